"""Softmax over the last axis.

Forward:  p_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x))   (subtracting the max changes nothing
          mathematically and keeps exp from overflowing)
Backward: the Jacobian is dp_i/dx_k = p_i (delta_ik - p_k), so
          dx_k = sum_i dp_i p_i (delta_ik - p_k) = p_k (dp_k - sum_i dp_i p_i)
Shapes: x, p, dp, dx all (..., N).
"""
from __future__ import annotations

import backends


def softmax_forward(x):
    xp = backends.of(x).xp
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp, cache):
    p = cache
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))
