"""Which head each fine-tuning task trains, and putting that head on a model.

The heads themselves (forward, loss, backward; Hugging Face's classes, names and losses) are the
model's own (:class:`ref_bert.model.Model` with ``Config.head``; ref_bert/tasks.py); this module maps
a task to one and adapts a batch to ``Model.loss_and_grads`` / ``Model.forward``:

    task             Config.head (problem_type)                           labels given to the loss
    classification   sequence_classification (single_label_classification)  labels (B,) int
    regression       sequence_classification (regression), num_labels 1     labels (B,) float
    tokens           token_classification                                  labels (B, T), -100 ignored
    qa               question_answering                                    start_positions, end_positions
    multiple-choice  multiple_choice (inputs (B, C, T))                    labels (B,) choice index
    seq2seq          masked_lm under UniLM's seq2seq mask, label-smoothed   labels (B, T): target tokens
                     cross-entropy (UniLM s2s-ft: 0.1)                     and the final [SEP], -100 elsewhere

:func:`with_task_head` builds the task's model from any starting model: the encoder's parameters
(and any head parameter of the same name and shape) are copied, the rest is freshly initialised
from ``seed`` and named in ``model.fresh_parameters`` (with a notice on stderr).
"""
from __future__ import annotations

import sys

from ..config import Config
from ..model import Model

# task -> (Config.head, problem_type)
TASK_HEADS = {
    "classification": ("sequence_classification", "single_label_classification"),
    "regression": ("sequence_classification", "regression"),
    "tokens": ("token_classification", None),
    "qa": ("question_answering", None),
    "multiple-choice": ("multiple_choice", None),
    "seq2seq": ("masked_lm", None),
}
LABEL_SMOOTHING = 0.1   # UniLM s2s-ft's
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def task_config(config: Config, task: str, num_labels: int) -> Config:
    """``config`` with the head of ``task`` (and its num_labels / problem_type)."""
    head, problem_type = TASK_HEADS[task]
    changes = {}
    if task in ("classification", "tokens"):
        changes["num_labels"] = int(num_labels)
    elif task == "regression":
        changes["num_labels"] = 1
    elif task == "qa":
        changes["num_labels"] = 2
    if head == "sequence_classification":
        changes["problem_type"] = problem_type
    return config.with_head(head, **changes)


def check_task_head(config: Config, task: str, where: str) -> None:
    """ValueError when ``config`` already carries a task head other than ``task``'s (a pretraining,
    masked-LM or base model takes any head)."""
    head, problem_type = TASK_HEADS[task]
    neutral = ("pretraining", "base", "masked_lm")
    if config.head in neutral or (config.head == head and (problem_type is None or config.problem_type in
                                                           (None, problem_type))):
        return
    raise ValueError(f"{where} is a {config.architecture} checkpoint"
                     + (f" (problem_type {config.problem_type})" if config.problem_type else "")
                     + f"; --task {task} needs a {config.replace(head=head).architecture}"
                     + (f" with problem_type {problem_type}" if problem_type and config.head == head else "")
                     + " or a base / pretraining checkpoint (its encoder then gets a fresh head)")


def with_task_head(model: Model, task: str, num_labels: int, seed: int) -> Model:
    """The model of ``task``: ``model`` itself when it already has that head and label count, else a
    new model with the task's head whose matching parameters are copied from ``model``."""
    config = task_config(model.config, task, num_labels)
    if config == model.config:
        return model
    if model.config.head == config.head and model.config.num_labels != config.num_labels:
        raise ValueError(f"the checkpoint's {model.config.architecture} head has num_labels="
                         f"{model.config.num_labels}, the training data {num_labels} classes; expected the same")
    new = Model(config, backend=model.backend, dtype=model.dtype, seed=seed)
    old = model.state_dict()
    fresh = []
    for name, view in new.state_dict().items():
        if name in old and tuple(old[name].shape) == tuple(view.shape):
            view[...] = old[name]
        else:
            fresh.append(name)
    new.fresh_parameters = tuple(fresh)
    if fresh:
        groups = sorted({n.split(".")[0] for n in fresh})
        print(f"note: {config.architecture}: {', '.join(groups)} freshly initialised (seed {seed}); the encoder "
              f"comes from the starting model", file=sys.stderr)
    return new


def loss_and_grads(model: Model, task: str, batch: dict, training: bool, weight: float,
                   label_smoothing: float = LABEL_SMOOTHING, dropout_seed=None):
    """``Model.loss_and_grads`` of ``task`` on a batch of backend arrays, the loss scaled by ``weight``;
    ``dropout_seed``: the batch's own dropout masks (None: the model's dropout stream)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    if task == "qa":
        targets = {"start_positions": batch["start_positions"], "end_positions": batch["end_positions"]}
    else:
        targets = {"labels": batch["labels"]}
    smoothing = label_smoothing if task == "seq2seq" else 0.0
    return model.loss_and_grads(**inputs, **targets, training=training, loss_scale=weight, label_smoothing=smoothing,
                                dropout_seed=dropout_seed)


def task_outputs(model: Model, task: str, batch: dict):
    """The head's outputs without dropout: logits, or (start, end) logits for qa."""
    out = model.forward(*(batch[k] for k in MODEL_INPUTS), training=False)
    if task == "qa":
        return out.start_logits, out.end_logits
    return out.logits
