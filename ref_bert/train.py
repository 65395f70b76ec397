"""``ref-bert pretrain``: ALBERT pretraining (MLM + SOP) with exact, atomic, resumable checkpoints.

    ref-bert pretrain                                   # tiny config, packaged corpus, about two minutes
    ref-bert pretrain --out runs/a --steps 2000 --checkpoint-every 200
    ref-bert pretrain --out runs/a --steps 2000 --checkpoint-every 200 --resume

One optimiser step (global step s = 1, 2, ..., ``steps``):

    lr    = schedule(s - 1)          the rate is read *before* the update, from the number of updates
                                     already made (TF's global_step, HF's scheduler): with warmup the
                                     first update has lr 0, as in ALBERT and Hugging Face
    batch = k micro-batches of b examples from the data stream (k = grad_accum, b = batch_size),
            moved to the model's backend with one ``backend.from_host`` per array per step
    grads = gradient of the loss of the whole effective batch of k*b examples (see below)
    optimiser.step(grads, lr)        LAMB/AdamW; global-norm clipping is the optimiser preset's

Gradient accumulation. The loss of one batch is ``w_mlm MLM + w_sop SOP`` (ALBERT: weights 1) where
MLM is a mean over the batch's labelled positions and SOP a mean over its examples. Micro-batch i has
n_i labelled positions and b_i examples (N = sum n_i, B = sum b_i), so the effective batch's loss is

    L = sum_i w_mlm (n_i / N) MLM_i + sum_i w_sop (b_i / B) SOP_i

and its gradient carries the same weights. The two losses need *different* weights (n_i / N is not
b_i / B unless every micro-batch has the same number of masks), so each micro-batch runs one pass
with ``loss_weights=(w_mlm n_i / N, w_sop b_i / B)``. Weighting a combined gradient by n_i / N alone
would be exact for MLM only and would weight each example's SOP term by its mask count. The result
equals one batch of k*b examples up to rounding (tested at 1e-12 in float64 with dropout off; with
dropout on, the masks of k micro-batches are different draws).

Host syncs. Everything per step stays on the model's backend: losses, gradient norm and the
optimiser's norms are 0-d device arrays. They are read on the host (one ``backend.to_host`` of four
numbers, which waits for the step to finish on a GPU) only on logging steps (``log_every``, and every
checkpoint step, so that a non-finite loss is caught before it is saved). ``Model.loss_and_grads``
itself validates labels and counts them, which syncs on CuPy; that is the model's, not this loop's.

Checkpoints (every ``checkpoint_every`` steps and at the end), all safetensors + JSON, each file written
atomically (``checkpoint.atomic_write_bytes``) and each directory published atomically
(``checkpoint.publish_directory``: written under a hidden temporary name, renamed when complete):

    OUT/checkpoints/step-000100/config.json           model Config
                                model.safetensors     parameters (loadable by checkpoint.load_model)
                                optimizer.safetensors exp_avg/<name>, exp_avg_sq/<name>
                                state.json            step, optimiser step + hyperparameters, the model's
                                                      dropout generator state, data position, run settings,
                                                      elapsed time, tokens seen
                                spiece.model          the tokenizer
    OUT/latest                  one line naming the newest complete checkpoint, replaced atomically
                                after the checkpoint directory is in place
    OUT/config.json, OUT/model.safetensors, OUT/spiece.model   the newest weights: OUT is itself a model
                                directory for ``checkpoint.load_model`` and ``ref-bert generate``
    OUT/metrics.jsonl           one JSON line per logged step; OUT/loss.png the loss curves

What the default run shows (measured; tests/test_train.py runs it): the MLM loss falls from 6.9
(ln 1000) to about 5.4 and the SOP loss from ln 2 = 0.693 to 0.17-0.41 (seeds 0-2) in 1600 steps.
That needs the demo's SOP weight of 100 (``sop_weight``; ALBERT's loss is the unweighted MLM + SOP,
``--sop-weight 1``). With weight 1 the SOP loss stays at chance in this budget: the MLM gradient
dominates the shared encoder (the median ratio of the two gradients' norms over the encoder's
weight matrices is 5 at initialisation and 64 after 3000 steps), the [CLS] query's attention stays
uniform (largest weight 0.018, about 1/T), so the pooled output is the same for every example, and
SOP had not left chance after 3250 steps of batch 32. Weights 4, 10 and 30 did not change that in
1200 steps; 100 and 1000 did. Trained on SOP alone the same model reaches 0.28 in 1200 steps.

``--resume`` restores all of it and continues exactly: N steps, resume, N more steps give parameters,
optimiser state and logged losses bit-identical to 2N steps in one go (tests/test_train.py). The
run's settings (steps, batch, schedule, ...) must be the same as the checkpoint's; a difference is a
ValueError naming it. Interrupting (Ctrl-C) never damages the newest complete checkpoint: a
checkpoint being written is a hidden temporary directory until its final rename.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import backends

from . import checkpoint as ckpt
from . import files
from .config import PRESETS, Config
from .data import PretrainingDataset, Tokenizer, default_corpus_path, read_corpus
from .model import DTYPES, Model
from .ops import IGNORE_INDEX
from .unilm import pretraining_batch as unilm_pretraining_batch
from .optim import ADAMW_PRESETS, LAMB_PRESETS, AdamW, Lamb, albert_schedule, global_grad_norm, linear_warmup_decay
from .params import FlatBuffer

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "effective_batch_gradients", "load_checkpoint_state",
           "OBJECTIVES", "SCHEDULES", "OPTIMIZERS", "add_arguments", "run"]

OBJECTIVES = ("albert", "unilm")
SCHEDULES = ("albert", "linear")
# "lamb" is ALBERT's LAMB; the other LAMB names are the presets of ref_bert.optim; "adamw" is
# torch.optim.AdamW's defaults and "adamw-bert" BERT's AdamWeightDecayOptimizer.
OPTIMIZERS = ("lamb",) + tuple(LAMB_PRESETS) + ("adamw",) + tuple(f"adamw-{k}" for k in ADAMW_PRESETS)

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "state.json"
TOKENIZER_NAME = "spiece.model"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
STATE_FORMAT = "ref-bert-pretrain/1"
# The data stream's seed is derived from --seed with its own SeedSequence key, so that the data's
# generators (default_rng([data_seed, epoch])) never coincide with the model's (default_rng(seed) for
# the weights, default_rng([seed, 1]) for dropout).
DATA_STREAM_KEY = 0xDA7A

# Settings that define the run's arithmetic: a resumed run must have the same ones.
RUN_KEYS = ("objective", "steps", "batch_size", "grad_accum", "seq_len", "optimizer", "lr", "schedule",
            "warmup", "seed", "dtype", "sop_weight")


# --- settings ----------------------------------------------------------------------------------------
@dataclass
class PretrainConfig:
    """Everything ``ref-bert pretrain`` takes (its options, one field each). Defaults: the tiny
    config on the packaged corpus, 1600 steps of 32 examples of 64 tokens, ALBERT's LAMB at lr 0.01
    with 10% warmup: about 100 seconds on two (shared) CPU cores with one BLAS thread.

    config:   a preset name (``Config.preset``), a ``config.json`` file, or a directory holding one;
              ``config_overrides`` replaces fields (e.g. ``{"hidden_dropout_prob": 0.0}``).
    batch_size: examples per micro-batch; ``grad_accum`` micro-batches make one step (effective
              batch ``batch_size * grad_accum``).
    optimizer: one of :data:`OPTIMIZERS`; its preset fixes betas, eps, weight decay and clipping.
    warmup:   warmup steps; None means 10% of ``steps`` (rounded).
    resume:   False, True (continue from ``out/latest``) or a checkpoint directory.
    until:    stop after this global step (with a checkpoint) although the schedule spans ``steps``;
              resume later to finish. None runs to ``steps``.
    keep_checkpoints: newest checkpoints kept (0 keeps all).
    """

    out: str = "runs/pretrain"
    corpus: Optional[str] = None
    tokenizer: Optional[str] = None
    config: str = "tiny"
    config_overrides: dict = field(default_factory=dict)
    backend: Optional[str] = None
    dtype: str = "float32"
    objective: str = "albert"
    sop_weight: float = 100.0   # the two-minute demo's; ALBERT's recipe is 1 (see the module docstring)
    steps: int = 1600
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 64
    optimizer: str = "lamb"
    lr: float = 0.01
    schedule: str = "albert"
    warmup: Optional[int] = None
    seed: int = 0
    checkpoint_every: int = 400
    keep_checkpoints: int = 3
    log_every: int = 1
    resume: Any = False
    until: Optional[int] = None
    progress: bool = True
    plot: bool = True

    def warmup_steps(self) -> int:
        return int(round(0.1 * self.steps)) if self.warmup is None else int(self.warmup)

    def run_settings(self) -> dict:
        """The settings a resumed run must share with its checkpoint (warmup resolved)."""
        settings = {k: getattr(self, k) for k in RUN_KEYS}
        settings["warmup"] = self.warmup_steps()
        return settings


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def validate(cfg: PretrainConfig) -> None:
    """Check every setting; raise ValueError naming the first bad one and what was expected."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective={cfg.objective!r} is invalid: expected one of {OBJECTIVES}")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "log_every"):
        value = getattr(cfg, name)
        _require(_is_int(value) and value >= 1, name, value, "a positive integer")
    _require(_is_int(cfg.keep_checkpoints) and cfg.keep_checkpoints >= 0, "keep_checkpoints",
             cfg.keep_checkpoints, "an integer >= 0 (0 keeps every checkpoint)")
    _require(_is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "a non-negative integer")
    _require(isinstance(cfg.lr, (int, float)) and not isinstance(cfg.lr, bool) and math.isfinite(cfg.lr)
             and cfg.lr > 0, "lr", cfg.lr, "a positive number")
    _require(cfg.schedule in SCHEDULES, "schedule", cfg.schedule, f"one of {SCHEDULES}")
    _require(isinstance(cfg.sop_weight, (int, float)) and not isinstance(cfg.sop_weight, bool)
             and math.isfinite(cfg.sop_weight) and cfg.sop_weight >= 0, "sop_weight", cfg.sop_weight,
             "a finite number >= 0 (ALBERT: 1)")
    _require(cfg.optimizer in OPTIMIZERS, "optimizer", cfg.optimizer, f"one of {OPTIMIZERS}")
    _require(cfg.dtype in DTYPES, "dtype", cfg.dtype, f"one of {DTYPES}")
    if cfg.warmup is not None:
        _require(_is_int(cfg.warmup) and 0 <= cfg.warmup <= cfg.steps, "warmup", cfg.warmup,
                 f"an integer in [0, steps={cfg.steps}]")
    if cfg.until is not None:
        _require(_is_int(cfg.until) and 1 <= cfg.until <= cfg.steps, "until", cfg.until,
                 f"a step in [1, steps={cfg.steps}]")
    _require(isinstance(cfg.config_overrides, dict), "config_overrides", cfg.config_overrides,
             "a dict of Config fields")
    _require(cfg.resume is False or cfg.resume is True or isinstance(cfg.resume, (str, Path)), "resume",
             cfg.resume, "False, True (the latest checkpoint in out) or a checkpoint directory")


def resolve_model_config(spec: str, overrides: dict) -> Config:
    """A Config from a preset name, a config.json file or a directory holding one, plus overrides."""
    spec = str(spec)
    if spec in PRESETS:
        base = Config.preset(spec)
    else:
        path = Path(spec)
        if path.is_dir():
            base = ckpt.load_config(path)
        elif path.is_file():
            base = Config.from_dict(files.read_json(path, "config file"))
        else:
            raise ValueError(f"config={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                             f"config.json file or directory")
    return base.replace(**overrides) if overrides else base


def make_optimizer(name: str, params: dict, lr: float):
    """The optimiser called ``name`` (:data:`OPTIMIZERS`) over ``params`` with base rate ``lr``."""
    if name == "lamb":
        return Lamb.from_preset("albert", params, lr=lr)
    if name in LAMB_PRESETS:
        return Lamb.from_preset(name, params, lr=lr)
    if name == "adamw":
        return AdamW.from_preset("torch", params, lr=lr)
    if name.startswith("adamw-") and name[len("adamw-"):] in ADAMW_PRESETS:
        return AdamW.from_preset(name[len("adamw-"):], params, lr=lr)
    raise ValueError(f"optimizer={name!r} is invalid: expected one of {OPTIMIZERS}")


def learning_rate(cfg: PretrainConfig, updates_done: int) -> float:
    """The rate of the update that follows ``updates_done`` updates (REFERENCE.md section 1)."""
    if cfg.schedule == "albert":
        return albert_schedule(updates_done, cfg.lr, cfg.steps, cfg.warmup_steps())
    return linear_warmup_decay(updates_done, cfg.lr, cfg.steps, cfg.warmup_steps())


def data_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, DATA_STREAM_KEY]).generate_state(1)[0])


# --- the UniLM objective mix ------------------------------------------------------------------------
def unilm_host_batch(albert_batch: dict, config, seed) -> dict:
    """Re-cut one batch of the ALBERT data stream into a UniLM mixed-objective batch.

    The stream's examples are ``[CLS] A [SEP] B [SEP]`` with A and B swapped for SOP (label 1) and
    tokens masked. The original tokens (the label where masked) and the original order give the
    sentence pairs; :func:`ref_bert.unilm.pretraining_batch` then gives each example its mask kind
    (1/3 bidirectional with the sentence-order loss, 1/3 seq2seq, 1/6 left-to-right, 1/6
    right-to-left) and masks afresh (15%, 80/10/10, spans of 1 to 3 tokens). ``seed`` makes the
    draw a function of (run seed, step, micro-batch), so a resumed run rebuilds the same batches.
    UniLM's segment ids (6 types) are used when the config has ``type_vocab_size >= 6``.
    """
    original = np.where(albert_batch["mlm_labels"] != IGNORE_INDEX, albert_batch["mlm_labels"],
                        albert_batch["input_ids"])
    pairs = []
    for row, types, mask, swapped in zip(original, albert_batch["token_type_ids"], albert_batch["attention_mask"],
                                         albert_batch["sop_labels"]):
        real = int(mask.sum())
        first_sep = int(np.argmax(types[:real] == 1)) - 1      # the last token of type 0
        a, b = row[1:first_sep].tolist(), row[first_sep + 1:real - 1].tolist()
        pairs.append((b, a) if swapped == 1 else (a, b))
    batch = unilm_pretraining_batch(pairs, albert_batch["input_ids"].shape[1], config.vocab_size,
                                    seed=np.random.default_rng(list(seed)),
                                    unilm_segments=config.type_vocab_size >= 6)
    return {key: getattr(batch, key) for key in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels",
                                                 "sop_labels")}


# --- one step's gradient --------------------------------------------------------------------------------
def effective_batch_gradients(model: Model, micro_batches: list, mlm_counts: list, training: bool = True,
                              sop_weight: float = 1.0):
    """Gradient of the effective batch made of ``micro_batches`` (see the module docstring).

    Args:
        micro_batches: dicts of backend arrays (``Model.loss_and_grads`` keyword arguments: input_ids,
            token_type_ids, attention_mask, mlm_labels (b_i, T), sop_labels (b_i,)).
        mlm_counts: host integers n_i, the labelled MLM positions of each micro-batch (counted on the
            host before the transfer, so no device read is needed for the weights).
        sop_weight: w_sop (ALBERT: 1); w_mlm is 1.
    Returns:
        ``(grads, parts)``: grads a dict name -> backend array (the parameters' names and shapes);
        parts ``{"loss", "mlm", "sop"}`` as 0-d backend arrays (not read on the host); "loss" is the
        weighted total, "mlm" and "sop" the unweighted means over the effective batch.
    """
    k = len(micro_batches)
    if k == 0:
        raise ValueError("effective_batch_gradients needs at least one micro-batch, got none")
    if len(mlm_counts) != k:
        raise ValueError(f"mlm_counts has {len(mlm_counts)} entries, expected one per micro-batch ({k})")
    if k == 1:
        result = model.loss_and_grads(**micro_batches[0], training=training, loss_weights=(1.0, sop_weight))
        return result.grads, {"loss": result.loss, **result.parts}

    xp = model.xp
    total_masks = int(sum(mlm_counts))
    sizes = [int(mb["sop_labels"].shape[0]) for mb in micro_batches]
    total_examples = sum(sizes)
    accumulated = FlatBuffer(model.params.shapes, xp, model.dtype)   # zeros, the parameters' layout
    mlm = xp.zeros((), dtype=model.dtype)
    sop = xp.zeros((), dtype=model.dtype)
    for micro_batch, n_masks, n_examples in zip(micro_batches, mlm_counts, sizes):
        mlm_share = n_masks / total_masks if total_masks else 0.0   # no masks: MLM loss 0, weight 0
        sop_share = n_examples / total_examples
        result = model.loss_and_grads(**micro_batch, training=training,
                                      loss_weights=(mlm_share, sop_weight * sop_share))
        _accumulate(accumulated, result.grads)
        mlm = mlm + mlm_share * result.parts["mlm"]
        sop = sop + sop_share * result.parts["sop"]
    return dict(accumulated.items()), {"loss": mlm + sop_weight * sop, "mlm": mlm, "sop": sop}


def _accumulate(accumulated, grads: dict) -> None:
    """In place, tensor by tensor: accumulated[name] += grads[name]."""
    for name, view in accumulated.items():
        view += grads[name]


# --- checkpoints -------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _checkpoint_step(path: Path) -> Optional[int]:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(out) -> list:
    """Complete checkpoint directories under ``out/checkpoints``, oldest first."""
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := _checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def save_checkpoint(out: Path, step: int, model: Model, optimizer, dataset: PretrainingDataset,
                    tokenizer: Tokenizer, run_state: dict) -> Path:
    """Write ``out/checkpoints/step-NNNNNN`` atomically, point ``out/latest`` at it, refresh the model
    files in ``out``. ``run_state`` holds the host-side counters (settings, elapsed, tokens)."""
    backend = model.backend
    opt_state = optimizer.state_dict()
    # Host copies now: the optimiser's tensors are its live arrays.
    opt_tensors = {key: backend.to_host(value) for key, value in opt_state["tensors"].items()}
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "optimizer": {"step": opt_state["step"], "hyper": opt_state["hyper"]},
        "dropout_rng": model.dropout_rng.bit_generator.state,
        "data": dataset.state_dict(),
        **run_state,
    }

    def write(directory: Path) -> None:
        ckpt.save_model(model, directory)
        files.save_tensors(directory / OPTIMIZER_NAME, opt_tensors,
                          metadata={"format": "ref-bert-optimizer", "step": str(opt_state["step"])})
        files.atomic_write_bytes(directory / TOKENIZER_NAME, tokenizer.model_proto)
        files.atomic_write_json(directory / STATE_NAME, state)

    final = files.publish_directory(out / CHECKPOINTS_DIR / checkpoint_name(step), write)
    files.write_pointer(out / LATEST_NAME, final)
    # OUT itself stays a model directory (config.json + model.safetensors + spiece.model).
    ckpt.save_model(model, out)
    files.atomic_write_bytes(out / TOKENIZER_NAME, tokenizer.model_proto)
    return final


def prune_checkpoints(out: Path, newest: Path, keep: int) -> None:
    """Delete checkpoints older than ``newest`` beyond the ``keep`` newest (0 keeps all). Checkpoints
    *after* ``newest`` (left by a run that was resumed from an earlier one) are replaced as the new run
    reaches them, not deleted here."""
    if keep == 0:
        return
    newest_step = _checkpoint_step(newest)
    older = [p for p in list_checkpoints(out) if _checkpoint_step(p) <= newest_step]
    for path in older[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(out: Path, resume) -> Path:
    """The checkpoint directory ``resume`` names: ``out/latest`` for True, else the given path."""
    if resume is True:
        if not (out / LATEST_NAME).is_file():
            raise ValueError(f"--resume: {out / LATEST_NAME} does not exist, so {out} holds no complete checkpoint "
                             f"to resume from; expected the output directory of an earlier pretrain run")
        return files.read_pointer(out / LATEST_NAME)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {str(path)!r} is not a directory; expected a checkpoint directory "
                         f"(OUT/checkpoints/step-NNNNNN)")
    return path


def load_checkpoint_state(directory) -> dict:
    """Read and check a checkpoint's ``state.json`` (the cheap part of a resume)."""
    directory = Path(directory)
    state = files.read_json(directory / STATE_NAME, "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{directory / STATE_NAME} has format {got!r}, expected {STATE_FORMAT!r}")
    for key in ("step", "optimizer", "dropout_rng", "data", "run", "elapsed", "tokens"):
        if key not in state:
            raise ValueError(f"{directory / STATE_NAME} lacks {key!r}; expected keys step, optimizer, dropout_rng, "
                             f"data, run, elapsed, tokens")
    if not _is_int(state["step"]) or state["step"] < 1:
        raise ValueError(f"{directory / STATE_NAME} has step={state['step']!r}, expected a positive integer")
    return state


def _describe_config_difference(saved: Config, wanted: Config) -> str:
    diffs = [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, this run {getattr(wanted, f.name)!r}"
             for f in dataclasses.fields(Config) if f.compare and getattr(saved, f.name) != getattr(wanted, f.name)]
    return "; ".join(diffs)


def _set_rng_state(rng: np.random.Generator, state, where: str) -> None:
    expected = type(rng.bit_generator).__name__
    if not isinstance(state, dict) or state.get("bit_generator") != expected:
        raise ValueError(f"{where}: dropout_rng state is {state!r:.80}, expected a {expected} bit-generator state")
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: dropout_rng state cannot be restored: {e}") from e


def _other_checkpoints_hint(out: Path, directory: Path) -> str:
    others = [p for p in list_checkpoints(out) if p.resolve() != directory.resolve()]
    if not others:
        return ""
    return f" (other checkpoints: {', '.join(str(p) for p in others[-3:])}; resume from one with --resume DIR)"


# --- metrics and plot -------------------------------------------------------------------------------------
def read_metrics(path) -> list:
    """The JSON lines of a metrics file (an absent file is an empty history). A last line cut short
    (a process killed while appending it: no final newline) is dropped; any other bad line is a
    ValueError."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):   # the unterminated tail
                break
            raise ValueError(f"{path} line {number} is not JSON: {e}") from e
    return records


def _metrics_bytes(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _moving_average(values: list, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.r_[0.0, values])
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def write_plot(out: Path, records: list) -> Optional[Path]:
    """OUT/loss.png: MLM (and total) loss, SOP loss (with chance level ln 2) and the learning rate
    against the step; thin lines per logged step, thick ones a moving average. Returns None (with a
    printed note) where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {out / PLOT_NAME} was not drawn "
              f"(pip install matplotlib); the numbers are in {out / METRICS_NAME}", file=sys.stderr)
        return None
    if not records:
        return None
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 50)
    fig, (ax_mlm, ax_sop, ax_lr) = plt.subplots(3, 1, figsize=(7, 8), sharex=True, height_ratios=(3, 2, 1))
    for ax, keys in ((ax_mlm, (("loss", "total", "C0"), ("mlm", "MLM", "C1"))), (ax_sop, (("sop", "SOP", "C2"),))):
        for key, label, color in keys:
            values = [r[key] for r in records]
            ax.plot(steps, values, color=color, linewidth=0.5, alpha=0.35)
            ax.plot(steps, _moving_average(values, window), color=color, linewidth=1.5,
                    label=f"{label} (mean of {window})" if window > 1 else label)
        ax.grid(alpha=0.3)
    ax_mlm.set_ylabel("training loss")
    ax_mlm.legend()
    ax_sop.axhline(math.log(2), color="gray", linestyle="--", linewidth=1, label="chance (ln 2)")
    ax_sop.set_ylabel("SOP loss")
    ax_sop.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], color="gray", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    files.atomic_write_bytes(out / PLOT_NAME, buffer.getvalue())
    return out / PLOT_NAME


# --- the job ------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    """What :func:`pretrain` returns.

    out_dir: the output directory; checkpoint: the newest complete checkpoint; step: the last step
    done; metrics: the last logged metrics line; history: every line of OUT/metrics.jsonl (earlier
    runs of a resumed job included); wall_time: seconds this call took; plot: OUT/loss.png or None.
    """

    out_dir: Path
    checkpoint: Optional[Path]
    step: int
    metrics: dict
    history: list
    wall_time: float
    plot: Optional[Path] = None

    def mean(self, key: str, first: bool, count: int = 10) -> float:
        """Mean of ``key`` over the first (or last) ``count`` logged steps of the history."""
        values = [r[key] for r in self.history]
        chosen = values[:count] if first else values[-count:]
        return float(np.mean(chosen)) if chosen else float("nan")


OnStep = Optional[Callable[[int, Optional[dict]], None]]


@dataclass
class _Job:
    """The live objects of a run and its host-side counters."""

    cfg: PretrainConfig
    out: Path
    model: Model
    optimizer: Any
    dataset: PretrainingDataset
    tokenizer: Tokenizer
    resume_dir: Optional[Path] = None
    step: int = 0                  # updates done
    elapsed_before: float = 0.0    # seconds spent by earlier runs of this job (from the checkpoint)
    tokens_seen: int = 0           # real (non-pad) tokens consumed so far
    history: list = field(default_factory=list)
    newest: Optional[Path] = None  # newest complete checkpoint


def pretrain(cfg: PretrainConfig | None = None, on_step: OnStep = None, **settings) -> PretrainResult:
    """Run (or resume) a pretraining job; ``settings`` override fields of ``cfg`` (or of the defaults).

    ``on_step(step, metrics)`` is called after every completed step (after its logging and its
    checkpoint), with the step's metrics dict or None on steps that are not logged. Tests raise
    KeyboardInterrupt from it to simulate Ctrl-C; the exception propagates after the progress bar
    and the metrics file are closed.
    """
    cfg = dataclasses.replace(cfg or PretrainConfig(), **settings)
    validate(cfg)
    started = time.perf_counter()
    job = _prepare(cfg)      # everything that can fail on bad input; nothing is written
    _open_output(job)        # from here on OUT is written
    _train(job, on_step)
    plot = write_plot(job.out, job.history) if cfg.plot else None
    return PretrainResult(out_dir=job.out, checkpoint=job.newest, step=job.step,
                          metrics=job.history[-1] if job.history else {}, history=job.history,
                          wall_time=time.perf_counter() - started, plot=plot)


def _prepare(cfg: PretrainConfig) -> _Job:
    """Check the resume target, corpus and tokenizer; build the model, optimiser and data stream, and
    restore a checkpoint into them. Writes nothing, so a ValueError leaves OUT as it was."""
    out = Path(cfg.out)
    corpus = default_corpus_path() if cfg.corpus is None else str(cfg.corpus)
    model_config = resolve_model_config(cfg.config, cfg.config_overrides)
    resume_dir, state = None, None
    if cfg.resume is not False:
        resume_dir = resolve_resume(out, cfg.resume)
        state = load_checkpoint_state(resume_dir)
        _check_resumable(cfg, model_config, resume_dir, state)
    elif (out / LATEST_NAME).exists():
        raise ValueError(f"{out} already holds a pretraining run ({out / LATEST_NAME} exists); pass --resume to "
                         f"continue it, or choose another --out")

    # Corpus first: its errors (missing, empty, undecodable, one sentence) are clearer than the
    # tokenizer trainer's, which would fail on the same text.
    documents = read_corpus(corpus)
    if not any(len(d) >= 2 for d in documents):
        raise ValueError(f"corpus {corpus!r} has {sum(map(len, documents))} sentence(s) and no document with two or "
                         f"more; expected at least one document of two or more sentences (one per line), since "
                         f"sentence-order prediction splits a document's consecutive sentences into A and B")
    if resume_dir is not None:
        tokenizer = Tokenizer.load(resume_dir / TOKENIZER_NAME)
        if cfg.tokenizer is not None and Tokenizer.load(cfg.tokenizer).model_proto != tokenizer.model_proto:
            raise ValueError(f"tokenizer {cfg.tokenizer!r} differs from the one in checkpoint {resume_dir}; "
                             f"expected the same tokenizer to resume (or omit --tokenizer)")
    elif cfg.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        tokenizer = Tokenizer.train(corpus, vocab_size=model_config.vocab_size)
    dataset = PretrainingDataset(corpus, tokenizer, batch_size=cfg.batch_size, max_seq_length=cfg.seq_len,
                                 seed=data_seed(cfg.seed), config=model_config)
    model = Model(model_config, backend=cfg.backend, dtype=cfg.dtype, seed=cfg.seed)
    optimizer = make_optimizer(cfg.optimizer, model.named_parameters(), cfg.lr)
    job = _Job(cfg=cfg, out=out, model=model, optimizer=optimizer, dataset=dataset, tokenizer=tokenizer,
               resume_dir=resume_dir)
    if resume_dir is not None:
        _restore(job, state)
    return job


def _check_resumable(cfg: PretrainConfig, model_config: Config, resume_dir: Path, state: dict) -> None:
    """Same model config and same run settings as the checkpoint, and steps left to do."""
    saved_config = ckpt.load_config(resume_dir)
    if saved_config != model_config:
        raise ValueError(f"checkpoint {resume_dir} was written for another model config than "
                         f"config={cfg.config!r} ({_describe_config_difference(saved_config, model_config)}); "
                         f"expected the same config to resume")
    saved_run, wanted_run = state["run"], cfg.run_settings()
    changed = [f"{k}: checkpoint {saved_run.get(k)!r}, this run {wanted_run[k]!r}"
               for k in RUN_KEYS if saved_run.get(k) != wanted_run[k]]
    if changed:
        raise ValueError(f"checkpoint {resume_dir} was written by a run with other settings ({'; '.join(changed)}); "
                         f"expected the same settings to resume exactly")
    if state["step"] >= cfg.steps:
        raise ValueError(f"checkpoint {resume_dir} is at step {state['step']}, the end of the run "
                         f"(steps={cfg.steps}); nothing to resume")


def _restore(job: _Job, state: dict) -> None:
    """Parameters, optimiser moments and step, dropout generator, data position, counters, history."""
    where = job.resume_dir
    try:
        ckpt.load_weights(job.model, where)
        opt_tensors, _ = files.load_tensors(where / OPTIMIZER_NAME)
        job.optimizer.load_state_dict({"step": state["optimizer"]["step"], "tensors": opt_tensors,
                                       "hyper": state["optimizer"]["hyper"]})
        _set_rng_state(job.model.dropout_rng, state["dropout_rng"], str(where))
        job.dataset.load_state_dict(state["data"])
    except ValueError as e:
        raise ValueError(f"cannot resume from {where}: {e}{_other_checkpoints_hint(job.out, where)}") from e
    job.step, job.elapsed_before, job.tokens_seen = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
    # The metrics up to the checkpoint; lines logged after it belong to the abandoned tail.
    job.history = [r for r in read_metrics(job.out / METRICS_NAME) if r.get("step", 0) <= job.step]


def _open_output(job: _Job) -> None:
    """Create OUT, clear staging leftovers, write the metrics history, tokenizer and config."""
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    files.remove_staging(out / CHECKPOINTS_DIR)
    files.atomic_write_bytes(out / METRICS_NAME, _metrics_bytes(job.history))
    files.atomic_write_bytes(out / TOKENIZER_NAME, job.tokenizer.model_proto)
    files.atomic_write_bytes(out / ckpt.CONFIG_NAME, job.model.config.to_json().encode())
    if job.resume_dir is not None and job.resume_dir.resolve().parent == (out / CHECKPOINTS_DIR).resolve():
        # The run continues from resume_dir: it is now the newest checkpoint of the run's line, even
        # if OUT/latest named a later one (a resume from an explicit earlier checkpoint). Later
        # checkpoints are then never named by OUT/latest while this run replaces them.
        files.write_pointer(out / LATEST_NAME, job.resume_dir)
        job.newest = job.resume_dir


def _train(job: _Job, on_step: OnStep) -> None:
    """The loop: steps ``job.step + 1 .. until`` (or ``steps``), logging and checkpointing as set."""
    cfg, model, out = job.cfg, job.model, job.out
    backend, xp = model.backend, model.xp
    stop = cfg.steps if cfg.until is None else cfg.until
    run_state = {"run": cfg.run_settings(), "config_source": str(cfg.config)}
    progress = _progress_bar(cfg, job.step)
    metrics_file = open(out / METRICS_NAME, "a", encoding="utf-8")
    loop_start = time.perf_counter()
    log_time, log_tokens = loop_start, 0
    try:
        while job.step < stop:
            lr = learning_rate(cfg, job.step)
            host_batches = [job.dataset.next_batch() for _ in range(cfg.grad_accum)]
            step_tokens = sum(int(hb["attention_mask"].sum()) for hb in host_batches)   # (B, T) padding masks
            if cfg.objective == "unilm":
                host_batches = [unilm_host_batch(hb, model.config, seed=(cfg.seed, job.step, i))
                                for i, hb in enumerate(host_batches)]
            mlm_counts = [int((hb["mlm_labels"] != IGNORE_INDEX).sum()) for hb in host_batches]
            # One transfer per array per step: the k micro-batches travel together, then are sliced
            # on the device.
            batch = {key: backend.from_host(np.concatenate([hb[key] for hb in host_batches]))
                     for key in host_batches[0]}
            b = cfg.batch_size
            micro_batches = [{key: value[i * b:(i + 1) * b] for key, value in batch.items()}
                             for i in range(cfg.grad_accum)]
            grads, parts = effective_batch_gradients(model, micro_batches, mlm_counts, training=True,
                                                     sop_weight=cfg.sop_weight)
            will_checkpoint = job.step + 1 == stop or (job.step + 1) % cfg.checkpoint_every == 0
            will_log = will_checkpoint or (job.step + 1) % cfg.log_every == 0
            grad_norm = global_grad_norm(grads.values(), xp) if will_log else None   # before clipping
            job.optimizer.step(grads, lr=lr)
            job.step += 1
            job.tokens_seen += step_tokens
            log_tokens += step_tokens
            record = None
            if will_log:
                # The host sync of this step: four 0-d device arrays read as one host array. On CuPy
                # it waits for the step's kernels, so the clock read after it is honest.
                loss, mlm, sop, norm = (float(v) for v in backend.to_host(
                    xp.stack([parts["loss"], parts["mlm"], parts["sop"], grad_norm])))
                now = time.perf_counter()
                record = {"step": job.step, "loss": loss, "mlm": mlm, "sop": sop, "lr": lr, "grad_norm": norm,
                          "tokens_per_s": log_tokens / max(now - log_time, 1e-9),
                          "elapsed": job.elapsed_before + (now - loop_start), "tokens": job.tokens_seen}
                log_time, log_tokens = now, 0
                if not all(math.isfinite(v) for v in (loss, mlm, sop, norm)):
                    raise ValueError(f"the loss is not finite at step {job.step} (loss={loss}, mlm={mlm}, sop={sop}, "
                                     f"grad_norm={norm}); this step was not checkpointed, the newest complete "
                                     f"checkpoint is {job.newest}; expected finite values (try a lower --lr)")
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                job.history.append(record)
                progress.set_postfix(loss=f"{loss:.3f}", mlm=f"{mlm:.3f}", sop=f"{sop:.3f}", lr=f"{lr:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            progress.update(1)
            if will_checkpoint:
                run_state.update(elapsed=job.elapsed_before + (time.perf_counter() - loop_start),
                                 tokens=job.tokens_seen)
                job.newest = save_checkpoint(out, job.step, model, job.optimizer, job.dataset, job.tokenizer,
                                             run_state)
                prune_checkpoints(out, job.newest, cfg.keep_checkpoints)
            if on_step is not None:
                on_step(job.step, record)
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted after step {job.step}; newest complete checkpoint: {job.newest} "
              f"(continue with --resume)", file=sys.stderr)
        raise
    finally:
        metrics_file.close()
        progress.close()


def _progress_bar(cfg: PretrainConfig, initial: int):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=initial, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                desc="pretrain", file=sys.stderr)


# --- command line ------------------------------------------------------------------------------------------
def limit_blas_threads(threads: int) -> Optional[int]:
    """Set the BLAS libraries' thread count (threadpoolctl) and return the previous one; None where
    threadpoolctl finds no BLAS library. The NumPy backend's own threads (erf, the optimiser's
    pieces) are set to the same count.

    Why: the tiny config's matrices (64 x 1024 and the like) are too small for BLAS threads to pay,
    and on a machine whose cores are busy with other work the threads wait on each other; measured on
    two shared cores, one thread ran the default job 8 to 15 times faster than OpenBLAS's default two.
    The environment variables only act before NumPy is imported, which the ``ref-bert`` entry point
    has already done, hence threadpoolctl, which calls the loaded library's own setter.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    backends.get("numpy").set_threads(int(threads))
    blas = [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]
    if not blas:
        return None
    threadpool_limits(limits=int(threads), user_api="blas")
    return int(blas[0]["num_threads"])


def _default_blas_threads(args) -> int:
    """1 for the NumPy backend unless the user set a BLAS thread count in the environment; else 0
    (leave BLAS alone)."""
    backend = (args.backend or os.environ.get(backends.ENV_VAR) or "numpy").strip().lower()
    if backend != "numpy" or any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
        return 0
    return 1


def _parse_override(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r} is invalid: expected KEY=VALUE with KEY a Config field")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a bare string, e.g. --set hidden_act=relu
    return key, parsed


def add_arguments(parser) -> None:
    d = PretrainConfig()
    parser.epilog = ("On a CPU the job uses one BLAS thread by default (--blas-threads): the tiny config's "
                     "matrices are too small for threads to pay, and threads sharing busy cores wait on each other. "
                     "Larger configs may gain from --blas-threads N.")
    a = parser.add_argument
    a("--out", default=d.out, metavar="DIR", help=f"output directory (default {d.out})")
    a("--corpus", default=None, metavar="FILE",
      help="UTF-8 text, one sentence per line, blank lines between documents (default: the packaged corpus)")
    a("--tokenizer", default=None, metavar="FILE",
      help="SentencePiece model; default: train one on the corpus with the config's vocab_size (saved as OUT/spiece.model)")
    a("--config", default=d.config, metavar="PRESET|FILE",
      help=f"model config: a preset ({', '.join(sorted(PRESETS))}) or a config.json (default {d.config})")
    a("--set", action="append", default=[], metavar="KEY=VALUE", dest="config_set",
      help="override a config field, e.g. --set hidden_dropout_prob=0 (repeatable; VALUE is JSON or a string)")
    a("--backend", default=None, help="numpy or cupy (default: $REF_BERT_BACKEND or numpy)")
    a("--dtype", default=d.dtype, choices=DTYPES, help=f"(default {d.dtype})")
    a("--objective", default=d.objective, help=f"albert (MLM + SOP) or unilm (UniLM's mix of bidirectional + SOP, seq2seq, "
                                               f"left-to-right and right-to-left masks; default {d.objective})")
    a("--sop-weight", type=float, default=d.sop_weight,
      help=f"weight w of the SOP loss in MLM + w * SOP (default {d.sop_weight:g}, which lets SOP leave chance "
           f"within the two-minute demo; ALBERT's recipe is 1)")
    a("--steps", type=int, default=d.steps, help=f"optimiser steps; the schedule spans them (default {d.steps})")
    a("--batch-size", type=int, default=d.batch_size, help=f"examples per micro-batch (default {d.batch_size})")
    a("--grad-accum", type=int, default=d.grad_accum,
      help="micro-batches per step, gradients weighted to equal one batch of grad_accum*batch_size (default 1)")
    a("--seq-len", type=int, default=d.seq_len, help=f"tokens per example, [CLS] and [SEP]s included (default {d.seq_len})")
    a("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
      help=f"lamb (= ALBERT's LAMB), another LAMB preset, or adamw / adamw-bert (default {d.optimizer})")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    a("--schedule", default=d.schedule, choices=SCHEDULES,
      help="albert: warmup then polynomial decay counted from step 0; linear: Hugging Face's (default albert)")
    a("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    a("--seed", type=int, default=d.seed, help="weights, dropout and data all derive from it (default 0)")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
      help=f"write a checkpoint every N steps, and at the end (default {d.checkpoint_every})")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="K",
      help=f"keep the K newest checkpoints, 0 = all (default {d.keep_checkpoints})")
    a("--log-every", type=int, default=d.log_every, metavar="N",
      help="log (and read the loss on the host: a device sync on GPUs) every N steps (default 1)")
    a("--until", type=int, default=None, metavar="STEP",
      help="stop after this step with a checkpoint; --resume later to finish the --steps schedule")
    a("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
      help="continue from OUT/latest, or from the given checkpoint directory")
    a("--blas-threads", type=int, default=None, metavar="N",
      help="OpenBLAS threads for the numpy backend; 0 leaves them alone (default: 1, unless OPENBLAS_NUM_THREADS "
           "or OMP_NUM_THREADS is set)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--no-plot", action="store_true", help=f"do not draw OUT/{PLOT_NAME}")


def config_from_args(args) -> PretrainConfig:
    overrides = dict(_parse_override(text) for text in args.config_set)
    return PretrainConfig(
        out=args.out, corpus=args.corpus, tokenizer=args.tokenizer, config=args.config, config_overrides=overrides,
        backend=args.backend, dtype=args.dtype, objective=args.objective, sop_weight=args.sop_weight, steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, optimizer=args.optimizer,
        lr=args.lr, schedule=args.schedule, warmup=args.warmup, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        resume=args.resume, until=args.until, progress=not args.no_progress, plot=not args.no_plot)


def run(args) -> int:
    """The CLI entry: bad input (ValueError) prints ``error: ...`` and exits 2; Ctrl-C exits 130."""
    try:
        cfg = config_from_args(args)
        threads = _default_blas_threads(args) if args.blas_threads is None else args.blas_threads
        if threads < 0:
            raise ValueError(f"--blas-threads={threads} is invalid: expected 0 (leave alone) or a positive count")
        if threads and limit_blas_threads(threads) is None:
            print(f"note: no BLAS library found: --blas-threads {threads} set only ref-bert's own threads "
                  f"(set OMP_NUM_THREADS before starting Python for BLAS)", file=sys.stderr)
        result = pretrain(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except backends.BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    m = result.metrics
    n = min(10, max(1, len(result.history) // 2))
    print(f"done: step {result.step} in {result.wall_time:.1f} s; checkpoint {result.checkpoint}")
    if result.history:
        print(f"loss (mean of the first / last {n} logged steps): "
              f"total {result.mean('loss', True, n):.4f} -> {result.mean('loss', False, n):.4f}, "
              f"mlm {result.mean('mlm', True, n):.4f} -> {result.mean('mlm', False, n):.4f}, "
              f"sop {result.mean('sop', True, n):.4f} -> {result.mean('sop', False, n):.4f}; "
              f"last step: loss {m['loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s")
    print(f"model directory: {result.out_dir} (config.json, model.safetensors, {TOKENIZER_NAME}); "
          f"metrics: {result.out_dir / METRICS_NAME}" + (f"; plot: {result.plot}" if result.plot else ""))
    return 0
