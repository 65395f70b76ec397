"""Gradients entering below the top layer, and the loss path (issue #18).

1. ``Model.backward(out, d_hidden_states={i: G_i, ...}, d_pooled_output=Gp)`` for random subsets of the
   hidden states (0 = the encoder input after the E -> H projection, middle layers, the top; named by
   positive or negative index) and the pooled output, with random upstream gradients. The loss is the
   linear functional

       L = sum_i <G_i, h_i> + <Gp, pooled>

   and every parameter's gradient and the inputs_embeds gradient are checked against

   (a) finite differences in float64 (gradcheck): one random direction per parameter tensor, so every
       entry of every tensor takes part. Tolerance: gradcheck's 1e-6 relative with its 1e-4 floor
       (gradcheck/core.py): the Richardson-extrapolated stencil at h = 1e-3 has truncation error ~1e-9
       and round-off ~1e-11 relative on these O(1)-weight tiny models, so 1e-6 leaves three decades of
       margin above the method's own error while every bug targeted here (a layer's upstream gradient
       dropped, negated or replacing what comes from above) is an O(1) relative error;
   (b) torch autograd on the same weights in transformers' AlbertModel / BertModel (eager attention,
       float64, ``output_hidden_states=True``, the same functional). Tolerance: 1e-10 relative to each
       tensor's largest entry plus 1e-12 of the model's largest gradient (the attention key bias's
       gradient is exactly zero in exact arithmetic, so only rounding is left there; the measured errors
       are ~1e-14, see test_hf_parity.py's table: the margin is 4 decades above float64 rounding after
       a few hundred operations, and 9 decades below a wrong path).

   Configurations: ALBERT with everything shared (E < H), with G = 2 groups of K = 2 blocks over 3
   layers (HF's uneven split), with attention only / FFN only shared (no transformers equivalent: FD
   only), with frozen dropout, and BERT (E == H, nothing shared).

2. The loss path: ``loss_and_grads``' returned loss against its weighted parts recomputed independently
   from the logits (torch.nn.functional's losses in float64), with loss weights and loss scales that are
   not 1, for the pretraining head and every head of ref_bert/tasks.py; and the gradient against finite
   differences of the *returned* loss (so a loss that ignores a weight the gradient honours fails).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gradcheck import check_inplace
from ref_bert import Config, Model, hf_torch
from tests._models import perturbed_model

from .conftest import examples

torch.set_num_threads(1)

TINY = dict(vocab_size=40, embedding_size=6, hidden_size=8, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=8, type_vocab_size=2, hidden_act="gelu_new", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, head="base")
CONFIGS = {
    # name: (Config, transformers can express it)
    "albert_all": (Config(**TINY, num_hidden_layers=3), True),
    "albert_groups": (Config(**dict(TINY, hidden_act="gelu"), num_hidden_layers=3, num_hidden_groups=2,
                             inner_group_num=2), True),
    "albert_attention_shared": (Config(**TINY, num_hidden_layers=3, sharing="attention"), False),
    "albert_ffn_shared_dropout": (Config(**dict(TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
                                         num_hidden_layers=2, sharing="ffn", inner_group_num=2), False),
    "bert": (Config(**dict(TINY, embedding_size=8, hidden_act="gelu"), num_hidden_layers=3, sharing="none",
                    model_type="bert"), True),
}
HF_CONFIGS = [name for name, (_, hf_ok) in CONFIGS.items() if hf_ok]
B, T = 2, 5
FD = dict(rtol=1e-6, max_elements=0, samples=0, directions=1)   # one random direction per tensor
TORCH_RTOL, TORCH_ATOL = 1e-10, 1e-12


def _inputs(config, seed):
    """Distinct token ids (none the pad id), so that the word table's gradient row ids[b, t] is exactly
    inputs_embeds' gradient [b, t] (no MLM head here: no tied-decoder term), and transformers'
    padding_idx (no gradient for the pad row) never matters; row 1 padded after 3 tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, config.vocab_size))[:B * T].reshape(B, T)
    types = rng.integers(0, config.type_vocab_size, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 3:] = 0
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask)


def _case(name, layers, pooled, negative, seed):
    """The model, its inputs, the upstream gradients by layer index (as the caller names them) and the
    analytic gradients."""
    config = CONFIGS[name][0]
    L = config.num_hidden_layers
    model = perturbed_model(config, seed=seed, std=0.3)
    inputs = _inputs(config, seed)
    kwargs = dict(inputs, training=config.hidden_dropout_prob > 0, dropout_seed=seed)
    out = model.forward(**kwargs, keep_cache=True)
    rng = np.random.default_rng(seed + 1)
    upstream = {(i - (L + 1) if negative else i): rng.standard_normal((B, T, config.hidden_size))
                for i in sorted(i % (L + 1) for i in layers)}
    d_pooled = rng.standard_normal((B, config.hidden_size)) if pooled else None
    grads = model.backward(out, d_hidden_states=upstream, d_pooled_output=d_pooled)
    return model, kwargs, upstream, d_pooled, grads


def _functional(hidden_states, pooled, upstream, d_pooled):
    total = sum((g * hidden_states[i]).sum() for i, g in upstream.items())
    if d_pooled is not None:
        total = total + (d_pooled * pooled).sum()
    return total


@settings(max_examples=examples(4))
@given(name=st.sampled_from(list(CONFIGS)), layers=st.sets(st.integers(0, 3), min_size=1, max_size=4),
       pooled=st.booleans(), negative=st.booleans(), seed=st.integers(0, 1000))
@example(name="albert_groups", layers={0, 1, 2, 3}, pooled=True, negative=False, seed=3)
@example(name="albert_attention_shared", layers={1}, pooled=False, negative=True, seed=4)
@example(name="albert_ffn_shared_dropout", layers={0, 1}, pooled=True, negative=False, seed=5)
def test_gradients_injected_at_any_layers_match_finite_differences(name, layers, pooled, negative, seed):
    """Every parameter tensor (one random direction each) and inputs_embeds against finite differences
    of L = sum_i <G_i, h_i> + <Gp, pooled>; rtol 1e-6 (module docstring)."""
    model, kwargs, upstream, d_pooled, grads = _case(name, layers, pooled, negative, seed)

    def loss():
        out = model.forward(**kwargs)
        return _functional(out.hidden_states, out.pooled_output, upstream, d_pooled)

    report = check_inplace(loss, model.state_dict(), grads.params, seed=seed, **FD)
    assert {r.name for r in report.results} == set(model.state_dict())
    report.assert_ok()
    # inputs_embeds: with distinct ids its gradient is the word table's rows, which FD just checked
    ids = kwargs["input_ids"]
    word = grads.params["embeddings.word_embeddings"]
    assert np.array_equal(word[ids.reshape(-1)], grads.inputs_embeds.reshape(B * T, -1))
    # a gradient entering only the encoder input reaches no encoder parameter, one above it does
    encoder = [k for k in grads.params if k.startswith("encoder.")]
    reaches_encoder = pooled or any(i % (model.config.num_hidden_layers + 1) for i in upstream)
    assert any(grads.params[k].any() for k in encoder) == reaches_encoder


def _torch_grads(model, inputs, upstream, d_pooled):
    """transformers' AlbertModel / BertModel holding ``model``'s weights: autograd of the same functional.
    Returns (gradients by HF name, inputs_embeds gradient). HF reports one hidden state per block call
    (L * K + 1 of them) when K > 1: our layer i is its entry i * K."""
    hf = hf_torch.from_model(model, "Model", dtype="float64")
    kwargs = hf_torch.forward_kwargs(inputs, model.config.model_type, labels=False, output_hidden_states=True)
    with hf_torch.word_lookup(hf) as kept:
        out = hf(**kwargs)
    hidden = out.hidden_states
    L, K = model.config.num_hidden_layers, model.config.inner_group_num
    step = K if len(hidden) == L * K + 1 else 1
    assert len(hidden) == L * step + 1
    total = sum((torch.from_numpy(g) * hidden[(i % (L + 1)) * step]).sum() for i, g in upstream.items())
    if d_pooled is not None:
        total = total + (torch.from_numpy(d_pooled) * out.pooler_output).sum()
    total.backward()
    grads = {}
    for hf_name, p in zip(hf_torch.parameters(hf), hf.parameters()):
        grads[hf_name] = np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy().copy()
    d_embeds = kept["output"].grad
    return grads, (np.zeros((B, T, model.config.embedding_size)) if d_embeds is None else d_embeds.numpy())


@settings(max_examples=examples(3))
@given(name=st.sampled_from(HF_CONFIGS), layers=st.sets(st.integers(0, 3), min_size=1, max_size=4),
       pooled=st.booleans(), negative=st.booleans(), seed=st.integers(0, 1000))
@example(name="albert_groups", layers={0, 2}, pooled=True, negative=True, seed=7)
@example(name="bert", layers={0, 1, 2, 3}, pooled=False, negative=False, seed=8)
def test_gradients_injected_at_any_layers_match_torch_autograd(name, layers, pooled, negative, seed):
    """Every parameter and inputs_embeds against torch autograd on the transformers model:
    max|ours - torch| <= 1e-10 max|torch| + 1e-12 (largest gradient) per tensor (module docstring)."""
    model, kwargs, upstream, d_pooled, grads = _case(name, layers, pooled, negative, seed)
    inputs = {k: kwargs[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    ref, ref_embeds = _torch_grads(model, inputs, upstream, d_pooled)
    ours = model.hf_state_dict(grads.params)
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    largest = max(np.abs(g).max() for g in ref.values())
    assert largest > 0
    for hf_name, g in ref.items():
        err = np.abs(ours[hf_name] - g).max()
        assert err <= TORCH_RTOL * np.abs(g).max() + TORCH_ATOL * largest, (hf_name, err, np.abs(g).max())
    err = np.abs(grads.inputs_embeds - ref_embeds).max()
    assert err <= TORCH_RTOL * np.abs(ref_embeds).max() + TORCH_ATOL * largest, err
    assert np.abs(ref_embeds).max() > 0


# --- 2. the loss path ---------------------------------------------------------------------------------
LOSS_RTOL = 1e-12   # float64, the same sums in another order (torch's functional losses): ~1e-15 measured
LOSS_FD = dict(rtol=1e-6, max_elements=0, samples=4, directions=2)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _torch_ce(logits, labels, label_smoothing=0.0, ignore_index=-100, tf_albert=False):
    """torch's cross-entropy over rows (N, C); TF ALBERT's normalisation sum(nll) / (count + 1e-5)."""
    logits, labels = _t(logits).reshape(-1, np.shape(logits)[-1]), _t(labels).reshape(-1)
    if not tf_albert:
        return float(F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing))
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            reduction="sum")
    return float(total / (int((labels != ignore_index).sum()) + 1e-5))


def _flat_grads(model, grads):
    """The per-parameter gradients laid out like ``model.params.flat``."""
    return np.concatenate([np.asarray(grads[name]).reshape(-1) for name in model.params.shapes])


def _check_returned_loss_gradient(model, call, grads, seed):
    """Finite differences of the *returned* loss ``call().loss`` against the returned gradient: two random
    directions through all parameters at once plus 4 entries (2 where the gradient is non-zero), and one
    random direction per head tensor. rtol 1e-6 as in part 1; a loss off by a weight w != 1 relative to
    its gradient is a relative error |1 - w| / (1 + w), here >= 0.1."""
    def loss():
        return call().loss

    check_inplace(loss, {"flat": model.params.flat}, {"flat": _flat_grads(model, grads)}, seed=seed,
                  **LOSS_FD).assert_ok()
    heads = [n for n in model.params.shapes if n.split(".")[0] in ("mlm", "sop", "classifier", "qa_outputs")]
    check_inplace(loss, {n: model.params[n] for n in heads}, grads, seed=seed, **FD).assert_ok()


def _pretraining_case(seed):
    config = Config(**dict(TINY, hidden_dropout_prob=0.1, classifier_dropout_prob=0.1, head="pretraining"),
                    num_hidden_layers=1)
    model = perturbed_model(config, seed=seed, std=0.3)
    inputs = _inputs(config, seed)
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((B, T)) < 0.5, rng.integers(0, config.vocab_size, (B, T)), -100)
    labels[0, 0] = 7
    labels[1, 4] = -100                                        # a padded position: ignored
    return model, inputs, labels, np.array([1, 0])


@pytest.mark.parametrize("weights, scale, smoothing, normalization, parts", [
    ((0.7, 1.9), 1.0, 0.0, "mean", ("mlm", "sop")),
    ((1.3, 0.4), 0.25, 0.1, "tf_albert", ("mlm", "sop")),
    ((2.5, 0.6), 1.0, 0.0, "mean", ("mlm",)),
    ((0.8, 3.0), 0.5, 0.2, "mean", ("sop",)),
])
def test_pretraining_returned_loss_is_its_weighted_parts_and_its_gradients_loss(weights, scale, smoothing,
                                                                                normalization, parts):
    """loss = scale * (w_mlm MLM + w_sop SOP), each part recomputed by torch's F.cross_entropy from the
    logits of a plain forward (same frozen dropout), to 1e-12 relative; parts unweighted (0 when the part
    has no labels); and finite differences of the returned loss give the returned gradient (rtol 1e-6)."""
    model, inputs, mlm_labels, sop_labels = _pretraining_case(seed=21)
    kwargs = dict(inputs, mlm_labels=mlm_labels if "mlm" in parts else None,
                  sop_labels=sop_labels if "sop" in parts else None, training=True, dropout_seed=5,
                  loss_weights=weights, loss_scale=scale, label_smoothing=smoothing, mlm_normalization=normalization)

    def call():
        return model.loss_and_grads(**kwargs)

    result = call()
    out = model.forward(**inputs, training=True, dropout_seed=5)
    mlm = _torch_ce(out.mlm_logits, mlm_labels, smoothing, tf_albert=normalization == "tf_albert") \
        if "mlm" in parts else 0.0
    sop = _torch_ce(out.sop_logits, sop_labels, smoothing) if "sop" in parts else 0.0
    assert mlm != sop
    expected = scale * (weights[0] * mlm + weights[1] * sop)
    assert float(result.loss) == pytest.approx(expected, rel=LOSS_RTOL, abs=0)
    assert float(result.parts["mlm"]) == pytest.approx(mlm, rel=LOSS_RTOL, abs=0)
    assert float(result.parts["sop"]) == pytest.approx(sop, rel=LOSS_RTOL, abs=0)
    assert float(model.loss(**kwargs)) == float(result.loss)
    _check_returned_loss_gradient(model, call, result.grads, seed=2)


def _head_case(head, seed, column=False, **config_changes):
    """A one-layer model with ``head``, its inputs and labels (keyword arguments of loss_and_grads), and
    the loss transformers computes from ``out.logits`` (torch.nn.functional, float64): (loss, parts)."""
    bert = head in ("causal_lm", "next_sentence")
    spec = dict(TINY, head=head, hidden_dropout_prob=0.1, classifier_dropout_prob=0.1)
    if bert:
        spec.update(embedding_size=8, model_type="bert", sharing="none", is_decoder=head == "causal_lm")
    config = Config(**spec, num_hidden_layers=1, **config_changes)
    model = perturbed_model(config, seed=seed, std=0.3)
    rng = np.random.default_rng(seed)
    inputs = _inputs(config, seed)
    if head == "multiple_choice":
        inputs = {k: np.stack([v, v[::-1]], axis=1) for k, v in inputs.items()}   # (B, C = 2, T)
        inputs["input_ids"][:, 1, 1] = 3                                           # the two choices differ
    L = config.num_labels
    if head == "question_answering":
        # transformers clamps to [0, T] and ignores T: a start past the end and an end at T are ignored,
        # negative ones count as position 0
        labels = dict(start_positions=np.array([-1, T + 3]), end_positions=np.array([T, -2]))
    elif head in ("masked_lm", "causal_lm"):
        labels = dict(labels=np.where(rng.random((B, T)) < 0.6, rng.integers(0, config.vocab_size, (B, T)), -100))
        labels["labels"][:, 2] = 5
    elif head == "token_classification":
        labels = dict(labels=np.where(inputs["attention_mask"] == 1, rng.integers(0, L, (B, T)), -100))
    elif head in ("next_sentence", "multiple_choice"):
        labels = dict(labels=np.array([1, 0]))
    else:
        problem = model.config.problem_type
        if problem == "regression" or (problem is None and L == 1):
            labels = dict(labels=rng.standard_normal((B,) if L == 1 else (B, L)))
        elif problem == "multi_label_classification":
            labels = dict(labels=rng.random((B, L)))
        else:
            labels = dict(labels=np.array([L - 1, 0]))
    if column:      # transformers also takes (B, 1) labels for one label or one class id per row
        labels["labels"] = labels["labels"].reshape(B, 1)
    return model, inputs, labels


def _reference_loss(model, out, labels, smoothing):
    """transformers' loss for the head, from the logits of a plain forward: (loss, parts)."""
    head, L = model.config.head, model.config.num_labels
    logits = out.logits
    if head == "question_answering":
        T_ = logits.shape[1]
        start = np.clip(labels["start_positions"], 0, T_)
        end = np.clip(labels["end_positions"], 0, T_)
        s = _torch_ce(logits[..., 0], start, smoothing, ignore_index=T_)
        e = _torch_ce(logits[..., 1], end, smoothing, ignore_index=T_)
        return (s + e) / 2, {"start": s, "end": e}
    y = labels["labels"]
    if head == "causal_lm":
        loss = _torch_ce(logits[:, :-1], y[:, 1:], smoothing)
    elif head == "sequence_classification":
        problem = model.problem_type(y)
        if problem == "regression":
            loss = float(F.mse_loss(_t(logits).squeeze(), _t(y).squeeze()))
        elif problem == "multi_label_classification":
            loss = float(F.binary_cross_entropy_with_logits(_t(logits), _t(y)))
        else:
            loss = _torch_ce(logits, y, smoothing)
    else:
        loss = _torch_ce(logits, y, smoothing)
    return loss, {"task": loss}


@pytest.mark.parametrize("head, changes, smoothing", [
    ("sequence_classification", dict(num_labels=1), 0.0),
    ("sequence_classification", dict(num_labels=1, column=True), 0.0),
    ("sequence_classification", dict(num_labels=3, column=True), 0.0),
    ("sequence_classification", dict(num_labels=3, problem_type="regression"), 0.0),
    ("sequence_classification", dict(num_labels=3), 0.1),
    ("sequence_classification", dict(num_labels=3, problem_type="multi_label_classification"), 0.0),
    ("token_classification", dict(num_labels=3), 0.0),
    ("question_answering", {}, 0.1),
    ("multiple_choice", {}, 0.0),
    ("next_sentence", {}, 0.0),
    ("masked_lm", {}, 0.2),
    ("causal_lm", {}, 0.0),
])
def test_task_head_returned_loss_is_the_scaled_transformers_loss_and_its_gradients_loss(head, changes, smoothing):
    """loss = loss_scale * (transformers' loss of the head), recomputed by torch.nn.functional from the
    logits of a plain forward (same frozen dropout), 1e-12 relative; parts unscaled (question answering:
    start and end, with a position past the end ignored and a negative one clamped to 0); and finite
    differences of the returned loss give the returned gradient (rtol 1e-6)."""
    model, inputs, labels = _head_case(head, seed=31, **changes)
    scale = 0.37
    kwargs = dict(inputs, **labels, training=True, dropout_seed=6, loss_scale=scale, label_smoothing=smoothing)

    def call():
        return model.loss_and_grads(**kwargs)

    result = call()
    out = model.forward(**inputs, training=True, dropout_seed=6)
    if changes.get("column"):
        labels = {"labels": labels["labels"].reshape(-1)}     # the reference takes (B,)
    loss, parts = _reference_loss(model, out, labels, smoothing)
    assert loss > 0
    assert float(result.loss) == pytest.approx(scale * loss, rel=LOSS_RTOL, abs=0)
    assert set(result.parts) == set(parts)
    for k, v in parts.items():
        assert float(result.parts[k]) == pytest.approx(v, rel=LOSS_RTOL, abs=0), k
    assert float(model.loss(**kwargs)) == float(result.loss)
    _check_returned_loss_gradient(model, call, result.grads, seed=3)


def test_sequence_problem_type_and_the_loss_functions_defaults():
    """transformers' choice when problem_type is None: one label -> regression, integer labels ->
    single-label, float labels with several -> multi-label; and tasks' loss functions called with their
    defaults (no label smoothing) give torch's losses (1e-12 relative)."""
    from ref_bert import tasks

    model = Model(Config(**dict(TINY, head="sequence_classification"), num_hidden_layers=1, num_labels=3))
    assert model.problem_type(np.array([0, 2])) == "single_label_classification"
    assert model.problem_type(np.array([0, 2], dtype=np.uint8)) == "single_label_classification"
    assert model.problem_type(np.zeros((2, 3))) == "multi_label_classification"
    assert tasks.sequence_problem_type(None, 1, np.array([1, 0])) == "regression"
    assert tasks.sequence_problem_type("regression", 3, np.array([1, 0])) == "regression"
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((4, 3)), np.array([2, 0, 1, 1])
    loss, _ = tasks.sequence_loss_forward(logits, labels, "single_label_classification")
    assert float(loss) == pytest.approx(_torch_ce(logits, labels), rel=LOSS_RTOL, abs=0)
    (both, start, end), _ = tasks.span_loss_forward(logits.T, logits.T[::-1].copy(), np.array([1, 3, 0]),
                                                    np.array([2, 2, 9]))
    assert float(start) == pytest.approx(_torch_ce(logits.T, np.array([1, 3, 0])), rel=LOSS_RTOL, abs=0)
    assert float(end) == pytest.approx(_torch_ce(logits.T[::-1], np.array([2, 2, 4]), ignore_index=4),
                                       rel=LOSS_RTOL, abs=0)
    assert float(both) == pytest.approx((float(start) + float(end)) / 2, rel=LOSS_RTOL, abs=0)
    (column, _, _), _ = tasks.span_loss_forward(logits.T, logits.T[::-1].copy(), np.array([[1], [3], [0]]),
                                                np.array([[2], [2], [9]]))        # (B, 1) positions: the same
    assert float(column) == float(both)
    # transformers' ForCausalLMLoss: pad(labels, (0, 1), value=-100)[..., 1:], in the labels' integer dtype
    for dtype in (np.int64, np.int32):
        shifted = tasks.shift_labels(np.array([[5, 6, -100, 7], [1, 2, 3, 4]], dtype=dtype))
        assert shifted.dtype == dtype
        assert shifted.tolist() == [[6, -100, 7, -100], [2, 3, 4, -100]]


def test_task_loss_defaults_and_span_logit_columns_against_torch():
    """Mutation survivors of ref_bert/tasks.py (docs/testing.md): the losses' default label smoothing is
    0 (transformers' CrossEntropyLoss()), and the QA head's start logits are column 0 of the span
    projection, the end logits column 1 (transformers' ``logits.split(1, dim=-1)``). Against torch's
    functional cross-entropy in float64, 1e-12 (one log-sum-exp per row apart)."""
    import torch
    import torch.nn.functional as F

    from ref_bert import tasks

    rng = np.random.default_rng(7)
    logits = rng.standard_normal((5, 4))
    labels = rng.integers(0, 4, 5)
    loss, _ = tasks.sequence_loss_forward(logits, labels, "single_label_classification")
    assert abs(float(loss) - F.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()) < 1e-12
    start, end = rng.standard_normal((2, 3, 6))
    sp, ep = np.array([1, 4, 0]), np.array([2, 5, 3])
    (loss, _, _), _ = tasks.span_loss_forward(start, end, sp, ep)
    want = (F.cross_entropy(torch.tensor(start), torch.tensor(sp)) + F.cross_entropy(torch.tensor(end), torch.tensor(ep))) / 2
    assert abs(float(loss) - want.item()) < 1e-12
    hidden, weight, bias = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    (s, e), both, _ = tasks.span_logits_forward(hidden, weight, bias)
    full = hidden @ weight + bias
    np.testing.assert_allclose(s, full[..., 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(e, full[..., 1], rtol=1e-12, atol=1e-12)
