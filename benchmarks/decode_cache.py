"""Decoding speed with and without the incremental key/value cache (not a test; prints a table).

    python benchmarks/decode_cache.py                       # target lengths 16, 64, 256
    python benchmarks/decode_cache.py --lengths 16 64 --backend cupy
    ref-bert bench --decode 16 64 256                       # the same, from the benchmark harness

Greedy decoding of a fixed number of tokens (min_length = max_length, so [SEP] never ends it early)
from a randomly initialised model. Without the cache every step re-runs the whole sequence (step cost
grows with the length, total cost with its square); with it a step runs two new positions against the
cached keys and values (step cost linear in the length, dominated by position-wise work here).
Both runs must produce the same tokens; the script checks it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ref_bert import Config, Model  # noqa: E402
from ref_bert.generate import generate  # noqa: E402


def measure(lengths, source_length: int = 32, batch: int = 1, hidden: int = 256, layers: int = 4,
            vocab: int = 30000, backend: str = "numpy", dtype: str = "float32", out=sys.stdout) -> list[dict]:
    """Greedy decoding of each target length with and without the cache; prints a table to ``out``
    and returns one dict per length (seconds and milliseconds per token for both)."""
    cfg = Config(vocab_size=vocab, embedding_size=128, hidden_size=hidden, num_hidden_layers=layers,
                 num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                 max_position_embeddings=512, type_vocab_size=6)
    model = Model(cfg, backend=backend, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    sources = [[int(t) for t in rng.integers(5, vocab, size=source_length)] for _ in range(batch)]
    print(f"model: H={cfg.hidden_size} E={cfg.embedding_size} L={cfg.num_hidden_layers} heads={cfg.num_attention_heads} "
          f"I={cfg.intermediate_size} V={cfg.vocab_size}; backend {backend}, {dtype}; batch {batch}, "
          f"source {source_length} tokens; greedy", file=out)
    generate(model, sources, max_length=4, min_length=4)                  # warm-up
    generate(model, sources, max_length=4, min_length=4, use_cache=False)
    print(f"{'target':>7} {'no cache (s)':>13} {'cache (s)':>10} {'speed-up':>9} {'ms/token no cache':>18} "
          f"{'ms/token cache':>15}", file=out)
    rows = []
    for length in lengths:
        times, outputs = {}, {}
        for use_cache in (False, True):
            model.backend.synchronize()
            start = time.perf_counter()
            outputs[use_cache] = generate(model, sources, max_length=length, min_length=length, use_cache=use_cache)
            model.backend.synchronize()
            times[use_cache] = time.perf_counter() - start
        if outputs[True].sequences != outputs[False].sequences:
            raise SystemExit(f"cached and uncached decoding disagree at target length {length}")
        print(f"{length:>7} {times[False]:>13.3f} {times[True]:>10.3f} {times[False] / times[True]:>8.1f}x "
              f"{1000 * times[False] / length:>18.2f} {1000 * times[True] / length:>15.2f}", file=out, flush=True)
        rows.append({"length": length, "seconds_no_cache": times[False], "seconds_cache": times[True],
                     "ms_per_token_no_cache": 1000 * times[False] / length,
                     "ms_per_token_cache": 1000 * times[True] / length})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    measure(args.lengths, args.source_length, args.batch, args.hidden, args.layers, args.vocab, args.backend,
            args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
