"""The job's settings: :class:`PretrainConfig`, its validation, the model config it names, the
optimiser and the learning-rate schedule it chooses, and the BLAS thread count."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import backends

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
    progress: bool = True
    plot: bool = True

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
    require(cfg.resume is False or cfg.resume is True or isinstance(cfg.resume, (str, Path)), "resume",
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


def learning_rate(cfg: PretrainConfig, updates_done: int) -> float:
    """The rate of the update that follows ``updates_done`` updates (docs/reference.md §5)."""
    if cfg.schedule == "albert":
        return albert_schedule(updates_done, cfg.lr, cfg.steps, cfg.warmup_steps())
    return linear_warmup_decay(updates_done, cfg.lr, cfg.steps, cfg.warmup_steps())


def limit_blas_threads(threads: int) -> Optional[int]:
    """Set the BLAS libraries' thread count (threadpoolctl) and return the previous one; None where
    threadpoolctl finds no BLAS library. The NumPy backend's own threads (erf, the optimiser's
    pieces) are set to the same count.

    Why: the tiny config's matrices (64 x 1024 and the like) are too small for BLAS threads to pay,
    and on a machine whose cores are busy with other work the threads wait on each other, so one
    thread runs the default job faster than OpenBLAS's default of one per core.
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
