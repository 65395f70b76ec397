"""Fused CuPy kernels for the ops that make several passes over memory in their NumPy form.

On a GPU every NumPy-style expression is one kernel launch that reads and writes whole arrays:
``0.5 * x * (1 + tanh(...))`` is seven of them. Each method here does the same arithmetic in one
elementwise kernel (or, for row-wise ops, a couple of reductions and one elementwise kernel), for
arrays of either float dtype (``T`` is float or double). The readable reference for each is the
reference op in ref_bert/ops (named in the method's docstring); backends/cupy_fast.py adapts the
methods to the ops' signatures, and that table is what the CuPy backend runs. tests/test_fused_kernels.py
checks every entry against its reference on a GPU (``@pytest.mark.gpu``), and against a NumPy
interpreter of the kernel source on any machine; where the CUDA toolkit is installed it also compiles
every kernel's source with nvcc (sm_90, T = float and double), no GPU needed.

Only backends/ imports cupy: :func:`backends.get` builds one :class:`CupyKernels` for the CuPy
backend, behind its fast table (``backend.fast``); set ``REF_BERT_FAST=0`` (or
``REF_BERT_FUSED=0``) to run the reference ops on CuPy instead.

Kernel source conventions (kept simple on purpose, so the NumPy interpreter in the tests can run it):
one statement per ``;``, ``T name = ...`` declarations, ``(T)`` casts, and the functions tanh, exp,
erf and sqrt. Scalars are passed as float64 and cast with ``(T)``.
"""
from __future__ import annotations

import math

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _f(x: float) -> str:
    """A double literal for kernel source."""
    return repr(float(x))


class CupyKernels:
    """The fused kernels, compiled by CuPy on first use. ``cp`` is the cupy module."""

    def __init__(self, cp):
        self.cp = cp
        ek, rk = cp.ElementwiseKernel, cp.ReductionKernel
        s, sc = _SQRT_2_OVER_PI, _SQRT_2_OVER_PI * _GELU_CUBIC
        # --- activations (ref_bert/ops/activations.py) -------------------------------------------
        self._gelu_new_forward = ek(
            "T x", "T y, T h",
            f"T u = x * ((T){_f(s)} + (T){_f(sc)} * x * x);"
            f"h = ((T)1 + tanh(u)) * (T)0.5;"
            f"y = x * h;",
            "ref_bert_gelu_new_forward")
        self._gelu_new_backward = ek(
            "T dy, T x, T h", "T dx",
            f"T k = (T){_f(2 * s)} + (T){_f(6 * sc)} * x * x;"
            f"dx = dy * h * ((T)1 + x * ((T)1 - h) * k);",
            "ref_bert_gelu_new_backward")
        self._gelu_forward = ek(
            "T x", "T y, T cdf",
            f"cdf = (T)0.5 * ((T)1 + erf(x * (T){_f(_INV_SQRT_2)}));"
            f"y = x * cdf;",
            "ref_bert_gelu_forward")
        self._gelu_backward = ek(
            "T dy, T x, T cdf", "T dx",
            f"dx = dy * (cdf + x * exp((T)-0.5 * x * x) * (T){_f(_INV_SQRT_2PI)});",
            "ref_bert_gelu_backward")
        # --- reductions ----------------------------------------------------------------------------
        self._sum = rk("T x", "T y", "x", "a + b", "y = a", "0", "ref_bert_sum")
        self._sum_sq = rk("T x", "T y", "x * x", "a + b", "y = a", "0", "ref_bert_sum_sq")
        self._sum_prod = rk("T x, T z", "T y", "x * z", "a + b", "y = a", "0", "ref_bert_sum_prod")
        self._sum_prod3 = rk("T x, T z, T w", "T y", "x * z * w", "a + b", "y = a", "0", "ref_bert_sum_prod3")
        self._sum_sq_dev = rk("T x, T mean", "T y", "(x - mean) * (x - mean)", "a + b", "y = a", "0",
                              "ref_bert_sum_sq_dev")
        self._sum_exp_dev = rk("T x, T mx", "T y", "exp(x - mx)", "a + b", "y = a", "0", "ref_bert_sum_exp_dev")
        # --- layer norm (ref_bert/ops/layer_norm.py) --------------------------------------------------
        self._rstd = ek("T sum_sq_dev, float64 inv_c, float64 eps", "T rstd",
                        "rstd = (T)1 / sqrt(sum_sq_dev * (T)inv_c + (T)eps);", "ref_bert_ln_rstd")
        self._layer_norm_apply = ek(
            "T x, T mean, T rstd, T w, T b", "T xhat, T y",
            "xhat = (x - mean) * rstd;"
            "y = xhat * w + b;",
            "ref_bert_ln_apply")
        self._layer_norm_dx = ek(
            "T dout, T w, T xhat, T rstd, T g_sum, T gx_sum, float64 inv_c", "T dx",
            "dx = rstd * (dout * w - (g_sum + xhat * gx_sum) * (T)inv_c);",
            "ref_bert_ln_dx")
        # --- masked softmax and attention dropout (ref_bert/ops/softmax.py, attention.py, dropout.py) --
        self._scale_mask = ek("T mask, float64 scale", "T s", "s = s * (T)scale + mask;", "ref_bert_scale_mask")
        self._softmax_normalise = ek("T mx, T denom", "T p", "p = exp(p - mx) / denom;", "ref_bert_softmax_norm")
        self._softmax_normalise_drop = ek(
            "T mx, T denom, T keep", "T p, T dropped",
            "p = exp(p - mx) / denom;"
            "dropped = p * keep;",
            "ref_bert_softmax_norm_drop")
        self._softmax_dx = ek("T dp, T p, T dot, float64 scale", "T dx", "dx = p * (dp - dot) * (T)scale;",
                              "ref_bert_softmax_dx")
        self._softmax_dx_drop = ek(
            "T dd, T keep, T p, T dot, float64 scale", "T dx",
            "dx = p * (dd * keep - dot) * (T)scale;",
            "ref_bert_softmax_dx_drop")
        # --- LAMB (ref_bert/optim/lamb.py; the adapters: backends/cupy_optim_fast.py) ----------------
        self._lamb_direction = ek(
            "T g, T w, T clip, float64 b1, float64 b2, float64 bias1, float64 bias2, float64 eps, "
            "float64 wd_l2, float64 wd_in",
            "T m, T v, T u",
            "T gg = g * clip + (T)wd_l2 * w;"
            "m = (T)b1 * m + (T)(1 - b1) * gg;"
            "v = (T)b2 * v + (T)(1 - b2) * (gg * gg);"
            "u = (m / (T)bias1) / (sqrt(v / (T)bias2) + (T)eps) + (T)wd_in * w;",
            "ref_bert_lamb_direction")
        self._lamb_apply = ek("T u, T scale, float64 decay", "T w", "w = w - scale * u - (T)decay * w;",
                              "ref_bert_lamb_apply")

    # --- activations ----------------------------------------------------------------------------------
    def gelu_new_forward(self, x):
        """(y, h) with h = (1 + tanh(u)) / 2: ops.activations.gelu_new_forward."""
        return self._gelu_new_forward(x)

    def gelu_new_backward(self, dy, x, h):
        """dx: ops.activations.gelu_new_backward."""
        return self._gelu_new_backward(dy, x, h)

    def gelu_forward(self, x):
        """(y, cdf): ops.activations.gelu_forward (exact erf GELU)."""
        return self._gelu_forward(x)

    def gelu_backward(self, dy, x, cdf):
        """dx: ops.activations.gelu_backward."""
        return self._gelu_backward(dy, x, cdf)

    # --- layer norm -----------------------------------------------------------------------------------
    def layer_norm_forward(self, x, weight, bias, eps):
        """(out, xhat, rstd): ops.layer_norm.layer_norm_forward. Row mean and centred sum of squares
        are two reductions; rstd, xhat and out come from two elementwise kernels."""
        inv_c = 1.0 / x.shape[-1]
        mean = self._sum(x, axis=-1, keepdims=True)
        mean *= inv_c
        rstd = self._rstd(self._sum_sq_dev(x, mean, axis=-1, keepdims=True), inv_c, float(eps))
        xhat, out = self._layer_norm_apply(x, mean, rstd, weight, bias)
        return out, xhat, rstd

    def layer_norm_backward(self, dout, xhat, rstd, weight, dweight=None, dbias=None):
        """dx, accumulating dweight/dbias: ops.layer_norm.layer_norm_backward."""
        rows = tuple(range(dout.ndim - 1))
        if dweight is not None:
            dweight += self._sum_prod(dout, xhat, axis=rows)
        if dbias is not None:
            dbias += self._sum(dout, axis=rows)
        g_sum = self._sum_prod(dout, weight, axis=-1, keepdims=True)              # sum(g), g = dout * w
        gx_sum = self._sum_prod3(dout, weight, xhat, axis=-1, keepdims=True)      # sum(g * xhat)
        return self._layer_norm_dx(dout, weight, xhat, rstd, g_sum, gx_sum, 1.0 / xhat.shape[-1])

    # --- masked softmax with attention dropout ----------------------------------------------------------
    def masked_softmax(self, scores, scale, additive_mask, keep=None):
        """In place: ``scores`` becomes softmax(scores * scale + additive_mask) over the last axis
        (ops.softmax.masked_softmax_forward). Returns ``(probs, dropped)`` with dropped = probs * keep
        (``keep`` the dropout multiplier, or probs itself)."""
        self._scale_mask(additive_mask, float(scale), scores)
        mx = scores.max(axis=-1, keepdims=True)
        denom = self._sum_exp_dev(scores, mx, axis=-1, keepdims=True)
        if keep is None:
            self._softmax_normalise(mx, denom, scores)
            return scores, scores
        dropped = self.cp.empty_like(scores)
        self._softmax_normalise_drop(mx, denom, keep, scores, dropped)
        return scores, dropped

    def softmax_backward(self, ddropped, probs, scale, keep=None):
        """d(scores before scaling) times ``scale``: dropout backward, softmax backward and the scale
        (ops.softmax.masked_softmax_backward), in one reduction and one elementwise kernel."""
        if keep is None:
            dot = self._sum_prod(ddropped, probs, axis=-1, keepdims=True)
            return self._softmax_dx(ddropped, probs, dot, float(scale))
        dot = self._sum_prod3(ddropped, keep, probs, axis=-1, keepdims=True)
        return self._softmax_dx_drop(ddropped, keep, probs, dot, float(scale))

    # --- LAMB ---------------------------------------------------------------------------------------------
    def sum_of_squares(self, x):
        """sum(x^2) over every element, a 0-d array, with no x^2 temporary. A matrix is reduced row by
        row first and the row sums then: CuPy's reduction kernels give each output element one thread
        block, so a whole-tensor reduction in one call would run a 23M-element embedding table
        through a single block (one streaming multiprocessor, a sequential float32 sum per thread)."""
        if x.ndim > 1 and x.size:
            return self._sum(self._sum_sq(x.reshape(-1, x.shape[-1]), axis=-1))
        return self._sum_sq(x)

    def lamb_direction(self, g, w, m, v, clip, b1, b2, bias1, bias2, eps, wd_l2, wd_inside):
        """One kernel for Lamb.step up to the trust ratio: clipping (``clip`` a 0-d array), optional L2
        decay, the moment updates (m and v in place) and u = (m / bias1) / (sqrt(v / bias2) + eps)
        + wd_inside * w. Returns u. (bias1 = bias2 = 1 without moment bias correction.)"""
        u = self.cp.empty_like(w)
        self._lamb_direction(g, w, clip, float(b1), float(b2), float(bias1), float(bias2), float(eps),
                             float(wd_l2), float(wd_inside), m, v, u)
        return u

    def lamb_apply(self, w, u, scale, decay):
        """In place: w <- w - scale * u - decay * w (``scale`` a 0-d array: lr x step factor x ratio)."""
        self._lamb_apply(u, scale, float(decay), w)


__all__ = ["CupyKernels"]
