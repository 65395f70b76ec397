"""Incremental (cached) forward through the encoder, for UniLM's left-to-right decoding.

In the seq2seq mask a committed position (a source token, or a target token already decoded) only
attends positions at or before it, so its hidden state in every block never changes once computed.
A decoding step therefore only has to run the *new* positions through the encoder, with each block's
attention reading the keys and values of the earlier positions from a cache:

    for every executed block (layer i, inner block m of Config.block_schedule()):
        q, k, v = x_new Wq + bq, x_new Wk + bk, x_new Wv + bv          new positions only (B, n, H)
        keys    = [cached keys of positions 0..L-1 ; k]                 (B, h, L + n, d)
        values  = [cached values                  ; v]
        context = softmax(q keys^T / sqrt(d) + mask) values              (B, h, n, d)
        x_new   = post-LN attention output, then the FFN sublayer (position-wise)
        append k, v of the first ``commit`` new positions to the cache

The cache is per executed *block*, not per parameter set: ALBERT's shared blocks see different inputs
at every layer, so each of the L * K executions has its own keys and values. A step costs
O(n (L + n)) attention work plus O(n) for everything position-wise: linear in the current length.

The [MASK] slot being predicted is always the last new position and is never committed: the next step
replaces it by the predicted token (same position and segment ids), computes that token's keys and
values, and appends a fresh [MASK]. Dropout is off (decoding is inference).

The math is the encoder's own: encoder.attention_sublayer_forward with the cached keys and values as
its ``past`` (ops.attention appends the new positions' own), and encoder.ffn_sublayer_forward.
"""
from __future__ import annotations

from .encoder import attention_sublayer_forward, ffn_sublayer_forward
from .ops import additive_mask_from, embeddings_forward


def _no_dropout(shape, prob):
    return None


class KVCache:
    """Keys and values of the committed positions, one pair of buffers per executed block.

    keys[b], values[b]: (N, h, capacity, d), of which the first ``length`` positions are filled.
    """

    def __init__(self, config, batch_size: int, capacity: int, xp, dtype):
        h, d = config.num_attention_heads, config.head_dim
        num_blocks = config.num_hidden_layers * config.inner_group_num
        self.capacity = capacity
        self.length = 0
        self.keys = [xp.zeros((batch_size, h, capacity, d), dtype=dtype) for _ in range(num_blocks)]
        self.values = [xp.zeros((batch_size, h, capacity, d), dtype=dtype) for _ in range(num_blocks)]

    def append(self, block: int, new_keys, new_values) -> None:
        """Write (N, h, n, d) keys/values at [length, length + n) of ``block`` (``length`` moves in
        :meth:`advance`, once every block has been written)."""
        n = new_keys.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} + {n} positions exceed its capacity {self.capacity}")
        self.keys[block][:, :, self.length:self.length + n] = new_keys
        self.values[block][:, :, self.length:self.length + n] = new_values

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index) -> None:
        """Rows of the batch follow ``index`` (N,) (beam search keeps the surviving beams)."""
        L = self.length
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[:, :, :L] = buf[index, :, :L]


def incremental_forward(model, cache: KVCache, input_ids, token_type_ids, position_ids, attention_mask,
                        commit: int):
    """Run n new positions through the model, reading and extending ``cache``.

    input_ids, token_type_ids, position_ids: (N, n) integer arrays on the model's backend;
    attention_mask: (N, n, cache.length + n) 0/1, entry [b, i, j] = 1 when new query i may attend key j
    (the cached keys first, then the new ones). The keys and values of the first ``commit`` new
    positions are appended to the cache (the [MASK] slot, last, is not).
    Returns the last hidden states of the new positions, (N, n, H).
    """
    cfg, params = model.config, model.params
    n = input_ids.shape[1]
    L = cache.length
    if tuple(attention_mask.shape) != (input_ids.shape[0], n, L + n):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"{(input_ids.shape[0], n, L + n)} (new queries x cached + new keys)")
    if not 0 <= commit <= n:
        raise ValueError(f"commit={commit} is invalid: expected an integer in [0, {n}]")
    x, _ = embeddings_forward(params.prefixed("embeddings."), input_ids, token_type_ids, position_ids,
                              cfg.layer_norm_eps, None, project=cfg.has_projection)
    additive_mask = additive_mask_from(attention_mask, model.dtype, cfg.attention_mask_value)
    block = 0
    for blocks in cfg.block_schedule():
        for a, f in blocks:
            past = (cache.keys[block][:, :, :L], cache.values[block][:, :, :L])
            x, (attention, *_) = attention_sublayer_forward(x, params.prefixed(f"encoder.attention.{a}."),
                                                            additive_mask, cfg, _no_dropout, past=past)
            x, _ = ffn_sublayer_forward(x, params.prefixed(f"encoder.ffn.{f}."), cfg, _no_dropout)
            if commit:   # the new positions' keys and values follow the L cached ones
                cache.append(block, attention.k[:, :, L:L + commit], attention.v[:, :, L:L + commit])
            block += 1
    cache.advance(commit)
    return x


__all__ = ["KVCache", "incremental_forward"]
