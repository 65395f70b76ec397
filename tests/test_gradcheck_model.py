"""Every parameter of the full model against finite differences, float64, hypothesis-drawn configs.

Configs cover E < H and E == H, every sharing variant, 1-3 layers, 1-4 heads, groups and inner
blocks, both GELU forms, padded and unpadded masks and dropout with frozen masks (gradcheck.strategies).
Each parameter tensor gets 4 sampled entries (half where the analytic gradient is non-zero) and,
when larger than 16 entries, a random-direction check covering all of its entries.
Tolerance 1e-6 relative, floor 1e-4 (see tests/test_gradcheck_ops.py); measured worst over 150
random examples while developing: 5.9e-8.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck.battery import run_battery
from gradcheck.cases import check_model
from gradcheck.strategies import configs, model_inputs
from ref_bert import Model, ops

from .conftest import examples


@settings(max_examples=examples(10))
@given(data=st.data())
def test_every_parameter_gradient(data):
    config = data.draw(configs(), label="config")
    inputs = data.draw(model_inputs(config), label="inputs")
    model = Model(config, dtype="float64", seed=data.draw(st.integers(0, 1000), label="weights seed"))
    report = check_model(model, inputs, samples=4, directions=1, seed=inputs["dropout_seed"] % 1000)
    assert {r.name for r in report.results} == set(model.state_dict())
    report.assert_ok()


@settings(max_examples=examples(4))
@given(data=st.data())
def test_mlm_only_and_sop_only_losses(data):
    config = data.draw(configs(max_layers=2), label="config")
    inputs = data.draw(model_inputs(config), label="inputs")
    model = Model(config, dtype="float64", seed=0)
    for drop in ("mlm_labels", "sop_labels"):
        partial = {**inputs, drop: None}
        check_model(model, partial, samples=3, directions=1).assert_ok()


def test_battery_passes_and_fails_on_a_planted_bug(monkeypatch, capsys):
    assert run_battery(seed=0)
    out = capsys.readouterr().out
    assert "0 failed" in out and "model bert: E==H, no sharing, erf gelu" in out

    real_backward = ops.masked_softmax_backward

    def softmax_backward_off_by_scale(ddropped, cache):
        return 1.01 * real_backward(ddropped, cache)

    import gradcheck.battery as battery
    import ref_bert.ops.attention as attention
    monkeypatch.setattr(attention, "masked_softmax_backward", softmax_backward_off_by_scale)
    monkeypatch.setattr(battery, "MODEL_CASES", {})     # the op checks name the bug; the model runs cost 9 s
    assert not run_battery(seed=0)
    out = capsys.readouterr().out
    assert "FAIL" in out and "op self_attention" in out


def test_shared_parameters_receive_the_sum_of_their_layers_gradients():
    """All-shared vs unshared with identical weights in every layer: the shared gradient is the sum."""
    from ref_bert import Config
    shared = Config.preset("tiny", vocab_size=30, num_hidden_layers=3, sharing="all", hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    unshared = shared.replace(sharing="none")
    a, b = Model(shared, dtype="float64", seed=0), Model(unshared, dtype="float64", seed=0)
    for name, view in b.params.items():  # copy the shared weights into every layer of the unshared model
        src = name.replace("attention.1.", "attention.0.").replace("attention.2.", "attention.0.") \
                  .replace("ffn.1.", "ffn.0.").replace("ffn.2.", "ffn.0.")
        view[...] = a.params[src]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (2, 6))
    labels = np.where(rng.random((2, 6)) < 0.5, rng.integers(0, 30, (2, 6)), -100)
    _result = a.loss_and_grads(ids, mlm_labels=labels, sop_labels=np.array([0, 1]))
    la, ga = _result.loss, _result.grads
    _result = b.loss_and_grads(ids, mlm_labels=labels, sop_labels=np.array([0, 1]))
    lb, gb = _result.loss, _result.grads
    assert float(la) == float(lb)
    for name in ga:
        if name.startswith("encoder."):
            layers = [name.replace(".0.", f".{i}.") for i in range(3)]
            np.testing.assert_allclose(ga[name], sum(gb[n] for n in layers), rtol=1e-12, atol=1e-15)
