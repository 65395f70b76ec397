"""Parity with Hugging Face transformers (ALBERT and BERT), checkpoints in and out.

Every reference model is built here from a config with random weights (tests/_hf_models.py), saved with
``save_pretrained`` and loaded with ``Model.from_hf``; nothing is downloaded. transformers runs with
attn_implementation="eager" and in eval mode (dropout off).

Error measures. Forward tensors and the loss: ``rel_err = max|ours - hf| / max|hf|`` per tensor
(relative to the tensor's scale, so entries near zero cannot blow it up). Gradients: the same per-tensor
relative error, plus an absolute allowance relative to the *largest gradient of the model*:

    max|ours - hf| <= rtol * max|hf| + atol * max over all parameters |hf grad|,
    (rtol, atol) = (1e-10, 1e-12) in float64 and (1e-5, 1e-6) in float32.

The allowance exists for gradients that are (nearly) zero in exact arithmetic, where only rounding
noise is left on both sides: the attention *key bias* gradient is exactly zero (adding q . b_k to every
score of a query row leaves the softmax unchanged), and saturated attention makes the query/key
gradients of later layers tiny. Relative to their own scale, float32 noise there reaches 3e-4.

Measured on this machine (transformers 5.24, torch 2.13, the configs of tests/_hf_models.py):

    configuration           dtype    hidden   pooled   MLM logits  SOP/NSP  loss     grads/own  grads/largest
    ALBERT shared (E<H)     float64  1.1e-15  1.3e-15  1.4e-15     3.3e-16  1.7e-16  4.3e-15    8.8e-16
                            float32  6.9e-07  3.6e-07  7.7e-07     1.3e-07  0        1.5e-06    3.5e-07
    ALBERT G=2, K=2, gelu   float64  1.7e-15  5.4e-16  5.7e-16     2.9e-16  1.5e-16  5.2e-13    1.7e-15
                            float32  8.4e-07  2.0e-07  2.7e-07     2.4e-07  8.3e-08  3.1e-04    3.8e-07
    ALBERT relu             float64  9.6e-16  8.8e-16  5.4e-16     2.3e-16  1.5e-16  4.4e-15    6.3e-16
                            float32  6.7e-07  4.5e-07  3.0e-07     9.3e-08  0        1.1e-06    4.7e-07
    BERT gelu               float64  2.1e-15  5.9e-15  2.1e-15     1.5e-15  5.2e-16  6.2e-15    2.6e-15
                            float32  8.5e-07  2.7e-06  8.4e-07     1.0e-06  0        2.5e-06    1.9e-06
    BERT gelu_new, eps 1e-5 float64  7.3e-16  1.6e-15  1.3e-15     7.6e-16  1.5e-16  2.7e-15    1.4e-15
                            float32  5.4e-07  1.1e-06  8.7e-07     3.3e-07  0        2.0e-06    8.9e-07
("grads/own" leaves out the key biases, whose own scale is noise.)

The pad row (docs/reference.md §2.3): ``nn.Embedding(padding_idx=pad)`` gives the pad row of the word
embeddings no gradient from the lookup; ref-bert does. The main batches therefore keep the pad id out of
real (attended) positions and put it only at padded positions, whose lookup gradient is exactly zero on
both sides (masked keys get probability exactly 0, and no loss reads a padded position), so *every*
row, the pad row included, is compared: there the pad row holds only its tied-decoder gradient.
``test_pad_row_differs_exactly_by_its_lookup_gradient`` then puts the pad id at real positions and
shows the one difference is that row's lookup gradient, measured independently in torch.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from ref_bert import Config, Model, hf_torch
from ref_bert.hf import PROJECTION_NAMES
from tests._models import perturbed_model
from tests._hf_models import (ALBERT_GROUPS, ALBERT_RELU, ALBERT_SHARED, BERT, BERT_GELU_NEW, batch, hf_model,
                              hf_run, rel_err)

torch.set_num_threads(1)
TOL = {"float64": 1e-10, "float32": 1e-5}        # rtol: forward tensors, loss, gradients
GRAD_ATOL = {"float64": 1e-12, "float32": 1e-6}   # times the largest gradient of the model
CONFIGS = {"albert_shared": ALBERT_SHARED, "albert_groups": ALBERT_GROUPS, "albert_relu": ALBERT_RELU,
           "bert": BERT, "bert_gelu_new": BERT_GELU_NEW}


def load_pair(spec, tmp_path, dtype="float64", arch="ForPreTraining"):
    hf = hf_model(spec, arch=arch, dtype=dtype)
    hf.save_pretrained(tmp_path)
    return hf, Model.from_hf(tmp_path, dtype=dtype)


def block_outputs(model, inputs):
    """Our forward output and the encoder input followed by every block's output (HF transformers 5
    reports one hidden state per AlbertLayer call, i.e. L * K + 1 of them)."""
    blocks = []

    def trace(name, x):
        if name == "embeddings.output" or name.endswith(".ffn_output"):
            blocks.append(np.array(x))

    out = model.forward(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"], trace=trace)
    return out, blocks


def hf_pooled(hf, inputs):
    with torch.no_grad():
        return hf.base_model(**hf_torch.forward_kwargs(inputs, hf.config.model_type, labels=False)
                             ).pooler_output.numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_loss_and_every_gradient_match_transformers(name, dtype, tmp_path):
    spec, tol = CONFIGS[name], TOL[dtype]
    hf, model = load_pair(spec, tmp_path, dtype)
    inputs = batch(spec)
    hf_out, hf_grads = hf_run(hf, inputs, spec["family"])

    # forward: every hidden state (per layer, or per block when the HF version reports blocks)
    out, blocks = block_outputs(model, inputs)
    hf_hidden = [h.detach().numpy() for h in hf_out.hidden_states]
    ours_hidden = blocks if len(hf_hidden) == len(blocks) else [np.array(h) for h in out.hidden_states]
    assert len(ours_hidden) == len(hf_hidden)
    for i, (a, b) in enumerate(zip(ours_hidden, hf_hidden)):
        assert rel_err(a, b) <= tol, f"hidden state {i}: {rel_err(a, b):.2e}"
    assert rel_err(out.pooled_output, hf_pooled(hf, inputs)) <= tol
    assert rel_err(out.mlm_logits, hf_out.prediction_logits.detach().numpy()) <= tol
    hf_sop = hf_out.sop_logits if spec["family"] == "albert" else hf_out.seq_relationship_logits
    assert rel_err(out.sop_logits, hf_sop.detach().numpy()) <= tol

    # loss = mean MLM CE over labels != -100 + SOP/NSP CE, and the gradient of every parameter
    _result = model.loss_and_grads(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"],
                                       inputs["mlm_labels"], inputs["sop_labels"])
    loss, grads = _result.loss, _result.grads
    assert rel_err(loss, hf_out.loss.detach().numpy()) <= tol
    ours = model.hf_state_dict(grads)
    assert set(ours) == set(hf_grads), set(ours) ^ set(hf_grads)
    assert_grads_close(ours, hf_grads, tol, GRAD_ATOL[dtype])


def assert_grads_close(ours, ref, rtol, atol, skip=()):
    """max|ours - ref| <= rtol * max|ref| + atol * (largest gradient): see the module docstring."""
    largest = max(np.abs(g).max() for g in ref.values())
    for key, r in ref.items():
        if key in skip:
            continue
        err = np.abs(ours[key] - r).max()
        assert err <= rtol * np.abs(r).max() + atol * largest, f"{key}: error {err:.2e}, scale {np.abs(r).max():.2e}"


@pytest.mark.parametrize("name", ["albert_groups", "bert"])
def test_capture_hooks_record_every_activation_ref_bert_traces(name, tmp_path):
    """hf_torch.capture names transformers' activations as ref-bert's trace does: the same set of names
    (every block of every layer, heads included), and each one equal in float64."""
    spec = CONFIGS[name]
    hf, model = load_pair(spec, tmp_path)
    inputs = batch(spec)
    traced = {}

    def trace(tname, x):
        assert tname not in traced, f"{tname} traced twice"
        traced[tname] = np.array(x)

    model.forward(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"], trace=trace)
    with hf_torch.capture(hf) as captured, torch.no_grad():
        hf(**hf_torch.forward_kwargs(inputs, spec["family"], labels=False))
    assert set(traced) == set(captured), (sorted(set(traced) - set(captured)), sorted(set(captured) - set(traced)))
    L, K = spec["num_hidden_layers"], spec.get("inner_group_num", 1)
    assert f"encoder.layer.{L - 1}.block.{K - 1}.attention.probs" in captured
    for tname, ours in traced.items():
        assert rel_err(ours, captured[tname]) <= TOL["float64"], f"{tname}: {rel_err(ours, captured[tname]):.2e}"
    # the hooks are gone after the block
    with hf_torch.capture(hf) as again:
        pass
    hf(**hf_torch.forward_kwargs(inputs, spec["family"], labels=False))
    assert again == {}


def test_pad_row_differs_exactly_by_its_lookup_gradient(tmp_path):
    spec = ALBERT_SHARED
    hf, model = load_pair(spec, tmp_path)
    inputs = batch(spec, pad_at_real_positions=True)
    pad = hf.config.pad_token_id
    assert (inputs["input_ids"][inputs["attention_mask"] == 1] == pad).any()

    with hf_torch.word_lookup(hf) as lookup:  # gradient reaching the word-embedding lookup output, in torch
        _, hf_grads = hf_run(hf, inputs, "albert")
    pad_lookup_grad = lookup["output"].grad.numpy()[inputs["input_ids"] == pad].sum(axis=0)
    assert np.abs(pad_lookup_grad).max() > 1e-3  # the rule really bites in this batch

    _result = model.loss_and_grads(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"],
                                    inputs["mlm_labels"], inputs["sop_labels"])
    _, grads = _result.loss, _result.grads
    ours = model.hf_state_dict(grads)
    key = "albert.embeddings.word_embeddings.weight"
    others = np.arange(spec["vocab_size"]) != pad
    assert rel_err(ours[key][others], hf_grads[key][others]) <= 1e-10
    assert rel_err(ours[key][pad] - pad_lookup_grad, hf_grads[key][pad]) <= 1e-10
    assert_grads_close(ours, hf_grads, 1e-10, 1e-12, skip={key})


@pytest.mark.parametrize("arch, spec", [
    ("ForMaskedLM", ALBERT_SHARED),
    ("Model", ALBERT_GROUPS),
    ("ForMaskedLM", BERT),
    ("Model", BERT),
])
def test_other_architectures_load_as_themselves(arch, spec, tmp_path):
    """A *ForMaskedLM or bare *Model checkpoint loads as that architecture: no pooler where transformers
    has none, no invented heads, nothing fresh, no warning (tests/test_hf_heads.py compares their
    gradients)."""
    import warnings

    hf = hf_model(spec, arch=arch)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Model.from_hf(tmp_path, dtype="float64")
    assert model.config.architecture == type(hf).__name__ and model.fresh_parameters == ()
    assert set(model.hf_state_dict()) == set(hf_torch.parameters(hf))
    inputs = batch(spec)
    hf_out, _ = hf_run(hf, inputs, spec["family"], backward=False)
    out, blocks = block_outputs(model, inputs)
    last = hf_out.hidden_states[-1].detach().numpy()
    assert rel_err(out.hidden_states[-1], last) <= 1e-10
    if arch == "ForMaskedLM":
        assert out.pooled_output is None
        assert rel_err(out.mlm_logits, hf_out.logits.detach().numpy()) <= 1e-10
    else:
        assert out.mlm_logits is None and out.sop_logits is None
        assert rel_err(out.pooled_output, hf_out.pooler_output.detach().numpy()) <= 1e-10


def _randomised(config, dtype="float64", seed=3):
    return perturbed_model(config, dtype=dtype, seed=seed, std=0.2)


@pytest.mark.parametrize("config", [
    Config(vocab_size=60, embedding_size=12, hidden_size=24, num_hidden_layers=4, num_attention_heads=2,
           intermediate_size=30, max_position_embeddings=16, num_hidden_groups=2, inner_group_num=2,
           hidden_act="gelu_new", model_type="albert", pad_token_id=2, layer_norm_eps=1e-7),
    Config(vocab_size=60, embedding_size=24, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=30, max_position_embeddings=16, sharing="none", hidden_act="gelu",
           model_type="bert", type_vocab_size=3),
    # ALBERT with E == H: HF still has embedding_hidden_mapping_in; save_hf writes the identity.
    Config(vocab_size=60, embedding_size=24, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=30, max_position_embeddings=16, hidden_act="relu", model_type="albert"),
], ids=["albert_groups", "bert", "albert_e_equals_h"])
def test_save_hf_loads_in_transformers_and_round_trips_bit_for_bit(config, tmp_path):
    model = _randomised(config)
    model.save_hf(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == [("Albert" if config.model_type == "albert" else "Bert") + "ForPreTraining"]
    hf, info = hf_torch.from_pretrained(tmp_path, dtype="float64", output_loading_info=True)  # eval mode
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    spec = dict(family=config.model_type, vocab_size=config.vocab_size, type_vocab_size=config.type_vocab_size,
                pad_token_id=config.pad_token_id)
    inputs = batch(spec, lengths=(9, 5))
    hf_out, hf_grads = hf_run(hf, inputs, config.model_type)
    _result = model.loss_and_grads(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"],
                                       inputs["mlm_labels"], inputs["sop_labels"])
    loss, grads = _result.loss, _result.grads
    assert rel_err(loss, hf_out.loss.detach().numpy()) <= 1e-10
    # An E == H ALBERT has no projection in ref-bert, so HF's identity projection has no counterpart.
    no_counterpart = set(PROJECTION_NAMES) if not config.has_projection and config.model_type == "albert" else set()
    ours = model.hf_state_dict(grads)
    assert set(ours) == set(hf_grads) - no_counterpart
    assert_grads_close(ours, hf_grads, 1e-10, 1e-12, skip=no_counterpart)

    again = Model.from_hf(tmp_path, dtype="float64")
    assert again.config == config.replace(name=again.config.name, initializer=again.config.initializer,
                                          classifier_dropout_prob=again.config.classifier_dropout_prob,
                                          ffn_output_dropout=again.config.ffn_output_dropout)
    for name, view in model.params.items():
        assert np.array_equal(view, again.params[name]), name


def test_hf_state_dict_maps_any_dict_shaped_like_the_parameters():
    model = _randomised(Config(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=20, max_position_embeddings=8,
                               inner_group_num=2, model_type="albert"))
    doubled = {k: 2 * v for k, v in model.params.items()}
    plain, mapped = model.hf_state_dict(), model.hf_state_dict(doubled)
    assert set(plain) == set(mapped) and len(plain) == len(model.params.shapes)
    for k in plain:
        assert np.array_equal(mapped[k], 2 * plain[k])
    q = "albert.encoder.albert_layer_groups.0.albert_layers.1.attention.query.weight"
    assert np.array_equal(plain[q], np.asarray(model.params["encoder.attention.1.query.weight"]).T)
    with pytest.raises(ValueError, match="missing"):
        model.hf_state_dict({"embeddings.word_embeddings": doubled["embeddings.word_embeddings"]})


@pytest.mark.parametrize("changes, match", [
    (dict(sharing="attention"), "sharing='attention'"),
    (dict(sharing="ffn"), "sharing='ffn'"),
    (dict(model_type="bert", sharing="none"), "embedding_size == hidden_size"),
    (dict(model_type="bert", embedding_size=16), "sharing='all'"),
    # TF's int(i / L * G) and HF's int(i / (L / G)) disagree at layer 9 of (L, G) = (18, 14)
    (dict(num_hidden_layers=18, num_hidden_groups=14, group_rule="tf"), "layer 9 .*group_rule='tf'"),
])
def test_save_hf_rejects_what_transformers_cannot_express(changes, match, tmp_path):
    config = Config(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=20, max_position_embeddings=8, model_type="albert").replace(**changes)
    with pytest.raises(ValueError, match=match):
        Model(config, dtype="float64").save_hf(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def _rewrite_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_tensors(directory, fn):
    from safetensors.numpy import load_file, save_file

    tensors = fn(load_file(directory / "model.safetensors"))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_from_hf_errors_name_the_problem(tmp_path):
    hf_model(ALBERT_SHARED, dtype="float32").save_pretrained(tmp_path)
    Model.from_hf(tmp_path)  # loads as saved

    _rewrite_config(tmp_path, architectures=["AlbertForCausalLM"])
    with pytest.raises(ValueError, match="AlbertForCausalLM.*not supported"):
        Model.from_hf(tmp_path)
    _rewrite_config(tmp_path, architectures=["AlbertForPreTraining"], hidden_act="silu")
    with pytest.raises(ValueError, match="hidden_act='silu'"):
        Model.from_hf(tmp_path)
    _rewrite_config(tmp_path, hidden_act="gelu_new", intermediate_size=50)
    with pytest.raises(ValueError, match=r"ffn.weight' has shape \(48, 32\), expected \(50, 32\)"):
        Model.from_hf(tmp_path)
    _rewrite_config(tmp_path, intermediate_size=48)
    key = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.bias"
    _rewrite_tensors(tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match="query.bias.*missing"):
        Model.from_hf(tmp_path)
    _rewrite_tensors(tmp_path, lambda t: {**t, key: np.zeros(32, np.float32), "classifier.weight": np.zeros((2, 32), np.float32)})
    with pytest.raises(ValueError, match="classifier.weight"):
        Model.from_hf(tmp_path)


def test_from_hf_accepts_old_names_bf16_and_pytorch_bin_without_unpickling_code(tmp_path):
    hf = hf_model(ALBERT_SHARED, dtype="float32")
    hf.save_pretrained(tmp_path / "f32")
    reference = {k: v.numpy().copy() for k, v in hf.state_dict().items()}

    # pytorch_model.bin with the old gamma/beta LayerNorm names and the tied decoder copies
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "f32" / "config.json").read_text())
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    assert "predictions.decoder.weight" in state and "albert.embeddings.LayerNorm.gamma" in state
    torch.save(state, legacy / "pytorch_model.bin")
    ours = Model.from_hf(legacy).hf_state_dict()
    for k, v in ours.items():
        assert np.array_equal(v, reference[k]), k

    # bfloat16 safetensors (NumPy has no bfloat16: widened exactly to float32)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = Model.from_hf(tmp_path / "bf16")
    word = hf.get_input_embeddings().weight.detach().float().numpy()
    assert not np.array_equal(word, reference["albert.embeddings.word_embeddings.weight"])  # really rounded
    assert np.array_equal(model.params["embeddings.word_embeddings"], word)

    # a pickle that would run code when unpickled is refused, and the code does not run
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (legacy / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        Model.from_hf(legacy)
    assert not marker.exists()


def test_untied_or_missing_pieces_are_reported(tmp_path):
    hf_model(BERT, dtype="float32").save_pretrained(tmp_path)
    decoder = "cls.predictions.decoder.weight"
    word = "bert.embeddings.word_embeddings.weight"
    _rewrite_tensors(tmp_path, lambda t: {**t, decoder: t[word].copy()})
    Model.from_hf(tmp_path)  # a tied copy that agrees is fine
    _rewrite_tensors(tmp_path, lambda t: {**t, decoder: t[word] + 1})
    with pytest.raises(ValueError, match="decoder.weight differs .* not tied"):
        Model.from_hf(tmp_path)
    _rewrite_tensors(tmp_path, lambda t: {k: v for k, v in t.items() if k != decoder})
    _rewrite_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        Model.from_hf(tmp_path)
    _rewrite_config(tmp_path, tie_word_embeddings=True, add_cross_attention=True)
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        Model.from_hf(tmp_path)
    _rewrite_config(tmp_path, add_cross_attention=False)
    _rewrite_tensors(tmp_path, lambda t: {k.replace("bert.", "albert.", 1) if k.startswith("bert.") else k: v
                                          for k, v in t.items()})
    with pytest.raises(ValueError, match="expects tensors under 'bert.'"):
        Model.from_hf(tmp_path)


def test_config_comes_from_config_json(tmp_path):
    hf_model(ALBERT_GROUPS, dtype="float32").save_pretrained(tmp_path)
    config = Model.from_hf(tmp_path).config
    for key in ("hidden_act", "layer_norm_eps", "num_hidden_groups", "inner_group_num", "type_vocab_size",
                "max_position_embeddings", "pad_token_id", "embedding_size", "vocab_size"):
        assert getattr(config, key) == ALBERT_GROUPS[key], key
    assert (config.sharing, config.ffn_output_dropout, config.classifier_dropout_prob) == ("all", False, 0.1)
    hf_model(BERT, dtype="float32").save_pretrained(tmp_path / "bert")
    config = Model.from_hf(tmp_path / "bert").config
    assert (config.sharing, config.embedding_size, config.model_type) == ("none", 32, "bert")
    assert (config.ffn_output_dropout, config.classifier_dropout_prob, config.hidden_dropout_prob) == (True, 0.0, 0.1)
