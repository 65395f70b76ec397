"""The backends' fast variants against the reference ops they replace, and the tables that hold them.

A fast variant (backends/numpy_fast.py on NumPy; backends/cupy_fast.py over the fused kernels on CuPy,
run here over the NumPy interpreter of the kernel source from tests/test_fused_kernels.py) computes the reference's formula with its operations
rearranged: in place, through ``out=`` buffers, LayerNorm's row means as matrix-vector products. So the
two agree up to rounding only, and the tolerances are a few roundings of the largest value involved:

* float64: ``|fast - ref| <= 1e-12 * |ref| + 1e-12 * max|ref|``. One rounding is 1.1e-16 relative; the
  ops chain at most a few dozen, and an entry that is a difference of larger terms (softmax and
  LayerNorm backward subtract a row mean) carries the rounding of those terms, hence the part scaled by
  the largest entry. Measured worst case: 1.0e-15 of ``|ref| + max|ref|``.
* float32: ``1e-5 * |ref| + 1e-6 * max|ref|`` (one rounding is 6e-8; row sums taken in another order
  add a few). Measured worst case: 4e-7 of ``|ref| + max|ref|``.

A wrong rearrangement is off by far more: with mean(g * xhat) divided by C - 1 instead of C in the
NumPy fast LayerNorm backward, the LayerNorm cases failed (relative error up to 56) and so did the
whole-model comparison.

The references run with the NumPy backend's table emptied (:func:`run_reference`), so that a
reference built from other ops (masked softmax from softmax and dropout) is reference all the way down.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import backends
from ref_bert.optim import lamb
from ref_bert.optim.norms import sum_of_squares
from backends import cupy_fast, numpy_fast
from backends.cupy_kernels import CupyKernels
from ref_bert import Config, Model, ops
from ref_bert.ops import activations, layer_norm, softmax

from ._models import dropout_case

TOL = {np.float64: (1e-12, 1e-12), np.float32: (1e-5, 1e-6)}


def close(got, ref, dtype, what="", scale=None):
    """``scale`` (default max|ref|) sets the absolute part of the tolerance."""
    rtol, scaled_atol = TOL[dtype]
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == dtype and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    scale = float(np.abs(ref).max()) if scale is None else scale
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=scaled_atol * max(scale, 1e-30), err_msg=what)


def close_grads(got, ref, dtype):
    """Every gradient, with the key bias's measured against the value bias's size: softmax ignores a
    constant added to a query's row of scores, so dL/d(key bias) is exactly zero and both sides hold
    rounding noise only (about 1e-15 in float64)."""
    for name in ref:
        scale = None
        if name.endswith("key.bias"):
            scale = float(np.abs(ref[name[:-len("key.bias")] + "value.bias"]).max())
        close(got[name], ref[name], dtype, name, scale)


@pytest.fixture
def numpy_backend():
    return backends.get("numpy")


def same_table(a: dict, b: dict) -> bool:
    """The same keys, each bound to the same function (bound methods of two FastOps compare unequal)."""
    def functions(table):
        return {key: getattr(fn, "__func__", fn) for key, fn in table.items()}

    return bool(a) and functions(a) == functions(b)


def run_reference(fn, *args, **kwargs):
    """``fn`` with the fast tables emptied (every op, nested ones too, its reference)."""
    with backends.reference_ops():
        return fn(*args, **kwargs)


def fast_path_ops() -> dict:
    """Every op decorated with backends.fast_path in ref_bert.ops: key -> decorated function."""
    found = {}
    for module in (activations, layer_norm, softmax):
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            if hasattr(fn, "fast_key"):
                found[fn.fast_key] = fn
    return found


def interpreted_cupy_table():
    from .test_fused_kernels import NumpyKernelInterpreter

    return cupy_fast.fast_table(CupyKernels(NumpyKernelInterpreter), backends.get("numpy"))


def tables():
    out = {"numpy_fast": numpy_fast.fast_table(backends.get("numpy")), "cupy_fast (interpreted kernels)": interpreted_cupy_table()}
    if backends.available("cupy"):
        out["cupy backend"] = backends.get("cupy").fast
    return out


# --- the tables -------------------------------------------------------------------------------------------
def test_the_ops_with_fast_variants_are_the_expected_ones():
    names = {key.rsplit(".", 1)[1] for key in fast_path_ops()}
    assert names == {"gelu_forward", "gelu_backward", "gelu_new_forward", "gelu_new_backward",
                     "layer_norm_forward", "layer_norm_backward", "softmax_forward", "softmax_backward",
                     "masked_softmax_forward", "masked_softmax_backward"}
    for key, op in fast_path_ops().items():
        assert key == f"{op.reference.__module__}.{op.reference.__name__}"


@pytest.mark.parametrize("name", ["numpy_fast", "cupy_fast (interpreted kernels)", "cupy backend"])
def test_every_table_pairs_forward_with_backward(name):
    """A fast forward's cache is read only by the fast backward of the same table: a table holding one
    without the other would hand a reference backward a fast cache (or the reverse). Each key must name a
    fast_path op, and the pair must come from one module (one author of the cache's layout)."""
    all_tables = tables()
    if name not in all_tables:
        pytest.skip("needs CuPy and a visible GPU")
    table = all_tables[name]
    known = fast_path_ops()
    # the optimiser's per-piece functions (LAMB's, on CuPy) keep no cache: nothing to pair
    optimiser = {f.fast_key for f in (sum_of_squares, lamb.lamb_direction, lamb.lamb_apply)}
    ops_keys = set(table) - optimiser
    assert ops_keys and ops_keys <= set(known), sorted(ops_keys - set(known))
    for key in ops_keys:
        stem, _, direction = key.rpartition("_")
        partner = f"{stem}_{'backward' if direction == 'forward' else 'forward'}"
        assert direction in ("forward", "backward"), key
        assert partner in table, f"{name}: {key} without {partner}"
        assert table[key].__module__ == table[partner].__module__, (key, table[key], table[partner])


def test_the_numpy_backend_runs_the_numpy_fast_table(numpy_backend):
    if not backends.fast_enabled():
        pytest.skip("fast variants turned off by the environment")
    assert same_table(numpy_backend.fast, numpy_fast.fast_table(numpy_backend))


@pytest.mark.parametrize("var", [backends.FAST_ENV_VAR, backends.FUSED_ENV_VAR])
def test_the_environment_turns_every_fast_variant_off(var, monkeypatch):
    monkeypatch.setenv(var, "0")
    assert not backends.fast_enabled()
    assert backends._make("numpy").fast == {}
    monkeypatch.setenv(var, "1")
    assert same_table(backends._make("numpy").fast, numpy_fast.fast_table(backends.get("numpy")))


def test_reference_ops_empties_the_tables_and_restores_them(numpy_backend):
    before = numpy_backend.fast
    with backends.reference_ops():
        assert numpy_backend.fast == {}
    assert numpy_backend.fast is before


def test_a_decorated_op_calls_what_the_table_holds(numpy_backend, monkeypatch):
    calls = []
    key = ops.layer_norm_forward.fast_key

    def spy(*args):
        calls.append(args)
        return "fast"

    monkeypatch.setattr(numpy_backend, "fast", {key: spy})
    x = np.ones((2, 4))
    assert ops.layer_norm_forward(x, np.ones(4), np.zeros(4), 1e-12) == "fast" and len(calls) == 1
    monkeypatch.setattr(numpy_backend, "fast", {})
    out, _ = ops.layer_norm_forward(x, np.ones(4), np.zeros(4), 1e-12)
    assert np.all(out == 0) and len(calls) == 1


# --- each fast variant against its reference ----------------------------------------------------------------
def draw(rng, dtype, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def table_under_test(name):
    return numpy_fast.fast_table(backends.get("numpy")) if name == "numpy_fast" else interpreted_cupy_table()


TABLES = ["numpy_fast", "cupy_fast"]
DTYPES = [np.float64, np.float32]


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gelu", "gelu_new"])
def test_gelu_fast_variant_matches_reference(name, dtype, table):
    rng = np.random.default_rng(0)
    fast = table_under_test(table)
    forward, backward = getattr(activations, f"{name}_forward"), getattr(activations, f"{name}_backward")
    x, dy = draw(rng, dtype, 4, 5, 24, scale=3.0), draw(rng, dtype, 4, 5, 24)
    y_ref, cache_ref = run_reference(forward, x)
    dx_ref = run_reference(backward, dy, cache_ref)
    y, cache = fast[forward.fast_key](x)
    close(y, y_ref, dtype, "y")
    dy_before = dy.copy()
    close(fast[backward.fast_key](dy, cache), dx_ref, dtype, "dx")
    assert np.array_equal(dy, dy_before), "the backward must not modify dy"
    # and through the public entry points, which dispatch on the cache's name
    y2, cache2 = run_reference(ops.activation_forward, name, x)
    close(run_reference(ops.activation_backward, dy, cache2), dx_ref, dtype, "activation_backward")


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_fast_variant_matches_reference(dtype, table):
    rng = np.random.default_rng(1)
    fast = table_under_test(table)
    x = draw(rng, dtype, 3, 7, 24, scale=2.0) + dtype(0.5)
    w, b, dout = draw(rng, dtype, 24) + dtype(1), draw(rng, dtype, 24), draw(rng, dtype, 3, 7, 24)
    out_ref, cache_ref = run_reference(ops.layer_norm_forward, x, w, b, 1e-12)
    dw_ref, db_ref = np.full(24, 0.5, dtype), np.full(24, -0.5, dtype)
    dx_ref = run_reference(ops.layer_norm_backward, dout, cache_ref, dw_ref, db_ref)
    out, cache = fast[ops.layer_norm_forward.fast_key](x, w, b, 1e-12)
    close(out, out_ref, dtype, "out")
    dw, db = np.full(24, 0.5, dtype), np.full(24, -0.5, dtype)
    close(fast[ops.layer_norm_backward.fast_key](dout, cache, dw, db), dx_ref, dtype, "dx")
    close(dw, dw_ref, dtype, "dweight")
    close(db, db_ref, dtype, "dbias")
    # gradients for the weights are optional
    close(fast[ops.layer_norm_backward.fast_key](dout, cache), dx_ref, dtype, "dx without dweight/dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_fast_variant_matches_reference(dtype):
    rng = np.random.default_rng(2)
    fast = numpy_fast.fast_table(backends.get("numpy"))     # the CuPy table uses these same functions
    x, dp = draw(rng, dtype, 2, 3, 5, 9, scale=4.0), draw(rng, dtype, 2, 3, 5, 9)
    p_ref, cache_ref = run_reference(ops.softmax_forward, x)
    dx_ref = run_reference(ops.softmax_backward, dp, cache_ref)
    x_before = x.copy()
    p, cache = fast[ops.softmax_forward.fast_key](x)
    assert np.array_equal(x, x_before), "softmax_forward must not overwrite its input"
    close(p, p_ref, dtype, "p")
    close(fast[ops.softmax_backward.fast_key](dp, cache), dx_ref, dtype, "dx")


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["padding", "unilm"])
@pytest.mark.parametrize("dropout", [False, True])
def test_masked_softmax_fast_variant_matches_reference(mask_kind, dropout, dtype, table):
    """Scale + additive mask + softmax + dropout and back, with masked keys: a padding mask (B, T) and a
    per-query mask (B, T, T) as UniLM's objectives use."""
    rng = np.random.default_rng(3)
    fast = table_under_test(table)
    B, h, T, scale = 2, 3, 7, 0.125
    scores, dd = draw(rng, dtype, B, h, T, T, scale=3.0), draw(rng, dtype, B, h, T, T)
    mask01 = rng.random((B, T) if mask_kind == "padding" else (B, T, T)) < 0.6
    mask01[..., 0] = True                               # every query sees at least one key
    additive = ops.additive_mask_from(mask01, dtype, -10000.0)
    keep = ((rng.random((B, h, T, T)) < 0.8) / 0.8).astype(dtype) if dropout else None
    (probs_ref, dropped_ref), cache_ref = run_reference(ops.masked_softmax_forward, scores.copy(), scale,
                                                        additive, keep)
    dscores_ref = run_reference(ops.masked_softmax_backward, dd, cache_ref)
    (probs, dropped), cache = fast[ops.masked_softmax_forward.fast_key](scores.copy(), scale, additive, keep)
    close(probs, probs_ref, dtype, "probs")
    close(dropped, dropped_ref, dtype, "dropped")
    assert np.all(probs[np.broadcast_to(additive < 0, probs.shape)] < 1e-30), "masked keys get no weight"
    close(fast[ops.masked_softmax_backward.fast_key](dd, cache), dscores_ref, dtype, "dscores")


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention_with_fast_variants_matches_reference(dtype, numpy_backend):
    """The whole attention op (its masked softmax chosen by the table) with a padding mask and dropout."""
    rng = np.random.default_rng(4)
    B, T, H, heads = 2, 6, 8, 2
    x, dcontext = draw(rng, dtype, B, T, H), draw(rng, dtype, B, T, H)
    p = {f"{k}.{s}": draw(rng, dtype, *((H, H) if s == "weight" else (H,)), scale=0.5)
         for k in ("query", "key", "value") for s in ("weight", "bias")}
    mask01 = np.ones((B, T))
    mask01[1, 4:] = 0
    additive = ops.additive_mask_from(mask01, dtype, -10000.0)
    keep = ((rng.random((B, heads, T, T)) < 0.9) / 0.9).astype(dtype)

    def run():
        context, cache = ops.self_attention_forward(x, p, additive, heads, keep)
        g = {k: np.zeros_like(v) for k, v in p.items()}
        return context, ops.self_attention_backward(dcontext, cache, g), g

    ref, fast = run_reference(run), run()
    close(fast[0], ref[0], dtype, "context")
    close(fast[1], ref[1], dtype, "dx")
    close_grads(fast[2], ref[2], dtype)


# --- the whole model --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
def test_model_loss_and_gradients_equal_with_and_without_fast_variants(act):
    """References only (the table emptied) against the default, float64, dropout on, a padding mask:
    loss within 1e-12 relative, every gradient within 1e-12 relative plus 1e-12 of its largest entry
    (gradients are sums over the batch of products of the ops' results, so the ops' tolerance carries
    over; measured worst case about 1e-14)."""
    config, inputs = dropout_case(5, act)
    model = Model(config, dtype="float64", seed=0)
    _result = model.loss_and_grads(**inputs)
    loss_fast, grads_fast = _result.loss, _result.grads
    reference = run_reference(model.loss_and_grads, **inputs)
    loss_ref, grads_ref = reference.loss, reference.grads
    assert float(loss_fast) == pytest.approx(float(loss_ref), rel=1e-12)
    close_grads(grads_fast, grads_ref, np.float64)
