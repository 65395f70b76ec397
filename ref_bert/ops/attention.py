"""Multi-head scaled dot-product self-attention with an additive mask.

Shapes: B batch, T tokens, H hidden, h heads, d = H / h.
Forward (x: (B, T, H); Wq, Wk, Wv: (H, H); bq, bk, bv: (H,); additive_mask broadcastable to
(B, h, T, T), 0 where a query may attend a key and a large negative number where it may not):
    q = x Wq + bq,  k = x Wk + bk,  v = x Wv + bv                          (B, T, H)
    split heads: (B, T, h*d) -> (B, h, T, d)                                 (einops)
    scores = q k^T / sqrt(d) + additive_mask                                (B, h, T, T)
    probs  = softmax(scores) over keys;   probs' = dropout(probs)
    context = probs' v, merged back to (B, T, H)
The output projection, its dropout, the residual and LayerNorm belong to the encoder block.

Backward (dcontext: (B, T, H), split into heads the same way):
    dprobs' = dcontext v^T,      dv = probs'^T dcontext
    dprobs  = dprobs' * dropout_mask
    dscores = probs * (dprobs - sum_keys(dprobs * probs))        (softmax backward)
    The mask is a constant, so it receives no gradient; scale s = 1/sqrt(d):
    dq = s * dscores k,          dk = s * dscores^T q
    then the three linear backwards, whose dx contributions add up (x feeds q, k and v).

q, k and v come from one product with the weights side by side, x [Wq | Wk | Wv] + [bq | bk | bv]
(mathematically the three products; one wide matmul runs faster than three narrow ones). The
parameters stay three tensors, for LAMB's per-tensor trust ratio and for checkpoint names. Its
backward is one linear backward, giving d[Wq | Wk | Wv] and dx (the sum of the three contributions).
The middle, scale + mask + softmax + dropout, is ops.softmax.masked_softmax_forward (and backward).

Cached decoding (ref_bert/decoding.py) runs the same forward with ``past=(keys, values)``: the keys and
values of earlier positions, (B, h, L, d), to which the new positions' own are appended,
keys = [past keys ; k] (B, h, L + T, d), so the T new queries attend L + T keys. That forward is for
inference: its backward is not defined (the past keys would need a gradient of their own).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from einops import rearrange

import backends

from .linear import linear_backward, linear_forward
from .softmax import masked_softmax_backward, masked_softmax_forward


def split_heads(t, num_heads: int):
    """(B, T, h*d) -> (B, h, T, d)."""
    return rearrange(t, "b t (h d) -> b h t d", h=num_heads)


def merge_heads(t):
    """(B, h, T, d) -> (B, T, h*d)."""
    return rearrange(t, "b h t d -> b t (h d)")


def fused_qkv(p):
    """[Wq | Wk | Wv] (H, 3H) and [bq | bk | bv] (3H,): copies, so q, k, v come from one matmul."""
    xp = backends.of(p["query.weight"]).xp
    weight = xp.concatenate([p["query.weight"], p["key.weight"], p["value.weight"]], axis=1)
    bias = xp.concatenate([p["query.bias"], p["key.bias"], p["value.bias"]])
    return weight, bias


class AttentionCache(NamedTuple):
    """What the forward keeps. ``k``, ``v``: every key and value attended, (B, h, L + T, d) (L = 0 without
    a past), which cached decoding reads back; the rest is for the backward. ``x`` and ``p`` are the
    fused product's input and the parameters, not the (H, 3H) copy of the weights it used: the backward
    concatenates them again (the same array, so the same numbers), and a model's cache holds no weight
    copy per layer until then (bert-base: 7 MB a layer)."""

    x: object
    p: object
    q: object
    k: object
    v: object
    dropped: object
    softmax_cache: tuple
    num_heads: int
    past_length: int


def self_attention_forward(x, p, additive_mask, num_heads: int, probs_dropout_mask=None, trace=None, past=None):
    """``p`` maps "query.weight", "query.bias", "key.*", "value.*" to arrays.

    Returns ``(context (B, T, H), cache)``, the cache an :class:`AttentionCache`. ``past``: None, or the
    (keys, values) of earlier positions (module docstring). ``trace(name, array)``, when given, sees
    query, key, value (B, T, H), probs (B, h, T, L + T, before dropout) and context (B, T, H).
    """
    xp = backends.of(x).xp
    qkv, _ = linear_forward(x, *fused_qkv(p))                         # (B, T, 3H) = [q | k | v]
    q, k, v = xp.split(qkv, 3, axis=-1)
    if trace is not None:
        trace("query", q)
        trace("key", k)
        trace("value", v)
    qh, kh, vh = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    past_length = 0
    if past is not None:
        past_keys, past_values = past
        past_length = past_keys.shape[2]
        kh = xp.concatenate([past_keys, kh], axis=2)                  # (B, h, L + T, d)
        vh = xp.concatenate([past_values, vh], axis=2)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    (probs, dropped), softmax_cache = masked_softmax_forward(qh @ kh.swapaxes(-1, -2), scale, additive_mask,
                                                             probs_dropout_mask)
    if trace is not None:
        trace("probs", probs)
    context = merge_heads(dropped @ vh)
    if trace is not None:
        trace("context", context)
    return context, AttentionCache(x, p, qh, kh, vh, dropped, softmax_cache, num_heads, past_length)


def self_attention_backward(dcontext, cache, g):
    """Accumulate the q/k/v weight and bias gradients into ``g`` (same keys as ``p``); return dx."""
    x, p, qh, kh, vh, dropped, softmax_cache, num_heads, past_length = cache
    if past_length:
        raise ValueError("self_attention_backward: the forward attended cached keys (past=...), an inference-only "
                         "forward; run it without past to differentiate")
    xp = backends.of(dcontext).xp
    H = dcontext.shape[-1]
    dctx = split_heads(dcontext, num_heads)                           # (B, h, T, d)
    dvh = dropped.swapaxes(-1, -2) @ dctx
    dqk = masked_softmax_backward(dctx @ vh.swapaxes(-1, -2), softmax_cache)   # d(q k^T) = s * dscores
    dqh = dqk @ kh
    dkh = dqk.swapaxes(-1, -2) @ qh
    dqkv = xp.concatenate([merge_heads(dqh), merge_heads(dkh), merge_heads(dvh)], axis=-1)   # [dq | dk | dv]
    dweight = xp.zeros((H, 3 * H), dtype=dcontext.dtype)
    dbias = xp.zeros(3 * H, dtype=dcontext.dtype)
    dx = linear_backward(dqkv, (x, fused_qkv(p)[0]), dweight, dbias)
    for i, part in enumerate(("query", "key", "value")):
        g[f"{part}.weight"] += dweight[:, i * H:(i + 1) * H]
        g[f"{part}.bias"] += dbias[i * H:(i + 1) * H]
    return dx


def additive_mask_from(attention_mask, dtype, mask_value: float):
    """0/1 mask -> additive mask for the scores.

    attention_mask: (B, T) -- 1 for keys that may be attended (padding mask, same for every query), or
                    (B, T, T) -- entry [b, i, j] = 1 when query i may attend key j (UniLM masks).
    Returns an array broadcastable to (B, h, T, T): 0 where allowed, ``mask_value`` where not.
    """
    m = attention_mask.astype(dtype)
    if m.ndim == 2:
        m = m[:, None, None, :]
    else:
        m = m[:, None, :, :]
    return (1.0 - m) * mask_value
