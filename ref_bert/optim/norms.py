"""Norms for the optimisers: sums of squares, the global gradient norm, and global-norm clipping.

Every value that depends on array values is a 0-d array on the arrays' backend and is never read on
the host, so a step on CuPy queues kernels and returns without synchronising.
"""
from __future__ import annotations

import functools
import operator

import backends

__all__ = ["sum_of_squares", "total", "global_grad_norm", "clip_factor"]


def sum_of_squares(x):
    """sum(x^2) over every element, a 0-d array (never ``numpy.linalg.norm``, which returns a host float).
    A backend may replace it (on CuPy: one fused reduction, without the x^2 temporary)."""
    return backends.of(x).xp.sum(x * x)
sum_of_squares = backends.fast_path(sum_of_squares)   # a backend may run its fast variant instead


def total(values):
    """values[0] + values[1] + ..., in order (unlike ``sum``, no ``0 +`` first: one kernel fewer on CuPy)."""
    return functools.reduce(operator.add, values)


def global_grad_norm(grads, xp=None):
    """||G|| = sqrt(sum over tensors of sum(g^2)), a 0-d array on the gradients' backend.

    ``grads``: an iterable of arrays (e.g. ``grads.values()``). Not read on the host. The sums of
    squares are taken per piece (``Backend.pieces``) on the backend's threads and added in a fixed order.
    """
    grads = list(grads)
    if not grads:
        raise ValueError("global_grad_norm needs at least one gradient, got none")
    backend = backends.of(grads[0])
    if xp is None:
        xp = backend.xp
    pieces = [piece for g in grads for (piece,) in backend.pieces(g)]
    return xp.sqrt(total(backend.parallel_map(sum_of_squares, pieces)))


def clip_factor(norm, max_norm: float, xp):
    """TensorFlow's ``clip_by_global_norm`` factor: max_norm / max(norm, max_norm), a 0-d array.

    1 when ``norm <= max_norm`` (the gradients are left alone), ``max_norm / norm`` above it.
    A NaN or inf norm gives NaN / 0, as in TensorFlow (the step then poisons the weights visibly).
    apex computes ``g / (norm / max_norm)``: the same number up to one rounding.
    """
    return max_norm / xp.maximum(norm, max_norm)
