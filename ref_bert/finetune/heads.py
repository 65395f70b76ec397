"""The fine-tuning heads on top of :class:`ref_bert.model.Model`, as ``ref-bert finetune`` trains them.

Each head is the Hugging Face class of the same task (parameter names as there, our (n_in, n_out)
layout); its forward runs the encoder with ``keep_cache=True``, the head, the loss; its backward hands
the head's gradient to ``Model.backward`` (``d_pooled_output``, ``d_hidden_states={-1: ...}`` or
``d_mlm_logits``). Dropout on the head's input uses the model's dropout generator, drawn after the
encoder's masks, so the run's single generator state covers it.

    task             head (parameters)                        logits          loss
    classification   dropout(pooled) W + b  (classifier.*)    (B, K)          cross-entropy
    regression       dropout(pooled) W + b  (classifier.*)    (B,) squeezed   mean squared error
    tokens           dropout(h) W + b       (classifier.*)    (B, T, K)       cross-entropy, -100 ignored
    qa               h W + b                (qa_outputs.*)    start, end (B, T)   (CE_start + CE_end) / 2
    multiple-choice  dropout(pooled) W + b  (classifier.*)    (B, C) from B*C rows   cross-entropy
    seq2seq          the model's MLM head at labelled target positions   (N, V)   label-smoothed CE

The dropout probability is ``config.classifier_dropout_prob``. Head weights start N(0,
initializer_range^2) (biases 0), drawn from ``default_rng([seed, HEAD_SEED_KEY])``.

These heads live in the fine-tuning layer because issue 13's heads (ref_bert/heads.py, with their
checkpoint mapping) were not yet on this branch when it was written; they compute the same functions.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..ops import (IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward, dropout_backward, dropout_forward,
                   linear_backward, linear_forward)
from ..params import FlatBuffer
from .losses import mse_backward, mse_forward, smoothed_cross_entropy_backward, smoothed_cross_entropy_forward

HEAD_SEED_KEY = 0x4EAD
LABEL_SMOOTHING = 0.1   # UniLM s2s-ft's


@dataclass
class StepResult:
    """One micro-batch: ``loss`` (0-d backend array, weighted), ``grads`` (name -> backend array, the
    encoder's and the head's), ``count`` (the units the loss averages over)."""

    loss: object
    grads: dict


def head_shapes(task: str, hidden: int, num_labels: int) -> "OrderedDict[str, tuple]":
    """The head's parameters (none for seq2seq, which uses the model's MLM head)."""
    if task in ("classification", "tokens"):
        return OrderedDict([("classifier.weight", (hidden, num_labels)), ("classifier.bias", (num_labels,))])
    if task == "regression":
        return OrderedDict([("classifier.weight", (hidden, 1)), ("classifier.bias", (1,))])
    if task == "multiple-choice":
        return OrderedDict([("classifier.weight", (hidden, 1)), ("classifier.bias", (1,))])
    if task == "qa":
        return OrderedDict([("qa_outputs.weight", (hidden, 2)), ("qa_outputs.bias", (2,))])
    return OrderedDict()


class TaskModel:
    """A :class:`Model` plus the head of ``task`` (``num_labels`` classes where the task has them)."""

    def __init__(self, model, task: str, num_labels: int = 0, seed: int = 0,
                 label_smoothing: float = LABEL_SMOOTHING):
        self.model, self.task, self.num_labels = model, task, int(num_labels)
        self.label_smoothing = float(label_smoothing)
        self.backend, self.xp, self.dtype = model.backend, model.xp, model.dtype
        self.head = FlatBuffer(head_shapes(task, model.config.hidden_size, num_labels), self.xp, self.dtype)
        rng = np.random.default_rng([seed, HEAD_SEED_KEY])
        for name, view in self.head.items():
            if name.endswith("weight"):
                view[...] = self.backend.from_host(
                    rng.normal(0.0, model.config.initializer_range, view.shape), dtype=self.dtype)

    # --- parameters ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every trainable array: the encoder's (its names) and the head's."""
        return {**self.model.state_dict(), **dict(self.head.items())}

    def head_tensors(self) -> dict:
        return {name: self.backend.to_host(view) for name, view in self.head.items()}

    def load_head(self, tensors: dict, where: str) -> None:
        from ..files import check_state

        check_state(self.head.shapes, tensors, where)
        for name, view in self.head.items():
            view[...] = self.backend.from_host(tensors[name], dtype=self.dtype)

    # --- forward / backward --------------------------------------------------------------------
    def _encode(self, batch: dict, training: bool, **kwargs):
        ids = batch["input_ids"]
        shape = ids.shape
        flat = {k: batch[k].reshape(-1, shape[-1]) if self.task == "multiple-choice" else batch[k]
                for k in ("input_ids", "token_type_ids", "attention_mask")}
        return self.model.forward(flat["input_ids"], flat["token_type_ids"], flat["attention_mask"],
                                  training=training, keep_cache=True, return_sop_logits=False, **kwargs)

    def logits(self, batch: dict, training: bool = False):
        """The head's outputs for ``batch`` (no loss): the forward of :meth:`loss_and_grads`."""
        return self._forward(batch, training)[0]

    def _forward(self, batch: dict, training: bool):
        """``(outputs, encoder output, head cache)``."""
        task, p, cfg = self.task, self.head, self.model.config
        drop = self.model._dropout(training, None)
        if task == "seq2seq":
            labels = batch["mlm_labels"].reshape(-1)
            positions = self.xp.nonzero(labels != IGNORE_INDEX)[0]
            out = self._encode(batch, training, return_mlm_logits=True, mlm_positions=positions)
            return out.mlm_logits, out, (labels[positions],)
        if task == "qa":
            out = self._encode(batch, training, return_mlm_logits=False)
            logits, lin = linear_forward(out.last_hidden_state, p["qa_outputs.weight"], p["qa_outputs.bias"])
            return (logits[..., 0], logits[..., 1]), out, (lin,)
        out = self._encode(batch, training, return_mlm_logits=False)
        x = out.last_hidden_state if task == "tokens" else out.pooled_output
        dropped, drop_cache = dropout_forward(x, drop(x.shape, cfg.classifier_dropout_prob))
        logits, lin = linear_forward(dropped, p["classifier.weight"], p["classifier.bias"])
        if task == "regression":
            logits = logits[:, 0]
        elif task == "multiple-choice":
            logits = logits.reshape(batch["input_ids"].shape[:2])
        return logits, out, (drop_cache, lin)

    def loss_and_grads(self, batch: dict, training: bool = True, weight: float = 1.0) -> StepResult:
        """``weight`` times the task's loss on ``batch`` (backend arrays) and its gradient."""
        task, xp = self.task, self.xp
        outputs, out, cache = self._forward(batch, training)
        head_grads = FlatBuffer(self.head.shapes, xp, self.dtype)
        if task == "seq2seq":
            loss, ce = smoothed_cross_entropy_forward(outputs, cache[0], self.label_smoothing)
            grads = self.model.backward(out, d_mlm_logits=smoothed_cross_entropy_backward(weight, ce))
            return StepResult(weight * loss, grads.params)
        if task == "qa":
            start, end = outputs
            (lin,) = cache
            T = start.shape[1]
            # transformers: positions outside [0, T) are clamped to T and ignored.
            s_labels = xp.where((batch["start_positions"] < 0) | (batch["start_positions"] >= T), IGNORE_INDEX,
                                batch["start_positions"])
            e_labels = xp.where((batch["end_positions"] < 0) | (batch["end_positions"] >= T), IGNORE_INDEX,
                                batch["end_positions"])
            s_loss, s_ce = cross_entropy_forward(start, s_labels)
            e_loss, e_ce = cross_entropy_forward(end, e_labels)
            d_logits = xp.stack([cross_entropy_backward(weight / 2, s_ce), cross_entropy_backward(weight / 2, e_ce)],
                                axis=-1)
            d_hidden = linear_backward(d_logits, lin, head_grads["qa_outputs.weight"], head_grads["qa_outputs.bias"])
            grads = self.model.backward(out, d_hidden_states={-1: d_hidden})
            return StepResult(weight * (s_loss + e_loss) / 2, {**grads.params, **dict(head_grads.items())})
        drop_cache, lin = cache
        if task == "regression":
            loss, mse = mse_forward(outputs, batch["labels"].astype(self.dtype))
            d_logits = mse_backward(weight, mse)[:, None]
        elif task == "tokens":
            B, T, K = outputs.shape
            loss, ce = cross_entropy_forward(outputs.reshape(B * T, K), batch["labels"].reshape(-1))
            d_logits = cross_entropy_backward(weight, ce).reshape(B, T, K)
        else:   # classification, multiple-choice
            loss, ce = cross_entropy_forward(outputs, batch["labels"])
            d_logits = cross_entropy_backward(weight, ce)
            if task == "multiple-choice":
                d_logits = d_logits.reshape(-1, 1)
        dx = dropout_backward(linear_backward(d_logits, lin, head_grads["classifier.weight"],
                                              head_grads["classifier.bias"]), drop_cache)
        if task == "tokens":
            grads = self.model.backward(out, d_hidden_states={-1: dx})
        else:
            grads = self.model.backward(out, d_pooled_output=dx)
        return StepResult(weight * loss, {**grads.params, **dict(head_grads.items())})

    def loss(self, batch: dict) -> float:
        """The loss without dropout or gradient (for tests and evaluation)."""
        return float(self.backend.to_host(self.loss_and_grads(batch, training=False).loss))
