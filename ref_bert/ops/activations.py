"""Pointwise activations: exact GELU, tanh-approximated GELU ("gelu_new"), ReLU and tanh.

Names follow Hugging Face's ACT2FN: "gelu" is the exact erf form (BERT), "gelu_new" the tanh
approximation that ALBERT's TF code calls "gelu". They differ by up to about 4.7e-4 near |x| = 2.7.

gelu (exact):   y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
                dy/dx = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
gelu_new:       u = sqrt(2/pi) (x + 0.044715 x^3),  t = tanh(u),  y = 0.5 x (1 + t)
                dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
relu:           y = max(x, 0),      dy/dx = 1 where x > 0 else 0
tanh:           y = tanh(x),        dy/dx = 1 - y^2

``activation_forward(name, x)`` returns ``(y, cache)`` and ``activation_backward(dy, cache)`` returns
dx (a new array; ``dy`` is not modified). The cache starts with the activation's name, which picks the
backward. Constants are Python floats, so a float32 input stays float32.
"""
from __future__ import annotations

import math

import backends

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


def gelu_forward(x):
    cdf = 0.5 * (1.0 + backends.of(x).erf(x * _INV_SQRT_2))      # Phi(x)
    return x * cdf, ("gelu", x, cdf)
gelu_forward = backends.fast_path(gelu_forward)   # a backend may run its fast variant instead


def gelu_backward(dy, cache):
    _, x, cdf = cache
    pdf = backends.of(x).xp.exp(-0.5 * x * x) * _INV_SQRT_2PI    # phi(x)
    return dy * (cdf + x * pdf)
gelu_backward = backends.fast_path(gelu_backward)   # a backend may run its fast variant instead


def gelu_new_forward(x):
    xp = backends.of(x).xp
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x ** 3))
    return 0.5 * x * (1.0 + t), ("gelu_new", x, t)
gelu_new_forward = backends.fast_path(gelu_new_forward)   # a backend may run its fast variant instead


def gelu_new_backward(dy, cache):
    _, x, t = cache
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
gelu_new_backward = backends.fast_path(gelu_new_backward)   # a backend may run its fast variant instead


def relu_forward(x):
    xp = backends.of(x).xp
    return xp.maximum(x, 0), ("relu", x)


def relu_backward(dy, cache):
    _, x = cache
    return dy * (x > 0)


def tanh_forward(x):
    xp = backends.of(x).xp
    y = xp.tanh(x)
    return y, ("tanh", y)


def tanh_backward(dy, cache):
    _, y = cache
    return dy * (1.0 - y * y)


_FORWARD = {"gelu": gelu_forward, "gelu_new": gelu_new_forward, "relu": relu_forward, "tanh": tanh_forward}
_BACKWARD = {"gelu": gelu_backward, "gelu_new": gelu_new_backward, "relu": relu_backward, "tanh": tanh_backward}
# The one list of activation names: Config validates hidden_act against it, the HF adapter too.
ACTIVATIONS = tuple(_FORWARD)


def activation_forward(name: str, x):
    """Apply the activation called ``name``; returns ``(y, cache)``."""
    try:
        forward = _FORWARD[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_FORWARD)}") from None
    return forward(x)


def activation_backward(dy, cache):
    """dx = dy * f'(x), with f' from the module docstring; the cache's first entry names f."""
    name = cache[0]
    try:
        backward = _BACKWARD[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r} in cache; expected one of {sorted(_BACKWARD)}") from None
    return backward(dy, cache)
