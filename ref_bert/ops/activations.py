"""Pointwise activations: exact GELU, tanh-approximated GELU ("gelu_new"), ReLU and tanh.

Names follow Hugging Face's ACT2FN: "gelu" is the exact erf form (BERT), "gelu_new" the tanh
approximation that ALBERT's TF code calls "gelu". They differ by up to about 4.7e-4 near |x| = 2.7.

gelu (exact):   y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
                dy/dx = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
gelu_new:       u = sqrt(2/pi) (x + 0.044715 x^3),  t = tanh(u),  y = 0.5 x (1 + t)
                dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
relu:           y = max(x, 0),      dy/dx = 1 where x > 0 else 0
tanh:           y = tanh(x),        dy/dx = 1 - y^2

Each ``activation_forward(name, x)`` returns ``(y, cache)`` and ``activation_backward(dy, cache)``
returns dx. Constants are Python floats, so a float32 input stays float32.
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
    cdf = 0.5 * (1.0 + bk.erf(x * _INV_SQRT_2))
    return x * cdf, ("gelu", x, cdf)


def gelu_new_forward(x):
    xp = backends.of(x).xp
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
    return 0.5 * x * (1.0 + t), ("gelu_new", x, t)


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
    if name == "gelu":
        xp = backends.of(x).xp
        pdf = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return dy * (aux + x * pdf)
    if name == "gelu_new":
        t = aux
        du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
    if name == "relu":
        return dy * (x > 0)
    if name == "tanh":
        return dy * (1.0 - aux * aux)
    raise ValueError(f"unknown activation {name!r} in cache")
