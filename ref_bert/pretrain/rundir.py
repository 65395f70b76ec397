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
    OUT/superseded/after-step-NNNNNN/   what a resume from an earlier checkpoint of OUT moved out of the
                                run's way: the newer checkpoints and the whole metrics.jsonl, itself a
                                run directory (``--out`` it with ``--resume`` to continue that line)
    OUT/.lock, OUT/.lock-holder the writer's lock (files.claim_run_directory) and who holds it

Nothing is lost: one writer per run directory (the lock); an ``--out`` that is neither new, empty nor
this run is refused unless ``overwrite``; interrupting (Ctrl-C, ``kill -9``) never damages the newest
complete checkpoint (a checkpoint being written is a hidden temporary directory until its final
rename, pruning renames a checkpoint away before deleting it, and the next run cleans up such
leftovers); a checkpoint is published only when every parameter and optimiser moment is finite; a
resume from an earlier checkpoint moves the newer work aside instead of overwriting it.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import checkpoint as ckpt
from .. import files
from ..config import Config
from ..data import SentencePairStream, Tokenizer
from ..model import Model
from ..validate import is_int, is_real
from .metrics import METRICS_NAME, metrics_bytes, read_metrics
from .settings import JOB_KEYS, RUN_KEYS, PretrainConfig

CHECKPOINTS_DIR = "checkpoints"
SUPERSEDED_DIR = "superseded"
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


def run_directory_of(checkpoint) -> Optional[Path]:
    """The run directory a checkpoint belongs to (OUT for OUT/checkpoints/step-NNNNNN), else None."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint_step(checkpoint) is not None and checkpoint.parent.name == CHECKPOINTS_DIR:
        return checkpoint.parent.parent
    return None


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a pretraining run (a ``latest`` pointer or a checkpoints directory)."""
    return (out / LATEST_NAME).exists() or (out / CHECKPOINTS_DIR).is_dir()


# --- the output directory ----------------------------------------------------------------------------
# The files a run keeps at OUT's top level besides checkpoints/ and latest: the model, its tokenizer (any
# kind), the metrics and plot, and fine-tuning's task and evaluation. A new run removes them (--overwrite,
# or the leftovers of a run that stopped before its first checkpoint), so that nothing of the run it
# replaces (a stale model or tokenizer setting) is read as this run's.
RUN_FILES = (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, TOKENIZER_NAME, "vocab.txt", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", METRICS_NAME, "loss.png", "task.json", "eval.json")
# Results computed from the final model: a resume from an earlier checkpoint moves them aside with the
# newer checkpoints, since they no longer describe OUT's model.
RESULT_FILES = ("eval.json",)


def check_output(out: Path, resume_dir: Optional[Path], overwrite: bool, kind: str = "pretraining") -> None:
    """Refuse an ``out`` that is not this run's to write, before anything is written. Allowed: a new
    or empty directory; the run directory that ``resume_dir`` belongs to (continuing it); anything
    with ``overwrite``. Refused: an existing run without a resume of it, and any other non-empty
    directory (a Hugging Face model directory, someone's files). A reusable guard: ``finetune``'s
    ``--out`` goes through it too (with :func:`ref_bert.files.claim_run_directory`); ``kind`` names the job in
    the messages."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; expected a new or empty directory, or a run "
                         f"to resume")
    found = sorted(p.name for p in out.iterdir() if p.name not in (files.LOCK_NAME, files.HOLDER_NAME))
    if not found or overwrite:
        return
    if resume_dir is not None and run_directory_of(resume_dir) == out.resolve():
        return
    if resume_dir is None and not holds_run(out) and (out / METRICS_NAME).is_file() \
            and not (out / ckpt.WEIGHTS_NAME).exists() and set(found) <= set(RUN_FILES):
        return   # a run that stopped before its first checkpoint: only its own files and no weights, nothing to lose
    if holds_run(out):
        if resume_dir is None:
            raise ValueError(f"{out} already holds a {kind} run ({out / LATEST_NAME} or {out / CHECKPOINTS_DIR} "
                             f"exists); pass --resume to continue it, --overwrite to replace it, or choose another "
                             f"--out")
        raise ValueError(f"--out {out} holds another {kind} run than the checkpoint {resume_dir}; resuming "
                         f"would write over it: choose a new --out (to branch from that checkpoint), resume {out}'s "
                         f"own run, or pass --overwrite to replace it")
    raise ValueError(f"--out {out} is an existing directory that is not a {kind} run (it holds "
                     f"{', '.join(found[:6])}{', ...' if len(found) > 6 else ''}); refusing to write into it: choose "
                     f"a new or empty directory, or pass --overwrite to let this run replace its files")




def open_output(out: Path, history: list, tokenizer: Tokenizer, resume_dir: Optional[Path],
                overwrite: bool = False) -> Optional[Path]:
    """Make OUT this run's (the caller holds its lock): clear staging leftovers, move work newer than
    ``resume_dir`` aside (:func:`supersede_newer`), write the metrics history and tokenizer, and make
    OUT's model files those of ``resume_dir``. Returns the newest complete checkpoint of the run's line:
    ``resume_dir`` when it is one of OUT's, else None.

    A new run writes no config.json here: OUT gets config.json and model.safetensors together, with the
    first checkpoint, so it is never a config without weights."""
    out.mkdir(parents=True, exist_ok=True)
    files.remove_staging(out / CHECKPOINTS_DIR)
    continuing = resume_dir is not None and run_directory_of(resume_dir) == out.resolve()
    if not continuing:   # a new run: nothing of a replaced run (--overwrite) or of a failed start stays
        if overwrite and holds_run(out):
            files.remove_directory(out / CHECKPOINTS_DIR)
            (out / LATEST_NAME).unlink(missing_ok=True)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if continuing:
        supersede_newer(out, resume_dir)
    files.atomic_write_bytes(out / METRICS_NAME, metrics_bytes(history))
    tokenizer.save_to(out)
    if resume_dir is not None:   # OUT is the model of the checkpoint the run continues from
        files.atomic_copy(resume_dir / ckpt.WEIGHTS_NAME, out / ckpt.WEIGHTS_NAME)
        files.atomic_copy(resume_dir / ckpt.CONFIG_NAME, out / ckpt.CONFIG_NAME)
    if continuing:
        files.write_pointer(out / LATEST_NAME, resume_dir)
        return resume_dir
    return None


def supersede_newer(out: Path, resume_dir: Path) -> Optional[Path]:
    """Move OUT's checkpoints newer than ``resume_dir`` (left by a run that got further) out of the way,
    into ``OUT/superseded/after-step-NNNNNN[.k]/``, with a copy of the whole metrics.jsonl and a
    ``latest`` naming the newest of them: nothing a resume from an earlier checkpoint replaces is lost,
    and ``--keep-checkpoints`` counts only the run's own line. Crash-safe in this order: the metrics
    copy, then OUT/latest names ``resume_dir``, then each checkpoint is moved by one rename, newest
    first (a process killed in between leaves the rest where the next resume moves them again, into
    another archive). Returns the archive, or None."""
    step = checkpoint_step(resume_dir)
    newer = [p for p in list_checkpoints(out) if checkpoint_step(p) > step]
    if not newer:
        return None
    root = out / SUPERSEDED_DIR
    base = f"after-step-{step:06d}"
    archive, k = root / base, 1
    while archive.exists():
        k += 1
        archive = root / f"{base}.{k}"
    (archive / CHECKPOINTS_DIR).mkdir(parents=True)
    if (out / METRICS_NAME).is_file():
        files.atomic_copy(out / METRICS_NAME, archive / METRICS_NAME)
    for name in RESULT_FILES:
        if (out / name).is_file():
            (out / name).replace(archive / name)
    files.write_pointer(out / LATEST_NAME, resume_dir)
    for path in reversed(newer):   # newest first, so that the archive's latest names a moved checkpoint
        path.replace(archive / CHECKPOINTS_DIR / path.name)
        if path is newer[-1]:
            files.write_pointer(archive / LATEST_NAME, archive / CHECKPOINTS_DIR / path.name)
    files.fsync_directory(out / CHECKPOINTS_DIR)
    print(f"note: resuming {out} from step {step}: its newer checkpoints "
          f"({', '.join(p.name for p in newer)}) and metrics were moved to {archive}", file=sys.stderr)
    return archive


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
    files._fault_point("checkpoint-before-pointer")
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
        files.remove_directory(path)   # renamed away first: never seen half-deleted under its name


# --- resuming ----------------------------------------------------------------------------------------
def resolve_resume(out: Path, resume, kind: str = "pretraining") -> Optional[Path]:
    """The checkpoint directory ``resume`` names: ``out/latest`` for True, the given path for a path,
    None for False (then ``out`` must not hold a run already). ``kind`` names the job in messages."""
    if resume is False:
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
    where = directory / STATE_NAME
    if not is_int(state["step"]) or state["step"] < 1:
        raise ValueError(f"{where} has step={state['step']!r}, expected a positive integer")
    for key in ("optimizer", "dropout_rng", "data", "run") + (("job",) if "job" in state else ()):
        if not isinstance(state[key], dict):
            raise ValueError(f"{where} has {key}={state[key]!r:.80}, expected a JSON object")
    optimizer = state["optimizer"]
    if not is_int(optimizer.get("step")) or optimizer["step"] < 0 or not isinstance(optimizer.get("hyper"), dict):
        raise ValueError(f"{where} has optimizer={optimizer!r:.120}, expected an object with an integer step >= 0 "
                         f"and a hyper object")
    if not is_real(state["elapsed"]) or state["elapsed"] < 0:
        raise ValueError(f"{where} has elapsed={state['elapsed']!r:.40}, expected a finite number of seconds >= 0")
    if not is_int(state["tokens"]) or state["tokens"] < 0:
        raise ValueError(f"{where} has tokens={state['tokens']!r:.40}, expected an integer >= 0")
    if not isinstance(state.get("config_source", ""), str):
        raise ValueError(f"{where} has config_source={state['config_source']!r:.40}, expected a string")
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
    if cfg.until is not None and cfg.until <= state["step"]:
        raise ValueError(f"until={cfg.until} is invalid: checkpoint {resume_dir} is already at step {state['step']}; "
                         f"expected a step after it (or omit --until to run to steps={cfg.steps})")
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
        files.check_finite(opt_tensors, str(where / OPTIMIZER_NAME))
        optimizer.load_state_dict({"step": state["optimizer"]["step"], "tensors": opt_tensors,
                                   "hyper": state["optimizer"]["hyper"]})
        _set_rng_state(model.dropout_rng, state["dropout_rng"], str(where))
        stream.load_state_dict(state["data"])
    except ValueError as e:
        raise ValueError(f"cannot resume from {where}: {e}{_other_checkpoints_hint(out, where)}") from e
    # The history up to the checkpoint comes from the run the checkpoint belongs to (OUT itself, or
    # another run's directory when this run branches from one of its checkpoints).
    source = run_directory_of(where)
    history = read_metrics(source / METRICS_NAME) if source is not None else []
    return [r for r in history if r["step"] <= int(state["step"])]


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
