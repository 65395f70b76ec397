"""Pointwise activations: exact GELU, tanh-approximated GELU ("gelu_new"), ReLU and tanh.

Names follow Hugging Face's ACT2FN: "gelu" is the exact erf form (BERT), "gelu_new" the tanh
approximation that ALBERT's TF code calls "gelu". They differ by up to about 4.7e-4 near |x| = 2.7.

gelu (exact):   y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
                dy/dx = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
gelu_new:       u = sqrt(2/pi) (x + 0.044715 x^3),  t = tanh(u),  y = 0.5 x (1 + t)
                dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
relu:           y = max(x, 0),      dy/dx = 1 where x > 0 else 0
tanh:           y = tanh(x),        dy/dx = 1 - y^2

How the two GELUs are computed (the formulas above, arranged for few passes over memory):
    gelu_new forward: u = x (s + s c x^2) with s = sqrt(2/pi), c = 0.044715, built in one buffer in
                      place; h = (1 + tanh(u)) / 2 in the same buffer; y = x h. The cache keeps x and h.
    gelu_new backward: with h = (1 + t) / 2 we have 1 - t^2 = (1 - t)(1 + t) = 4 h (1 - h), so
                      dy/dx = h + 0.5 x * 4 h (1 - h) * s (1 + 3 c x^2) = h (1 + x (1 - h) k),
                      k = 2 s (1 + 3 c x^2) = 2 du/dx.
    gelu forward:     cdf = (1 + erf(x / sqrt 2)) / 2 in one buffer; y = x cdf; the cache keeps x and cdf.
    gelu backward:    dy/dx = cdf + x phi(x), phi built in one buffer.
Each ``activation_forward(name, x)`` returns ``(y, cache)`` and ``activation_backward(dy, cache)``
returns dx (a new array; ``dy`` is not modified). Constants are Python floats, so a float32 input
stays float32. On CuPy each GELU direction is one fused kernel (``backend.fused``, in backends/,
tested against the code here).
"""
from __future__ import annotations

import math

import backends

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


def gelu_forward(x):
    bk = backends.of(x)
    if bk.fused is not None:
        y, cdf = bk.fused.gelu_forward(x)
        return y, ("gelu", x, cdf)
    cdf = x * _INV_SQRT_2
    bk.erf(cdf, out=cdf)
    cdf += 1.0
    cdf *= 0.5                                   # cdf = Phi(x) = (1 + erf(x / sqrt 2)) / 2
    return x * cdf, ("gelu", x, cdf)


def gelu_new_forward(x):
    bk = backends.of(x)
    if bk.fused is not None:
        y, h = bk.fused.gelu_new_forward(x)
        return y, ("gelu_new", x, h)
    h = x * x
    h *= _SQRT_2_OVER_PI * _GELU_CUBIC
    h += _SQRT_2_OVER_PI
    h *= x                                       # u = sqrt(2/pi) (x + 0.044715 x^3)
    bk.xp.tanh(h, out=h)                         # t = tanh(u)
    h += 1.0
    h *= 0.5                                     # h = (1 + t) / 2
    return x * h, ("gelu_new", x, h)


def relu_forward(x):
    xp = backends.of(x).xp
    return xp.maximum(x, 0), ("relu", x, None)


def tanh_forward(x):
    xp = backends.of(x).xp
    y = xp.tanh(x)
    return y, ("tanh", None, y)


_FORWARD = {"gelu": gelu_forward, "gelu_new": gelu_new_forward, "relu": relu_forward, "tanh": tanh_forward}


def activation_forward(name: str, x):
    """Apply the activation called ``name``; returns ``(y, cache)``."""
    try:
        return _FORWARD[name](x)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_FORWARD)}") from None


def activation_backward(dy, cache):
    """dx = dy * f'(x), with f' from the module docstring."""
    name, x, aux = cache
    bk = backends.of(x if x is not None else aux)
    if name == "gelu":
        if bk.fused is not None:
            return bk.fused.gelu_backward(dy, x, aux)
        cdf = aux
        dx = x * x
        dx *= -0.5
        bk.xp.exp(dx, out=dx)
        dx *= x
        dx *= _INV_SQRT_2PI                      # x phi(x)
        dx += cdf
        dx *= dy
        return dx
    if name == "gelu_new":
        if bk.fused is not None:
            return bk.fused.gelu_new_backward(dy, x, aux)
        h = aux
        dx = x * x
        dx *= 6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI
        dx += 2.0 * _SQRT_2_OVER_PI              # k = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        dx *= x
        dx *= 1.0 - h                            # x (1 - h) k
        dx += 1.0
        dx *= h                                  # dy/dx = h (1 + x (1 - h) k)
        dx *= dy
        return dx
    if name == "relu":
        return dy * (x > 0)
    if name == "tanh":
        return dy * (1.0 - aux * aux)
    raise ValueError(f"unknown activation {name!r} in cache")
