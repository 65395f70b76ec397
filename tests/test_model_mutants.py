"""ref_bert/model.py's plumbing, pinned where a wrong version would change what a user sees (issue #18,
mutation testing): ``from_hf`` / ``save_hf`` (defaults, the tokenizer argument, freshly initialised heads,
unused checkpoint heads, the exact warnings and where they point), ``hf_state_dict``, the bookkeeping
methods. No torch: checkpoints are written by ``save_hf`` itself, whose format the parity tests check
against transformers (test_hf_parity.py, test_heads.py).

The references are independent of the code under test: parameter counts are sums of the arrays' sizes,
Hugging Face layouts are nn.Linear's (out_features, in_features), fresh weights are those of a model built
from scratch with the same seed, and messages are the documented ones.
"""
from __future__ import annotations

import os
import re
import sys
import json
import warnings

import numpy as np
import pytest

from ref_bert import Config, Model, Tokenizer
from tests._models import perturbed_model

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Where a warning must point (its stacklevel): the caller, this file. Under the mutation run, mutmut
# calls every mutated function through its trampoline, one frame deeper, so there the caller's frame is
# the trampoline's, and only that (docs/testing.md): a stacklevel one too deep then points here.
CALLER = ({os.path.join(os.path.dirname(sys.modules["mutmut"].__file__), "mutation", "trampoline.py")}
          if "mutmut" in sys.modules else {__file__})


# The BERT family with untied layers and E = H (no embedding projection), for the BERT-only heads.
BERT = dict(model_type="bert", sharing="none", embedding_size=8)


def _config(**changes):
    base = dict(vocab_size=24, embedding_size=6, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=12, max_position_embeddings=8)
    return Config(**{**base, **changes})


def _tokenizer(n):
    return Tokenizer.from_wordpiece_vocab(SPECIALS + [f"w{i}" for i in range(n - len(SPECIALS))])


def _no_warnings():
    """A context in which any warning is an error."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error")
    return context


def test_from_hf_defaults_load_every_tensor_as_float32_on_numpy_with_seed_0(tmp_path):
    model = perturbed_model(_config(), dtype="float64", seed=3)
    model.save_hf(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())     # the dtype transformers loads it in
    assert hf_config["dtype"] == hf_config["torch_dtype"] == "float64"
    Model(_config(), dtype="float32").save_hf(tmp_path / "f32")
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    context = _no_warnings()
    try:
        loaded = Model.from_hf(tmp_path)                       # no tokenizer files: none attached, no warning
    finally:
        context.__exit__(None, None, None)
    assert loaded.backend.name == "numpy" and loaded.dtype == np.float32 and loaded.seed == 0
    assert loaded.tokenizer is None and loaded.fresh_parameters == ()
    assert list(loaded.params.shapes) == list(model.params.shapes)
    for name, view in model.params.items():
        assert loaded.params[name].dtype == np.float32
        assert np.array_equal(loaded.params[name], view.astype(np.float32)), name
    again = Model.from_hf(tmp_path, dtype="float64", seed=9)
    assert again.dtype == np.float64 and again.seed == 9
    assert np.array_equal(again.params.flat, model.params.flat)     # save_hf writes float64 bit for bit


def test_from_hf_takes_its_backend_argument_not_the_environment(tmp_path, monkeypatch):
    """from_hf's backend defaults to "numpy" and is passed on: $REF_BERT_BACKEND (what Model(backend=None)
    reads) must not decide it."""
    Model(_config(), seed=0).save_hf(tmp_path)
    monkeypatch.setenv("REF_BERT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        Model(_config())
    assert Model.from_hf(tmp_path).backend.name == "numpy"
    assert Model.from_hf(tmp_path, backend="numpy").backend.name == "numpy"


def test_from_hf_refuses_non_finite_weights_unless_asked(tmp_path):
    model = Model(_config(), dtype="float32", seed=0)
    model.params["encoder.ffn.0.output.bias"][1] = np.nan
    model.save_hf(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        Model.from_hf(tmp_path)
    loaded = Model.from_hf(tmp_path, allow_nonfinite=True)
    assert np.isnan(loaded.params["encoder.ffn.0.output.bias"][1])


def test_from_hf_tokenizer_argument(tmp_path):
    config = _config(**BERT)
    model = Model(config, seed=0)
    model.save_hf(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"^tokenizer='yes' is invalid: expected 'auto', True or False$"):
        Model.from_hf(tmp_path / "bare", tokenizer="yes")
    with pytest.raises(ValueError, match="has no tokenizer: looked for"):
        Model.from_hf(tmp_path / "bare", tokenizer=True)
    assert Model.from_hf(tmp_path / "bare", tokenizer="auto").tokenizer is None

    model.tokenizer = _tokenizer(config.vocab_size)
    directory = model.save_hf(tmp_path / "with")
    assert (tmp_path / "with" / "vocab.txt").read_text().split() == SPECIALS + [f"w{i}" for i in range(19)]
    for choice in ("auto", True):
        found = Model.from_hf(directory, tokenizer=choice).tokenizer
        assert found is not None and found.vocab_size == config.vocab_size
        assert found.encode("w3 w4").input_ids == model.tokenizer.encode("w3 w4").input_ids
    assert Model.from_hf(directory, tokenizer=False).tokenizer is None

    # a tokenizer whose size is not the embedding table's: refused, naming the directory
    _tokenizer(config.vocab_size + 2).save_hf(tmp_path / "with")
    for choice in ("auto", True):
        with pytest.raises(ValueError, match=f"^{tmp_path / 'with'}: the tokenizer has 26 tokens but the model's "
                                             f"word embeddings have 24 rows"):
            Model.from_hf(directory, tokenizer=choice)
    assert Model.from_hf(directory, tokenizer=False).tokenizer is None


def test_a_head_put_on_an_encoder_checkpoint_is_fresh_from_the_seed_and_named(tmp_path):
    encoder = perturbed_model(_config(head="base"), dtype="float64", seed=1)
    encoder.save_hf(tmp_path)
    with pytest.warns(UserWarning) as record:
        model = Model.from_hf(tmp_path, dtype="float64", seed=4, head="sequence_classification", num_labels=3)
    assert len(record) == 1 and record[0].filename in CALLER          # stacklevel: the caller's line
    assert str(record[0].message) == (
        f"{tmp_path}: the AlbertModel checkpoint has no classifier weights for AlbertForSequenceClassification; "
        f"they are freshly initialised (seed 4) and must be trained (model.fresh_parameters)")
    assert model.fresh_parameters == ("classifier.weight", "classifier.bias")
    assert model.config.head == "sequence_classification" and model.config.num_labels == 3
    scratch = Model(model.config, dtype="float64", seed=4)
    for name, view in model.params.items():
        expected = scratch.params[name] if name.startswith("classifier.") else encoder.params[name]
        assert np.array_equal(view, expected), name

    # save_hf refuses to publish them, names them, and writes nothing
    with pytest.raises(ValueError, match=r"^save_hf: 2 parameters \(classifier.weight, classifier.bias\) are "
                                         r"freshly initialised and were never trained; train them and call "
                                         r"model.mark_trained\(\), or pass allow_fresh=True"):
        model.save_hf(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning) as record:
        model.save_hf(tmp_path / "forced", allow_fresh=True)
    assert len(record) == 1 and record[0].filename in CALLER
    assert str(record[0].message) == ("save_hf: writing freshly initialised (untrained) parameters: "
                                      "classifier.weight, classifier.bias")
    forced = Model.from_hf(tmp_path / "forced", dtype="float64")
    assert forced.fresh_parameters == () and np.array_equal(forced.params.flat, model.params.flat)
    model.mark_trained()
    assert model.fresh_parameters == ()
    context = _no_warnings()
    try:
        model.save_hf(tmp_path / "trained")
    finally:
        context.__exit__(None, None, None)


def test_many_fresh_parameters_are_named_six_then_dots_and_unused_heads_are_named(tmp_path):
    Model(_config(head="base"), seed=0).save_hf(tmp_path / "base")
    with pytest.warns(UserWarning, match=r"checkpoint has no mlm, sop weights for AlbertForPreTraining; they are "
                                         r"freshly initialised \(seed 0\)"):
        model = Model.from_hf(tmp_path / "base", head="pretraining")
    names = ("mlm.dense.weight", "mlm.dense.bias", "mlm.layer_norm.weight", "mlm.layer_norm.bias", "mlm.bias",
             "sop.weight", "sop.bias")
    assert sorted(model.fresh_parameters) == sorted(names)
    with pytest.raises(ValueError, match=r"^save_hf: 7 parameters \(([a-z_.]+, ){5}[a-z_.]+, \.\.\.\) are freshly"):
        model.save_hf(tmp_path / "x")
    shown = ", ".join(model.fresh_parameters[:6]) + ", ..."
    with pytest.warns(UserWarning, match=f"^save_hf: writing freshly initialised \\(untrained\\) parameters: "
                                         f"{shown.replace('.', '[.]')}$"):
        model.save_hf(tmp_path / "x", allow_fresh=True)

    model.fresh_parameters = names[:6]                            # exactly six: all named, no dots
    with pytest.warns(UserWarning, match=r"parameters: mlm.dense.weight, [a-z_., ]+, sop.weight$"):
        model.save_hf(tmp_path / "y", allow_fresh=True)

    # a pretraining checkpoint under a token classifier: a fresh classifier, the unused heads named too
    Model(_config(), seed=0).save_hf(tmp_path / "pre")
    with pytest.warns(UserWarning) as record:
        Model.from_hf(tmp_path / "pre", head="token_classification", num_labels=4, seed=2)
    assert len(record) == 1 and record[0].filename in CALLER
    assert str(record[0].message) == (
        f"{tmp_path / 'pre'}: the AlbertForPreTraining checkpoint has no classifier weights for "
        f"AlbertForTokenClassification; they are freshly initialised (seed 2) and must be trained "
        f"(model.fresh_parameters); AlbertForTokenClassification does not use the checkpoint's albert.pooler, "
        f"predictions, sop_classifier weights")


def test_save_hf_refuses_a_tokenizer_of_another_size_and_writes_a_fitting_one(tmp_path):
    model = Model(_config(**BERT), seed=0)
    model.tokenizer = _tokenizer(23)
    with pytest.raises(ValueError, match="^save_hf: the tokenizer has 23 tokens but the model's word embeddings "
                                         "have 24 rows"):
        model.save_hf(tmp_path / "bad")
    model.tokenizer = _tokenizer(24)
    model.save_hf(tmp_path / "good")
    assert (tmp_path / "good" / "vocab.txt").read_text().split() == SPECIALS + [f"w{i}" for i in range(19)]


def test_hf_state_dict_maps_parameters_and_any_dict_shaped_like_them():
    """nn.Linear stores (out_features, in_features): our (n_in, n_out) weights appear transposed."""
    model = perturbed_model(_config(**BERT, head="base"), seed=0)
    grads = {name: np.full(view.shape, i + 0.5) for i, (name, view) in enumerate(model.params.items())}
    for tensors in (None, grads):
        mapped = model.hf_state_dict(tensors)
        source = model.state_dict() if tensors is None else grads
        q = mapped["bert.encoder.layer.0.attention.self.query.weight"]
        assert np.array_equal(q, source["encoder.attention.0.query.weight"].T)
        assert np.array_equal(mapped["bert.embeddings.word_embeddings.weight"], source["embeddings.word_embeddings"])
        assert np.array_equal(mapped["bert.pooler.dense.bias"], source["pooler.bias"])
        assert sum(a.size for a in mapped.values()) == model.params.size
    with pytest.raises(ValueError, match="tensor 'pooler.bias' is missing"):
        model.hf_state_dict({k: v for k, v in grads.items() if k != "pooler.bias"})


def test_bookkeeping_counts_names_and_views():
    config = _config(vocab_size=60)
    model = Model(config, dtype="float64", seed=0)
    sizes = {name: view.size for name, view in model.params.items()}
    heads = sum(n for name, n in sizes.items() if name.startswith(("mlm.", "sop.")))
    assert model.num_parameters(include_heads=True) == sum(sizes.values()) == model.params.size
    # AlbertModel's count (no heads): embeddings V E + P E + types E + LN 2E + projection E H + H,
    # one shared layer 4 (H H + H) + 2H + (H I + I) + (I H + H) + 2H, pooler H H + H
    V, E, H, I, P = 60, 6, 8, 12, 8
    albert_model = V * E + P * E + 2 * E + 2 * E + E * H + H + 4 * (H * H + H) + 2 * H + H * I + I + I * H + H \
        + 2 * H + H * H + H
    assert model.num_parameters() == albert_model == sum(sizes.values()) - heads
    names = [name for name, _ in model.named_parameters()]
    assert names == list(model.state_dict()) == list(config_names(config))
    arrays = list(model.parameters())
    assert len(arrays) == len(names)
    arrays[0][0, 0] = 123.0                                   # views: writing changes the model
    assert model.params["embeddings.word_embeddings"][0, 0] == 123.0
    model.state_dict()["sop.bias"][1] = -7.0
    assert model.params.flat[-1] == -7.0
    assert sum(sizes.values()) > 1000                           # so the thousands separator shows
    assert repr(model) == f"Model('custom', backend='numpy', dtype='float64', parameters={sum(sizes.values()):,})"


def config_names(config):
    from ref_bert.params import parameter_shapes

    return parameter_shapes(config, heads=True)


# --- the loss entry points: Model.loss and Model.loss_and_grads --------------------------------------
def _pretraining_inputs(config, seed=0):
    from ref_bert.examples import make_batch

    batch = make_batch(config, 3, 8, seed, recipe="counted")
    batch["position_ids"] = np.broadcast_to(np.arange(7, -1, -1), (3, 8)).copy()   # reversed: not the default
    return batch


def _plain_pretraining_loss(model, batch, label_smoothing=0.0):
    """MLM + SOP cross-entropy of what ``forward`` computes for ``batch`` (its position ids included), in
    plain NumPy on the logits."""
    out = model.forward(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                        position_ids=batch["position_ids"])
    labelled = batch["mlm_labels"].reshape(-1) != -100
    return (_smoothed_nll(out.mlm_logits.reshape(-1, model.config.vocab_size)[labelled],
                          batch["mlm_labels"].reshape(-1)[labelled], label_smoothing)
            + _smoothed_nll(out.sop_logits, batch["sop_labels"], label_smoothing))


def test_position_ids_reach_the_pretraining_loss_of_both_entry_points():
    """The loss of a batch with its own position ids is the cross-entropy of what ``forward`` computes
    with them (plain NumPy on its logits; float64, 1e-12 relative: two orders of the same few dozen
    additions), and differs from the loss with default positions."""
    model = perturbed_model(_config(), dtype="float64", seed=0)
    batch = _pretraining_inputs(model.config)
    expected = _plain_pretraining_loss(model, batch)
    assert float(model.loss(**batch)) == pytest.approx(expected, rel=1e-12)
    assert float(model.loss_and_grads(**batch).loss) == pytest.approx(expected, rel=1e-12)
    default_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    assert abs(float(model.loss(**default_positions)) - expected) > 1e-3


@pytest.mark.parametrize("given", ["mlm_labels", "sop_labels"])
def test_a_float32_pretraining_loss_with_one_label_set_stays_float32(given):
    """The absent loss is a 0-d zero of the model's dtype: a float64 zero would make the float32 loss
    float64 (NumPy 2 promotes a float32 0-d array with a float64 one)."""
    model = Model(_config(), dtype="float32", seed=0)
    batch = _pretraining_inputs(model.config)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", given)}
    result = model.loss_and_grads(**inputs)
    assert model.loss(**inputs).dtype == np.float32
    assert result.loss.dtype == np.float32
    assert {k: v.dtype for k, v in result.parts.items()} == {"mlm": np.float32, "sop": np.float32}
    absent = "sop" if given == "mlm_labels" else "mlm"
    assert float(result.parts[absent]) == 0.0


def test_loss_is_the_eval_loss_by_default_and_traces_its_forward():
    """``Model.loss`` without ``training`` runs no dropout: on a config with dropout 0.1 it equals the
    ``training=False`` loss and the default ``loss_and_grads`` loss exactly, while a training pass
    differs. Its ``trace`` sees the forward's tensors, the same names ``loss_and_grads`` reports."""
    model = perturbed_model(_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1), dtype="float64")
    batch = _pretraining_inputs(model.config)
    eval_loss = float(model.loss(**batch, training=False))
    assert float(model.loss(**batch)) == eval_loss == float(model.loss_and_grads(**batch).loss)
    assert float(model.loss(**batch, training=True, dropout_seed=1)) != eval_loss
    seen_loss, seen_grads = [], []
    model.loss(**batch, trace=lambda name, x: seen_loss.append(name))
    model.loss_and_grads(**batch, trace=lambda name, x: seen_grads.append(name))
    assert seen_loss and [n for n in seen_grads if n in set(seen_loss)] == seen_loss


def test_loss_scale_scales_the_pretraining_loss_and_its_gradient():
    """``loss_scale`` multiplies both loss weights: by 2 the loss and every gradient are exactly twice
    the unscaled ones (a power of two scales without rounding), by 3 the loss within 1e-15 relative and
    the gradients within 1e-12 relative (the factor enters at the logits and meets a rounding at every
    step of the backward; measured 6e-15 at most, on entries where terms cancel), plus 1e-12 of the
    largest gradient absolute (the key bias's gradient is zero in exact arithmetic: rounding noise ~1e-17)."""
    model = perturbed_model(_config(), dtype="float64", seed=0)
    batch = _pretraining_inputs(model.config)
    base = model.loss_and_grads(**batch)
    largest = max(float(np.abs(g).max()) for g in base.grads.values())
    for scale, rel, grad_rel in ((2.0, 0.0, 0.0), (3.0, 1e-15, 1e-12)):
        scaled = model.loss_and_grads(**batch, loss_scale=scale)
        assert float(scaled.loss) == pytest.approx(scale * float(base.loss), rel=rel, abs=0)
        assert float(model.loss(**batch, loss_scale=scale)) == float(scaled.loss)
        for name, grad in base.grads.items():
            np.testing.assert_allclose(scaled.grads[name], scale * grad, rtol=grad_rel, atol=grad_rel * largest,
                                       err_msg=name)
        assert float(scaled.parts["mlm"]) == float(base.parts["mlm"])   # the parts stay unweighted


@pytest.mark.parametrize("smoothing", [1.5, -0.1, float("nan"), "0.1"])
def test_label_smoothing_outside_0_1_is_refused_by_name(smoothing):
    model = Model(_config(), dtype="float64", seed=0)
    batch = _pretraining_inputs(model.config)
    with pytest.raises(ValueError, match=r"^label_smoothing=.* is invalid: expected a number in \[0, 1\]$"):
        model.loss(**batch, label_smoothing=smoothing)


def _smoothed_nll(logits, labels, eps):
    """torch's CrossEntropyLoss(label_smoothing=eps), mean over rows, in plain NumPy (float64):
    (1 - eps) * nll + eps * mean over the classes of -log p."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(labels)), labels]
    return float(np.mean((1 - eps) * nll - eps * log_probs.mean(axis=-1)))


def test_label_smoothing_of_one_is_accepted_and_is_the_uniform_target():
    """The range is closed, [0, 1] as torch's: 1.0 is the cross-entropy against the uniform distribution,
    checked on the pretraining loss against plain NumPy on forward's logits (float64, 1e-12 relative)."""
    model = perturbed_model(_config(), dtype="float64", seed=0)
    batch = _pretraining_inputs(model.config)
    expected = _plain_pretraining_loss(model, batch, label_smoothing=1.0)
    assert float(model.loss(**batch, label_smoothing=1.0)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("problem", ["pretraining", "regression", "multi_label_classification"])
def test_label_smoothing_is_refused_before_the_forward_on_every_head(problem):
    """1.5 is refused by the model's own check, before any computation: the trace sees no tensor. On the
    regression and multi-label heads no cross-entropy op would ever see the value, so that check is the
    only one."""
    if problem == "pretraining":
        model = Model(_config(), dtype="float64", seed=0)
        inputs = _pretraining_inputs(model.config)
    else:
        num_labels = 1 if problem == "regression" else 3
        model = Model(_config(head="sequence_classification", num_labels=num_labels), dtype="float64", seed=0)
        ids = np.random.default_rng(0).integers(5, 24, size=(2, 8))
        labels = (np.array([0.5, -1.0]) if problem == "regression"
                  else np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
        inputs = dict(input_ids=ids, labels=labels)
        assert model.problem_type(labels) == problem
    seen = []
    with pytest.raises(ValueError, match=r"^label_smoothing=1\.5 is invalid: expected a number in \[0, 1\]$"):
        model.loss(**inputs, label_smoothing=1.5, trace=lambda name, x: seen.append(name))
    assert seen == []


@pytest.mark.parametrize("given", ["labels", "start_positions", "end_positions"])
def test_the_pretraining_head_refuses_each_fine_tuning_label_alone(given):
    model = Model(_config(), dtype="float64", seed=0)
    batch = _pretraining_inputs(model.config)
    with pytest.raises(ValueError, match=r"^the pretraining head takes mlm_labels and sop_labels \(labels, "
                                         r"start_positions and end_positions are for the fine-tuning heads\)$"):
        model.loss(**batch, **{given: np.zeros(3, dtype=np.int64)})


@pytest.mark.parametrize("head, takes", [("question_answering", "start_positions and end_positions"),
                                         ("sequence_classification", "labels"), ("token_classification", "labels")])
def test_a_fine_tuning_head_given_pretraining_labels_names_its_own(head, takes):
    model = Model(_config(head=head), dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(5, 24, size=(2, 8))
    for given in ("mlm_labels", "sop_labels"):
        with pytest.raises(ValueError, match=rf"^mlm_labels / sop_labels are the pretraining head's; the "
                                             rf"{model.config.architecture} head takes {takes}$"):
            model.loss(ids, **{given: np.zeros((2, 8) if given == "mlm_labels" else 2, dtype=np.int64)})


@pytest.mark.parametrize("head", ["sequence_classification", "multiple_choice"])
def test_position_ids_reach_a_fine_tuning_heads_loss(head):
    """A task head's loss with its own position ids is the cross-entropy of what ``forward`` computes with
    them (plain NumPy; float64, 1e-12 relative), and differs from the loss with default positions.
    Multiple choice: (B, C, T) inputs, flattened to (B * C, T) rows on the way."""
    model = perturbed_model(_config(head=head, num_labels=3), dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    shape = (2, 3, 8) if head == "multiple_choice" else (2, 8)
    ids = rng.integers(5, 24, size=shape)
    positions = np.broadcast_to(np.arange(7, -1, -1), shape).copy()     # reversed: not the default
    labels = np.array([2, 0])
    out = model.forward(ids, position_ids=positions)
    expected = _smoothed_nll(out.logits.reshape(2, 3), labels, 0.0)
    assert float(model.loss(ids, position_ids=positions, labels=labels)) == pytest.approx(expected, rel=1e-12)
    assert float(model.loss_and_grads(ids, position_ids=positions, labels=labels).loss) == pytest.approx(
        expected, rel=1e-12)
    assert abs(float(model.loss(ids, labels=labels)) - expected) > 1e-3


def test_multiple_choice_labels_of_the_wrong_shape_name_the_batch_as_an_integer():
    model = Model(_config(head="multiple_choice"), dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(5, 24, size=(2, 3, 8))
    with pytest.raises(ValueError, match=r"^labels has shape \(3,\), expected \(2,\)$"):
        model.loss(ids, labels=np.array([0, 1, 2]))


@pytest.mark.parametrize("head", ["masked_lm", "causal_lm"])
def test_a_language_model_heads_loss_traces_its_forward_and_takes_the_tf_normalization(head):
    """The masked / causal LM heads: ``trace`` sees the forward's tensors through ``loss`` and
    ``loss_and_grads``; ``mlm_normalization="tf_albert"`` is TF ALBERT's sum(nll) / (count + 1e-5)
    (plain NumPy on forward's logits, float64, 1e-12 relative), not the mean."""
    bert = dict(BERT, is_decoder=True) if head == "causal_lm" else {}
    model = perturbed_model(_config(head=head, **bert), dtype="float64", seed=0)
    rng = np.random.default_rng(2)
    ids = rng.integers(5, 24, size=(2, 8))
    labels = np.where(rng.random((2, 8)) < 0.5, ids, -100)
    labels[0, 3] = ids[0, 3]
    seen = []
    loss = float(model.loss(ids, labels=labels, trace=lambda name, x: seen.append(name)))
    assert "mlm_logits" in seen and "embeddings.output" in seen
    seen_grads = []
    model.loss_and_grads(ids, labels=labels, trace=lambda name, x: seen_grads.append(name))
    assert seen_grads[:len(seen)] == seen
    logits = model.forward(ids).mlm_logits.reshape(-1, model.config.vocab_size)
    targets = (np.concatenate([labels[:, 1:], np.full((2, 1), -100)], axis=1) if head == "causal_lm"
               else labels).reshape(-1)
    kept = targets != -100
    count = int(kept.sum())
    mean_nll = _smoothed_nll(logits[kept], targets[kept], 0.0)
    assert loss == pytest.approx(mean_nll, rel=1e-12)
    tf = float(model.loss(ids, labels=labels, mlm_normalization="tf_albert"))
    assert tf == pytest.approx(mean_nll * count / (count + 1e-5), rel=1e-12)
    assert tf != loss


@pytest.mark.parametrize("head", ["token_classification", "multiple_choice", "sequence_classification"])
def test_label_smoothing_reaches_a_task_heads_cross_entropy(head):
    """torch's label smoothing (UniLM s2s-ft uses 0.1) on the task heads' cross-entropy: against plain
    NumPy on forward's logits (float64, 1e-12 relative), and not the unsmoothed loss."""
    model = perturbed_model(_config(head=head, num_labels=3), dtype="float64", seed=0)
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 24, size=(2, 3, 8) if head == "multiple_choice" else (2, 8))
    labels = rng.integers(0, 3, size=(2, 8) if head == "token_classification" else 2)
    logits = model.forward(ids).logits
    rows = logits.reshape(-1, logits.shape[-1]) if head != "multiple_choice" else logits.reshape(2, 3)
    expected = _smoothed_nll(rows, labels.reshape(-1), 0.1)
    smoothed = float(model.loss(ids, labels=labels, label_smoothing=0.1))
    assert smoothed == pytest.approx(expected, rel=1e-12)
    assert abs(smoothed - float(model.loss(ids, labels=labels))) > 1e-4


TWO_LAYER_IDS = np.random.default_rng(4).integers(5, 24, size=(2, 8))


def _two_layer_output(**config_changes):
    model = perturbed_model(_config(num_hidden_layers=2, **config_changes), dtype="float64", seed=0)
    return model, model.forward(TWO_LAYER_IDS, keep_cache=True)


def test_d_hidden_states_as_a_list_is_the_dict_form():
    """``backward``'s d_hidden_states as a list of L + 1 entries (None where no gradient enters) gives the
    same bits as the dict form, and neither is empty; anything else is refused by name."""
    model, out = _two_layer_output()
    g = np.random.default_rng(5).standard_normal(out.hidden_states[1].shape)
    by_list = model.backward(out, d_hidden_states=[None, g, None])
    by_dict = model.backward(out, d_hidden_states={1: g})
    assert by_list.params.keys() == by_dict.params.keys()
    for name, grad in by_dict.params.items():
        assert np.array_equal(by_list.params[name], grad), name
    assert np.array_equal(by_list.inputs_embeds, by_dict.inputs_embeds)
    assert np.abs(by_dict.params["embeddings.word_embeddings"]).max() > 0
    with pytest.raises(ValueError, match=r"^d_hidden_states must be a dict layer index -> array or a list of 3, "
                                         r"got str$"):
        model.backward(out, d_hidden_states="1")


@pytest.mark.parametrize("index", [True, "1", 3, -4, 1.0])
def test_d_hidden_states_layer_indices_outside_the_integers_of_the_range_are_refused(index):
    """Three hidden states (two layers): indices are integers in [-3, 3); a bool, a string, a float, 3
    (which ``% 3`` would silently turn into 0) and -4 are refused by name."""
    model, out = _two_layer_output()
    g = np.ones(out.hidden_states[1].shape)
    with pytest.raises(ValueError, match=rf"^d_hidden_states has layer index {re.escape(repr(index))}, expected an "
                                         rf"integer in \[-3, 3\)$"):
        model.backward(out, d_hidden_states={index: g})


@pytest.mark.parametrize("case, message", [
    ("no cache", r"backward needs the output of forward\(\.\.\., keep_cache=True\); this output has no cache"),
    ("wrong shape", r"d_hidden_states\[1\] has shape \(2, 7, 8\) and dtype float64, expected shape \(2, 8, 8\) "
                    r"and dtype float64"),
    ("twice", r"d_hidden_states names layer 1 twice \(index -2\); expected each hidden state once"),
    ("not an array", r"d_pooled_output must be an array of the model's backend \(numpy\), got list"),
    ("base d_logits", r"d_logits was given but the AlbertModel head has no task logits \(expected d_mlm_logits / "
                      r"d_sop_logits / d_hidden_states / d_pooled_output\)"),
    ("no MLM logits", r"d_mlm_logits was given but forward did not compute MLM logits \(return_mlm_logits=False, "
                      r"or a head without an MLM head\)"),
    ("no SOP logits", r"d_sop_logits was given but forward did not compute SOP logits \(return_sop_logits=False, "
                      r"or a head without an SOP/NSP head\)"),
    ("MLM shape", r"d_mlm_logits has shape \(2, 7, 24\) and dtype float64, expected shape \(2, 8, 24\) "
                  r"and dtype float64"),
])
def test_backward_refuses_each_wrong_upstream_gradient_with_its_message(case, message):
    model, out = _two_layer_output(head="base" if case == "base d_logits" else "pretraining")
    g = np.ones(out.hidden_states[1].shape)
    ids = TWO_LAYER_IDS
    call = {
        "no cache": lambda: model.backward(model.forward(np.ones((2, 8), dtype=np.int64) * 5), d_hidden_states={1: g}),
        "wrong shape": lambda: model.backward(out, d_hidden_states={1: g[:, :7]}),
        "twice": lambda: model.backward(out, d_hidden_states={1: g, -2: g}),
        "not an array": lambda: model.backward(out, d_pooled_output=[[0.0] * 8] * 2),
        "base d_logits": lambda: model.backward(out, d_logits=g),
        "no MLM logits": lambda: model.backward(model.forward(ids, keep_cache=True, return_mlm_logits=False),
                                                d_mlm_logits=np.ones((2, 8, 24))),
        "no SOP logits": lambda: model.backward(model.forward(ids, keep_cache=True, return_sop_logits=False),
                                                d_sop_logits=np.ones((2, 2))),
        "MLM shape": lambda: model.backward(out, d_mlm_logits=np.ones((2, 7, 24))),
    }[case]
    with pytest.raises(ValueError, match=f"^{message}$"):
        call()


@pytest.mark.parametrize("head, field", [("masked_lm", "d_mlm_logits"), ("causal_lm", "d_mlm_logits"),
                                         ("next_sentence", "d_sop_logits")])
def test_d_logits_of_a_language_model_or_nsp_head_is_its_own_output_gradient(head, field):
    """``d_logits`` on the masked / causal LM and next-sentence heads is the gradient of their one output:
    the same bits as passing it by that output's own name."""
    bert = dict(BERT) if head != "masked_lm" else {}
    if head == "causal_lm":
        bert["is_decoder"] = True
    model, out = _two_layer_output(head=head, **bert)
    g = np.random.default_rng(6).standard_normal(out.logits.shape)
    by_logits = model.backward(out, d_logits=g)
    by_name = model.backward(out, **{field: g})
    for name, grad in by_name.params.items():
        assert np.array_equal(by_logits.params[name], grad), name
    assert np.abs(by_name.params["embeddings.word_embeddings"]).max() > 0


@pytest.mark.parametrize("head, field", [("masked_lm", "d_mlm_logits"), ("next_sentence", "d_sop_logits")])
def test_d_logits_and_its_own_outputs_name_together_are_refused(head, field):
    """Both names of one output at once would add two gradients for one tensor; refused, naming both.
    The other output's gradient with d_logits is not the same output (the pooled output's gradient goes
    with a masked LM's d_logits)."""
    bert = dict(BERT) if head == "next_sentence" else {}
    model, out = _two_layer_output(head=head, **bert)
    g = np.ones(out.logits.shape)
    with pytest.raises(ValueError, match=rf"^give d_logits or {field}, not both \(they are the same output of the "
                                         rf"{model.config.architecture} head\)$"):
        model.backward(out, d_logits=g, **{field: g})
    if head == "masked_lm":
        grads = model.backward(out, d_logits=g, d_hidden_states={-1: np.ones(out.hidden_states[-1].shape)})
        assert np.abs(grads.params["embeddings.word_embeddings"]).max() > 0


def test_d_pooled_output_of_a_head_without_a_pooler_is_refused_by_name():
    """transformers builds the masked LM (and token classification, QA, BertLMHeadModel) without a
    pooler; a gradient for the pooled output there is refused, naming the architecture."""
    model, out = _two_layer_output(head="masked_lm")
    assert out.pooled_output is None
    with pytest.raises(ValueError, match=r"^d_pooled_output was given but AlbertForMaskedLM has no pooler$"):
        model.backward(out, d_pooled_output=np.ones((2, 8)))


def test_a_causal_lm_head_attending_both_ways_warns_at_the_callers_line():
    """BertLMHeadModel with is_decoder=False attends both ways (as transformers' does): a warning with
    this exact text, pointing at the caller; with is_decoder=True, or any other head, no warning."""
    bert = dict(BERT, head="causal_lm")
    with pytest.warns(UserWarning) as record:
        Model(_config(**bert), dtype="float64")
    assert len(record) == 1 and record[0].filename in CALLER
    assert str(record[0].message) == (
        "a causal_lm head (BertLMHeadModel) with is_decoder=False attends both ways, as transformers' does; "
        "set is_decoder=True for left-to-right language modelling")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Model(_config(**bert, is_decoder=True), dtype="float64")
        Model(_config(**{**bert, "head": "masked_lm"}), dtype="float64")


def test_a_model_built_with_defaults_is_float32_seed_0_with_the_documented_dropout_stream():
    """``Model(config)``: float32, seed 0 (the same bits as asking for them, other bits than seed 1), no
    fresh parameters, no tokenizer, and the training dropout stream ``default_rng([seed, 1])``; a
    forward without keep_cache keeps no cache."""
    config = _config()
    model = Model(config)
    assert model.dtype == np.float32 and model.seed == 0
    assert np.array_equal(model.params.flat, Model(config, dtype="float32", seed=0).params.flat)
    assert not np.array_equal(model.params.flat, Model(config, dtype="float32", seed=1).params.flat)
    assert model.fresh_parameters == () and model.tokenizer is None
    seeded = Model(config, seed=5)
    assert np.array_equal(seeded.dropout_rng.random(6), np.random.default_rng([5, 1]).random(6))
    assert model.forward(np.array([[5, 6, 7]])).cache is None


@pytest.mark.parametrize("call, message", [
    (lambda: Model(3), "config must be a ref_bert.Config or a preset name, got int"),
    (lambda: Model(_config(), dtype="float16"), "dtype must be one of ('float32', 'float64'), got 'float16'"),
    (lambda: Model(_config(), seed=-1), "seed=-1 is invalid: expected a non-negative integer"),
    (lambda: Model(_config()).forward(np.array([[5, 6]]), training="yes"),
     "training='yes' is invalid: expected True or False"),
    (lambda: Model(_config()).forward(np.array([[5, 6]]), training=True, dropout_seed=-2),
     "dropout_seed=-2 is invalid: expected a non-negative integer or a non-empty sequence of them"),
    (lambda: Model(_config()).forward(np.array([[5, 6]]), training=True, dropout_seed=[1, -1]),
     "dropout_seed=[1, -1] is invalid: expected a non-negative integer or a non-empty sequence of them"),
], ids=["config", "dtype", "seed", "training", "dropout_seed", "dropout_seed list"])
def test_the_model_refuses_a_bad_config_dtype_seed_or_flag_with_its_exact_message(call, message):
    with pytest.raises(ValueError) as raised:
        call()
    assert str(raised.value) == message


def test_a_sequence_dropout_seed_is_accepted_and_gives_the_same_masks_each_time():
    model = Model(_config(hidden_dropout_prob=0.5), dtype="float64")
    ids = np.array([[5, 6, 7]])
    a, b = (model.forward(ids, training=True, dropout_seed=[2, 7]).last_hidden_state for _ in range(2))
    assert np.array_equal(a, b) and not np.array_equal(a, model.forward(ids).last_hidden_state)


def test_a_custom_upstream_gradient_reaches_the_qa_heads_bias_and_weight():
    """Under the span loss the QA bias gradient is zero whatever the model (each row's start / end
    softmax gradient sums to zero over positions), so only a custom loss checks it: with d_logits = G,
    d(qa_outputs.bias) = sum of G over (B, T) and d(qa_outputs.weight) = h_L^T G (exact in float64 up to
    summation order: 1e-12 relative); a G of the wrong shape is refused, naming d_logits."""
    model, out = _two_layer_output(head="question_answering", **BERT)
    g = np.random.default_rng(7).standard_normal(out.logits.shape)           # (2, 8, 2)
    grads = model.backward(out, d_logits=g).params
    np.testing.assert_allclose(grads["qa_outputs.bias"], g.sum(axis=(0, 1)), rtol=1e-12, atol=0)
    last = out.hidden_states[-1]
    np.testing.assert_allclose(grads["qa_outputs.weight"], last.reshape(-1, 8).T @ g.reshape(-1, 2),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"^d_logits has shape \(2, 7, 2\) and dtype float64, expected shape "
                                         r"\(2, 8, 2\) and dtype float64$"):
        model.backward(out, d_logits=g[:, :7])


def test_the_reference_ops_keep_a_float32_model_in_float32_with_a_padding_mask():
    """With the reference ops (what the docstrings derive) a float32 model computes in float32: the
    additive mask is built in the model's dtype, so a padded batch's every traced tensor, hidden state
    and logit is float32 (a float64 mask would silently promote the scores and all that follows), and
    it agrees with the fast path to float32 rounding (1e-5 relative)."""
    import backends

    model = perturbed_model(_config(num_hidden_layers=2), dtype="float32", seed=0)
    ids = np.random.default_rng(8).integers(5, 24, size=(2, 8))
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, 5:] = 0
    fast = model.forward(ids, attention_mask=mask)
    traced = {}
    with backends.reference_ops():
        out = model.forward(ids, attention_mask=mask, trace=lambda name, x: traced.setdefault(name, x.dtype))
    assert {str(dtype) for dtype in traced.values()} == {"float32"} and len(traced) > 20
    assert all(h.dtype == np.float32 for h in out.hidden_states)
    assert out.mlm_logits.dtype == out.sop_logits.dtype == np.float32
    np.testing.assert_allclose(out.mlm_logits, fast.mlm_logits, rtol=1e-5, atol=1e-5)


def test_the_loss_paths_trace_reports_the_mlm_head_at_the_labelled_positions():
    """The loss runs the MLM head only at labelled positions; its trace still reports the head's
    dense, activation and LayerNorm outputs there, each the rows of forward's full-position trace at
    those positions (float64, 1e-12 relative: the same numbers, matrix products of other shapes)."""
    model = perturbed_model(_config(num_hidden_layers=2), dtype="float64", seed=0)
    ids = np.random.default_rng(9).integers(5, 24, size=(2, 8))
    labels = np.full((2, 8), -100)
    labels[0, 3], labels[1, 0], labels[1, 6] = 7, 9, 11
    full, on_labels = {}, {}
    model.forward(ids, trace=lambda name, x: full.setdefault(name, x.copy()))
    model.loss_and_grads(ids, mlm_labels=labels, trace=lambda name, x: on_labels.setdefault(name, x.copy()))
    rows = np.flatnonzero(labels.reshape(-1) != -100)
    for name in ("mlm.dense", "mlm.activation", "mlm.layer_norm"):
        assert on_labels[name].shape == (3, full[name].shape[-1]), name
        np.testing.assert_allclose(on_labels[name], full[name].reshape(16, -1)[rows], rtol=1e-12, atol=0,
                                   err_msg=name)
