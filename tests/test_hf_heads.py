"""Every Hugging Face task head against transformers, and each head's gradient against finite differences.

The reference models are built here (tests/_hf_models.py: random weights, eval mode, eager attention),
saved with ``save_pretrained`` and loaded with ``Model.from_hf``; nothing is downloaded. Each
transformers model is built once per module (``_pair``) and reused by every dtype and problem type.

For every head of ALBERT (G = 2 groups of K = 2 blocks, exact gelu, pad id 1, three token types) and
BERT, on a padded batch: the task logits, the loss and the gradient of every parameter, by the error
measures of tests/test_hf_parity.py (per-tensor rel_err; gradients with an absolute allowance of
1e-12 (float64) / 1e-6 (float32) times the model's largest gradient, for the exactly-zero key-bias
gradients). Tolerances: 1e-10 in float64, 1e-5 in float32 (measured: below).

Idiosyncrasies handled here, each stated where it is used:
* BertLMHeadModel's loss (transformers' ForCausalLMLoss) calls ``logits.float()``, which turns float64
  logits into float32 before the cross-entropy. The float64 comparison therefore takes the same shifted
  cross-entropy computed by torch in float64 from transformers' logits (and compares transformers' own
  loss at float32 precision).
* The bare encoder has no loss: a random upstream gradient on the last hidden state (zero at padded
  positions) and the pooled output, through ``torch.autograd`` and through ``Model.backward``.
* Padded positions get label -100 (token classification, causal LM), so no loss reads them and the
  pad row of the word embeddings (which ``nn.Embedding(padding_idx)`` never updates) has no lookup
  gradient on either side (tests/test_hf_parity.py explains the rule).

MEASURED on this machine (transformers 5.24, torch 2.13). "grads/largest": max error over every
parameter's gradient / the model's largest gradient; "grads/own": max of each tensor's error over its
own scale (tensors above 1e-6 of the largest; in float32 the exactly-zero ones described at GRAD_ATOL
reach 1e-4 of their own noise-sized scale, the allowance covers them):

    head                                   dtype    logits    loss      grads/largest  grads/own
    albert base                            float64  1.6e-15   3.6e-15   3.1e-15   8.9e-15
                                           float32  6.1e-07   2.1e-06   1.1e-06   3.6e-06
    albert masked_lm                       float64  1.1e-15   3.3e-16   5.0e-16   2.5e-14
                                           float32  6.1e-07   0         2.9e-07   8.7e-06
    albert sequence_classification single  float64  8.2e-16   1.8e-16   5.5e-16   1.4e-14
                                           float32  5.6e-07   9.5e-08   2.0e-07   4.5e-06
    albert sequence_classification multi   float64  8.2e-16   0         5.1e-16   3.2e-14
                                           float32  5.6e-07   0         2.5e-07   1.6e-05
    albert sequence_classification regr.   float64  4.4e-16   0         2.8e-16   2.5e-13
                                           float32  7.9e-08   9.8e-08   1.0e-07   1.3e-04
    albert token_classification            float64  1.5e-15   1.3e-16   9.7e-16   1.3e-13
                                           float32  4.9e-07   1.4e-07   2.9e-07   7.5e-06
    albert question_answering              float64  6.1e-16   0         1.6e-14   2.5e-13
                                           float32  3.3e-07   1.0e-07   2.5e-06   1.2e-04
    albert multiple_choice                 float64  4.2e-16   3.2e-16   3.9e-15   3.0e-13
                                           float32  3.0e-07   0         2.5e-06   6.3e-05
    bert base                              float64  2.2e-15   1.5e-16   3.2e-15   6.0e-15
                                           float32  1.5e-06   5.7e-07   2.7e-06   3.8e-06
    bert masked_lm                         float64  1.8e-15   1.9e-16   6.2e-15   6.2e-15
                                           float32  1.1e-06   0         1.7e-06   1.8e-06
    bert causal_lm                         float64  1.8e-15   0         2.2e-15   5.0e-15
                                           float32  1.1e-06   0         1.1e-06   3.2e-06
    bert next_sentence                     float64  1.2e-15   0         3.5e-15   6.4e-15
                                           float32  1.0e-06   1.0e-07   1.3e-06   2.0e-06
    bert sequence_classification single    float64  1.7e-15   1.7e-16   2.8e-15   4.9e-15
                                           float32  2.7e-06   7.4e-07   1.8e-06   2.4e-06
    bert sequence_classification multi     float64  1.7e-15   1.5e-16   5.9e-15   7.9e-15
                                           float32  2.7e-06   2.4e-07   1.5e-06   2.4e-06
    bert sequence_classification regr.     float64  1.2e-15   3.6e-16   1.9e-15   3.8e-15
                                           float32  1.0e-06   0         1.4e-06   3.7e-06
    bert token_classification              float64  2.1e-15   2.3e-16   3.1e-15   8.6e-15
                                           float32  1.2e-06   6.3e-08   2.0e-06   4.0e-06
    bert question_answering                float64  1.1e-15   1.6e-16   2.2e-15   4.4e-15
                                           float32  6.7e-07   3.3e-07   1.2e-06   2.4e-06
    bert multiple_choice                   float64  9.9e-16   2.5e-16   1.3e-15   5.6e-15
                                           float32  7.4e-07   1.3e-07   6.4e-07   3.6e-06
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck.cases import check_model
from gradcheck.strategies import configs
from ref_bert import Config, Model, hf_torch
from ref_bert.examples import task_batch
from ref_bert.masks import batch_masks
from tests._hf_models import ALBERT_GROUPS, BERT, hf_model, rel_err
from tests.test_hf_parity import assert_grads_close

from .conftest import examples

torch.set_num_threads(1)
TOL = {"float64": 1e-10, "float32": 1e-5}
# The absolute allowance is for gradients that are zero in exact arithmetic and hold only rounding noise:
# as the attention key bias (test_hf_parity), multiple choice's classifier bias (one constant added to
# every choice's logit cancels in the softmax) and, under question answering, the last LayerNorm's bias
# (it shifts every position's start and end logits alike). In float32 that noise reaches 4e-6 of the
# model's largest gradient here (test_hf_parity's 1e-6 is for larger pretraining gradients); float64
# stays within 1e-12 of it.
GRAD_ATOL = {"float64": 1e-12, "float32": 1e-5}
# ALBERT with G = 2 groups of K = 2 blocks over L = 2 layers (tests/_hf_models.py's ALBERT_GROUPS has
# L = 4): in these random models the tokens' representations grow alike by ~3x per block, and after 8
# blocks the question-answering logits differ across positions by ~5e-4 only, which leaves its loss's
# gradient to float32 rounding (1.4e-4 relative; float64 still 4e-13). After 4 blocks they differ by 4e-2.
SPECS = {"albert": dict(ALBERT_GROUPS, num_hidden_layers=2), "bert": BERT}
LENGTHS = (10, 8, 6)

# (family, head, extra config.json keys, problem_type given to the config or None)
CASES = [
    ("albert", "base", {}, None),
    ("albert", "masked_lm", {}, None),
    ("albert", "sequence_classification", dict(num_labels=3), "single_label_classification"),
    ("albert", "sequence_classification", dict(num_labels=3), "multi_label_classification"),
    ("albert", "sequence_classification", dict(num_labels=1), "regression"),
    ("albert", "token_classification", dict(num_labels=5), None),
    ("albert", "question_answering", {}, None),
    ("albert", "multiple_choice", {}, None),
    ("bert", "base", {}, None),
    ("bert", "masked_lm", {}, None),
    ("bert", "causal_lm", dict(is_decoder=True), None),
    ("bert", "next_sentence", {}, None),
    ("bert", "sequence_classification", dict(num_labels=3), "single_label_classification"),
    ("bert", "sequence_classification", dict(num_labels=3), "multi_label_classification"),
    ("bert", "sequence_classification", dict(num_labels=2, problem_type="regression"), "regression"),
    ("bert", "token_classification", dict(num_labels=5), None),
    ("bert", "question_answering", {}, None),
    ("bert", "multiple_choice", {}, None),
]
CASE_IDS = [f"{f}-{h}" + (f"-{p.split('_')[0]}" if p else "") for f, h, _, p in CASES]

_PAIRS: dict = {}


def _pair(family, head, extra, tmp_path_factory):
    """(transformers model, ref-bert model) in float64 for this head, built once per module."""
    key = (family, head, tuple(sorted(extra.items())))
    if key not in _PAIRS:
        spec = {**SPECS[family], **extra}
        arch = Config(model_type=family, head=head, sharing="none" if family == "bert" else "all",
                      embedding_size=8, hidden_size=8, num_attention_heads=1, intermediate_size=8,
                      num_hidden_layers=1, vocab_size=8, is_decoder=head == "causal_lm").architecture
        hf = hf_model(spec, arch=arch, dtype="float64")
        directory = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(directory)
        hf.configured_problem_type = hf.config.problem_type
        _PAIRS[key] = (hf, directory)
    return _PAIRS[key]


def _inputs(model, problem_type):
    config = model.config if problem_type is None else model.config.replace(problem_type=problem_type)
    lengths = LENGTHS * 2 if config.head == "multiple_choice" else LENGTHS
    x = task_batch(config, len(LENGTHS), max(LENGTHS), seed=5, lengths=lengths, dtype=model.dtype.name)
    x.pop("position_ids")
    if config.head == "question_answering":
        # transformers' rule: positions are clamped to [0, T] and T is ignored: row 1's start is past the
        # end (ignored), row 2's end is negative (clamped to 0, so it counts as position 0).
        x["start_positions"][1] = 40
        x["end_positions"][2] = -3
    return x


def _hf_side(hf, x, head, dtype):
    """transformers' logits, loss (float64-faithful) and gradients by HF name."""
    hf.zero_grad(set_to_none=True)
    # transformers stores the problem type it chose on the first call; start from config.json's each time
    hf.config.problem_type = hf.configured_problem_type
    kwargs = hf_torch.forward_kwargs(x, hf.config.model_type, labels=head != "base")
    extra = {}
    if head == "causal_lm":
        with torch.no_grad():
            extra["hf_own_loss"] = hf(**kwargs).loss.item()
    lookup_context = hf_torch.word_lookup(hf)
    lookup = lookup_context.__enter__()
    if head == "causal_lm":
        labels = kwargs.pop("labels")
        out = hf(**kwargs, output_hidden_states=True)
        logits = out.logits
        # ForCausalLMLoss upcasts with logits.float() (float64 -> float32): take the same shifted mean
        # cross-entropy in the model's dtype, and keep transformers' own loss for a float32 comparison.
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
    elif head == "base":
        out = hf(**kwargs)
        rng = np.random.default_rng(9)
        # zero at padded positions, so that nothing reads them (the pad-row rule, module docstring)
        upstream = {"last": rng.standard_normal(out.last_hidden_state.shape) * x["attention_mask"][..., None],
                    "pooled": rng.standard_normal(out.pooler_output.shape)}
        loss = (out.last_hidden_state * torch.from_numpy(upstream["last"]).to(out.last_hidden_state.dtype)).sum() \
            + (out.pooler_output * torch.from_numpy(upstream["pooled"]).to(out.pooler_output.dtype)).sum()
        extra["upstream"] = upstream
        logits = out.last_hidden_state
    else:
        out = hf(**kwargs)
        loss = out.loss
        logits = torch.stack([out.start_logits, out.end_logits], -1) if head == "question_answering" else out.logits
    loss.backward()
    lookup_context.__exit__(None, None, None)
    grads = hf_torch.parameters(hf, grads=True)
    # the gradient reaching the lookup of the pad id: nn.Embedding(padding_idx) drops it, ref-bert keeps it
    pad = hf.config.pad_token_id
    extra["pad_lookup_grad"] = lookup["output"].grad.numpy()[x["input_ids"].reshape(-1, x["input_ids"].shape[-1])
                                                            == pad].sum(axis=0)
    return logits.detach().numpy(), loss.detach().numpy(), grads, extra


def _ours(model, x, head, extra):
    if head == "base":
        out = model.forward(x["input_ids"], x["token_type_ids"], x["attention_mask"], keep_cache=True)
        up = {k: v.astype(model.dtype) for k, v in extra["upstream"].items()}
        grads = model.backward(out, d_hidden_states={-1: up["last"]}, d_pooled_output=up["pooled"]).params
        loss = (out.last_hidden_state * up["last"]).sum() + (out.pooled_output * up["pooled"]).sum()
        return out.last_hidden_state, loss, grads
    labels = {k: x[k] for k in ("labels", "start_positions", "end_positions") if k in x}
    result = model.loss_and_grads(x["input_ids"], x["token_type_ids"], x["attention_mask"], **labels)
    logits = model.forward(x["input_ids"], x["token_type_ids"], x["attention_mask"]).logits
    return logits, result.loss, result.grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family, head, extra, problem_type", CASES, ids=CASE_IDS)
def test_head_logits_loss_and_every_gradient_match_transformers(family, head, extra, problem_type, dtype,
                                                                tmp_path_factory):
    hf, directory = _pair(family, head, extra, tmp_path_factory)
    hf = hf.to(getattr(torch, dtype))
    try:
        model = Model.from_hf(directory, dtype=dtype)
        assert model.config.architecture == type(hf).__name__ and model.fresh_parameters == ()
        x = _inputs(model, problem_type)
        if problem_type is not None:
            assert model.problem_type(x["labels"]) == problem_type   # chosen as transformers chooses it
        hf_logits, hf_loss, hf_grads, info = _hf_side(hf, x, head, dtype)
        logits, loss, grads = _ours(model, x, head, info)
        tol = TOL[dtype]
        assert rel_err(logits, hf_logits) <= tol, f"logits {rel_err(logits, hf_logits):.2e}"
        assert rel_err(loss, hf_loss) <= tol, f"loss {rel_err(loss, hf_loss):.2e}"
        if "hf_own_loss" in info:
            assert rel_err(loss, info["hf_own_loss"]) <= 1e-6
        ours = model.hf_state_dict(grads)
        assert set(ours) == set(hf_grads), set(ours) ^ set(hf_grads)
        # Question answering's softmax over T also reads the padded positions (transformers masks
        # nothing there), so the pad row gets a lookup gradient that nn.Embedding(padding_idx) drops:
        # the rows must differ by exactly that (zero for the other heads, whose losses skip pads).
        word = f"{family}.embeddings.word_embeddings.weight"
        ours[word][model.config.pad_token_id] -= info["pad_lookup_grad"]
        if head != "question_answering":
            assert np.abs(info["pad_lookup_grad"]).max() == 0
        assert_grads_close(ours, hf_grads, tol, GRAD_ATOL[dtype])
    finally:
        hf.to(torch.float64)


def test_causal_mask_is_unilm_left_to_right_at_real_positions(tmp_path):
    """is_decoder's causal mask (key j <= query i, pads masked) against the second implementation,
    ref_bert.masks' UniLM left-to-right mask, given explicitly to the same bidirectional encoder."""
    config = Config(vocab_size=30, embedding_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=20, max_position_embeddings=12, model_type="bert", sharing="none")
    decoder = Model(config.with_head("causal_lm", is_decoder=True), dtype="float64", seed=1)
    encoder = Model(config.with_head("masked_lm"), dtype="float64", seed=1)
    for name in encoder.params:
        assert np.array_equal(encoder.params[name], decoder.params[name])
    x = task_batch(decoder.config, 3, 9, seed=2, lengths=(9, 6, 4))
    causal = decoder.forward(x["input_ids"], x["token_type_ids"], x["attention_mask"]).logits
    masks = batch_masks(["left_to_right"] * 3, 9, [9, 6, 4])
    explicit = encoder.forward(x["input_ids"], x["token_type_ids"], masks.astype(np.int64)).logits
    real = x["attention_mask"] == 1
    np.testing.assert_array_equal(causal[real], explicit[real])
    bidirectional = encoder.forward(x["input_ids"], x["token_type_ids"], x["attention_mask"]).logits
    assert np.abs(bidirectional[real] - causal[real]).max() > 1e-3     # the mask really matters here


VERIFY_CASES = [c for c in CASES if c[3] in (None, "single_label_classification")]


@pytest.mark.parametrize("family, head, extra, problem_type", VERIFY_CASES,
                         ids=[f"{f}-{h}" for f, h, _, _ in VERIFY_CASES])
def test_verify_compares_every_gradient_of_every_architecture(family, head, extra, problem_type, tmp_path_factory):
    """``ref-bert verify --hf`` on each architecture compares the loss and the gradient of every parameter
    (the bare encoders through a random upstream gradient; before, it reported OK comparing none)."""
    from ref_bert.verify import verify_hf

    hf, directory = _pair(family, head, extra, tmp_path_factory)
    report = verify_hf(directory, dtype="float64", seq_len=8)
    compared = {r.name.split("/", 1)[1] for r in report.rows if r.name.startswith("grads/")}
    assert compared == set(hf_torch.parameters(hf))
    assert any(r.name == "loss/total" for r in report.rows)
    assert report.ok, [(r.name, r.max_rel) for r in report.failures]
