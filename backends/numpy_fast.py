"""Fast variants of the reference ops in ref_bert/ops: the same formulas, arranged for few passes over memory.

Each function here has the signature and the results (up to rounding) of the reference op it stands in
for, and is registered under that op's key in :func:`fast_table` (``"module.name"`` of the reference, as
:func:`backends.fast_path` looks it up). The NumPy backend runs these by default; ``REF_BERT_FAST=0``
(or ``REF_BERT_FUSED=0``) runs the references instead. tests/test_fast_variants.py checks every one
against its reference, forward and backward.

What changes against the reference is only where results are written: a temporary is reused in place
(``*=``, ``out=``) instead of every expression making a new array, and two row reductions of LayerNorm's
backward become matrix-vector products. On a CPU a large elementwise expression is limited by memory
bandwidth, not arithmetic, so fewer passes are faster, and fewer temporaries keep the peak memory down.

A fast forward's cache is read only by the fast backward registered with it (the table always holds
both of a pair), so a cache may hold what suits the fast backward: the GELUs keep h = (1 + tanh(u)) / 2
or Phi(x) next to x, the same tuples the CuPy kernels use.

The variants are methods of :class:`FastOps`, made for one backend: they use its array module and
its erf, so the CuPy backend uses them too where it has no fused kernel of its own (the plain
softmax). This module is part of the bottom layer: it imports nothing from ref_bert, and nothing
from the backends package either (the backend is handed in).
"""
from __future__ import annotations

import math
from typing import Callable

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715

_OPS = "ref_bert.ops"


class FastOps:
    """The fast variants for one backend (``backend.xp``, ``backend.erf``)."""

    def __init__(self, backend):
        self.xp = backend.xp
        self.erf = backend.erf

    # --- activations (ref_bert/ops/activations.py) ------------------------------------------------------------
    def gelu_forward(self, x):
        """cdf = (1 + erf(x / sqrt 2)) / 2 built in one buffer; y = x cdf. The cache keeps x and cdf."""
        cdf = x * _INV_SQRT_2
        self.erf(cdf, out=cdf)
        cdf += 1.0
        cdf *= 0.5                                   # cdf = Phi(x) = (1 + erf(x / sqrt 2)) / 2
        return x * cdf, ("gelu", x, cdf)

    def gelu_backward(self, dy, cache):
        """dy/dx = cdf + x phi(x), with phi built in one buffer."""
        _, x, cdf = cache
        xp = self.xp
        dx = x * x
        dx *= -0.5
        xp.exp(dx, out=dx)
        dx *= x
        dx *= _INV_SQRT_2PI                          # x phi(x)
        dx += cdf
        dx *= dy
        return dx

    def gelu_new_forward(self, x):
        """u = x (s + s c x^2) with s = sqrt(2/pi), c = 0.044715, built in one buffer in place;
        h = (1 + tanh(u)) / 2 in the same buffer; y = x h. The cache keeps x and h."""
        xp = self.xp
        h = x * x
        h *= _SQRT_2_OVER_PI * _GELU_CUBIC
        h += _SQRT_2_OVER_PI
        h *= x                                       # u = sqrt(2/pi) (x + 0.044715 x^3)
        xp.tanh(h, out=h)                            # t = tanh(u)
        h += 1.0
        h *= 0.5                                     # h = (1 + t) / 2
        return x * h, ("gelu_new", x, h)

    def gelu_new_backward(self, dy, cache):
        """With h = (1 + t) / 2 we have 1 - t^2 = (1 - t)(1 + t) = 4 h (1 - h), so
        dy/dx = h + 0.5 x * 4 h (1 - h) * s (1 + 3 c x^2) = h (1 + x (1 - h) k),  k = 2 s (1 + 3 c x^2)."""
        _, x, h = cache
        dx = x * x
        dx *= 6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI
        dx += 2.0 * _SQRT_2_OVER_PI                  # k = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        dx *= x
        dx *= 1.0 - h                                # x (1 - h) k
        dx += 1.0
        dx *= h                                      # dy/dx = h (1 + x (1 - h) k)
        dx *= dy
        return dx

    # --- layer norm (ref_bert/ops/layer_norm.py) ----------------------------------------------------------------
    def layer_norm_forward(self, x, weight, bias, eps):
        """One buffer for xhat (centred, then scaled in place) and one for the output (first used for the
        squares of the variance)."""
        xp = self.xp
        xhat = x - x.mean(axis=-1, keepdims=True)               # centred
        out = xp.multiply(xhat, xhat)
        var = out.mean(axis=-1, keepdims=True)
        rstd = 1.0 / (var + eps) ** 0.5
        xhat *= rstd
        xp.multiply(xhat, weight, out=out)
        out += bias
        return out, (xhat, rstd, weight)

    def layer_norm_backward(self, dout, cache, dweight=None, dbias=None):
        """The two row reductions of g = dout * w are matrix-vector products, mean(g) = (dout @ w) / C and
        mean(g * xhat) = ((dout * xhat) @ w) / C, and dout * xhat is the product dw needs anyway."""
        xhat, rstd, weight = cache
        xp = self.xp
        C = xhat.shape[-1]
        dout_xhat = dout * xhat
        if dweight is not None:
            dweight += dout_xhat.reshape(-1, C).sum(axis=0)
        if dbias is not None:
            dbias += dout.reshape(-1, C).sum(axis=0)
        g_mean = (dout @ weight)[..., None] / C                 # mean(g), g = dout * w
        gx_mean = (dout_xhat @ weight)[..., None] / C           # mean(g * xhat)
        dx = dout * weight                                      # g
        dx -= g_mean
        xp.multiply(xhat, gx_mean, out=dout_xhat)
        dx -= dout_xhat
        dx *= rstd
        return dx

    # --- softmax, and the attention's masked softmax with dropout (ref_bert/ops/softmax.py) -------------------
    def _softmax_into(self, x, out):
        """p = softmax(x) over the last axis written into ``out`` (which may be ``x``): subtract the max,
        exponentiate and normalise in place."""
        xp = self.xp
        p = xp.subtract(x, x.max(axis=-1, keepdims=True), out=out)
        xp.exp(p, out=p)
        p *= 1.0 / p.sum(axis=-1, keepdims=True)
        return p

    def softmax_forward(self, x):
        """One new buffer for p, worked in place."""
        p = self._softmax_into(x, None)
        return p, p

    def softmax_backward(self, dp, cache):
        """One buffer: dp * p, summed, then turned into dx = p (dp - sum(dp * p)) in place."""
        p = cache
        xp = self.xp
        dx = dp * p
        xp.subtract(dp, dx.sum(axis=-1, keepdims=True), out=dx)
        dx *= p
        return dx

    def masked_softmax_forward(self, scores, scale, additive_mask, dropout_mask=None):
        """The scores are scaled and masked in place, and the softmax reuses their buffer: ``scores`` is
        overwritten with probs (the reference's contract allows it)."""
        scores *= scale
        scores += additive_mask
        probs = self._softmax_into(scores, scores)
        dropped = probs if dropout_mask is None else probs * dropout_mask
        return (probs, dropped), (probs, dropout_mask, scale)

    def masked_softmax_backward(self, ddropped, cache):
        """Dropout backward, softmax backward (in one buffer), then the scale, in place."""
        probs, dropout_mask, scale = cache
        dprobs = ddropped if dropout_mask is None else ddropped * dropout_mask
        dscores = self.softmax_backward(dprobs, probs)
        dscores *= scale
        return dscores


def fast_table(backend) -> dict[str, Callable]:
    """The NumPy backend's ``Backend.fast``: reference op key -> fast variant (forward and backward of
    every op together), bound to ``backend``."""
    f = FastOps(backend)
    return {
        f"{_OPS}.activations.gelu_forward": f.gelu_forward,
        f"{_OPS}.activations.gelu_backward": f.gelu_backward,
        f"{_OPS}.activations.gelu_new_forward": f.gelu_new_forward,
        f"{_OPS}.activations.gelu_new_backward": f.gelu_new_backward,
        f"{_OPS}.layer_norm.layer_norm_forward": f.layer_norm_forward,
        f"{_OPS}.layer_norm.layer_norm_backward": f.layer_norm_backward,
        f"{_OPS}.softmax.softmax_forward": f.softmax_forward,
        f"{_OPS}.softmax.softmax_backward": f.softmax_backward,
        f"{_OPS}.softmax.masked_softmax_forward": f.masked_softmax_forward,
        f"{_OPS}.softmax.masked_softmax_backward": f.masked_softmax_backward,
    }


__all__ = ["FastOps", "fast_table"]
