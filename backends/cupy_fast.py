"""The CuPy backend's fast variants: the reference ops' signatures over the fused kernels of
:class:`backends.cupy_kernels.CupyKernels`.

:func:`fast_table` builds ``Backend.fast`` for the CuPy backend from a kernels object: each adapter
takes the reference op's arguments, calls one kernel method (which does the op's arithmetic in one
elementwise kernel, or a few reductions and one elementwise kernel) and returns what the reference
returns. Ops with no kernel of their own (the plain softmax, used by cached decoding) take the in-place
variants of :mod:`backends.numpy_fast`, which are written against the inputs' array module.

Caches: a forward adapter's cache is read only by the backward adapter of the same op (the table holds
both of every pair); they are the tuples the kernels' backward methods want.

The kernels object can be anything with CupyKernels' methods: tests/test_fused_kernels.py builds one
over a NumPy interpreter of the kernel source and runs the model through this table on the CPU.
"""
from __future__ import annotations

from typing import Callable

from . import numpy_fast

_OPS = "ref_bert.ops"


def fast_table(kernels, backend) -> dict[str, Callable]:
    """Reference op key -> adapter over ``kernels`` (a :class:`CupyKernels`); the plain softmax, which
    has no kernel, is :mod:`backends.numpy_fast`'s in-place form on ``backend``'s arrays."""
    in_place = numpy_fast.FastOps(backend)

    def gelu_forward(x):
        y, cdf = kernels.gelu_forward(x)
        return y, ("gelu", x, cdf)

    def gelu_backward(dy, cache):
        _, x, cdf = cache
        return kernels.gelu_backward(dy, x, cdf)

    def gelu_new_forward(x):
        y, h = kernels.gelu_new_forward(x)
        return y, ("gelu_new", x, h)

    def gelu_new_backward(dy, cache):
        _, x, h = cache
        return kernels.gelu_new_backward(dy, x, h)

    def layer_norm_forward(x, weight, bias, eps):
        out, xhat, rstd = kernels.layer_norm_forward(x, weight, bias, eps)
        return out, (xhat, rstd, weight)

    def layer_norm_backward(dout, cache, dweight=None, dbias=None):
        xhat, rstd, weight = cache
        return kernels.layer_norm_backward(dout, xhat, rstd, weight, dweight, dbias)

    def masked_softmax_forward(scores, scale, additive_mask, dropout_mask=None):
        # scale, mask, softmax and dropout in a few kernels, in the scores' buffer
        probs, dropped = kernels.masked_softmax(scores, scale, additive_mask, dropout_mask)
        return (probs, dropped), (probs, dropout_mask, scale)

    def masked_softmax_backward(ddropped, cache):
        # dropout, softmax and scale backward in one reduction and one elementwise kernel
        probs, dropout_mask, scale = cache
        return kernels.softmax_backward(ddropped, probs, scale, dropout_mask)

    return {
        f"{_OPS}.activations.gelu_forward": gelu_forward,
        f"{_OPS}.activations.gelu_backward": gelu_backward,
        f"{_OPS}.activations.gelu_new_forward": gelu_new_forward,
        f"{_OPS}.activations.gelu_new_backward": gelu_new_backward,
        f"{_OPS}.layer_norm.layer_norm_forward": layer_norm_forward,
        f"{_OPS}.layer_norm.layer_norm_backward": layer_norm_backward,
        f"{_OPS}.softmax.softmax_forward": in_place.softmax_forward,
        f"{_OPS}.softmax.softmax_backward": in_place.softmax_backward,
        f"{_OPS}.softmax.masked_softmax_forward": masked_softmax_forward,
        f"{_OPS}.softmax.masked_softmax_backward": masked_softmax_backward,
    }


__all__ = ["fast_table"]
