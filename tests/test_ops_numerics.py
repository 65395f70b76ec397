"""Numerical stability of the softmax family, against SciPy's independent implementations.

Logits of size 1000 (float32 and float64) overflow an unshifted exp (float32 overflows above ~88.7,
float64 above ~709.8), so each check fails if the max-subtraction is removed or flipped.
Tolerances: float64 1e-12 relative, float32 1e-5 (a few float32 ulps of values up to ~1e3)."""
from contextlib import nullcontext as _nothing

import numpy as np
import pytest
import scipy.special

import backends
from ref_bert import ops
from ref_bert.ops.attention import self_attention_backward, self_attention_forward

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def large_logits(dtype, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((4, 7)) * 3
    z[0] += 1000.0          # every entry far beyond exp's range
    z[1] -= 1000.0          # every entry far below: an unshifted sum underflows to 0
    z[2, 3] = 1000.0        # one dominant entry
    return z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fast", [True, False])
def test_softmax_and_log_softmax_survive_large_logits(dtype, fast):
    z = large_logits(dtype)
    with (backends.reference_ops() if not fast else _nothing()):
        p, _ = ops.softmax_forward(z)
    lp = ops.log_softmax(z)
    assert p.dtype == dtype and lp.dtype == dtype
    assert np.isfinite(p).all() and np.isfinite(lp).all()
    np.testing.assert_allclose(p, scipy.special.softmax(z.astype(np.float64), axis=-1), rtol=TOL[dtype], atol=1e-30)
    np.testing.assert_allclose(lp, scipy.special.log_softmax(z.astype(np.float64), axis=-1), rtol=TOL[dtype],
                               atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_of_large_logits(dtype):
    z = large_logits(dtype)
    labels = np.array([2, 0, 3, -100])
    loss, cache = ops.cross_entropy_forward(z, labels)
    expected = -np.mean(scipy.special.log_softmax(z.astype(np.float64), axis=-1)[np.arange(3), labels[:3]])
    assert np.isfinite(loss) and float(loss) == pytest.approx(expected, rel=TOL[dtype])
    dz = ops.cross_entropy_backward(1.0, cache)
    ref = scipy.special.softmax(z.astype(np.float64), axis=-1)[:3]
    ref[np.arange(3), labels[:3]] -= 1
    np.testing.assert_allclose(dz[:3], ref / 3, rtol=TOL[dtype], atol=TOL[dtype])
    assert not dz[3].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_softmax_of_large_scores(dtype):
    rng = np.random.default_rng(1)
    raw = (rng.standard_normal((1, 2, 3, 5)) * 2000).astype(dtype)
    mask = np.ones((1, 5)); mask[0, 4] = 0
    additive = ops.additive_mask_from(mask, dtype, -10000.0)
    for context in (_nothing(), backends.reference_ops()):
        with context:
            (probs, _), _ = ops.masked_softmax_forward(raw.copy(), 0.5, additive)
        expected = scipy.special.softmax(raw.astype(np.float64) * 0.5 + additive, axis=-1)
        np.testing.assert_allclose(probs, expected, rtol=TOL[dtype], atol=1e-30)


def test_attention_with_a_past_has_no_backward():
    """Cached decoding's forward (past keys and values) is inference-only: its backward refuses."""
    rng = np.random.default_rng(0)
    H, heads = 8, 2
    p = {f"{n}.{k}": rng.standard_normal((H, H) if k == "weight" else H) for n in ("query", "key", "value")
         for k in ("weight", "bias")}
    x = rng.standard_normal((1, 2, H))
    past = (rng.standard_normal((1, heads, 3, H // heads)), rng.standard_normal((1, heads, 3, H // heads)))
    context, cache = self_attention_forward(x, p, np.zeros((1, 1, 2, 5)), heads, past=past)
    assert context.shape == (1, 2, H) and cache.k.shape == (1, heads, 5, H // heads)
    np.testing.assert_array_equal(cache.k[:, :, :3], past[0])
    with pytest.raises(ValueError, match="inference-only"):
        self_attention_backward(np.ones_like(context), cache, {})
