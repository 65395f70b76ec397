"""Benchmarks (harnesses, not tests): ``python -m benchmarks`` / ``ref-bert bench`` compares ref-bert's
training step and forward pass with Hugging Face transformers on PyTorch (:mod:`benchmarks.bench`);
:mod:`benchmarks.flops` counts the matmul FLOPs; :mod:`benchmarks.decode_cache` times cached decoding."""
