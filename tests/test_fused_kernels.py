"""The fused CuPy kernels (backends/cupy_kernels.py) against their NumPy references in ref_bert.

Two ways:
* On a GPU (``@pytest.mark.gpu``, skipped only where ``backends.available("cupy")`` is False): each
  kernel on CuPy arrays against the NumPy op, float32 and float64; and a whole training step.
* Everywhere: :class:`NumpyKernelInterpreter` runs the kernels' own source text (the C expressions
  given to ``ElementwiseKernel`` / ``ReductionKernel``) with NumPy, so the arithmetic, the argument
  order of every call and the model's fused code paths are checked on any machine. What it cannot
  check is that CUDA compiles the source: that is the GPU tests' job.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.special

import backends
from backends.cupy_kernels import CupyKernels
from ref_bert import Config, Model
from ref_bert import ops
from ref_bert.optim import Lamb

# --- a NumPy interpreter for the kernel source -----------------------------------------------------
_FUNCTIONS = {"tanh": np.tanh, "exp": np.exp, "sqrt": np.sqrt, "erf": scipy.special.erf}


def _python(source: str) -> str:
    """Kernel C source in the restricted style of cupy_kernels.py -> Python statements."""
    lines = []
    for statement in source.split(";"):
        statement = statement.strip()
        if not statement:
            continue
        statement = re.sub(r"^T\s+", "", statement)     # declarations: "T u = ..." -> "u = ..."
        statement = statement.replace("(T)", "")          # casts: operands keep the arrays' dtype
        lines.append(statement)
    return "\n".join(lines)


def _params(spec: str):
    return [tuple(p.split()) for p in spec.split(",") if p.strip()]


class _Elementwise:
    def __init__(self, in_params, out_params, operation, name):
        self.ins, self.outs, self.code, self.name = _params(in_params), _params(out_params), _python(operation), name

    def _bind(self, args):
        arrays = [a for (kind, _), a in zip(self.ins, args) if kind == "T"]
        dtype = np.result_type(*arrays)
        assert all(np.asarray(a).dtype == dtype for a in arrays), f"{self.name}: mixed dtypes"
        env = dict(_FUNCTIONS)
        for (kind, name), a in zip(self.ins, args):
            env[name] = np.asarray(a) if kind == "T" else float(a)
        return env, dtype, [np.shape(a) for a in arrays]

    def __call__(self, *args):
        n = len(self.ins)
        env, dtype, shapes = self._bind(args[:n])
        outs = list(args[n:])
        assert len(outs) in (0, len(self.outs)), f"{self.name}: pass all outputs or none"
        shape = np.broadcast_shapes(*shapes, *[o.shape for o in outs])
        for (_, name), out in zip(self.outs, outs):
            assert out.dtype == dtype
            env[name] = out.copy()
        exec(self.code, env)
        results = []
        for i, (_, name) in enumerate(self.outs):
            value = np.broadcast_to(np.asarray(env[name]), shape).astype(dtype)
            if outs:
                outs[i][...] = value
                results.append(outs[i])
            else:
                results.append(value.copy())
        return results[0] if len(results) == 1 else tuple(results)


class _Reduction(_Elementwise):
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name):
        assert reduce_expr == "a + b" and identity == "0", "the interpreter knows sums only"
        super().__init__(in_params, out_params, "", name)
        self.map_expr, self.post = map_expr, _python(post_map_expr)

    def __call__(self, *args, axis=None, keepdims=False):
        env, dtype, shapes = self._bind(args)
        mapped = np.broadcast_to(eval(self.map_expr, env), np.broadcast_shapes(*shapes))
        env["a"] = mapped.sum(axis=axis, keepdims=keepdims, dtype=dtype)
        exec(self.post, env)
        return np.asarray(env[self.outs[0][1]], dtype=dtype)


class NumpyKernelInterpreter:
    """Stands in for the cupy module: compiles nothing, interprets the kernel source with NumPy."""
    ElementwiseKernel = _Elementwise
    ReductionKernel = _Reduction
    empty_like = staticmethod(np.empty_like)


# --- the comparisons, shared by both ways ------------------------------------------------------------
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
ATOL = {np.float32: 2e-6, np.float64: 1e-14}


def close(fused, reference, dtype, to_host=np.asarray):
    fused = to_host(fused)
    assert fused.dtype == dtype and fused.shape == reference.shape
    np.testing.assert_allclose(fused, reference, rtol=RTOL[dtype], atol=ATOL[dtype])


def compare_kernels(kernels, dtype, to_device=np.asarray, to_host=np.asarray):
    rng = np.random.default_rng(0)

    def draw(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    dev = to_device
    # activations
    x, dy = draw(4, 5, 24, scale=2.0), draw(4, 5, 24)
    for name, fwd, bwd in (("gelu_new", kernels.gelu_new_forward, kernels.gelu_new_backward),
                           ("gelu", kernels.gelu_forward, kernels.gelu_backward)):
        y_ref, cache = ops.activation_forward(name, x)
        y, aux = fwd(dev(x))
        close(y, y_ref, dtype, to_host)
        close(aux, cache[2], dtype, to_host)
        close(bwd(dev(dy), dev(x), aux), ops.activation_backward(dy, cache), dtype, to_host)
    # layer norm
    w, b, dout = draw(24) + 1, draw(24), draw(4, 5, 24)
    out_ref, (xhat_ref, rstd_ref, _) = ops.layer_norm_forward(x, w, b, 1e-12)
    out, xhat, rstd = kernels.layer_norm_forward(dev(x), dev(w), dev(b), 1e-12)
    for got, ref in ((out, out_ref), (xhat, xhat_ref), (rstd, rstd_ref)):
        close(got, ref, dtype, to_host)
    dw_ref, db_ref = np.full(24, 0.5, dtype), np.full(24, -0.5, dtype)
    dx_ref = ops.layer_norm_backward(dout, (xhat_ref, rstd_ref, w), dw_ref, db_ref)
    dw, db = dev(np.full(24, 0.5, dtype)), dev(np.full(24, -0.5, dtype))
    close(kernels.layer_norm_backward(dev(dout), xhat, rstd, dev(w), dw, db), dx_ref, dtype, to_host)
    close(dw, dw_ref, dtype, to_host)
    close(db, db_ref, dtype, to_host)
    # masked softmax, with and without dropout, for both mask shapes
    scale = 0.125
    raw, dd = draw(2, 3, 6, 6, scale=3.0), draw(2, 3, 6, 6)
    keep = ((rng.random((2, 3, 6, 6)) < 0.8) / 0.8).astype(dtype)
    for mask01 in (rng.random((2, 6)) < 0.7, rng.random((2, 6, 6)) < 0.7):
        mask01[..., 0] = True
        additive = ops.additive_mask_from(mask01, dtype, -10000.0)
        for keep_mask in (None, keep):
            probs_ref, _ = ops.softmax_forward(raw * dtype(scale) + additive)
            dropped_ref, _ = ops.dropout_forward(probs_ref, keep_mask)
            probs, dropped = kernels.masked_softmax(dev(raw.copy()), scale, dev(additive),
                                                    None if keep_mask is None else dev(keep_mask))
            close(probs, probs_ref, dtype, to_host)
            close(dropped, dropped_ref, dtype, to_host)
            dscores_ref = ops.softmax_backward(ops.dropout_backward(dd, keep_mask), probs_ref) * dtype(scale)
            dscores = kernels.softmax_backward(dev(dd), probs, scale, None if keep_mask is None else dev(keep_mask))
            close(dscores, dscores_ref, dtype, to_host)
    close(kernels.sum_of_squares(dev(x)), np.asarray((x * x).sum()), dtype, to_host)


def lamb_steps(model_params, grads, backend_fused, monkeypatch, **preset):
    """Three LAMB steps with the given ``fused`` object on the NumPy backend (None = the plain code)."""
    monkeypatch.setattr(backends.get("numpy"), "fused", backend_fused)
    params = {k: v.copy() for k, v in model_params.items()}
    opt = Lamb.from_preset(**preset, params=params)
    for step in range(3):
        opt.step({k: g * (1 + step) for k, g in grads.items()})
    monkeypatch.setattr(backends.get("numpy"), "fused", None)
    return params, opt


# --- everywhere: the kernel source, interpreted ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_source_matches_the_numpy_ops(dtype):
    compare_kernels(CupyKernels(NumpyKernelInterpreter), dtype)


@pytest.mark.parametrize("preset", ["albert", "tfa", "apex", "torch_optimizer"])
def test_fused_lamb_source_matches_lamb_step(preset, monkeypatch):
    rng = np.random.default_rng(1)
    params = {"encoder.w": rng.standard_normal((6, 4)), "encoder.bias": rng.standard_normal(4),
              "layer_norm.weight": np.zeros(4)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    overrides = {"weight_decay": 0.01} if preset in ("tfa", "torch_optimizer") else {}
    ref, ref_opt = lamb_steps(params, grads, None, monkeypatch, name=preset, **overrides)
    got, got_opt = lamb_steps(params, grads, CupyKernels(NumpyKernelInterpreter), monkeypatch, name=preset,
                              **overrides)
    for name in params:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_opt.exp_avg_sq[name], ref_opt.exp_avg_sq[name], rtol=1e-12, atol=1e-15)


def test_model_training_step_through_the_fused_paths(monkeypatch):
    """The model's fused code paths (attention, LayerNorm, GELU, LAMB) with the interpreted kernels give
    the loss, gradients and updated weights of the plain NumPy code (float64, dropout on)."""
    config = Config.preset("tiny", vocab_size=50, num_hidden_layers=2, hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50, (2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, 6:] = 0
    labels = np.where(rng.random((2, 9)) < 0.4, rng.integers(0, 50, (2, 9)), -100)
    inputs = dict(input_ids=ids, attention_mask=mask, mlm_labels=labels, sop_labels=np.array([0, 1]),
                  training=True, dropout_seed=3)
    results = []
    for fused in (None, CupyKernels(NumpyKernelInterpreter)):
        monkeypatch.setattr(backends.get("numpy"), "fused", fused)
        model = Model(config, dtype="float64", seed=0)
        loss, grads = model.loss_and_grads(**inputs)
        Lamb.from_preset("albert", model.named_parameters()).step(grads)
        results.append((float(loss), grads, {k: v.copy() for k, v in model.named_parameters().items()}))
    monkeypatch.setattr(backends.get("numpy"), "fused", None)
    (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(params_b[name], params_a[name], rtol=1e-12, atol=1e-14, err_msg=name)


# --- on a GPU: the compiled kernels --------------------------------------------------------------------------
gpu = pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a visible GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_kernels_match_the_numpy_ops(dtype):
    bk = backends.get("cupy")
    assert bk.fused is not None, "the CuPy backend has no fused kernels (is REF_BERT_FUSED=0 set?)"
    compare_kernels(bk.fused, dtype, to_device=bk.from_host, to_host=bk.to_host)


@pytest.mark.gpu
@gpu
def test_cupy_training_step_matches_numpy():
    """Loss, every gradient and the LAMB-updated weights on CuPy (fused kernels) vs NumPy, float64."""
    config = Config.preset("tiny", vocab_size=50, num_hidden_layers=2)
    rng = np.random.default_rng(4)
    host = dict(input_ids=rng.integers(0, 50, (2, 9)), mlm_labels=np.where(rng.random((2, 9)) < 0.4,
                                                                           rng.integers(0, 50, (2, 9)), -100),
                sop_labels=np.array([1, 0]))
    out = []
    for name in ("numpy", "cupy"):
        model = Model(config, backend=name, dtype="float64", seed=0)
        inputs = {k: model.backend.from_host(v) for k, v in host.items()}
        loss, grads = model.loss_and_grads(**inputs, training=True, dropout_seed=5)
        Lamb.from_preset("albert", model.named_parameters()).step(grads)
        out.append((float(loss), {k: model.backend.to_host(g) for k, g in grads.items()},
                    {k: model.backend.to_host(p) for k, p in model.named_parameters().items()}))
    (loss_n, grads_n, params_n), (loss_c, grads_c, params_c) = out
    assert loss_c == pytest.approx(loss_n, rel=1e-10)
    for name in grads_n:
        np.testing.assert_allclose(grads_c[name], grads_n[name], rtol=1e-8, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(params_c[name], params_n[name], rtol=1e-10, atol=1e-13, err_msg=name)
