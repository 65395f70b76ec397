"""What ref_bert/ops promises besides its numbers (those are in test_numerical_stability.py and the
gradient checks): the exact error messages, the trace names, the dtypes kept, the defaults, losses over
a single element, the embedding layer's dropout and projection, the attention cache's past length, and
that every op does its array work with its input's array module (what lets the same code run on CuPy).

Each test here was written against a mutation-testing survivor (docs/testing.md) and fails with it.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.special

import backends
from ref_bert import ops
from ref_bert.ops import attention


# --- error messages -------------------------------------------------------------------------------------------
def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape)


def _attention_with_past():
    rng = np.random.default_rng(0)
    H, heads = 8, 2
    p = {f"{n}.{k}": rng.standard_normal((H, H) if k == "weight" else H) for n in ("query", "key", "value")
         for k in ("weight", "bias")}
    past = (rng.standard_normal((1, heads, 3, H // heads)), rng.standard_normal((1, heads, 3, H // heads)))
    _, cache = ops.self_attention_forward(rng.standard_normal((1, 2, H)), p, np.zeros((1, 1, 2, 5)), heads, past=past)
    ops.self_attention_backward(np.ones((1, 2, H)), cache, {k: np.zeros_like(v) for k, v in p.items()})


ERRORS = {
    "activation forward": (lambda: ops.activation_forward("swish", _x(2)),
                           "unknown activation 'swish'; expected one of ['gelu', 'gelu_new', 'relu', 'tanh']"),
    "activation backward": (lambda: ops.activation_backward(_x(2), ("swish", _x(2))),
                            "unknown activation 'swish' in cache; expected one of ['gelu', 'gelu_new', 'relu', 'tanh']"),
    "pooling mode": (lambda: ops.pooling_forward(_x(1, 2, 3), np.ones((1, 2)), "sum"),
                     "pooling mode 'sum' is not supported; expected one of ('cls', 'max', 'mean', "
                     "'mean_sqrt_len_tokens')"),
    "smoothing below 0": (lambda: ops.cross_entropy_forward(_x(2, 3), np.array([0, 1]), label_smoothing=-0.1),
                          "label_smoothing=-0.1 is invalid: expected a number in [0, 1]"),
    "smoothing above 1": (lambda: ops.cross_entropy_forward(_x(2, 3), np.array([0, 1]), label_smoothing=1.5),
                          "label_smoothing=1.5 is invalid: expected a number in [0, 1]"),
    "normalization": (lambda: ops.cross_entropy_forward(_x(2, 3), np.array([0, 1]), normalization="sum"),
                      "normalization='sum' is invalid: expected one of ('mean', 'tf_albert')"),
    "bce shapes": (lambda: ops.bce_with_logits_forward(_x(2, 3), _x(3, 2)),
                   "bce_with_logits: targets have shape (3, 2), expected the logits' shape (2, 3)"),
    "mse shapes": (lambda: ops.mse_forward(_x(4), _x(4, 1)),
                   "mse: targets have shape (4, 1), expected the logits' shape (4,)"),
    "attention backward after a past": (
        _attention_with_past,
        "self_attention_backward: the forward attended cached keys (past=...), an inference-only forward; run it "
        "without past to differentiate"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_messages(case):
    """Each refusal is a ValueError with exactly this message (the names and values it reports)."""
    fn, message = ERRORS[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fn()


def test_label_smoothing_accepts_its_bounds():
    """0 and 1 are valid (1: the uniform target); the messages above say [0, 1]."""
    z, y = _x(2, 3), np.array([0, 2])
    for eps in (0.0, 1.0):
        loss, _ = ops.cross_entropy_forward(z, y, label_smoothing=eps)
        assert np.isfinite(loss)


# --- losses over one element, and MSE against its definition ----------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mse_against_its_definition_and_one_element(dtype):
    """mse = mean((z - y)^2), dz = 2 (z - y) dloss / N, in the predictions' dtype (targets of another dtype
    are cast); N = 1 divides by 1. Reference: math.fsum in float64. Tolerance 4 eps relative (one
    product, a sum of 6 terms, one division)."""
    z = np.array([[1.5, -2.0, 3.25], [0.5, 7.0, -1.0]], dtype=dtype)
    y = np.array([[1.0, 2.0, -3.0], [0.0, 7.5, 1.0]], dtype=np.float64)
    loss, cache = ops.mse_forward(z, y)
    expected = math.fsum((float(a) - float(b)) ** 2 for a, b in zip(z.ravel(), y.ravel())) / 6
    assert loss.dtype == dtype and float(loss) == pytest.approx(expected, rel=4 * float(np.finfo(dtype).eps))
    dz = ops.mse_backward(dtype(0.5), cache)
    assert dz.dtype == dtype
    np.testing.assert_allclose(dz, 2 * (z.astype(np.float64) - y) * 0.5 / 6, rtol=4 * np.finfo(dtype).eps)
    one, _ = ops.mse_forward(np.array([3.0], dtype=dtype), np.array([1.0]))
    assert float(one) == 4.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_over_one_element_and_foreign_targets(dtype):
    """N = 1: the loss is that element's, log(1 + e^-2) for z = 2, y = 1 (math.log1p); targets of another
    dtype are cast to the logits'."""
    loss, cache = ops.bce_with_logits_forward(np.array([2.0], dtype=dtype), np.array([1.0]))
    eps = float(np.finfo(dtype).eps)
    assert loss.dtype == dtype and float(loss) == pytest.approx(math.log1p(math.exp(-2.0)), rel=4 * eps)
    dz = ops.bce_with_logits_backward(dtype(1.0), cache)
    assert dz.dtype == dtype and float(dz[0]) == pytest.approx(1 / (1 + math.exp(-2.0)) - 1, rel=8 * eps)


# --- the embedding layer ---------------------------------------------------------------------------------------
def _embedding_params(rng, V=11, P=6, E=4, H=5):
    return {"word_embeddings": rng.standard_normal((V, E)), "position_embeddings": rng.standard_normal((P, E)),
            "token_type_embeddings": rng.standard_normal((2, E)), "layer_norm.weight": 1 + rng.standard_normal(E) / 4,
            "layer_norm.bias": rng.standard_normal(E) / 4, "projection.weight": rng.standard_normal((E, H)),
            "projection.bias": rng.standard_normal(H)}


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_embeddings_forward_traces_drops_and_projects_by_default():
    """out = dropout(LayerNorm(word + position + type)) Wp + bp (ops/embedding.py's docstring), the
    projection on by default; the trace sees exactly "sum" then "layer_norm". Reference: NumPy in
    float64, 1e-12 relative."""
    rng = np.random.default_rng(1)
    p = _embedding_params(rng)
    ids, types, pos = rng.integers(0, 11, (2, 6)), rng.integers(0, 2, (2, 6)), np.tile(np.arange(6), (2, 1))
    drop = (rng.random((2, 6, 4)) < 0.7) / 0.7
    traced = []
    out, _ = ops.embeddings_forward(p, ids, types, pos, 1e-12, drop, trace=lambda n, a: traced.append((n, a.copy())))
    summed = p["word_embeddings"][ids] + p["position_embeddings"][pos] + p["token_type_embeddings"][types]
    normed = _layer_norm(summed, p["layer_norm.weight"], p["layer_norm.bias"], 1e-12)
    assert [n for n, _ in traced] == ["sum", "layer_norm"]
    np.testing.assert_allclose(traced[0][1], summed, rtol=1e-12)
    np.testing.assert_allclose(traced[1][1], normed, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, (normed * drop) @ p["projection.weight"] + p["projection.bias"], rtol=1e-12,
                               atol=1e-12)


def test_embeddings_backward_without_projection():
    """project=False (E == H): out is the dropped LayerNorm itself, and the backward runs without a
    projection cache; the word-table gradient is the LayerNorm backward scattered to the ids, checked
    against central differences of sum(out * dout) (step 1e-6, 1e-7 relative)."""
    rng = np.random.default_rng(2)
    p = {k: v for k, v in _embedding_params(rng).items() if not k.startswith("projection")}
    ids, types, pos = np.array([[1, 3, 1, 4]]), np.array([[0, 1, 1, 0]]), np.arange(4)[None]
    dout = rng.standard_normal((1, 4, 4))
    out, cache = ops.embeddings_forward(p, ids, types, pos, 1e-12, project=False)
    assert out.shape == (1, 4, 4)
    g = {k: np.zeros_like(v) for k, v in p.items()}
    ops.embeddings_backward(dout, cache, g)
    numeric = np.zeros_like(p["word_embeddings"])
    for idx in np.ndindex(numeric.shape):
        for sign in (1, -1):
            q = {k: v.copy() for k, v in p.items()}
            q["word_embeddings"][idx] += sign * 1e-6
            numeric[idx] += sign * (ops.embeddings_forward(q, ids, types, pos, 1e-12, project=False)[0] * dout).sum()
    np.testing.assert_allclose(g["word_embeddings"], numeric / 2e-6, rtol=1e-7, atol=1e-8)


# --- the attention cache -----------------------------------------------------------------------------------------
def test_attention_cache_records_the_past_length():
    """AttentionCache.past_length is L, the number of cached positions attended (0 without a past), and
    k holds L + T keys."""
    rng = np.random.default_rng(3)
    H, heads, d = 8, 2, 4
    p = {f"{n}.{k}": rng.standard_normal((H, H) if k == "weight" else H) for n in ("query", "key", "value")
         for k in ("weight", "bias")}
    x = rng.standard_normal((1, 2, H))
    _, cache = ops.self_attention_forward(x, p, np.zeros((1, 1, 2, 2)), heads)
    assert cache.past_length == 0 and type(cache.past_length) is int
    past = (rng.standard_normal((1, heads, 3, d)), rng.standard_normal((1, heads, 3, d)))
    _, cache = ops.self_attention_forward(x, p, np.zeros((1, 1, 2, 5)), heads, past=past)
    assert cache.past_length == 3 and cache.k.shape == (1, heads, 5, d)


# --- every op works with its input's array module ----------------------------------------------------------------
class DeviceArray(np.ndarray):
    """Stands for a cupy.ndarray: backends.of() reads only the top-level module of an array's type."""


DeviceArray.__module__ = "cupy"


class SpyModule:
    """An array module that records which of its functions were looked up, and serves NumPy's."""

    def __init__(self):
        self.used = set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(np, name)


@pytest.fixture
def device(monkeypatch):
    """A stand-in "cupy" backend over SpyModule, with the reference ops and a recording scatter_add."""
    spy = SpyModule()
    fake = backends.Backend("cupy", spy, scipy.special.erf)
    host = backends.get("numpy")

    def scatter_add(table, ids, values):
        spy.used.add("scatter_add")
        host.scatter_add(table, ids, values)

    def erf(x, out=None):
        spy.used.add("erf")
        return scipy.special.erf(x) if out is None else scipy.special.erf(x, out=out)

    fake.scatter_add = scatter_add
    fake._erf = erf
    monkeypatch.setitem(backends._cache, "cupy", fake)
    assert backends.of(np.zeros(1).view(DeviceArray)) is fake
    return spy


def _dev(a):
    return np.asarray(a).view(DeviceArray)


def _attention_args():
    rng = np.random.default_rng(4)
    p = {f"{n}.{k}": _dev(rng.standard_normal((4, 4) if k == "weight" else 4)) for n in ("query", "key", "value")
         for k in ("weight", "bias")}
    return _dev(rng.standard_normal((1, 3, 4))), p, _dev(np.zeros((1, 1, 1, 3))), 2


def _attention_backward():
    x, p, mask, heads = _attention_args()
    out, cache = ops.self_attention_forward(x, p, mask, heads)
    return lambda: ops.self_attention_backward(_dev(np.ones(out.shape)), cache, {k: np.zeros(v.shape) for k, v in p.items()})


def _ce_backward():
    _, cache = ops.cross_entropy_forward(_dev(_x(2, 3)), _dev(np.array([0, 2])))
    return lambda: ops.cross_entropy_backward(1.0, cache)


def _pool_backward():
    _, cache = ops.pooling_forward(_dev(_x(2, 3, 4)), _dev(np.array([[1, 1, 0], [1, 1, 1]])), "max")
    return lambda: ops.pooling_backward(_dev(_x(2, 4)), cache)


def _l2_backward():
    _, cache = ops.l2_normalize_forward(_dev(_x(2, 4)))
    return lambda: ops.l2_normalize_backward(_dev(_x(2, 4)), cache)


DISPATCH = {   # op -> (a call made on DeviceArray inputs, the array-module functions it must look up there)
    "log_softmax": (lambda: lambda: ops.log_softmax(_dev(_x(2, 3))), {"exp", "log"}),
    "softmax": (lambda: lambda: ops.softmax_forward(_dev(_x(2, 3))), {"exp"}),
    "gelu forward": (lambda: lambda: ops.activation_forward("gelu", _dev(_x(3))), {"erf"}),
    "gelu backward": (lambda: (lambda c: lambda: ops.activation_backward(_dev(_x(3)), c))(
        ops.activation_forward("gelu", _dev(_x(3)))[1]), {"exp"}),
    "gelu_new forward": (lambda: lambda: ops.activation_forward("gelu_new", _dev(_x(3))), {"tanh"}),
    "layer norm forward": (lambda: lambda: ops.layer_norm_forward(_dev(_x(2, 3)), _dev(np.ones(3)), _dev(np.zeros(3)),
                                                                  1e-12), {"sqrt"}),
    "relu": (lambda: lambda: ops.activation_forward("relu", _dev(_x(3))), {"maximum"}),
    "tanh": (lambda: lambda: ops.activation_forward("tanh", _dev(_x(3))), {"tanh"}),
    "pooling forward max": (lambda: lambda: ops.pooling_forward(_dev(_x(2, 3, 4)), _dev(np.ones((2, 3))), "max"),
                            {"where", "argmax", "take_along_axis"}),
    "pooling forward mean": (lambda: lambda: ops.pooling_forward(_dev(_x(2, 3, 4)), _dev(np.ones((2, 3))), "mean"),
                             {"maximum"}),
    "pooling backward": (_pool_backward, {"arange"}),
    "l2 normalize forward": (lambda: lambda: ops.l2_normalize_forward(_dev(_x(2, 4))), {"maximum", "sqrt"}),
    "l2 normalize backward": (_l2_backward, {"where"}),
    "attention fused qkv": (lambda: lambda: attention.fused_qkv(_attention_args()[1]), {"concatenate"}),
    "attention forward": (lambda: lambda: ops.self_attention_forward(*_attention_args()), {"split"}),
    "attention backward": (_attention_backward, {"zeros", "concatenate"}),
    "embedding backward": (lambda: lambda: ops.embedding_backward(_dev(_x(2, 3)), _dev(np.array([1, 1])),
                                                                   _dev(np.zeros((4, 3)))), {"scatter_add"}),
    "cross-entropy forward": (lambda: lambda: ops.cross_entropy_forward(_dev(_x(2, 3)), _dev(np.array([0, 2]))),
                              {"where", "take_along_axis"}),
    "cross-entropy backward": (_ce_backward, {"exp", "arange"}),
    "bce forward": (lambda: lambda: ops.bce_with_logits_forward(_dev(_x(2, 3)), _dev(np.ones((2, 3)))),
                    {"maximum", "log1p", "exp", "abs"}),
    "sigmoid": (lambda: lambda: ops.sigmoid(_dev(_x(3))), {"where", "exp", "abs"}),
}


@pytest.mark.parametrize("name", list(DISPATCH))
def test_ops_use_their_inputs_array_module(device, name):
    """Called on arrays of another backend (a stand-in for CuPy), each op looks up its array functions
    in that backend's module (backends.of(input).xp), never NumPy's directly: NumPy functions given CuPy
    arrays fail or copy to the host."""
    make, expected = DISPATCH[name]
    call = make()                    # the forward a backward needs runs before the record starts
    device.used.clear()
    call()
    assert expected <= device.used, (name, sorted(device.used))
