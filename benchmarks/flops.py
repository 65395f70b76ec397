"""Exact matrix-multiply FLOP counts of a training step, from the config alone.

What is counted: every matrix multiply, as 2 * m * n * k (one multiply and one add per term). The
backward pass of every matmul is two matmuls of the same size, one for each operand's gradient
(a weight's gradient and its input's, or both activations' for q k^T and probs v), so a training
step is exactly 3 x the forward matmuls: forward + 2 x forward.

    B batch, T tokens, N = B T, M rows that reach the MLM head, V vocab, E embedding, H hidden,
    I intermediate, h heads, d = H / h, blocks = num_hidden_layers x inner_group_num
    embedding projection (E != H)   2 N E H
    per block: q, k, v              3 x 2 N H H
               scores q k^T         2 B h T T d      (= 2 N T H)
               context probs v      2 B h T T d
               attention output     2 N H H
               FFN in and out       2 x 2 N H I
    pooler                          2 B H H
    SOP/NSP classifier              2 B H 2
    MLM dense                       2 M H E
    MLM decoder (tied)              2 M E V

ref-bert's loss runs the MLM head on the labelled positions only (M = number of labels);
Hugging Face's *ForPreTraining computes logits at every position (M = N), which is extra work that
``full_mlm=True`` counts. Not counted: elementwise work (bias adds, GELU, softmax, LayerNorm,
dropout, residuals, the optimiser), embedding lookups and scatter-adds, the one backward matmul
that one could skip (nothing: the embedding projection's input gradient is needed by the
embedding LayerNorm). These are the model FLOPs, the same whatever the implementation does.
"""
from __future__ import annotations


def _mm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def forward_matmul_flops(config, batch: int, seq: int, mlm_rows: int) -> dict:
    """Forward matmul FLOPs by component (Python ints) for ``batch`` sequences of ``seq`` tokens
    with ``mlm_rows`` rows through the MLM head (labelled positions, or ``batch * seq``)."""
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(mlm_rows, int) or not 0 <= mlm_rows <= batch * seq:
        raise ValueError(f"mlm_rows must be an integer in [0, batch*seq={batch * seq}], got {mlm_rows!r}")
    B, T, N = batch, seq, batch * seq
    V, E, H, I = config.vocab_size, config.embedding_size, config.hidden_size, config.intermediate_size
    h, d = config.num_attention_heads, config.head_dim
    blocks = config.num_hidden_layers * config.inner_group_num
    flops = {
        "embedding projection": _mm(N, H, E) if config.has_projection else 0,
        "attention q, k, v": blocks * 3 * _mm(N, H, H),
        "attention scores": blocks * B * h * _mm(T, T, d),
        "attention context": blocks * B * h * _mm(T, d, T),
        "attention output": blocks * _mm(N, H, H),
        "ffn": blocks * (_mm(N, I, H) + _mm(N, H, I)),
        "pooler": _mm(B, H, H),
        "sop classifier": _mm(B, 2, H),
        "mlm dense": _mm(mlm_rows, E, H),
        "mlm decoder": _mm(mlm_rows, V, E),
    }
    return flops


def step_flops(config, batch: int, seq: int, mlm_rows: int) -> dict:
    """``{"forward": F, "train_step": 3 F, "by_component": {...}}`` (see the module docstring)."""
    parts = forward_matmul_flops(config, batch, seq, mlm_rows)
    forward = sum(parts.values())
    return {"forward": forward, "train_step": 3 * forward, "by_component": parts}
