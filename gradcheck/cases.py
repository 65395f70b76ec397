"""Gradient-check cases for every op of ref_bert and for the full model.

The ops run whatever the backend chose (its fast variants, see backends/); to check the reference ops
themselves, run a case inside ``backends.reference_ops()`` (the battery and the tests do both).

Each op case turns an op's ``*_forward`` / ``*_backward`` pair into the ``forward(*inputs)`` /
``backward(dout) -> input gradients`` form that :func:`gradcheck.check_vjp` takes. Parameter
gradients come from the op's accumulate-into-buffer convention: the wrapper hands the backward fresh
zero buffers and returns what was added to them. The same cases serve the hypothesis tests (which
draw their sizes) and ``python -m gradcheck`` (which uses fixed sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ref_bert import ops
from ref_bert.encoder import (attention_sublayer_backward, attention_sublayer_forward, ffn_sublayer_backward,
                              ffn_sublayer_forward)
from ref_bert.heads import (mlm_head_backward, mlm_head_forward, pooler_backward, pooler_forward,
                            sop_head_backward, sop_head_forward)
from ref_bert.tasks import (classifier_backward, classifier_forward, sequence_loss_backward, sequence_loss_forward,
                            span_logits_backward, span_logits_forward, span_loss_backward, span_loss_forward)

from .core import Report, check_inplace, check_vjp


@dataclass
class OpCase:
    name: str
    forward: Callable
    backward: Callable
    inputs: dict


def _buffers_like(params: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in params.items()}


def _with_params(names, fwd, bwd):
    """Wrap an op taking a dict ``p`` of params into the (forward(**inputs), backward(dout)) form.

    ``fwd(x, p) -> (out, cache)``; ``bwd(dout, cache, g) -> dx``. The backward wrapper re-runs the
    forward at the unperturbed point (check_vjp calls backward once, before any perturbation).
    """
    state = {}

    def forward(x, **p):
        out, cache = fwd(x, p)
        state["cache"] = cache
        return out

    def backward(dout):
        g = _buffers_like({k: state["p"][k] for k in names})
        dx = bwd(dout, state["cache"], g)
        return {"x": dx, **g}

    def forward_recording(x, **p):
        state["p"] = p
        return forward(x, **p)

    return forward_recording, backward


def op_cases(seed: int = 0, B: int = 2, T: int = 5, H: int = 8, heads: int = 2, E: int = 6, I: int = 12,
             V: int = 11, dropout: float = 0.2) -> list[OpCase]:
    """One case per op, float64, sizes as given; every input drawn from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, s=1.0: rng.standard_normal(shape) * s  # noqa: E731
    keep = 1.0 - dropout
    mask = lambda *shape: (rng.random(shape) < keep) / keep  # noqa: E731
    cases = []

    lin_inputs = {"x": normal(B, T, H), "w": normal(H, I), "b": normal(I)}

    def linear_backward(dout, inputs=lin_inputs):
        _, cache = ops.linear_forward(inputs["x"], inputs["w"], inputs["b"])
        dw, db = np.zeros_like(inputs["w"]), np.zeros_like(inputs["b"])
        return {"x": ops.linear_backward(dout, cache, dw, db), "w": dw, "b": db}

    cases.append(OpCase("linear", lambda x, w, b: ops.linear_forward(x, w, b)[0], linear_backward, lin_inputs))

    ln_inputs = {"x": normal(B, T, H), "w": normal(H), "b": normal(H)}

    def ln_backward(dout, inputs=ln_inputs):
        _, cache = ops.layer_norm_forward(inputs["x"], inputs["w"], inputs["b"], 1e-12)
        dw, db = np.zeros_like(inputs["w"]), np.zeros_like(inputs["b"])
        return {"x": ops.layer_norm_backward(dout, cache, dw, db), "w": dw, "b": db}

    cases.append(OpCase("layer_norm", lambda x, w, b: ops.layer_norm_forward(x, w, b, 1e-12)[0],
                        ln_backward, ln_inputs))

    for act in ("gelu", "gelu_new", "tanh", "relu"):
        x = normal(B, T, H) * 2
        if act == "relu":  # keep away from the kink, where the derivative does not exist
            x = np.where(np.abs(x) < 0.05, 0.5, x)
        cases.append(OpCase(
            f"activation.{act}",
            lambda x, act=act: ops.activation_forward(act, x)[0],
            lambda dout, act=act, x=x: {"x": ops.activation_backward(dout, ops.activation_forward(act, x)[1])},
            {"x": x}))

    sm_x = normal(B, heads, T, T) * 2
    cases.append(OpCase("softmax", lambda x: ops.softmax_forward(x)[0],
                        lambda dout, x=sm_x: {"x": ops.softmax_backward(dout, ops.softmax_forward(x)[1])},
                        {"x": sm_x}))

    # masked softmax (the middle of attention) with a padding mask and a frozen dropout mask; the op may
    # overwrite its scores, so each call gets a copy
    ms_mask = np.ones((B, T))
    ms_mask[0, -1] = 0
    ms_additive = ops.additive_mask_from(ms_mask, np.float64, -10000.0)
    ms_keep = mask(B, heads, T, T)
    ms_x = normal(B, heads, T, T) * 2
    cases.append(OpCase(
        "masked_softmax",
        lambda x: ops.masked_softmax_forward(x.copy(), 0.5, ms_additive, ms_keep)[0][1],
        lambda dout, x=ms_x: {"x": ops.masked_softmax_backward(
            dout, ops.masked_softmax_forward(x.copy(), 0.5, ms_additive, ms_keep)[1])},
        {"x": ms_x}))

    drop_mask = mask(B, T, H)
    cases.append(OpCase("dropout", lambda x: ops.dropout_forward(x, drop_mask)[0],
                        lambda dout: {"x": ops.dropout_backward(dout, drop_mask)}, {"x": normal(B, T, H)}))

    # cross entropy: some rows ignored
    ce_labels = rng.integers(0, V, size=B * T)
    ce_labels[::3] = ops.IGNORE_INDEX
    ce_logits = normal(B * T, V) * 2
    cases.append(OpCase(
        "cross_entropy",
        lambda x: ops.cross_entropy_forward(x, ce_labels)[0],
        lambda dout, x=ce_logits: {"x": ops.cross_entropy_backward(dout, ops.cross_entropy_forward(x, ce_labels)[1])},
        {"x": ce_logits}))

    # the same with label smoothing 0.1 (torch's definition) and with TF ALBERT's sum / (count + 1e-5)
    cases.append(OpCase(
        "cross_entropy.label_smoothing",
        lambda x: ops.cross_entropy_forward(x, ce_labels, label_smoothing=0.1)[0],
        lambda dout, x=ce_logits: {"x": ops.cross_entropy_backward(
            dout, ops.cross_entropy_forward(x, ce_labels, label_smoothing=0.1)[1])},
        {"x": ce_logits}))
    cases.append(OpCase(
        "cross_entropy.tf_albert",
        lambda x: ops.cross_entropy_forward(x, ce_labels, normalization="tf_albert")[0],
        lambda dout, x=ce_logits: {"x": ops.cross_entropy_backward(
            dout, ops.cross_entropy_forward(x, ce_labels, normalization="tf_albert")[1])},
        {"x": ce_logits}))

    # binary cross-entropy with logits (soft targets in [0, 1], some logits large) and mean squared error
    bce_targets = rng.random((B, V))
    bce_logits = normal(B, V) * 3
    cases.append(OpCase("bce_with_logits", lambda x: ops.bce_with_logits_forward(x, bce_targets)[0],
                        lambda dout, x=bce_logits: {"x": ops.bce_with_logits_backward(
                            dout, ops.bce_with_logits_forward(x, bce_targets)[1])}, {"x": bce_logits}))
    mse_targets = normal(B, V)
    mse_x = normal(B, V)
    cases.append(OpCase("mse", lambda x: ops.mse_forward(x, mse_targets)[0],
                        lambda dout, x=mse_x: {"x": ops.mse_backward(dout, ops.mse_forward(x, mse_targets)[1])},
                        {"x": mse_x}))

    # self-attention with a padding mask (last key of example 0 masked) and a frozen probs-dropout mask
    attn_mask = np.ones((B, T))
    attn_mask[0, -1] = 0
    additive = ops.additive_mask_from(attn_mask, np.float64, -10000.0)
    probs_mask = mask(B, heads, T, T)
    attn_p = {f"{k}.{s}": normal(H, H) * 0.5 if s == "weight" else normal(H) * 0.5
              for k in ("query", "key", "value") for s in ("weight", "bias")}
    fwd, bwd = _with_params(list(attn_p),
                            lambda x, p: ops.self_attention_forward(x, p, additive, heads, probs_mask),
                            ops.self_attention_backward)
    cases.append(OpCase("self_attention", fwd, bwd, {"x": normal(B, T, H), **attn_p}))

    # embeddings: lookup + LayerNorm + dropout + projection E->H
    ids = rng.integers(0, V, size=(B, T))
    ids.reshape(-1)[:3] = 3  # repeated ids: the scatter-add must sum them
    types = rng.integers(0, 2, size=(B, T))
    positions = np.broadcast_to(np.arange(T), (B, T))
    emb_drop = mask(B, T, E)
    emb_p = {"word_embeddings": normal(V, E), "position_embeddings": normal(T + 2, E),
             "token_type_embeddings": normal(2, E), "layer_norm.weight": normal(E), "layer_norm.bias": normal(E),
             "projection.weight": normal(E, H), "projection.bias": normal(H)}

    def emb_forward(**p):
        return ops.embeddings_forward(p, ids, types, positions, 1e-12, emb_drop)[0]

    def emb_backward(dout, p=emb_p):
        _, cache = ops.embeddings_forward(p, ids, types, positions, 1e-12, emb_drop)
        g = _buffers_like(p)
        ops.embeddings_backward(dout, cache, g)
        return g

    cases.append(OpCase("embeddings", emb_forward, emb_backward, emb_p))

    # encoder sublayers (post-LN residual blocks) and heads, via a tiny stand-in config
    from ref_bert import Config
    cfg = Config(vocab_size=V, embedding_size=E, hidden_size=H, num_attention_heads=heads, intermediate_size=I,
                 num_hidden_layers=1, max_position_embeddings=T + 2, hidden_act="gelu",
                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    frozen = {}

    def drop(shape, prob):  # the same masks on every call: frozen while differencing
        if prob == 0:
            return None
        if shape not in frozen:
            frozen[shape] = mask(*shape)
        return frozen[shape]

    sub_p = {**{f"{k}.{s}": normal(H, H) * 0.5 if s == "weight" else normal(H) * 0.5
                for k in ("query", "key", "value", "output") for s in ("weight", "bias")},
             "layer_norm.weight": normal(H), "layer_norm.bias": normal(H)}
    fwd, bwd = _with_params(list(sub_p), lambda x, p: attention_sublayer_forward(x, p, additive, cfg, drop),
                            attention_sublayer_backward)
    cases.append(OpCase("encoder.attention_sublayer", fwd, bwd, {"x": normal(B, T, H), **sub_p}))

    ffn_p = {"intermediate.weight": normal(H, I) * 0.5, "intermediate.bias": normal(I) * 0.5,
             "output.weight": normal(I, H) * 0.5, "output.bias": normal(H) * 0.5,
             "layer_norm.weight": normal(H), "layer_norm.bias": normal(H)}
    fwd, bwd = _with_params(list(ffn_p), lambda x, p: ffn_sublayer_forward(x, p, cfg, drop), ffn_sublayer_backward)
    cases.append(OpCase("encoder.ffn_sublayer", fwd, bwd, {"x": normal(B, T, H), **ffn_p}))

    pool_p = {"pooler.weight": normal(H, H) * 0.5, "pooler.bias": normal(H) * 0.5}
    fwd, bwd = _with_params(list(pool_p), pooler_forward, lambda d, c, g: pooler_backward(d, c, g, np))
    cases.append(OpCase("heads.pooler", fwd, bwd, {"x": normal(B, T, H), **pool_p}))

    mlm_p = {"mlm.dense.weight": normal(H, E) * 0.5, "mlm.dense.bias": normal(E) * 0.5,
             "mlm.layer_norm.weight": normal(E), "mlm.layer_norm.bias": normal(E), "mlm.bias": normal(V),
             "embeddings.word_embeddings": normal(V, E)}
    fwd, bwd = _with_params(list(mlm_p), lambda x, p: mlm_head_forward(x, p, cfg), mlm_head_backward)
    cases.append(OpCase("heads.mlm", fwd, bwd, {"x": normal(B * T, H), **mlm_p}))

    sop_p = {"sop.weight": normal(H, 2), "sop.bias": normal(2)}
    sop_mask = mask(B, H)
    fwd, bwd = _with_params(list(sop_p), lambda x, p: sop_head_forward(x, p, sop_mask), sop_head_backward)
    cases.append(OpCase("heads.sop", fwd, bwd, {"x": normal(B, H), **sop_p}))

    # task heads (tasks.py): the classifier (dropout then dense) on (B, T, H), the span (QA) logits
    cls_p = {"classifier.weight": normal(H, 3), "classifier.bias": normal(3)}
    cls_mask = mask(B, T, H)
    fwd, bwd = _with_params(list(cls_p), lambda x, p: classifier_forward(x, p["classifier.weight"],
                                                                         p["classifier.bias"], cls_mask),
                            lambda d, c, g: classifier_backward(d, c, g["classifier.weight"], g["classifier.bias"]))
    cases.append(OpCase("tasks.classifier", fwd, bwd, {"x": normal(B, T, H), **cls_p}))
    qa_p = {"qa_outputs.weight": normal(H, 2), "qa_outputs.bias": normal(2)}
    fwd, bwd = _with_params(list(qa_p), lambda x, p: span_logits_forward(x, p["qa_outputs.weight"],
                                                                         p["qa_outputs.bias"])[1:],
                            lambda d, c, g: span_logits_backward(d, c, g["qa_outputs.weight"], g["qa_outputs.bias"]))
    cases.append(OpCase("tasks.span_logits", fwd, bwd, {"x": normal(B, T, H), **qa_p}))

    # the question-answering loss, with a position past the end (ignored) and a negative one (clamped to 0)
    starts, ends = rng.integers(0, T, B), rng.integers(0, T, B)
    starts[0], ends[-1] = T + 3, -2
    span_x = normal(B, T, 2)

    def span_loss(x):
        return span_loss_forward(x[..., 0], x[..., 1], starts, ends, label_smoothing=0.1)

    cases.append(OpCase("tasks.span_loss", lambda x: span_loss(x)[0][0],
                        lambda dout, x=span_x: {"x": span_loss_backward(dout, span_loss(x)[1])}, {"x": span_x}))

    # the sequence-classification losses, one case per problem type
    for problem, targets in (("regression", normal(B, 1)), ("single_label_classification", rng.integers(0, 3, B)),
                             ("multi_label_classification", rng.random((B, 3)))):
        seq_x = normal(B, targets.shape[1] if targets.ndim == 2 else 3)
        cases.append(OpCase(
            f"tasks.sequence_loss.{problem.split('_')[0]}",
            lambda x, problem=problem, targets=targets: sequence_loss_forward(x, targets, problem)[0],
            lambda dout, x=seq_x, problem=problem, targets=targets: {"x": sequence_loss_backward(
                dout, sequence_loss_forward(x, targets, problem)[1])}, {"x": seq_x}))

    # sentence pooling (every mode, concatenated) and L2 normalisation, over right- and left-padded rows;
    # per (row, feature) the values are a shuffled 0..T-1 plus noise, so the max has a clear winner that a
    # finite-difference step cannot overtake
    lengths = rng.integers(1, T + 1, size=B)
    row_starts = [int(rng.integers(0, T - n + 1)) for n in lengths]
    pool_mask = np.zeros((B, T), dtype=np.int64)
    for b, (n, start) in enumerate(zip(lengths, row_starts)):
        pool_mask[b, start:start + n] = 1
    ranks = np.argsort(rng.random((B, T, H)), axis=1).astype(np.float64)
    pooled_input = ranks + 0.1 * normal(B, T, H)

    def sentence_forward(h):
        return _sentence_pooling(h, pool_mask)[0]

    def sentence_backward(dout, inputs={"h": pooled_input}):
        _, (caches, norm_cache) = _sentence_pooling(inputs["h"], pool_mask)
        d = ops.l2_normalize_backward(dout, norm_cache)
        return {"h": sum(ops.pooling_backward(d[:, k * H:(k + 1) * H], c) for k, c in enumerate(caches))}

    cases.append(OpCase("sentence_pooling", sentence_forward, sentence_backward, {"h": pooled_input}))
    return cases


def _sentence_pooling(h, mask):
    """Every pooling mode of ``h`` over ``mask``, concatenated, then L2-normalised (ref_bert.sentence's path)."""
    pooled, caches = [], []
    for mode in ops.POOLING_MODES:
        y, c = ops.pooling_forward(h, mask, mode)
        pooled.append(y)
        caches.append(c)
    z, norm_cache = ops.l2_normalize_forward(np.concatenate(pooled, axis=-1))
    return z, (caches, norm_cache)


def check_op_case(case: OpCase, seed: int = 0, **options) -> Report:
    return check_vjp(case.forward, case.backward, case.inputs, seed=seed, **options)


def check_model(model, inputs: dict, *, names=None, seed: int = 0, **options) -> Report:
    """Check the gradient of ``model.loss(**inputs)`` for every parameter (or those in ``names``).

    The model must be float64. Dropout masks are frozen by passing ``training=True`` together with a
    ``dropout_seed`` in ``inputs``: every evaluation then draws the same masks.
    """
    if model.dtype != np.float64:
        raise ValueError(f"check_model needs a float64 model, got {model.dtype}")
    grads = model.loss_and_grads(**inputs).grads
    params = model.state_dict()
    if names is not None:
        params = {k: v for k, v in params.items() if k in names}
    return check_inplace(lambda: model.loss(**inputs), params, grads, seed=seed, **options)
