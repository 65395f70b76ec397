"""Softmax over the last axis.

Forward:  p_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x))   (subtracting the max changes nothing
          mathematically and keeps exp from overflowing)
Backward: the Jacobian is dp_i/dx_k = p_i (delta_ik - p_k), so
          dx_k = sum_i dp_i p_i (delta_ik - p_k) = p_k (dp_k - sum_i dp_i p_i)
Shapes: x, p, dp, dx all (..., N).

Both directions work in one buffer: forward subtracts the max, exponentiates and normalises in place
(in ``out``, which may be ``x`` itself when the caller no longer needs x); backward builds dp * p,
sums it, and turns the same buffer into dx.
"""
from __future__ import annotations

import backends


def softmax_forward(x, out=None):
    """Return ``(p, cache)``; ``out`` (may be ``x``) receives p, else a new array does."""
    xp = backends.of(x).xp
    p = xp.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    xp.exp(p, out=p)
    p *= 1.0 / p.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp, cache):
    p = cache
    xp = backends.of(p).xp
    dx = dp * p
    xp.subtract(dp, dx.sum(axis=-1, keepdims=True), out=dx)
    dx *= p
    return dx
