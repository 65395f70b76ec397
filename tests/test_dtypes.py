"""No hidden float64 work in a float32 model.

NumPy promotes silently: a float64 scalar or array anywhere in an expression (``np.float64(0.5) * x``,
a float64 mask, ``np.sqrt(2.0)`` kept as an array) turns a float32 computation into a float64 one,
twice the memory traffic and a different rounding from the float32 reference it claims to be. The
check: the model's parameters are viewed as :class:`Float64Watch`, an ndarray subclass whose
``__array_ufunc__`` sees every ufunc call (arithmetic, matmul, exp, reductions) that has a watched
operand, and records any float64 result. Results are viewed as watched arrays again, so the watch
follows the activations, the gradients and the optimiser's moments through a whole training step.
"""
from __future__ import annotations

import traceback

import numpy as np
import pytest

from ref_bert import Config, Model
from ref_bert.optim import AdamW, Lamb
from ref_bert.params import FlatBuffer


class Float64Watch(np.ndarray):
    """Records (ufunc, method, caller) for every float64 result of a ufunc with a watched operand."""
    calls = 0
    promotions: list = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        Float64Watch.calls += 1
        plain = [x.view(np.ndarray) if isinstance(x, Float64Watch) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Float64Watch) else o for o in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        for r in result if isinstance(result, tuple) else (result,):
            if getattr(r, "dtype", None) == np.float64:
                caller = traceback.extract_stack(limit=3)[0]
                Float64Watch.promotions.append((ufunc.__name__, method, f"{caller.filename}:{caller.lineno}"))
        if isinstance(result, np.ndarray) and result.dtype.kind == "f" and result.ndim:
            return result.view(Float64Watch)
        return result


@pytest.fixture
def watch():
    Float64Watch.calls, Float64Watch.promotions = 0, []
    yield Float64Watch


def watched_model(config) -> Model:
    model = Model(config, dtype="float32", seed=0)
    model.params = FlatBuffer(model.params.shapes, np, np.float32, flat=model.params.flat.view(Float64Watch))
    return model


def test_the_watch_sees_a_promotion(watch):
    # Guards against a check that cannot fail: a float64 scalar times a watched float32 array is seen.
    x = np.ones(3, dtype=np.float32).view(Float64Watch)
    assert (x * np.float32(2)).dtype == np.float32 and watch.promotions == []
    assert (x * np.float64(2)).dtype == np.float64
    assert len(watch.promotions) == 1 and watch.promotions[0][0] == "multiply"


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_float32_training_step_has_no_float64_arrays(watch, act, optimizer):
    """Forward, backward and an optimiser step of a float32 model, with dropout, padding, token types
    and both heads: hundreds of ufunc calls on watched arrays, none of them with a float64 result."""
    config = Config.preset("tiny", vocab_size=300, hidden_act=act, hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.1)
    model = watched_model(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, (4, 20))
    mask = np.ones((4, 20), dtype=np.int64)
    mask[1, 15:] = 0
    token_types = (np.arange(20) >= 10).astype(np.int64)[None].repeat(4, axis=0)
    labels = np.where(rng.random((4, 20)) < 0.3, ids, -100)
    _result = model.loss_and_grads(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                                       mlm_labels=labels, sop_labels=np.array([0, 1, 0, 1]), training=True,
                                       dropout_seed=1)
    loss, grads = _result.loss, _result.grads
    make = (lambda p: Lamb.from_preset("albert", p)) if optimizer == "lamb" else (lambda p: AdamW.from_preset("bert", p))
    make(model.state_dict()).step(grads)
    assert np.asarray(loss).dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    assert watch.calls > 500, f"the watch saw only {watch.calls} ufunc calls: it is not following the step"
    assert watch.promotions == [], f"float64 results in a float32 step: {watch.promotions[:10]}"
