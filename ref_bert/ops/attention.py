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
"""
from __future__ import annotations

import math

from einops import rearrange

from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward
from .softmax import softmax_backward, softmax_forward


def split_heads(t, num_heads: int):
    """(B, T, h*d) -> (B, h, T, d)."""
    return rearrange(t, "b t (h d) -> b h t d", h=num_heads)


def merge_heads(t):
    """(B, h, T, d) -> (B, T, h*d)."""
    return rearrange(t, "b h t d -> b t (h d)")


def self_attention_forward(x, p, additive_mask, num_heads: int, probs_dropout_mask=None, trace=None):
    """``p`` maps "query.weight", "query.bias", "key.*", "value.*" to arrays.

    Returns ``(context (B, T, H), cache)``. ``trace(name, array)``, when given, sees query, key, value
    (B, T, H), probs (B, h, T, T, before dropout) and context (B, T, H).
    """
    q, q_cache = linear_forward(x, p["query.weight"], p["query.bias"])
    k, k_cache = linear_forward(x, p["key.weight"], p["key.bias"])
    v, v_cache = linear_forward(x, p["value.weight"], p["value.bias"])
    if trace is not None:
        trace("query", q)
        trace("key", k)
        trace("value", v)
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    scores = (qh @ kh.swapaxes(-1, -2)) * scale + additive_mask
    probs, softmax_cache = softmax_forward(scores)
    if trace is not None:
        trace("probs", probs)
    dropped, dropout_cache = dropout_forward(probs, probs_dropout_mask)
    context = merge_heads(dropped @ vh)
    if trace is not None:
        trace("context", context)
    cache = (q_cache, k_cache, v_cache, qh, kh, vh, scale, softmax_cache, dropped, dropout_cache, num_heads)
    return context, cache


def self_attention_backward(dcontext, cache, g):
    """Accumulate the q/k/v weight and bias gradients into ``g`` (same keys as ``p``); return dx."""
    q_cache, k_cache, v_cache, qh, kh, vh, scale, softmax_cache, dropped, dropout_cache, num_heads = cache
    dctx = split_heads(dcontext, num_heads)                       # (B, h, T, d)
    ddropped = dctx @ vh.swapaxes(-1, -2)                         # (B, h, T, T)
    dvh = dropped.swapaxes(-1, -2) @ dctx                         # (B, h, T, d)
    dprobs = dropout_backward(ddropped, dropout_cache)
    dscores = softmax_backward(dprobs, softmax_cache) * scale
    dqh = dscores @ kh
    dkh = dscores.swapaxes(-1, -2) @ qh
    dx = linear_backward(merge_heads(dqh), q_cache, g["query.weight"], g["query.bias"])
    dx += linear_backward(merge_heads(dkh), k_cache, g["key.weight"], g["key.bias"])
    dx += linear_backward(merge_heads(dvh), v_cache, g["value.weight"], g["value.bias"])
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
