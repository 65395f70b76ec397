"""The run directory: checkpoint layout, publishing, pruning, and resuming from a checkpoint.

Checkpoints (every ``checkpoint_every`` steps and at the end) are safetensors + JSON, each file written
atomically (``files.atomic_write_bytes``) and each directory published atomically
(``files.publish_directory``: written under a hidden temporary name, renamed when complete):

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
    OUT/metrics.jsonl           one JSON line per logged step; OUT/loss.png the loss curves (metrics.py)

Interrupting (Ctrl-C) never damages the newest complete checkpoint: a checkpoint being written is a
hidden temporary directory until its final rename, and the next run removes such leftovers.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import checkpoint as ckpt
from .. import files
from ..config import Config
from ..data import SentencePairStream, Tokenizer
from ..model import Model
from ..validate import is_int
from .metrics import METRICS_NAME, metrics_bytes, read_metrics
from .settings import JOB_KEYS, RUN_KEYS, PretrainConfig

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "state.json"
TOKENIZER_NAME = "spiece.model"
STATE_FORMAT = "ref-bert-pretrain/1"
STATE_KEYS = ("step", "optimizer", "dropout_rng", "data", "run", "elapsed", "tokens")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> Optional[int]:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(out) -> list:
    """Complete checkpoint directories under ``out/checkpoints``, oldest first."""
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


# --- writing ---------------------------------------------------------------------------------------
def open_output(out: Path, history: list, tokenizer: Tokenizer, config: Config,
                resume_dir: Optional[Path]) -> Optional[Path]:
    """Create OUT, clear staging leftovers, write the metrics history, tokenizer and config. Returns
    the newest complete checkpoint of the run's line: ``resume_dir`` when it is one of OUT's, else None."""
    out.mkdir(parents=True, exist_ok=True)
    files.remove_staging(out / CHECKPOINTS_DIR)
    files.atomic_write_bytes(out / METRICS_NAME, metrics_bytes(history))
    tokenizer.save_to(out)
    files.atomic_write_bytes(out / ckpt.CONFIG_NAME, config.to_json().encode())
    if resume_dir is not None and resume_dir.resolve().parent == (out / CHECKPOINTS_DIR).resolve():
        # The run continues from resume_dir: it is now the newest checkpoint of the run's line, even
        # if OUT/latest named a later one (a resume from an explicit earlier checkpoint). Later
        # checkpoints are then never named by OUT/latest while this run replaces them.
        files.write_pointer(out / LATEST_NAME, resume_dir)
        return resume_dir
    return None


def save_checkpoint(out: Path, step: int, model: Model, optimizer, stream: SentencePairStream,
                    tokenizer: Tokenizer, run_state: dict, extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``out/checkpoints/step-NNNNNN`` atomically, point ``out/latest`` at it, refresh the model
    files in ``out``. ``run_state`` holds the host-side counters (settings, elapsed, tokens; a
    ``format`` key replaces :data:`STATE_FORMAT`). ``extra(directory)``, when given, writes further
    files (fine-tuning: the task head) into the checkpoint directory and into ``out``; ``stream`` is
    anything with ``state_dict()`` (the data position)."""
    backend = model.backend
    opt_state = optimizer.state_dict()
    # Host copies now: the optimiser's tensors are its live arrays.
    opt_tensors = {key: backend.to_host(value) for key, value in opt_state["tensors"].items()}
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "optimizer": {"step": opt_state["step"], "hyper": opt_state["hyper"]},
        "dropout_rng": model.dropout_rng.bit_generator.state,
        "data": stream.state_dict(),
        **run_state,
    }

    def write(directory: Path) -> None:
        ckpt.save_model(model, directory)
        files.save_tensors(directory / OPTIMIZER_NAME, opt_tensors,
                           metadata={"format": "ref-bert-optimizer", "step": str(opt_state["step"])})
        tokenizer.save_to(directory)
        files.atomic_write_json(directory / STATE_NAME, state)
        if extra is not None:
            extra(directory)

    final = files.publish_directory(out / CHECKPOINTS_DIR / checkpoint_name(step), write)
    files.write_pointer(out / LATEST_NAME, final)
    # OUT itself stays a model directory (config.json + model.safetensors + spiece.model).
    ckpt.save_model(model, out)
    tokenizer.save_to(out)
    if extra is not None:
        extra(out)
    return final


def prune_checkpoints(out: Path, newest: Path, keep: int) -> None:
    """Delete checkpoints older than ``newest`` beyond the ``keep`` newest (0 keeps all). Checkpoints
    *after* ``newest`` (left by a run that was resumed from an earlier one) are replaced as the new run
    reaches them, not deleted here."""
    if keep == 0:
        return
    newest_step = checkpoint_step(newest)
    older = [p for p in list_checkpoints(out) if checkpoint_step(p) <= newest_step]
    for path in older[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --- resuming ----------------------------------------------------------------------------------------
def resolve_resume(out: Path, resume, kind: str = "pretraining") -> Optional[Path]:
    """The checkpoint directory ``resume`` names: ``out/latest`` for True, the given path for a path,
    None for False (then ``out`` must not hold a run already). ``kind`` names the job in messages."""
    if resume is False:
        if (out / LATEST_NAME).exists():
            raise ValueError(f"{out} already holds a {kind} run ({out / LATEST_NAME} exists); pass --resume to "
                             f"continue it, or choose another --out")
        return None
    if resume is True:
        if not (out / LATEST_NAME).is_file():
            raise ValueError(f"--resume: {out / LATEST_NAME} does not exist, so {out} holds no complete checkpoint "
                             f"to resume from; expected the output directory of an earlier {kind} run")
        return files.read_pointer(out / LATEST_NAME)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {str(path)!r} is not a directory; expected a checkpoint directory "
                         f"(OUT/checkpoints/step-NNNNNN)")
    return path


def load_checkpoint_state(directory, expected_format: str = STATE_FORMAT) -> dict:
    """Read and check a checkpoint's ``state.json`` (the cheap part of a resume)."""
    directory = Path(directory)
    state = files.read_json(directory / STATE_NAME, "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != expected_format:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{directory / STATE_NAME} has format {got!r}, expected {expected_format!r}")
    for key in STATE_KEYS:
        if key not in state:
            raise ValueError(f"{directory / STATE_NAME} lacks {key!r}; expected keys {', '.join(STATE_KEYS)}")
    if not is_int(state["step"]) or state["step"] < 1:
        raise ValueError(f"{directory / STATE_NAME} has step={state['step']!r}, expected a positive integer")
    return state


RECORDED_KEYS = RUN_KEYS + JOB_KEYS + ("config", "config_overrides")


def recorded_settings(cfg: PretrainConfig, given: set, resume_dir: Path, state: dict) -> PretrainConfig:
    """The settings of a resumed run: each of :data:`RECORDED_KEYS` not in ``given`` comes from the
    checkpoint (``state.json``'s ``run`` and ``job``; the model config from its ``config.json``), the
    given ones from ``cfg``. ``until`` is never carried over: a resume without it runs to ``steps``.
    Checkpoints written before ``job`` was recorded keep ``cfg``'s values for those keys."""
    changes = {}
    saved_run, saved_job = state.get("run", {}), state.get("job", {})
    for key in RUN_KEYS:
        if key not in given and key in saved_run:
            changes[key] = saved_run[key]
    for key in JOB_KEYS:
        if key not in given and key in saved_job:
            changes[key] = saved_job[key]
    if "config" not in given:    # the checkpoint's own config; --set overrides apply on top of it
        changes["config"] = str(resume_dir)
        if "config_overrides" not in given:
            changes["config_overrides"] = {}
    return dataclasses.replace(cfg, **changes)


def check_resumable(cfg: PretrainConfig, model_config: Config, resume_dir: Path, state: dict) -> None:
    """Same model config and same run settings as the checkpoint (``steps`` aside: a different
    ``steps`` extends or shortens the run), and steps left to do."""
    saved_config = ckpt.load_config(resume_dir)
    if saved_config != model_config:
        raise ValueError(f"checkpoint {resume_dir} was written for another model config than "
                         f"config={cfg.config!r} ({_describe_config_difference(saved_config, model_config)}); "
                         f"expected the same config to resume")
    saved_run, wanted_run = state["run"], cfg.run_settings()
    changed = [f"{k}: checkpoint {saved_run.get(k)!r}, this run {wanted_run[k]!r}"
               for k in RUN_KEYS if k != "steps" and saved_run.get(k) != wanted_run[k]]
    if changed:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in RUN_KEYS if k != "steps"
                          and saved_run.get(k) != wanted_run[k])
        raise ValueError(f"checkpoint {resume_dir} was written by a run with other settings ({'; '.join(changed)}); "
                         f"these change the run's arithmetic, so a resume keeps the checkpoint's: omit {names} "
                         f"(only --steps may change, to extend the run)")
    if state["step"] >= cfg.steps:
        raise ValueError(f"checkpoint {resume_dir} is at step {state['step']}, the end of the run "
                         f"(steps={cfg.steps}); nothing to resume (to train on, extend the run: --resume "
                         f"--steps N with N > {state['step']})")


def checkpoint_tokenizer(resume_dir: Path, wanted: Optional[str]) -> Tokenizer:
    """The checkpoint's tokenizer; ``wanted`` (a model file, or None) must be the same one."""
    tokenizer = Tokenizer.load(resume_dir)          # spiece.model, with its settings file when there is one
    if wanted is not None and Tokenizer.load(wanted).model_proto != tokenizer.model_proto:
        raise ValueError(f"tokenizer {wanted!r} differs from the one in checkpoint {resume_dir}; "
                         f"expected the same tokenizer to resume (or omit --tokenizer)")
    return tokenizer


def restore(where: Path, state: dict, out: Path, model: Model, optimizer, stream: SentencePairStream) -> list:
    """Load parameters, optimiser moments and step, dropout generator and data position from checkpoint
    ``where``; return the metrics history up to it (lines logged after it belong to an abandoned tail)."""
    try:
        ckpt.load_weights(model, where)
        opt_tensors, _ = files.load_tensors(where / OPTIMIZER_NAME)
        optimizer.load_state_dict({"step": state["optimizer"]["step"], "tensors": opt_tensors,
                                   "hyper": state["optimizer"]["hyper"]})
        _set_rng_state(model.dropout_rng, state["dropout_rng"], str(where))
        stream.load_state_dict(state["data"])
    except ValueError as e:
        raise ValueError(f"cannot resume from {where}: {e}{_other_checkpoints_hint(out, where)}") from e
    return [r for r in read_metrics(out / METRICS_NAME) if r.get("step", 0) <= int(state["step"])]


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
