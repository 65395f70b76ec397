"""Every op's backward against finite differences, float64, under hypothesis-drawn sizes.

Tolerance: relative error <= 1e-6 with a floor of 1e-4 (|a - n| / max(1e-4, |a| + |n|)), from
Richardson-extrapolated five-point differences at h = 1e-3. Measured worst case over the CI examples:
~3e-8 (round-off at entries whose true gradient is exactly zero); a wrong backward is off by O(1).
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backends
import gradcheck
from gradcheck.cases import check_op_case, op_cases
from ref_bert import ops

from .conftest import examples

OP_NAMES = [c.name for c in op_cases()]


@st.composite
def op_sizes(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(2, 4))
    if heads * head_dim < 4:  # LayerNorm over fewer than 4 features is (nearly) a step function
        head_dim = 4
    return dict(seed=draw(st.integers(0, 2**31 - 1)), B=draw(st.integers(1, 3)), T=draw(st.integers(1, 6)),
                H=heads * head_dim, heads=heads, E=draw(st.integers(4, 9)), I=draw(st.integers(2, 12)),
                V=draw(st.integers(5, 20)), dropout=draw(st.sampled_from([0.0, 0.1, 0.5])))


@pytest.mark.parametrize("ops_run", ["default", "reference"])
@pytest.mark.parametrize("name", OP_NAMES)
@settings(max_examples=examples(12))
@given(sizes=op_sizes())
def test_op_backward_matches_finite_differences(name, ops_run, sizes):
    """With the backend's fast variants (the default), and with the reference ops (tables emptied)."""
    case = next(c for c in op_cases(**sizes) if c.name == name)
    with backends.reference_ops() if ops_run == "reference" else contextlib.nullcontext():
        check_op_case(case, seed=sizes["seed"] % 1000).assert_ok()


def test_every_op_family_is_covered():
    expected = {"linear", "layer_norm", "activation.gelu", "activation.gelu_new", "activation.relu",
                "activation.tanh", "softmax", "masked_softmax", "dropout", "cross_entropy", "self_attention", "embeddings",
                "encoder.attention_sublayer", "encoder.ffn_sublayer", "heads.pooler", "heads.mlm", "heads.sop",
                "cross_entropy.label_smoothing", "cross_entropy.tf_albert", "bce_with_logits", "mse",
                "tasks.classifier", "tasks.span_logits", "tasks.span_loss", "tasks.sequence_loss.regression",
                "tasks.sequence_loss.single", "tasks.sequence_loss.multi",
                "sentence_pooling"}
    assert expected == set(OP_NAMES)


def test_a_planted_backward_bug_is_caught(monkeypatch):
    """LayerNorm backward without the centring term: the check must fail, loudly."""
    def wrong_backward(dout, cache, dweight=None, dbias=None):
        xhat, rstd, weight = cache
        if dweight is not None:
            dweight += (dout * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
        if dbias is not None:
            dbias += dout.reshape(-1, xhat.shape[-1]).sum(axis=0)
        g = dout * weight
        return rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))  # forgot "- mean(g)"

    case = next(c for c in op_cases(seed=1) if c.name == "layer_norm")
    good = check_op_case(case)
    assert good.passed
    monkeypatch.setattr(ops, "layer_norm_backward", wrong_backward)
    case = next(c for c in op_cases(seed=1) if c.name == "layer_norm")
    bad = check_op_case(case)
    assert not bad.passed and bad.max_rel_error > 1e-2
    with pytest.raises(AssertionError, match="gradient check failed for x"):
        bad.assert_ok()


def test_check_on_a_users_own_function():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal(4)

    def f(x, w):
        return np.sum(np.tanh(x @ w) ** 2)

    t = np.tanh(x @ w)
    dz = 2 * t * (1 - t * t)
    report = gradcheck.check(f, [x, w], [np.outer(dz, w), x.T @ dz])
    assert report.passed and report.max_rel_error < 1e-8
    wrong = gradcheck.check(f, [x, w], [np.outer(dz, w), x.T @ dz * 1.001])
    assert not wrong.passed
    assert [r.name for r in wrong.results if not r.passed] == ["input1"]


def test_check_vjp_uses_a_random_upstream_gradient():
    # A backward that ignores dout's values (treats it as all ones) passes an all-ones check, but
    # must fail against check_vjp's random upstream gradient.
    x = np.random.default_rng(1).standard_normal(6)
    report = gradcheck.check_vjp(lambda x: 3 * x, lambda dout: [np.full_like(dout, 3.0)], [x])
    assert not report.passed


def test_check_rejects_float32_and_mismatched_gradients():
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="float64"):
        gradcheck.check(lambda x: float(x.sum()), [x], [np.ones(3)])
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        gradcheck.check(lambda x: float(x.sum()), [np.ones(3)], [np.ones(2)])


def test_relative_error_floor():
    assert gradcheck.relative_error(1.0, 1.0 + 1e-7) == pytest.approx(1e-7 / 2.0000001)
    assert gradcheck.relative_error(0.0, 1e-12, floor=1e-4) == pytest.approx(1e-8)
