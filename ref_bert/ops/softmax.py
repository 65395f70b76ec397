"""Softmax over the last axis, and the attention's masked softmax with dropout built from it.

Forward:  p_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x))   (subtracting the max changes nothing
          mathematically and keeps exp from overflowing)
Backward: the Jacobian is dp_i/dx_k = p_i (delta_ik - p_k), so
          dx_k = sum_i dp_i p_i (delta_ik - p_k) = p_k (dp_k - sum_i dp_i p_i)
Shapes: x, p, dp, dx all (..., N).

Log-softmax (cross-entropy's and beam search's): log p_i = (x_i - max(x)) - log sum_j exp(x_j - max(x)),
the same shift, so no exp overflows and the largest term of the sum is exactly 1.

Masked softmax (the middle of self-attention, ops.attention), for raw scores S = q k^T (B, h, T, T),
a scale s = 1/sqrt(d), an additive mask M (0 where a query may attend a key, a large negative number
where it may not) and a dropout multiplier m:
    probs   = softmax(s S + M),      dropped = probs * m                       (ops.dropout)
    dprobs  = ddropped * m,          dS = s * softmax_backward(dprobs)
The mask is a constant and receives no gradient.
"""
from __future__ import annotations

import backends

from .dropout import dropout_backward, dropout_forward


def softmax_forward(x):
    """Return ``(p, cache)``."""
    xp = backends.of(x).xp
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p, p
softmax_forward = backends.fast_path(softmax_forward)   # a backend may run its fast variant instead


def log_softmax(x):
    """log(softmax(x)) over the last axis, computed stably (module docstring); forward only: its users
    differentiate through it in closed form (ops.cross_entropy)."""
    xp = backends.of(x).xp
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_backward(dp, cache):
    p = cache
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))
softmax_backward = backends.fast_path(softmax_backward)   # a backend may run its fast variant instead


def masked_softmax_forward(scores, scale, additive_mask, dropout_mask=None):
    """Return ``((probs, dropped), cache)``: probs before dropout, dropped after (``dropout_mask=None``:
    no dropout, dropped is probs).

    ``scores`` (raw q k^T) may be overwritten: fast variants reuse its buffer for probs, so pass an array
    that is not needed afterwards.
    """
    probs, softmax_cache = softmax_forward(scores * scale + additive_mask)
    dropped, dropout_cache = dropout_forward(probs, dropout_mask)
    return (probs, dropped), (softmax_cache, dropout_cache, scale)
masked_softmax_forward = backends.fast_path(masked_softmax_forward)   # a backend may run its fast variant instead


def masked_softmax_backward(ddropped, cache):
    """Gradient with respect to the raw scores (before the scale)."""
    softmax_cache, dropout_cache, scale = cache
    dprobs = dropout_backward(ddropped, dropout_cache)
    return scale * softmax_backward(dprobs, softmax_cache)
masked_softmax_backward = backends.fast_path(masked_softmax_backward)   # a backend may run its fast variant instead
