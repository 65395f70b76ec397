"""Inverted dropout.

Forward:  out = x * m, where m = 1/keep_prob with probability keep_prob and 0 otherwise, so that
          E[out] = x and nothing needs rescaling at inference time.
Backward: dx = dout * m (the same mask).

The mask is an input, not drawn here: it comes from the backend's random-number policy (host
``numpy.random.Generator``, then transferred), which is what makes NumPy and CuPy agree and what
lets a gradient check freeze the mask while differencing. ``mask=None`` means no dropout.
"""
from __future__ import annotations


def dropout_forward(x, mask):
    if mask is None:
        return x, None
    return x * mask, mask


def dropout_backward(dout, cache):
    mask = cache
    return dout if mask is None else dout * mask
