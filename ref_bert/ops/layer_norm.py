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
"""
from __future__ import annotations

import backends


def layer_norm_forward(x, weight, bias, eps):
    """Return ``(out, cache)``; ``eps`` comes from the config (1e-12 in ALBERT and BERT)."""
    xp = backends.of(x).xp
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean) * rstd
    out = xhat * weight + bias
    return out, (xhat, rstd, weight)
layer_norm_forward = backends.fast_path(layer_norm_forward)   # a backend may run its fast variant instead


def layer_norm_backward(dout, cache, dweight=None, dbias=None):
    """Accumulate into ``dweight``/``dbias`` (when given) and return dx (formula in the module doc)."""
    xhat, rstd, weight = cache
    C = xhat.shape[-1]
    if dweight is not None:
        dweight += (dout * xhat).reshape(-1, C).sum(axis=0)
    if dbias is not None:
        dbias += dout.reshape(-1, C).sum(axis=0)
    g = dout * weight
    return rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
layer_norm_backward = backends.fast_path(layer_norm_backward)   # a backend may run its fast variant instead
