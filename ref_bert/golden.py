"""Golden files: one self-describing safetensors file per run, for checking another implementation.

    ref-bert golden --config tiny --out tiny.golden.safetensors [--seed 0 --dtype float64 --batch-size 2 --seq-len 16 --steps 2]
    ref-bert golden --hf path/to/hf-model --out model.golden.safetensors

(the command is :mod:`ref_bert.cli.golden`; this module is its library: :func:`make_inputs`,
:func:`write_golden`, :func:`read_golden`).

The file holds, in order (metadata "tensor_order"): the inputs, the parameters, every intermediate
activation of the forward pass (the model's trace hook), the losses, every gradient, and the loss
before and the parameters after K optimiser steps on the same batch. The format is specified in
docs/golden-format.md; :func:`read_golden` reads it back, ``ref-bert verify --golden`` compares two.

Runs are deterministic: dropout is off and the inputs come from ``numpy.random.default_rng([seed, 2])``.
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import numpy as np

FORMAT = "ref-bert-golden"
FORMAT_VERSION = 1
SECTIONS = ("inputs", "params", "forward", "loss", "grads", "steps", "after_steps")
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask", "position_ids", "mlm_labels", "sop_labels")
# Inputs a head other than pretraining may have instead of the MLM/SOP labels, in file order.
HEAD_INPUT_NAMES = ("labels", "start_positions", "end_positions", "d_last_hidden_state", "d_pooled_output")


# --- inputs --------------------------------------------------------------------------------------
def make_inputs(config, batch: int = 2, seq_len: int = 16, seed: int = 0, dtype: str = "float64") -> dict:
    """A deterministic padded batch for ``config.head`` as host arrays. Pretraining:
    :func:`ref_bert.examples.make_batch` with the ``"rows"`` recipe drawn from ``default_rng([seed, 2])``.
    Other heads: :func:`ref_bert.examples.task_batch` on the same rows (``batch * 2`` rows viewed
    (B, 2, T) for multiple choice), the head's labels instead of the MLM/SOP labels (float targets in
    ``dtype``); question answering has no padded rows (transformers' span softmax reads padded
    positions, and nn.Embedding(padding_idx) would drop the pad row's gradient); the bare model gets
    random upstream gradients ``d_last_hidden_state`` (B, T, H) (zero at padded positions) and
    ``d_pooled_output`` (B, H) from ``default_rng([seed, 2, 4])``, which stand in for a loss.

    Row 0 is full length, the others are padded: random lengths in [max(2, T // 2), T - 1]; real tokens avoid
    ``pad_token_id`` (so Hugging Face's pad-row gradient rule does not apply), padded positions hold
    it. Token type 0 for the first half of the real tokens, 1 after (when type_vocab_size > 1). MLM
    labels on ~15% of the real positions (at least one per row), -100 elsewhere; SOP labels 0/1.
    """
    from .examples import make_batch, task_batch
    from .validate import check_seed, is_int, require

    require(is_int(batch), "batch", batch, "an integer")       # make_batch checks the ranges
    require(is_int(seq_len), "seq_len", seq_len, "an integer")
    require(batch * seq_len <= MAX_GOLDEN_TOKENS, "batch * seq_len", batch * seq_len,
            f"at most {MAX_GOLDEN_TOKENS} tokens (a golden batch is for comparing, not for training)")
    check_seed("seed", seed)

    if config.head == "pretraining":
        return make_batch(config, batch, seq_len, [seed, 2], recipe="rows", label_rate=0.15)
    lengths = [seq_len] * batch if config.head == "question_answering" else None
    x = task_batch(config, batch, seq_len, [seed, 2], lengths=lengths, label_rate=0.15, dtype=dtype)
    return _with_upstream(config, x, seed, dtype)


def _with_upstream(config, x: dict, seed: int, dtype: str) -> dict:
    """The bare model's stand-in for a loss: random upstream gradients from ``default_rng([seed, 2, 4])``."""
    if config.head == "base":
        rng = np.random.default_rng([seed, 2, 4])
        batch, seq_len = x["input_ids"].shape
        x["d_last_hidden_state"] = (rng.standard_normal((batch, seq_len, config.hidden_size))
                                    * x["attention_mask"][..., None]).astype(dtype)
        x["d_pooled_output"] = rng.standard_normal((batch, config.hidden_size)).astype(dtype)
    return x


def text_inputs(config, x: dict, seed: int = 0, dtype: str = "float64") -> dict:
    """A batch made from text (:func:`ref_bert.examples.text_batch`: the checkpoint's own tokenization, with
    MLM/SOP labels) as the inputs of ``config.head``: for a task head its MLM/SOP labels are replaced by the
    head's (:func:`ref_bert.examples.task_labels` from ``default_rng([seed, 2, 3])``), for the bare model
    the random upstream gradients of :func:`make_inputs` are added.

    Refused (ValueError): a multiple-choice checkpoint (text rows are (B, T), its inputs (B, C, T)), and a
    question-answering checkpoint on texts of different lengths (transformers' span softmax reads padded
    positions, and nn.Embedding(padding_idx) drops the pad row's gradient, so padded rows cannot agree)."""
    from .examples import task_labels

    head = config.head
    if head == "pretraining":
        return x
    if head == "multiple_choice":
        raise ValueError("text inputs are (batch, tokens) rows, but a multiple-choice checkpoint takes "
                         "(batch, choices, tokens): omit the texts to use the synthetic batch")
    if head == "question_answering" and not x["attention_mask"].all():
        lengths = sorted(set(int(n) for n in x["attention_mask"].sum(axis=1)))
        raise ValueError(f"a question-answering checkpoint needs texts of one token length (no padding); the "
                         f"texts tokenize to lengths {lengths}: give one text, or texts of one length")
    labels = task_labels(config, x, np.random.default_rng([seed, 2, 3]), dtype=dtype)
    x = {k: v for k, v in x.items() if k not in ("mlm_labels", "sop_labels")}   # masked_lm / next_sentence: in labels
    return _with_upstream(config, {**x, **labels}, seed, dtype)


LABEL_NAMES = ("mlm_labels", "sop_labels", "labels", "start_positions", "end_positions")


def head_loss_and_grads(model, inputs: dict):
    """``model.loss_and_grads`` on ``inputs`` (backend arrays from :func:`make_inputs`), for any head. The
    bare model has no loss: its "loss" is <d_last_hidden_state, last_hidden_state> + <d_pooled_output,
    pooled_output>, whose gradient is backward with those upstream gradients. Returns a LossAndGrads."""
    from .model import LossAndGrads

    args = (inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"])
    if model.config.head == "base":
        out = model.forward(*args, position_ids=inputs["position_ids"], keep_cache=True)
        d_last, d_pooled = inputs["d_last_hidden_state"], inputs["d_pooled_output"]
        grads = model.backward(out, d_hidden_states={-1: d_last}, d_pooled_output=d_pooled).params
        loss = (out.last_hidden_state * d_last).sum() + (out.pooled_output * d_pooled).sum()
        return LossAndGrads(loss, grads, {})
    labels = {k: inputs[k] for k in LABEL_NAMES if k in inputs}
    return model.loss_and_grads(*args, position_ids=inputs["position_ids"], **labels)


LOSS_DEFINITIONS = {
    "pretraining": "mlm = mean cross-entropy over labels != -100; sop = mean cross-entropy; total = mlm + sop",
    "base": "total = sum(d_last_hidden_state * last_hidden_state) + sum(d_pooled_output * pooled_output)",
    "masked_lm": "total = task = mean cross-entropy of logits over labels != -100",
    "causal_lm": "total = task = mean cross-entropy of logits[:, t] against labels[:, t + 1] over labels != -100",
    "next_sentence": "total = task = mean cross-entropy of logits against labels",
    "sequence_classification": "total = task = by problem_type: MSE (regression; num_labels 1 squeezed), "
                               "mean cross-entropy (single label), mean BCE with logits (multi label)",
    "token_classification": "total = task = mean cross-entropy over labels != -100",
    "question_answering": "start, end = mean cross-entropy of start/end logits against positions clamped to "
                          "[0, T], T ignored; total = (start + end) / 2",
    "multiple_choice": "total = task = mean cross-entropy of the (B, C) choice logits against labels",
}


MAX_GOLDEN_TOKENS = 1 << 20


# --- the K optimiser steps --------------------------------------------------------------------------
LAMB_PRESET = "albert"


def make_optimizer(params):
    """The optimiser of the golden file's K steps: ALBERT's LAMB (``ref_bert.optim.Lamb``, preset
    "albert": global gradient clipping to norm 1.0, no bias correction, weight decay 0.01 inside the
    trust ratio, LayerNorm/bias excluded from decay and adaptation, lr 0.00176, eps 1e-6). Every
    hyperparameter is recorded in the file's ``optimizer`` metadata."""
    from .optim import make_optimizer as by_name

    return by_name("lamb", params)


def describe_optimizer(opt) -> dict:
    return {"preset": LAMB_PRESET, **opt.state_dict()["hyper"]}


# --- building and writing ----------------------------------------------------------------------------
def golden_tensors(model, inputs: dict, steps: int = 1, progress=None) -> tuple["OrderedDict[str, np.ndarray]", dict]:
    """Run ``model`` on ``inputs`` (host arrays) and collect every tensor of a golden file, in order.

    Returns ``(tensors, info)``; tensor names are "<section>/<name>". The model's parameters are
    restored after the K steps. ``progress``: None, or a tqdm-like bar advanced once per stage (the
    forward pass, the gradients, each optimiser step): 2 + ``steps`` updates.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")

    def advance(stage):
        if progress is not None:
            progress.set_postfix_str(stage, refresh=False)
            progress.update(1)

    bk = model.backend
    out: OrderedDict[str, np.ndarray] = OrderedDict()

    def put(section, name, array):
        key = f"{section}/{name}"
        if key in out:
            raise ValueError(f"golden: tensor {key} was produced twice")
        out[key] = np.ascontiguousarray(bk.to_host(array)).copy()

    for name in INPUT_NAMES + HEAD_INPUT_NAMES:
        if name in inputs:
            put("inputs", name, inputs[name])
    dev = {k: bk.from_host(v, dtype=model.dtype) if np.asarray(v).dtype.kind == "f" else bk.from_host(v)
           for k, v in inputs.items()}
    args = (dev["input_ids"], dev["token_type_ids"], dev["attention_mask"])
    for name, view in model.params.items():
        put("params", name, view)

    model.forward(*args, position_ids=dev["position_ids"], trace=lambda name, x: put("forward", name, x))
    advance("forward")
    result = head_loss_and_grads(model, dev)
    for part, value in result.parts.items():
        put("loss", part, value)
    put("loss", "total", result.loss)
    for name in model.params.shapes:
        put("grads", name, result.grads[name])
    advance("gradients")

    saved = model.params.flat.copy()
    opt = make_optimizer(model.state_dict())
    losses = []
    try:
        for _ in range(steps):
            step = head_loss_and_grads(model, dev)
            losses.append(float(step.loss))
            opt.step(step.grads)
            advance(f"step {len(losses)}/{steps}")
        put("steps", "loss", np.array(losses, dtype=model.dtype))
        for name, view in model.params.items():
            put("after_steps", name, view)
    finally:
        model.params.flat[...] = saved
    return out, {"optimizer": describe_optimizer(opt), "steps": steps}


def tensors_nbytes(tensors) -> int:
    """The bytes of the tensors' data: a golden file's size, less its header (a few kB of JSON)."""
    return sum(int(t.nbytes) for t in tensors.values())


def write_golden(path, model, inputs: dict, steps: int = 1, seed: int = 0, source: str = "", progress: bool = False,
                 before_write=None) -> dict:
    """Write the golden file for ``model`` on ``inputs``; returns its metadata (strings only).

    ``progress`` shows a bar on stderr (one update per stage: forward, gradients, each step, writing);
    ``before_write(nbytes)``, when given, is called with the size of the tensor data once it is known and
    before anything is written (the command uses it to announce a large file)."""
    import sys

    from tqdm import tqdm

    from . import __version__
    from .files import save_tensors
    from .validate import is_int, require

    require(is_int(steps) and steps >= 0, "steps", steps, "an integer >= 0")
    head = model.config.head
    required = ("input_ids", "token_type_ids", "attention_mask", "position_ids") + (
        ("mlm_labels", "sop_labels") if head == "pretraining" else
        ("d_last_hidden_state", "d_pooled_output") if head == "base" else
        ("start_positions", "end_positions") if head == "question_answering" else ("labels",))
    if not isinstance(inputs, dict) or any(k not in inputs for k in required):
        raise ValueError(f"inputs={type(inputs).__name__} is invalid: expected a dict with {', '.join(required)} "
                         f"(what make_inputs returns)")

    bar = tqdm(total=steps + 3, desc="golden", unit="stage", disable=not progress, file=sys.stderr, leave=False)
    try:
        tensors, info = golden_tensors(model, inputs, steps, progress=bar)
        if before_write is not None:
            before_write(tensors_nbytes(tensors))
        metadata = _metadata(model, inputs, tensors, info, steps, seed, source, __version__)
        bar.set_postfix_str("writing", refresh=False)
        save_tensors(path, tensors, metadata=metadata)
        bar.update(1)
    finally:
        bar.close()
    return metadata


def _metadata(model, inputs, tensors, info, steps, seed, source, version) -> dict:
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "ref_bert_version": version,
        "source": source,
        "config": model.config.to_json(),
        "dtype": model.dtype.name,
        "backend": model.backend.name,
        "seed": str(seed),
        "batch": str(inputs["input_ids"].shape[0]),
        "seq_len": str(inputs["input_ids"].shape[1]),
        "steps": str(steps),
        "optimizer": json.dumps(info["optimizer"], sort_keys=True),
        "dropout": "off",
        "loss": LOSS_DEFINITIONS[model.config.head],
        "architecture": model.config.architecture,
        "tensor_order": json.dumps(list(tensors)),
    }
    try:
        from .hf import config_to_hf, hf_name_map

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metadata["hf_config"] = json.dumps(config_to_hf(model.config, model.dtype.name))
        metadata["hf_names"] = json.dumps({ours: [hf, transposed] for ours, hf, transposed in hf_name_map(model.config)})
    except ValueError:
        pass  # a config Hugging Face cannot express: no HF names in the file
    return metadata


def read_golden(path) -> tuple["OrderedDict[str, np.ndarray]", dict]:
    """Read a golden file: ``(tensors in file order, metadata)`` with JSON fields decoded."""
    from .files import load_tensors

    tensors, metadata = load_tensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ref-bert golden file (metadata format={metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path} has golden format_version={version!r}; this ref-bert reads {FORMAT_VERSION}")
    from .files import parse_json

    meta = dict(metadata)
    for key in ("config", "optimizer", "tensor_order", "hf_config", "hf_names"):
        if key in meta:
            meta[key] = parse_json(meta[key], f"{path}: metadata {key}")
    order = meta.get("tensor_order")
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or len(set(order)) != len(order):
        raise ValueError(f"{path}: metadata tensor_order is {order!r:.80}; expected a list of distinct tensor names")
    if meta.get("dtype") not in ("float32", "float64"):
        raise ValueError(f"{path}: metadata dtype={meta.get('dtype')!r:.40} is invalid; expected 'float32' or 'float64'")
    if sorted(order) != sorted(tensors):
        raise ValueError(f"{path}: tensor_order does not list exactly the tensors in the file")
    return OrderedDict((name, tensors[name]) for name in order), meta
