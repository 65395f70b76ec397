"""The job's settings: :class:`PretrainConfig`, its validation, the model config it names, the
optimiser and the learning-rate schedule it chooses, and the BLAS thread count."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import backends
from backends.comm import KINDS as COMM_KINDS

from .. import checkpoint as ckpt
from .. import files
from ..config import PRESETS, Config
from ..model import DTYPES
from ..optim import OPTIMIZERS, albert_schedule, linear_warmup_decay
from ..validate import is_int, require

OBJECTIVES = ("albert", "unilm")
SCHEDULES = ("albert", "linear")
# Settings that define the run's arithmetic: a resumed run must have the same ones.
RUN_KEYS = ("objective", "steps", "batch_size", "grad_accum", "seq_len", "optimizer", "lr", "schedule",
            "warmup", "seed", "dtype", "sop_weight")
# Settings a checkpoint records besides RUN_KEYS; a resume takes them (and RUN_KEYS) from the
# checkpoint unless they are given explicitly (see :func:`ref_bert.pretrain.pretrain`).
# threads among them: a job setting (results do not depend on it: the loop's micro-batches run with
# one-thread BLAS each, Backend.map_shards), kept on resume like log_every.
JOB_KEYS = ("corpus", "checkpoint_every", "keep_checkpoints", "log_every", "threads")
# The BLAS thread-count variables a user may set; any of them set means "leave BLAS alone" by default.
THREAD_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@dataclass
class PretrainConfig:
    """Everything ``ref-bert pretrain`` takes (its options, one field each). Defaults: the tiny
    config on the packaged corpus, 1600 steps of 32 examples of 64 tokens, ALBERT's LAMB at lr 0.01
    with 10% warmup.

    config:   a preset name (``Config.preset``), a ``config.json`` file, or a directory holding one;
              ``config_overrides`` replaces fields (e.g. ``{"hidden_dropout_prob": 0.0}``).
    objective: one of :data:`OBJECTIVES`: ALBERT's MLM + SOP, or UniLM's mixed-mask batches.
    batch_size: examples per micro-batch; ``grad_accum`` micro-batches make one step (effective
              batch ``batch_size * grad_accum``).
    optimizer: one of :data:`OPTIMIZERS`; its preset fixes betas, eps, weight decay and clipping.
    warmup:   warmup steps; None means 10% of ``steps`` (rounded).
    resume:   False, True (continue from ``out/latest``) or a checkpoint directory.
    until:    stop after this global step (with a checkpoint) although the schedule spans ``steps``;
              resume later to finish. None runs to ``steps``.
    keep_checkpoints: newest checkpoints kept (0 keeps all).
    comm:     the communicator of a data-parallel run (``backends.comm.KINDS``): "auto" is one process
              unless started by ``mpiexec -n N``, then MPI (NumPy backend) or NCCL (CuPy); results
              do not depend on the number of processes (ref_bert/pretrain/data_parallel.py).
    shard_optimizer: ZeRO stage 1: each rank keeps the optimiser moments of its shard of the
              tensors only; bit-identical to the replicated optimiser.
    overwrite: allow ``out`` to be an existing directory that is not an empty one or a run to resume
              (a model directory, another run): the run then replaces its files. Without it such an
              ``out`` is refused, so that nothing that is not this run's is overwritten.
    threads:  BLAS threads for the duration of the run (and the NumPy backend's own loops), restored
              afterwards. None: 1 where the backend runs host BLAS (numpy) unless $OPENBLAS_NUM_THREADS
              or $OMP_NUM_THREADS is set, else leave alone; 0: leave alone; N: N threads.
              Results do not depend on it: each step's micro-batches are Backend.map_shards' shards,
              one-thread BLAS each, up to N side by side (so grad_accum >= N keeps N cores busy).
    """

    out: str = "runs/pretrain"
    corpus: Optional[str] = None
    tokenizer: Optional[str] = None
    config: str = "tiny"
    config_overrides: dict = field(default_factory=dict)
    backend: Optional[str] = None
    dtype: str = "float32"
    objective: str = "albert"
    sop_weight: float = 100.0   # the demo's; ALBERT's recipe is 1 (see the ref_bert.pretrain docstring)
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
    threads: Optional[int] = None
    comm: str = "auto"
    shard_optimizer: bool = False
    progress: bool = True
    plot: bool = True
    overwrite: bool = False

    def warmup_steps(self) -> int:
        return int(round(0.1 * self.steps)) if self.warmup is None else int(self.warmup)

    def run_settings(self) -> dict:
        """The settings a resumed run must share with its checkpoint (warmup resolved)."""
        settings = {k: getattr(self, k) for k in RUN_KEYS}
        settings["warmup"] = self.warmup_steps()
        return settings


def validate(cfg: PretrainConfig) -> None:
    """Check every setting; raise ValueError naming the first bad one and what was expected."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective={cfg.objective!r} is invalid: expected one of {OBJECTIVES}")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "log_every"):
        value = getattr(cfg, name)
        require(is_int(value) and value >= 1, name, value, "a positive integer")
    require(is_int(cfg.keep_checkpoints) and cfg.keep_checkpoints >= 0, "keep_checkpoints",
            cfg.keep_checkpoints, "an integer >= 0 (0 keeps every checkpoint)")
    require(is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "a non-negative integer")
    require(isinstance(cfg.lr, (int, float)) and not isinstance(cfg.lr, bool) and math.isfinite(cfg.lr)
            and cfg.lr > 0, "lr", cfg.lr, "a positive number")
    require(cfg.schedule in SCHEDULES, "schedule", cfg.schedule, f"one of {SCHEDULES}")
    require(isinstance(cfg.sop_weight, (int, float)) and not isinstance(cfg.sop_weight, bool)
            and math.isfinite(cfg.sop_weight) and cfg.sop_weight >= 0, "sop_weight", cfg.sop_weight,
            "a finite number >= 0 (ALBERT: 1)")
    require(cfg.optimizer in OPTIMIZERS, "optimizer", cfg.optimizer, f"one of {OPTIMIZERS}")
    require(cfg.dtype in DTYPES, "dtype", cfg.dtype, f"one of {DTYPES}")
    if cfg.warmup is not None:
        require(is_int(cfg.warmup) and 0 <= cfg.warmup <= cfg.steps, "warmup", cfg.warmup,
                f"an integer in [0, steps={cfg.steps}]")
    if cfg.until is not None:
        require(is_int(cfg.until) and 1 <= cfg.until <= cfg.steps, "until", cfg.until,
                f"a step in [1, steps={cfg.steps}]")
    require(isinstance(cfg.config_overrides, dict), "config_overrides", cfg.config_overrides,
            "a dict of Config fields")
    require(cfg.threads is None or (is_int(cfg.threads) and cfg.threads >= 0), "threads", cfg.threads,
            "None (the default rule), 0 (leave BLAS alone) or a positive thread count")
    require(cfg.comm in COMM_KINDS, "comm", cfg.comm, f"one of {COMM_KINDS}")
    require(isinstance(cfg.shard_optimizer, bool), "shard_optimizer", cfg.shard_optimizer, "True or False")
    require(cfg.resume is False or cfg.resume is True or isinstance(cfg.resume, (str, Path)), "resume",
            cfg.resume, "False, True (the latest checkpoint in out) or a checkpoint directory")
    require(isinstance(cfg.overwrite, bool), "overwrite", cfg.overwrite, "True or False")
    require(isinstance(cfg.out, (str, Path)) and str(cfg.out) != "", "out", cfg.out, "a directory path")


def resolve_model_config(spec: str, overrides: dict) -> Config:
    """A Config from a preset name, a config.json file or a directory holding one, plus overrides.

    The job trains the pretraining heads (MLM + SOP/NSP) of a bidirectional encoder, so a fine-tuning
    model's config (``Config.head``, e.g. a sequence classifier's directory) gives its sizes only: the
    head becomes "pretraining" and ``is_decoder`` False. Overriding either is a ValueError."""
    spec = str(spec)
    if spec in PRESETS:
        base = Config.preset(spec)
    else:
        path = Path(spec)
        if path.is_dir():
            base, _ = ckpt.load_config_any(path)   # ref-bert's, Hugging Face's or save_hf's directory
        elif path.is_file():
            try:
                base = Config.from_dict(files.read_json(path, "config file"))
            except ValueError as e:
                raise ValueError(f"config file {path}: {e}" if str(path) not in str(e) else str(e)) from e
        else:
            raise ValueError(f"config={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                             f"config.json file or a model directory")
    check_config_overrides(overrides)
    for key in ("head", "is_decoder"):
        if key in overrides:
            raise ValueError(f"--set {key}={json.dumps(overrides[key])}: pretraining always trains the pretraining "
                             f"heads of a bidirectional encoder (head 'pretraining', is_decoder false)")
    if base.head != "pretraining" or base.is_decoder:
        base = base.replace(head="pretraining", is_decoder=False)
    return base.replace(**overrides) if overrides else base


def check_config_overrides(overrides: dict) -> None:
    """ValueError for an override key that is not a Config field, naming the closest field."""
    known = [f.name for f in dataclasses.fields(Config)]
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r} (--set {close[0]}={json.dumps(value)})?" if close else \
                f"expected one of {', '.join(sorted(known))}"
            raise ValueError(f"--set {key}={json.dumps(value)}: {key!r} is not a Config field; {hint}")


def learning_rate(cfg: PretrainConfig, updates_done: int) -> float:
    """The rate of the update that follows ``updates_done`` updates (docs/reference.md §5)."""
    if cfg.schedule == "albert":
        return albert_schedule(updates_done, cfg.lr, cfg.steps, cfg.warmup_steps())
    return linear_warmup_decay(updates_done, cfg.lr, cfg.steps, cfg.warmup_steps())


def merge_settings(config_class, base, settings: dict, job: str) -> tuple:
    """A job's settings from a dataclass ``base`` (or None: the defaults) and keyword ``settings``:
    ``(cfg, given)``, ``given`` the names set by the caller (a keyword, or a field of ``base`` that differs
    from the default), which a resume must not take from the checkpoint. Used by ``pretrain`` and
    ``finetune``; a ValueError names a ``base`` of another type and unknown settings."""
    base = config_class() if base is None else base
    if not isinstance(base, config_class):
        raise ValueError(f"cfg={type(base).__name__} is invalid: expected a {config_class.__name__} or None")
    fields = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"unknown {job} settings {unknown}; expected fields of {config_class.__name__} "
                         f"({', '.join(fields)})")
    defaults = config_class()
    given = set(settings) | {name for name in fields if getattr(base, name) != getattr(defaults, name)}
    return dataclasses.replace(base, **settings), given


def resolve_threads(threads: Optional[int], backend) -> int:
    """The thread count :func:`thread_limit` applies for the ``threads`` setting (0 = leave alone)."""
    if threads is not None:
        return int(threads)
    if not backends.get(backend).host_blas or any(os.environ.get(v) for v in THREAD_ENV_VARS):
        return 0
    return 1


@contextlib.contextmanager
def thread_limit(threads: int):
    """For the ``with`` block: BLAS (threadpoolctl) and the NumPy backend's own loops use ``threads``
    threads; both are restored afterwards. 0 leaves everything alone. Yields whether a BLAS library
    was found (False: only ref-bert's own threads were set).

    Why one thread by default: the tiny config's matrices (64 x 1024 and the like) are too small for
    BLAS threads to pay, and where the cores are busy with other work the threads wait on each other.
    The environment variables only act before NumPy is imported, which has happened by now, hence
    threadpoolctl, which calls the loaded library's own setter."""
    if not threads:
        yield True
        return
    from threadpoolctl import threadpool_info, threadpool_limits

    numpy_backend = backends.get("numpy")
    own_before = numpy_backend.threads
    found = any(pool.get("user_api") == "blas" for pool in threadpool_info())
    numpy_backend.set_threads(int(threads))
    try:
        with threadpool_limits(limits=int(threads), user_api="blas"):
            yield found
    finally:
        numpy_backend.set_threads(own_before)
