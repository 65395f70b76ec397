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

How it is computed: q, k and v come from one (H, 3H) matmul, x [Wq | Wk | Wv] + [bq | bk | bv],
instead of three (H, H) ones (OpenBLAS runs the wide product about 12% faster; the parameters stay
three tensors, for LAMB's per-tensor trust ratio and for checkpoint names, so the fused weight is a
copy made per call, H * 3H floats, about 1% of the matmul's time). The heads are strided views of that
(B, T, 3H) result, which the batched matmuls read directly (no copies). Backward writes dq, dk and dv
into one (B, T, 3H) buffer, so the projection's backward is again one matmul for dx and one for
d[Wq | Wk | Wv]. Scores are scaled and masked in place, and the softmax reuses their buffer. On CuPy,
scale + mask + softmax + dropout, and their backward, are fused kernels (``backend.fused``).
"""
from __future__ import annotations

import math

from einops import rearrange

import backends

from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward
from .softmax import softmax_backward, softmax_forward


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


def self_attention_forward(x, p, additive_mask, num_heads: int, probs_dropout_mask=None, trace=None):
    """``p`` maps "query.weight", "query.bias", "key.*", "value.*" to arrays.

    Returns ``(context (B, T, H), cache)``. ``trace(name, array)``, when given, sees query, key, value
    (B, T, H), probs (B, h, T, T, before dropout) and context (B, T, H).
    """
    H = x.shape[-1]
    qkv, qkv_cache = linear_forward(x, *fused_qkv(p))                 # (B, T, 3H) = [q | k | v]
    if trace is not None:
        trace("query", qkv[..., :H])
        trace("key", qkv[..., H:2 * H])
        trace("value", qkv[..., 2 * H:])
    qh, kh, vh = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=num_heads)  # views
    scale = 1.0 / math.sqrt(qh.shape[-1])
    scores = qh @ kh.swapaxes(-1, -2)                                 # (B, h, T, T)
    fused = backends.of(x).fused
    if fused is None:
        scores *= scale
        scores += additive_mask
        probs, softmax_cache = softmax_forward(scores, out=scores)
        dropped, dropout_cache = dropout_forward(probs, probs_dropout_mask)
    else:   # CuPy: scale, mask, softmax and dropout in a few kernels (backends/cupy_kernels.py)
        probs, dropped = fused.masked_softmax(scores, scale, additive_mask, probs_dropout_mask)
        softmax_cache, dropout_cache = probs, probs_dropout_mask
    if trace is not None:
        trace("probs", probs)
    context = merge_heads(dropped @ vh)
    if trace is not None:
        trace("context", context)
    cache = (qkv_cache, qh, kh, vh, scale, softmax_cache, dropped, dropout_cache, num_heads)
    return context, cache


def self_attention_backward(dcontext, cache, g):
    """Accumulate the q/k/v weight and bias gradients into ``g`` (same keys as ``p``); return dx."""
    qkv_cache, qh, kh, vh, scale, softmax_cache, dropped, dropout_cache, num_heads = cache
    xp = backends.of(dcontext).xp
    B, T, H = dcontext.shape
    dctx = split_heads(dcontext, num_heads)                           # (B, h, T, d)
    dqkv = xp.empty((B, T, 3 * H), dtype=dcontext.dtype)              # [dq | dk | dv]
    dqh, dkh, dvh = rearrange(dqkv, "b t (three h d) -> three b h t d", three=3, h=num_heads)
    ddropped = dctx @ vh.swapaxes(-1, -2)                             # (B, h, T, T)
    xp.matmul(dropped.swapaxes(-1, -2), dctx, out=dvh)
    fused = backends.of(dcontext).fused
    if fused is None:
        dprobs = dropout_backward(ddropped, dropout_cache)
        dscores = softmax_backward(dprobs, softmax_cache)
        dscores *= scale
    else:   # CuPy: dropout, softmax and scale backward in one pass (backends/cupy_kernels.py)
        dscores = fused.softmax_backward(ddropped, softmax_cache, scale, dropout_cache)
    xp.matmul(dscores, kh, out=dqh)
    xp.matmul(dscores.swapaxes(-1, -2), qh, out=dkh)
    dweight = xp.zeros((H, 3 * H), dtype=dcontext.dtype)
    dbias = xp.zeros(3 * H, dtype=dcontext.dtype)
    dx = linear_backward(dqkv, qkv_cache, dweight, dbias)
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
