"""The optimisers' fast variants on CuPy: the fused kernels of :class:`backends.cupy_kernels.CupyKernels`
behind the signatures of the reference functions in ref_bert/optim (``Backend.fast``).

Each reference function is wrapped with :func:`backends.fast_path`; its key is the reference's
``"module.name"``, written out here as a string because backends/ never imports ref_bert
(tests/test_fused_kernels.py checks that the keys are the references' ``fast_key``). Each adapter
takes the reference's arguments, turns them into the kernel's (host floats, a 0-d array for the
per-step values that stay on the device) and makes the same arithmetic in one kernel:

* ``sum_of_squares``: sum(x^2) without the x^2 temporary.
* ``lamb_direction``: clipping, L2 decay, both moments and u in one elementwise kernel.
* ``lamb_apply``: w <- w - scale u - decay w in one elementwise kernel.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["optimizer_fast_table", "SUM_OF_SQUARES", "LAMB_DIRECTION", "LAMB_APPLY"]

SUM_OF_SQUARES = "ref_bert.optim.norms.sum_of_squares"
LAMB_DIRECTION = "ref_bert.optim.lamb.lamb_direction"
LAMB_APPLY = "ref_bert.optim.lamb.lamb_apply"


def optimizer_fast_table(kernels) -> dict[str, Callable]:
    """``{reference key: fused adapter}`` for a :class:`~backends.cupy_kernels.CupyKernels`."""

    def sum_of_squares(x):
        return kernels.sum_of_squares(x)

    def lamb_direction(w, g, m, v, *, clip, b1, b2, eps, bias1, bias2, wd_l2, wd_inside):
        # No clipping is a factor of 1; no bias correction divides by 1 (exact).
        clip = kernels.cp.asarray(1.0 if clip is None else clip, dtype=w.dtype)
        return kernels.lamb_direction(g, w, m, v, clip, b1, b2, 1.0 if bias1 is None else bias1,
                                      1.0 if bias2 is None else bias2, eps, wd_l2, wd_inside)

    def lamb_apply(w, u, *, scale, decay_outside):
        kernels.lamb_apply(w, u, kernels.cp.asarray(scale, dtype=w.dtype), decay_outside)

    return {SUM_OF_SQUARES: sum_of_squares, LAMB_DIRECTION: lamb_direction, LAMB_APPLY: lamb_apply}
