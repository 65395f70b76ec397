"""The fine-tuning heads: every head's gradient against finite differences (float64, hypothesis-drawn
configs), the new loss ops against torch's definitions, the dropout fallbacks as transformers reads them,
heads put on encoder checkpoints, and bad input. Parity with transformers is in tests/test_hf_heads.py.

Gradient-check tolerance: that of tests/test_gradcheck_model.py (1e-6 relative, floor 1e-4).
Loss ops against torch in float64: 1e-13 relative (both are a handful of float64 operations per
element; measured <= 5e-16).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck.cases import check_model
from gradcheck.strategies import configs, model_inputs
from ref_bert import Config, Model, hf_torch, ops
from ref_bert.config import BERT_ONLY_HEADS, HEADS
from ref_bert.examples import task_labels
from tests._hf_models import BERT, hf_config_dict, hf_model, rel_err

from .conftest import examples

FINE_TUNING_HEADS = [h for h in HEADS if h != "pretraining"]


# --- every head's gradient against finite differences ------------------------------------------------
@pytest.mark.parametrize("head", FINE_TUNING_HEADS)
@settings(max_examples=examples(3))
@given(data=st.data())
def test_every_head_gradient(head, data):
    config = data.draw(configs(max_layers=2), label="config")
    changes = dict(num_labels=data.draw(st.sampled_from([1, 3])) if head == "sequence_classification" else 3)
    if head == "question_answering":
        changes["num_labels"] = 2
    if head in BERT_ONLY_HEADS:
        changes.update(model_type="bert", is_decoder=head == "causal_lm")
    if head == "sequence_classification" and changes["num_labels"] == 3:
        changes["problem_type"] = data.draw(st.sampled_from(["single_label_classification",
                                                            "multi_label_classification", "regression"]))
    config = config.with_head(head, **changes)
    inputs = data.draw(model_inputs(config), label="inputs")
    if head == "multiple_choice":     # (B, C, T): the drawn rows become the choices of one or two examples
        rows = inputs["input_ids"].shape[0]
        B, C = (1, rows) if rows < 4 else (2, rows // 2)
        for key in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels"):
            inputs[key] = inputs[key][:B * C].reshape(B, C, -1)
    labels = task_labels(config, inputs, np.random.default_rng(inputs["dropout_seed"]))
    kwargs = {k: inputs[k] for k in ("input_ids", "token_type_ids", "attention_mask", "training", "dropout_seed")}
    kwargs.update(labels)
    if head in ("masked_lm", "causal_lm"):
        kwargs["mlm_normalization"] = data.draw(st.sampled_from(["mean", "tf_albert"]))
    if head != "base":
        kwargs["label_smoothing"] = data.draw(st.sampled_from([0.0, 0.1]))
    model = Model(config, dtype="float64", seed=data.draw(st.integers(0, 1000), label="weights seed"))
    # The head's own parameters, the pooler and the embeddings: the head's gradient reaches the
    # embeddings only through every layer's backward (each encoder parameter is checked, for every
    # sharing layout, by tests/test_gradcheck_model.py; this keeps the test within its time budget).
    checked = [n for n in model.params if not n.startswith("encoder.")]
    if head == "base":    # no loss: check backward with a random upstream gradient (gradcheck.check_vjp)
        from gradcheck import check_vjp

        def forward(**params):
            for name, value in params.items():
                model.params[name] = value
            out = model.forward(**kwargs)
            return np.concatenate([out.last_hidden_state.ravel(), out.pooled_output.ravel()])

        def backward(dout):
            out = model.forward(**kwargs, keep_cache=True)
            n = out.last_hidden_state.size
            return model.backward(out, d_hidden_states={-1: dout[:n].reshape(out.last_hidden_state.shape)},
                                  d_pooled_output=dout[n:].reshape(out.pooled_output.shape)).params

        saved = {k: model.params[k].copy() for k in checked}
        report = check_vjp(forward, lambda dout: {k: g for k, g in backward(dout).items() if k in checked}, saved,
                           samples=3, directions=1)
    else:
        report = check_model(model, kwargs, names=checked, samples=3, directions=1, seed=inputs["dropout_seed"] % 1000)
    assert {r.name for r in report.results} == set(checked)
    report.assert_ok()


# --- the loss ops against torch ------------------------------------------------------------------------
def test_label_smoothing_matches_torch_including_ignored_rows():
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((9, 6)) * 3, rng.integers(0, 6, 9)
    y[[1, 4]] = -100
    for eps in (0.0, 0.1, 0.5):
        loss, cache = ops.cross_entropy_forward(z, y, label_smoothing=eps)
        zt = torch.tensor(z, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(zt, torch.tensor(y), label_smoothing=eps)
        ref.backward()
        assert rel_err(loss, ref.item()) <= 1e-13
        assert rel_err(ops.cross_entropy_backward(1.0, cache), zt.grad.numpy()) <= 1e-13


def test_tf_albert_normalisation_is_sum_over_count_plus_epsilon():
    rng = np.random.default_rng(1)
    z, y = rng.standard_normal((7, 5)), rng.integers(0, 5, 7)
    y[2] = -100
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    weights = (y != -100).astype(float)                     # TF's masked_lm_weights
    nll = -log_p[np.arange(7), np.where(y >= 0, y, 0)]
    expected = (weights * nll).sum() / (weights.sum() + 1e-5)
    loss, _ = ops.cross_entropy_forward(z, y, normalization="tf_albert")
    mean, _ = ops.cross_entropy_forward(z, y)
    assert rel_err(loss, expected) <= 1e-14
    assert 0 < float(mean) - float(loss) < 1e-5          # differs from the mean, by the 1e-5 only


def test_bce_with_logits_and_mse_match_torch_and_stay_finite():
    rng = np.random.default_rng(2)
    z, t = rng.standard_normal((4, 3)) * 50, rng.random((4, 3))     # |z| up to ~150: exp(150) overflows float32
    for dtype in (np.float64, np.float32):
        zt = torch.tensor(z.astype(dtype), requires_grad=True)
        ref = torch.nn.functional.binary_cross_entropy_with_logits(zt, torch.tensor(t.astype(dtype)))
        ref.backward()
        loss, cache = ops.bce_with_logits_forward(z.astype(dtype), t.astype(dtype))
        grad = ops.bce_with_logits_backward(1.0, cache)
        tol = 1e-13 if dtype == np.float64 else 1e-6
        assert loss.dtype == dtype and np.isfinite(grad).all()
        assert rel_err(loss, ref.item()) <= tol and rel_err(grad, zt.grad.numpy()) <= tol
    zt = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.mse_loss(zt, torch.tensor(t))
    ref.backward()
    loss, cache = ops.mse_forward(z, t)
    assert rel_err(loss, ref.item()) <= 1e-14 and rel_err(ops.mse_backward(1.0, cache), zt.grad.numpy()) <= 1e-14


# --- dropout probabilities as transformers reads them -------------------------------------------------
@pytest.mark.parametrize("family, head, keys", [
    ("albert", "sequence_classification", dict(classifier_dropout_prob=0.3, hidden_dropout_prob=0.2)),
    ("albert", "multiple_choice", dict(classifier_dropout_prob=0.3, hidden_dropout_prob=0.2)),
    ("albert", "token_classification", dict(classifier_dropout_prob=0.3, hidden_dropout_prob=0.2)),
    ("albert", "pretraining", dict(classifier_dropout_prob=0.3)),
    ("bert", "sequence_classification", dict(classifier_dropout=0.3, hidden_dropout_prob=0.2)),
    ("bert", "sequence_classification", dict(classifier_dropout=None, hidden_dropout_prob=0.2)),
    ("bert", "token_classification", dict(classifier_dropout=None, hidden_dropout_prob=0.2)),
    ("bert", "multiple_choice", dict(classifier_dropout=0.3, hidden_dropout_prob=0.2)),
    ("bert", "next_sentence", dict(classifier_dropout=0.3, hidden_dropout_prob=0.2)),
    ("bert", "question_answering", dict(classifier_dropout=0.3, hidden_dropout_prob=0.2)),
])
def test_head_dropout_is_read_as_transformers_reads_it(family, head, keys):
    from ref_bert.hf import ARCHITECTURES, config_from_hf

    spec = dict(family=family, vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=8, max_position_embeddings=8, **keys)
    if family == "albert":
        spec["embedding_size"] = 4
    arch = next(a for a, (f, h) in ARCHITECTURES.items() if f == family and h == head)
    hf = hf_torch.from_config(hf_config_dict(spec), arch)
    dropouts = [m.p for name, m in hf.named_modules() if isinstance(m, torch.nn.Dropout)
                and not name.startswith(hf.base_model_prefix)]
    hf_p = dropouts[0] if dropouts else 0.0        # QA and NSP have no head dropout module
    ours = config_from_hf(hf.config.to_dict(), family, head=head)
    assert ours.head_dropout_prob == pytest.approx(hf_p)
    assert ours.architecture == arch


def test_albert_token_classification_falls_back_to_hidden_dropout():
    """AlbertForTokenClassification.__init__ reads classifier_dropout_prob, or hidden_dropout_prob when it
    is None; transformers 5's config validation now refuses None there, so this is checked on our side
    only (an older config.json may still carry null)."""
    config = Config(head="token_classification", classifier_dropout_prob=None, hidden_dropout_prob=0.2)
    assert config.head_dropout_prob == 0.2
    assert config.replace(classifier_dropout_prob=0.3).head_dropout_prob == 0.3


# --- heads on encoder checkpoints -----------------------------------------------------------------------
def test_a_head_on_a_base_checkpoint_is_fresh_and_not_saved_as_trained(tmp_path):
    hf_model(BERT, arch="Model").save_pretrained(tmp_path / "base")
    # a bare BertModel stays a BertModel: no invented heads (it used to be saved as BertForPreTraining)
    bare = Model.from_hf(tmp_path / "base", dtype="float64")
    assert bare.config.architecture == "BertModel" and bare.fresh_parameters == ()
    assert not any(n.startswith(("mlm.", "sop.")) for n in bare.params)
    bare.save_hf(tmp_path / "bare-out")
    assert json.loads((tmp_path / "bare-out" / "config.json").read_text())["architectures"] == ["BertModel"]
    _, info = hf_torch.from_pretrained(tmp_path / "bare-out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    with pytest.warns(UserWarning, match="no classifier weights for BertForSequenceClassification.*freshly"):
        model = Model.from_hf(tmp_path / "base", dtype="float64", head="sequence_classification", num_labels=3)
    assert model.fresh_parameters == ("classifier.weight", "classifier.bias")
    with pytest.raises(ValueError, match="freshly initialised and were never trained.*mark_trained"):
        model.save_hf(tmp_path / "untrained")
    assert not (tmp_path / "untrained").exists()
    model.mark_trained()
    model.save_hf(tmp_path / "cls")
    hf, info = hf_torch.from_pretrained(tmp_path / "cls", output_loading_info=True)
    assert type(hf).__name__ == "BertForSequenceClassification" and hf.config.num_labels == 3
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = np.random.default_rng(0).integers(1, BERT["vocab_size"], (2, 7))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(x)).logits.numpy()
    assert rel_err(model.forward(x).logits, ref) <= 1e-10
    from ref_bert.checkpoint import load_config_any

    assert load_config_any(tmp_path / "cls")[0] == model.config.replace(name="x")
    again = Model.from_hf(tmp_path / "cls", dtype="float64")
    assert again.config.head == "sequence_classification" and again.fresh_parameters == ()
    for name, view in model.params.items():
        assert np.array_equal(view, again.params[name]), name


def test_a_pretraining_checkpoint_as_a_classifier_reports_the_unused_heads(tmp_path):
    hf_model(BERT, arch="ForPreTraining").save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="does not use the checkpoint's bert.pooler, cls.predictions, "
                                         "cls.seq_relationship weights"):
        model = Model.from_hf(tmp_path, head="token_classification", num_labels=4)
    assert model.config.architecture == "BertForTokenClassification" and "pooler.weight" not in model.params
    assert model.fresh_parameters == ("classifier.weight", "classifier.bias")


# --- bad input ------------------------------------------------------------------------------------------
def _tiny(head, **changes):
    config = Config(vocab_size=20, embedding_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=8, max_position_embeddings=8)
    return Model(config.with_head(head, **changes), dtype="float64")


@pytest.mark.parametrize("head, kwargs, match", [
    ("sequence_classification", dict(labels=np.array([0, 3])), r"labels contains 3, outside the valid range \[0, 2\)"),
    ("sequence_classification", dict(labels=np.array([0, 1, 1])), r"labels has shape \(3,\), expected \(2,\)"),
    ("token_classification", dict(labels=np.array([0, 1])), r"labels has shape \(2,\), expected \(2, 5\)"),
    ("question_answering", dict(start_positions=np.array([0, 1])), "needs both start_positions and end_positions"),
    ("question_answering", dict(labels=np.array([0, 1])), "takes start_positions and end_positions, not labels"),
    ("sequence_classification", dict(mlm_labels=np.zeros((2, 5), int)), "mlm_labels / sop_labels are the pretraining"),
    ("sequence_classification", {}, "needs labels"),
    ("base", dict(labels=np.array([0, 1])), "AlbertModel has no loss"),
    ("pretraining", dict(labels=np.array([0, 1])), "pretraining head takes mlm_labels and sop_labels"),
    ("multiple_choice", dict(labels=np.array([0, 1])), "must be 3-D"),
    ("masked_lm", dict(labels=np.zeros((2, 5), int), mlm_normalization="sum"), "mlm_normalization='sum' is invalid"),
    ("masked_lm", dict(labels=np.zeros((2, 5), int), label_smoothing=1.5), "label_smoothing=1.5 is invalid"),
])
def test_bad_labels_are_named(head, kwargs, match):
    model = _tiny(head)
    ids = np.ones((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        model.loss_and_grads(ids, **kwargs)


def test_bad_head_configs_are_named():
    with pytest.raises(ValueError, match="head='classify' is invalid"):
        Config(head="classify")
    with pytest.raises(ValueError, match="head='causal_lm' is invalid: expected an ALBERT head"):
        Config(head="causal_lm")
    with pytest.raises(ValueError, match="num_labels=3 is invalid: expected 2 for question answering"):
        Config(head="question_answering", num_labels=3)
    with pytest.raises(ValueError, match="is_decoder=True is invalid"):
        Config(is_decoder=True)
    with pytest.raises(ValueError, match="classifier_dropout_prob=None is invalid"):
        Config(head="sequence_classification", classifier_dropout_prob=None)
    model = _tiny("pretraining")
    out = model.forward(np.ones((2, 5), dtype=np.int64), keep_cache=True)
    with pytest.raises(ValueError, match="d_logits was given but the AlbertForPreTraining head has no task logits"):
        model.backward(out, d_logits=np.zeros((2, 2)))


# --- golden files for every head --------------------------------------------------------------------
@pytest.mark.parametrize("head", FINE_TUNING_HEADS)
def test_golden_file_of_every_head(head, tmp_path):
    from ref_bert.golden import head_loss_and_grads, make_inputs, read_golden, write_golden

    model_type = "bert" if head in BERT_ONLY_HEADS else "albert"
    config = Config(vocab_size=20, embedding_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=8, max_position_embeddings=8, model_type=model_type,
                    sharing="none" if model_type == "bert" else "all").with_head(head, is_decoder=head == "causal_lm")
    model = Model(config, dtype="float64", seed=1)
    inputs = make_inputs(config, batch=2, seq_len=6, seed=0)
    write_golden(tmp_path / "g.safetensors", model, inputs, steps=1)
    tensors, meta = read_golden(tmp_path / "g.safetensors")
    assert meta["architecture"] == config.architecture and meta["config"]["head"] == head
    names = {n.split("/", 1)[1] for n in tensors if n.startswith("inputs/")}
    expected = {"input_ids", "token_type_ids", "attention_mask", "position_ids"} | {
        "base": {"d_last_hidden_state", "d_pooled_output"},
        "question_answering": {"start_positions", "end_positions"}}.get(head, {"labels"})
    assert names == expected
    losses = {n for n in tensors if n.startswith("loss/")}
    assert losses == {"loss/total"} | ({"loss/start", "loss/end"} if head == "question_answering" else
                                       set() if head == "base" else {"loss/task"})
    result = head_loss_and_grads(model, {k: v for k, v in inputs.items()})
    assert tensors["loss/total"].item() == float(result.loss)
    assert {n.split("/", 1)[1] for n in tensors if n.startswith("grads/")} == set(model.params)
    for name, grad in result.grads.items():
        assert np.array_equal(tensors[f"grads/{name}"], grad), name
    assert not np.array_equal(tensors["steps/loss"], np.zeros(1))


def test_generate_refuses_a_model_without_an_mlm_head():
    from ref_bert.generate import generate

    with pytest.raises(ValueError, match="generate needs a bidirectional model with an MLM head.*AlbertForSequence"):
        generate(_tiny("sequence_classification"), [[3, 4]])


def test_pretraining_takes_only_the_sizes_of_a_fine_tuning_config(tmp_path):
    from ref_bert.checkpoint import save_model
    from ref_bert.pretrain.settings import resolve_model_config

    save_model(_tiny("token_classification", num_labels=4), tmp_path)
    config = resolve_model_config(str(tmp_path), {})
    assert config.head == "pretraining" and config.hidden_size == 8
    with pytest.raises(ValueError, match="--set head=\"masked_lm\": pretraining always trains"):
        resolve_model_config(str(tmp_path), {"head": "masked_lm"})
