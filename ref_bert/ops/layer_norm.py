"""Layer normalisation over the last axis (biased variance, epsilon inside the square root).

Forward, for one row x of length C:
    mean = sum(x) / C
    var  = sum((x - mean)^2) / C                  (biased, as TF and PyTorch)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    out  = xhat * w + b

Backward, with g = dout * w (the gradient reaching xhat):
    dw += sum over rows of dout * xhat,    db += sum over rows of dout
    xhat depends on x through the centring and through rstd. Differentiating
    xhat_i = (x_i - mean) rstd, with d mean / d x_k = 1/C and d rstd / d x_k = -rstd^3 (x_k - mean) / C:
        dx_k = rstd * ( g_k - mean(g) - xhat_k * mean(g * xhat) )
Shapes: x, out (..., C); w, b (C,); the cache keeps xhat (..., C) and rstd (..., 1).

How it is computed: forward makes one buffer for xhat (centred, then scaled in place) and one for the
output (first used for the squares of the variance). Backward needs two row reductions of g = dout * w;
both are matrix-vector products, mean(g) = (dout @ w) / C and mean(g * xhat) = ((dout * xhat) @ w) / C,
and dout * xhat is the product dw needs anyway. On CuPy forward and backward are fused kernels
(``backend.fused``, in backends/, tested against the code here).
"""
from __future__ import annotations

import backends


def layer_norm_forward(x, weight, bias, eps):
    """Return ``(out, cache)``; ``eps`` comes from the config (1e-12 in ALBERT and BERT)."""
    bk = backends.of(x)
    if bk.fused is not None:
        out, xhat, rstd = bk.fused.layer_norm_forward(x, weight, bias, eps)
        return out, (xhat, rstd, weight)
    xp = bk.xp
    xhat = x - x.mean(axis=-1, keepdims=True)               # centred
    out = xp.multiply(xhat, xhat)
    var = out.mean(axis=-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    xhat *= rstd
    xp.multiply(xhat, weight, out=out)
    out += bias
    return out, (xhat, rstd, weight)


def layer_norm_backward(dout, cache, dweight=None, dbias=None):
    """Accumulate into ``dweight``/``dbias`` (when given) and return dx (formula in the module doc)."""
    xhat, rstd, weight = cache
    bk = backends.of(xhat)
    if bk.fused is not None:
        return bk.fused.layer_norm_backward(dout, xhat, rstd, weight, dweight, dbias)
    xp = bk.xp
    C = xhat.shape[-1]
    dout_xhat = dout * xhat
    if dweight is not None:
        dweight += dout_xhat.reshape(-1, C).sum(axis=0)
    if dbias is not None:
        dbias += dout.reshape(-1, C).sum(axis=0)
    g_mean = (dout @ weight)[..., None] / C                 # mean(g), g = dout * w
    gx_mean = (dout_xhat @ weight)[..., None] / C           # mean(g * xhat)
    dx = dout * weight                                      # g
    dx -= g_mean
    xp.multiply(xhat, gx_mean, out=dout_xhat)
    dx -= dout_xhat
    dx *= rstd
    return dx
