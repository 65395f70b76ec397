"""The fine-tuning job: :func:`finetune` validates everything (both files whole, the model, the head),
opens the output directory, runs pretraining's loop (:func:`ref_bert.pretrain.loop.train`) with a
fine-tuning step, evaluates, and writes OUT/eval.json.

One step (global step s = 1 .. steps), as in pretraining: the rate is read before the update,
``lr = linear_warmup_decay(s - 1, ...)`` (warmup 10% of the steps unless set); ``grad_accum``
micro-batches of ``batch_size`` examples are drawn in the run's shuffled order; the gradient is that
of the effective batch: micro-batch i's loss is weighted by n_i / N, with n_i the units its loss
averages over (examples; labelled tokens for ``tokens`` and ``seq2seq``), which makes the sum equal
one batch of all of them (:mod:`ref_bert.pretrain.accumulation` derives it); AdamW (``adamw-bert``:
BERT's AdamWeightDecayOptimizer, global-norm clipping 1.0, decay off for LayerNorm and biases) updates
encoder and head together.

The example order: epoch e is ``default_rng([data seed, e]).permutation(n)``; a micro-batch takes the
next ``batch_size`` indices, running into the next epoch when one ends. Micro-batch i of the step after
s updates draws its dropout masks from ``data_parallel.dropout_seed(seed, s, i)``. The order's position,
the optimiser and the weights are the checkpoint, so an interrupted run resumed is bit-identical to one
that was not interrupted (tests/test_finetune.py).

Data parallel (``mpiexec -n N ref-bert finetune ...``): pretraining's scheme
(:mod:`ref_bert.pretrain.data_parallel`), with the same code path for one process. Every rank encodes
the files and draws the whole global batch on the host; rank r computes micro-batches r, r + N, ...
(``grad_accum`` must be a multiple of N); their weighted gradients and losses are summed in index
order (:meth:`DataParallel.sum_in_order`), so N ranks give the parameters of one process bit for bit.
Rank 0 alone writes OUT and evaluates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

import backends.comm

from .. import checkpoint as ckpt
from .. import files
from ..data import SPECIAL_IDS, default_corpus_path
from ..data import Tokenizer as CorpusTokenizer
from ..hf import transformer_directory
from ..tokenization import Tokenizer, check_vocab_size
from ..model import DTYPES, Model
from ..ops import IGNORE_INDEX
from ..optim import OPTIMIZERS, linear_warmup_decay
from ..pretrain import rundir
from ..pretrain.data_parallel import DataParallel, check_split, dropout_seed, every_rank_ends_on_error
from ..pretrain.loop import check_publishable
from ..pretrain.loop import train as run_loop
from ..pretrain.settings import (check_config_overrides, merge_settings, resolve_model_config, resolve_threads,
                                thread_limit)
from ..validate import is_int, require
from . import metrics as task_metrics
from .data import Encoded, TaskData, check_task, encode, load_task_file
from .embedded import embedded_path
from .heads import (LABEL_SMOOTHING, TASK_HEADS, check_task_head, loss_and_grads, task_config, task_outputs,
                    with_task_head)

STATE_FORMAT = "ref-bert-finetune/1"
TASK_NAME = "task.json"
EVAL_NAME = "eval.json"
DATA_KEY = 0xF17E
# [PAD] [UNK] [CLS] [SEP] [MASK] ids that UniLM's seq2seq batches and generation are written for (ref_bert.unilm).
SEQ2SEQ_SPECIAL_IDS = dict(zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_IDS))
# Settings that define the run's arithmetic: a resume keeps the checkpoint's; giving another is an error.
RUN_KEYS = ("task", "train", "init", "config", "config_overrides", "num_labels", "steps", "batch_size", "grad_accum",
            "seq_len", "optimizer", "lr", "warmup", "seed", "dtype", "label_smoothing", "mask_prob")


@dataclass
class FinetuneConfig:
    """Everything ``ref-bert finetune`` takes. Defaults: the task's embedded data, the tiny config from
    scratch, 300 steps of 16 examples of 64 tokens, AdamW (BERT's) with 10% warmup and linear decay.

    train / eval: JSON-lines files (:mod:`ref_bert.finetune.data`); train None: the embedded data of the
        task (and its evaluation file when eval is None too).
    init: a model directory (ref-bert's, a finished finetune OUT, or Hugging Face's) to start from;
        None builds ``config`` (a preset, config.json or directory) from ``seed``.
    tokenizer: a SentencePiece model file or a checkpoint directory (its tokenizer,
        :meth:`ref_bert.Tokenizer.from_hf`); default: the init directory's own tokenizer (a ref-bert
        run's spiece.model, a Hugging Face or sentence-transformers directory's WordPiece or
        SentencePiece files), or (without init) a SentencePiece model trained on the packaged corpus with
        the config's vocab_size, as ``ref-bert pretrain`` does. Its vocabulary must have exactly the
        model's vocab_size tokens; its special ids ([CLS], [SEP], padding, [UNK]) lay out the inputs.
    lr: None picks 5e-5 with ``init`` (BERT's fine-tuning range is 2e-5 .. 5e-5) and 1e-3 without (a
        model trained from scratch on the embedded data).
    num_labels: the head's classes; None: from the training file (or the init directory's head).
    label_smoothing, mask_prob: seq2seq only (UniLM s2s-ft: 0.1 and 0.7).
    overwrite: allow ``out`` to be an existing directory that is neither empty nor this run (a model
        directory, another run), whose files the run then replaces; without it such an ``out`` is refused.
        One writer per run directory: the run holds OUT's lock (:func:`ref_bert.files.claim_run_directory`).
    comm: the communicator of a data-parallel run (module docstring).
    """

    task: str = "classification"
    train: Optional[str] = None
    eval: Optional[str] = None
    init: Optional[str] = None
    config: str = "tiny"
    config_overrides: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None
    num_labels: Optional[int] = None
    out: str = "runs/finetune"
    backend: Optional[str] = None
    dtype: str = "float32"
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 64
    optimizer: str = "adamw-bert"
    lr: Optional[float] = None
    warmup: Optional[int] = None
    seed: int = 0
    label_smoothing: float = LABEL_SMOOTHING
    mask_prob: float = 0.7
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    resume: Any = False
    until: Optional[int] = None
    threads: Optional[int] = None
    progress: bool = True
    schedule: str = "linear"     # fixed: Hugging Face's linear warmup and decay
    comm: str = "auto"           # data parallel: backends.comm.KINDS ("auto": mpiexec -n N gives N ranks)
    overwrite: bool = False      # allow an --out that is neither new, empty nor this run (pretraining's rule)

    def warmup_steps(self) -> int:
        return int(round(0.1 * self.steps)) if self.warmup is None else int(self.warmup)

    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else (5e-5 if self.init is not None else 1e-3)

    def run_settings(self) -> dict:
        settings = {k: getattr(self, k) for k in RUN_KEYS}
        settings["lr"], settings["warmup"] = self.learning_rate(), self.warmup_steps()
        return settings


def validate(cfg: FinetuneConfig) -> None:
    """Every setting; a ValueError names the first bad one and what was expected."""
    check_task(cfg.task)
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "log_every"):
        require(is_int(getattr(cfg, name)) and getattr(cfg, name) >= 1, name, getattr(cfg, name), "a positive integer")
    require(cfg.seq_len >= 8, "seq_len", cfg.seq_len, "at least 8 tokens")
    require(is_int(cfg.keep_checkpoints) and cfg.keep_checkpoints >= 0, "keep_checkpoints", cfg.keep_checkpoints,
            "an integer >= 0 (0 keeps every checkpoint)")
    require(is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "a non-negative integer")
    require(cfg.lr is None or (isinstance(cfg.lr, (int, float)) and not isinstance(cfg.lr, bool)
                               and math.isfinite(cfg.lr) and cfg.lr > 0), "lr", cfg.lr, "a positive number")
    require(cfg.optimizer in OPTIMIZERS, "optimizer", cfg.optimizer, f"one of {OPTIMIZERS}")
    require(cfg.dtype in DTYPES, "dtype", cfg.dtype, f"one of {DTYPES}")
    require(cfg.num_labels is None or (is_int(cfg.num_labels) and cfg.num_labels >= 1), "num_labels",
            cfg.num_labels, "a positive integer")
    require(isinstance(cfg.label_smoothing, (int, float)) and 0 <= cfg.label_smoothing < 1, "label_smoothing",
            cfg.label_smoothing, "a number in [0, 1)")
    require(isinstance(cfg.mask_prob, (int, float)) and 0 < cfg.mask_prob <= 1, "mask_prob", cfg.mask_prob,
            "a probability in (0, 1]")
    if cfg.warmup is not None:
        require(is_int(cfg.warmup) and 0 <= cfg.warmup <= cfg.steps, "warmup", cfg.warmup,
                f"an integer in [0, steps={cfg.steps}]")
    if cfg.until is not None:
        require(is_int(cfg.until) and 1 <= cfg.until <= cfg.steps, "until", cfg.until,
                f"a step in [1, steps={cfg.steps}]")
    require(isinstance(cfg.config_overrides, dict), "config_overrides", cfg.config_overrides, "a dict of Config fields")
    check_config_overrides(cfg.config_overrides)
    require(cfg.threads is None or (is_int(cfg.threads) and cfg.threads >= 0), "threads", cfg.threads,
            "None, 0 (leave BLAS alone) or a positive thread count")
    require(cfg.comm in backends.comm.KINDS, "comm", cfg.comm, f"one of {backends.comm.KINDS}")
    require(isinstance(cfg.overwrite, bool), "overwrite", cfg.overwrite, "True or False")
    require(isinstance(cfg.out, (str, os.PathLike)) and str(cfg.out) != "", "out", cfg.out, "a directory path")
    require(cfg.resume is True or cfg.resume is False or isinstance(cfg.resume, (str, os.PathLike)), "resume",
            cfg.resume, "True (OUT/latest), False or a checkpoint directory")
    for name in ("train", "eval", "init", "tokenizer"):
        require(getattr(cfg, name) is None or isinstance(getattr(cfg, name), (str, os.PathLike)), name,
                getattr(cfg, name), "None or a path")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the output directory, newest checkpoint, last step, the metrics
    history (OUT/metrics.jsonl), the evaluation scores (None without evaluation data) and seconds."""

    out_dir: Path
    checkpoint: Optional[Path]
    step: int
    history: list
    scores: Optional[dict]
    wall_time: float
    rank: int = 0               # this process's rank in a data-parallel run (only rank 0 writes and evaluates)


class ExampleOrder:
    """Shuffled passes over n examples (module docstring); its state is (epoch, position)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(np.random.SeedSequence([seed, DATA_KEY]).generate_state(1)[0])
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self, k: int) -> np.ndarray:
        taken = []
        while len(taken) < k:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            step = min(k - len(taken), self.n - self.position)
            taken.extend(self._order[self.position:self.position + step].tolist())
            self.position += step
        return np.array(taken, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "examples": self.n}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("examples") != self.n or not is_int(state.get("epoch")) \
                or not is_int(state.get("position")) or not 0 <= state["position"] <= self.n:
            raise ValueError(f"data state {state!r:.120} does not fit a training file of {self.n} examples "
                             f"(expected the same file as the checkpoint's run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


@dataclass
class Job:
    """The live objects of a fine-tuning run (the attributes pretraining's loop reads, and ours)."""

    cfg: FinetuneConfig
    out: Path
    model: Model
    optimizer: Any
    order: ExampleOrder
    tokenizer: Tokenizer
    train_data: TaskData
    train_encoded: Encoded
    eval_data: Optional[TaskData]
    eval_encoded: Optional[Encoded]
    task_info: dict
    resume_dir: Optional[Path] = None
    step: int = 0
    elapsed_before: float = 0.0
    tokens_seen: int = 0
    history: list = field(default_factory=list)
    newest: Optional[Path] = None
    parallel: Any = None            # pretraining's DataParallel (one process here), which its train() reads


def finetune(cfg: FinetuneConfig | None = None, on_step=None, comm=None, **settings) -> FinetuneResult:
    """Run (or resume) a fine-tuning job; ``settings`` override fields of ``cfg``.

    Data parallel: started by ``mpiexec -n N`` (or given ``comm``, a :class:`backends.comm.Communicator`),
    every process runs this call and the result is bit-identical to one process (module docstring);
    rank 0 alone writes OUT and returns the scores. An error on any rank ends every rank.

    A resume (``resume=True``: OUT/latest, or a checkpoint directory) takes every run setting
    (:data:`RUN_KEYS`) from the checkpoint; one given that differs is a ValueError. Everything that
    can fail on bad input (settings, both files whole, the model directory, the head) fails before
    OUT is touched."""
    cfg, given = merge_settings(FinetuneConfig, cfg, settings, "finetune")
    if not (cfg.resume is False or cfg.resume is True or isinstance(cfg.resume, (str, os.PathLike))) \
            or not isinstance(cfg.out, (str, os.PathLike)) \
            or any(not (getattr(cfg, k) is None or isinstance(getattr(cfg, k), (str, os.PathLike)))
                   for k in ("train", "eval", "init")):
        validate(cfg)   # raises for resume, out or a file setting before they are used as paths
    # Files are recorded (and compared on resume) as absolute paths, so a resume works from any directory.
    cfg = dataclasses.replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in ("train", "eval", "init")
                                      if isinstance(getattr(cfg, k), (str, os.PathLike)) and getattr(cfg, k) != ""})
    resume_dir = rundir.resolve_resume(Path(cfg.out), cfg.resume, kind="fine-tuning")
    state = None
    if resume_dir is not None:
        state = rundir.load_checkpoint_state(resume_dir, STATE_FORMAT)
        cfg = _recorded_settings(cfg, given, resume_dir, state)
    validate(cfg)
    comm = comm if comm is not None else backends.comm.communicator(cfg.comm, cfg.backend)
    check_split(cfg.grad_accum, cfg.batch_size, comm.size)
    with every_rank_ends_on_error(comm):
        return _run(cfg, resume_dir, state, on_step, comm)


def _run(cfg: FinetuneConfig, resume_dir: Optional[Path], state: Optional[dict], on_step, comm) -> FinetuneResult:
    with thread_limit(resolve_threads(cfg.threads, cfg.backend)):
        started = time.perf_counter()
        if comm.rank == 0:   # rank 0 alone writes OUT; its errors end every rank (every_rank_ends_on_error)
            # never into what is not this run's
            rundir.check_output(Path(cfg.out), resume_dir, cfg.overwrite, kind="fine-tuning")
        job = prepare(cfg, resume_dir, state, comm)   # nothing is written before this returns
        comm.barrier()                                # every rank has read the checkpoint before OUT changes
        with files.claim_run_directory(job.out) if comm.rank == 0 else contextlib.nullcontext():
            newest = None                             # one writer per run directory, until the run ends
            if comm.rank == 0:
                # What was checked before the lock must still hold now that no one else can write OUT.
                rundir.check_output(job.out, resume_dir, cfg.overwrite, kind="fine-tuning")
                if cfg.resume is True and \
                        files.read_pointer(job.out / rundir.LATEST_NAME).resolve() != resume_dir.resolve():
                    raise ValueError(f"{job.out / rundir.LATEST_NAME} changed while this run was preparing (another "
                                     f"run wrote {job.out}); run --resume again")
                newest = rundir.open_output(job.out, job.history, job.tokenizer, job.resume_dir, cfg.overwrite)
                _write_task(job, job.out)
            newest = comm.broadcast_text(None if newest is None else str(newest))
            job.newest = Path(newest) if newest else None
            if job.step < (cfg.steps if cfg.until is None else cfg.until):
                run_loop(job, on_step, step=_step, save=_save_checkpoint, desc=f"finetune {cfg.task}")
            scores = None
            if job.eval_data is not None and (cfg.until is None or job.step == cfg.steps) and comm.rank == 0:
                scores = evaluate(job.model, job.eval_data, job.eval_encoded, job.tokenizer, cfg.batch_size)
                files.atomic_write_json(job.out / EVAL_NAME, {"task": cfg.task, "step": job.step,
                                                              "eval_file": job.eval_data.path,
                                                              "examples": len(job.eval_data.records), **scores})
            comm.barrier()
    return FinetuneResult(job.out, job.newest, job.step, job.history, scores, time.perf_counter() - started,
                          rank=comm.rank)


def _recorded_settings(cfg: FinetuneConfig, given: set, resume_dir: Path, state: dict) -> FinetuneConfig:
    saved = state["run"]
    changes = {}
    for key in RUN_KEYS:
        if key not in saved:
            continue
        if key in given and getattr(cfg, key) != saved[key] and not (key == "lr" and cfg.lr is None):
            raise ValueError(f"checkpoint {resume_dir} was written by a run with {key}={saved[key]!r}, this run "
                             f"gives {getattr(cfg, key)!r}; a resume keeps the checkpoint's settings (omit "
                             f"--{key.replace('_', '-')})")
        changes[key] = saved[key]
    for key in ("eval", "checkpoint_every", "keep_checkpoints", "log_every", "threads"):
        if key not in given and key in state.get("job", {}):
            changes[key] = state["job"][key]
    return dataclasses.replace(cfg, **changes)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _init_task(cfg: FinetuneConfig, init: Path) -> Optional[dict]:
    """Check that the model directory ``init`` has no head of another task (its config's head, or a
    Hugging Face directory's architecture); return its task.json (a finished finetune OUT) or None."""
    config, kind = ckpt.load_config_any(init)
    if kind == ckpt.HF_DIRECTORY:   # its head is the class config.json names (load_config_any reads the encoder)
        from ..hf import ARCHITECTURES

        raw = files.read_json(transformer_directory(init) / ckpt.CONFIG_NAME, "model config")
        named = [a for a in (raw.get("architectures") or []) if a in ARCHITECTURES]
        if named:
            config = config.with_head(ARCHITECTURES[named[0]][1], **({"problem_type": raw["problem_type"]}
                                                                    if raw.get("problem_type") else {}))
    check_task_head(config, cfg.task, f"--init {init}")
    if not (init / TASK_NAME).is_file():
        return None
    info = files.read_json(init / TASK_NAME, "task description")
    if not isinstance(info, dict) or info.get("task") != cfg.task:
        got = info.get("task") if isinstance(info, dict) else info
        raise ValueError(f"--init {init} was fine-tuned for task {got!r} ({init / TASK_NAME}); --task {cfg.task} "
                         f"needs another head: start from a pretraining or base model directory")
    return info


def prepare(cfg: FinetuneConfig, resume_dir: Optional[Path] = None, state: Optional[dict] = None,
            comm=None) -> Job:
    """Read and check both files, the model directory and the head; build the model, head, optimiser
    and example order; restore a checkpoint; the parameters are then rank 0's on every rank of ``comm``
    (default: one process). Writes nothing."""
    train_path = cfg.train or embedded_path(cfg.task, "train")
    eval_path = cfg.eval if cfg.eval is not None else (embedded_path(cfg.task, "eval") if cfg.train is None else None)
    init_head = None
    source = Path(resume_dir) if resume_dir is not None else (Path(cfg.init) if cfg.init is not None else None)
    if cfg.init is not None and resume_dir is None:
        init_head = _init_task(cfg, Path(cfg.init))
    if resume_dir is not None:
        init_head = files.read_json(resume_dir / TASK_NAME, "task description")
    # The label space: the head's when it has one, else the training file's.
    label_names = init_head.get("label_names") if init_head else None
    num_labels = cfg.num_labels if cfg.num_labels is not None else (init_head.get("num_labels") if init_head else None)
    if init_head and cfg.num_labels is not None and init_head.get("num_labels") != cfg.num_labels:
        raise ValueError(f"--num-labels {cfg.num_labels} differs from the head in {source} "
                         f"(num_labels={init_head.get('num_labels')})")
    if cfg.task in ("regression", "qa", "seq2seq"):
        num_labels = None
    train_data = load_task_file(cfg.task, train_path, label_names, num_labels)
    eval_data = None
    if eval_path is not None:
        eval_data = load_task_file(cfg.task, eval_path, train_data.label_names, train_data.num_labels or None)
    if resume_dir is not None and state["job"].get("train_sha256") != _file_digest(train_path):
        raise ValueError(f"training file {train_path} changed since checkpoint {resume_dir} was written; expected "
                         f"the same file to resume exactly")

    if source is not None:
        if cfg.config_overrides:
            raise ValueError("--set changes the config of a model built from --config; with --init the "
                             "checkpoint's config is used (omit --set)")
        if resume_dir is None and ckpt.directory_kind(source) == ckpt.HF_DIRECTORY:
            # transformers' directory: the task's architecture straight from it (its own head when it
            # has this one, else a fresh head on its encoder: Model.from_hf warns and names them).
            wanted = task_config(ckpt.load_config_any(source)[0], cfg.task, train_data.num_labels)
            options = {k: getattr(wanted, k) for k in ("num_labels", "problem_type")
                       if wanted.head in ("sequence_classification", "token_classification", "question_answering")}
            if wanted.head != "sequence_classification":
                options.pop("problem_type", None)
            model = Model.from_hf(source, backend=cfg.backend, dtype=cfg.dtype, seed=cfg.seed, head=wanted.head,
                                  tokenizer=cfg.tokenizer is None and resume_dir is None, **options)
        else:
            model, _ = ckpt.load_any(source, backend=cfg.backend, dtype=cfg.dtype, seed=cfg.seed,
                                     tokenizer=cfg.tokenizer is None and resume_dir is None)
    else:   # from scratch: the task's architecture directly
        config = resolve_model_config(cfg.config, cfg.config_overrides)
        check_task_head(config, cfg.task, f"--config {cfg.config}")
        model = Model(task_config(config, cfg.task, train_data.num_labels), backend=cfg.backend, dtype=cfg.dtype,
                      seed=cfg.seed)
    tokenizer = _resume_tokenizer(resume_dir, cfg.tokenizer) if resume_dir is not None else _tokenizer(cfg, model)
    check_vocab_size(tokenizer, model.config.vocab_size,
                     f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer is not None else f"{source or '--config'}")
    if cfg.task == "seq2seq" and tokenizer.special_ids != SEQ2SEQ_SPECIAL_IDS:
        raise ValueError(f"the tokenizer {tokenizer.source} has special ids {tokenizer.special_ids}; --task seq2seq "
                         f"(UniLM's masks and generation) needs ALBERT's layout {SEQ2SEQ_SPECIAL_IDS}, as a "
                         f"SentencePiece model trained by ref-bert has it")
    train_encoded = encode(train_data, tokenizer, cfg.seq_len)
    eval_encoded = encode(eval_data, tokenizer, cfg.seq_len) if eval_data is not None else None
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} is more than the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if resume_dir is None:
        model = with_task_head(model, cfg.task, train_data.num_labels, cfg.seed)
    model.tokenizer = tokenizer     # save_hf of the fine-tuned model writes it
    parallel = DataParallel(comm or backends.comm.SingleProcess(), model)
    optimizer = parallel.make_optimizer(cfg.optimizer, model, cfg.learning_rate())
    task_info = {"task": cfg.task, "num_labels": train_data.num_labels, "label_names": train_data.label_names}
    job = Job(cfg=cfg, out=Path(cfg.out), model=model, optimizer=optimizer,
              order=ExampleOrder(len(train_encoded), cfg.seed), tokenizer=tokenizer, train_data=train_data,
              train_encoded=train_encoded, eval_data=eval_data, eval_encoded=eval_encoded, task_info=task_info,
              resume_dir=resume_dir, parallel=parallel)
    if resume_dir is not None:
        job.history = rundir.restore(resume_dir, state, job.out, model, optimizer, job.order)
        job.step, job.elapsed_before, job.tokens_seen = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
    parallel.broadcast_parameters(model)
    return job


def load_tokenizer(path) -> Tokenizer:
    """``--tokenizer PATH``: a checkpoint directory's tokenizer (:meth:`Tokenizer.from_hf`, through a
    sentence-transformers directory's transformer module), or a SentencePiece model file read with the
    pretraining job's settings (no lower-casing, accents kept)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--tokenizer {path} does not exist; expected a SentencePiece model file or a checkpoint "
                         f"directory with a tokenizer")
    if path.is_dir():
        return Tokenizer.from_hf(transformer_directory(path))
    if path.is_file() and path.name in ("vocab.txt", "tokenizer.json"):
        raise ValueError(f"--tokenizer {path}: give the directory that holds {path.name} (its "
                         f"tokenizer_config.json says how to normalise text), not the file")
    return Tokenizer.from_sentencepiece(path)


def _tokenizer(cfg: FinetuneConfig, model: Model) -> Tokenizer:
    """The tokenizer of a new run: ``--tokenizer``, else the one beside the --init weights (attached by the
    loader, which requires one), else a SentencePiece model trained on the packaged corpus."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if model.tokenizer is not None:
        return model.tokenizer
    corpus_tokenizer = CorpusTokenizer.train(default_corpus_path(), vocab_size=model.config.vocab_size)
    return Tokenizer.from_sentencepiece(corpus_tokenizer)


def _resume_tokenizer(resume_dir: Path, wanted: Optional[str]) -> Tokenizer:
    """The checkpoint's tokenizer; ``wanted`` (``--tokenizer``, or None) must encode alike."""
    tokenizer = Tokenizer.from_hf(resume_dir)
    if wanted is not None and load_tokenizer(wanted).fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"--tokenizer {wanted} differs from the tokenizer of checkpoint {resume_dir}; expected "
                         f"the same tokenizer to resume (or omit --tokenizer)")
    return tokenizer


# --- one step ----------------------------------------------------------------------------------------
def _host_batch(job: Job, indices: np.ndarray, micro: int) -> tuple:
    """(host arrays, units the loss averages over, real tokens) of the examples ``indices``."""
    cfg, enc = job.cfg, job.train_encoded
    if cfg.task == "seq2seq":
        from ..unilm import seq2seq_finetune_batch

        config = job.model.config
        batch = seq2seq_finetune_batch([enc.pairs[i] for i in indices], cfg.seq_len, config.vocab_size,
                                       seed=[cfg.seed, job.step, micro], unilm_segments=config.type_vocab_size >= 6,
                                       mask_prob=cfg.mask_prob)
        arrays = {"input_ids": batch.input_ids, "token_type_ids": batch.token_type_ids,
                  "attention_mask": batch.attention_mask, "labels": batch.mlm_labels}
        return arrays, int((batch.mlm_labels != IGNORE_INDEX).sum()), int(sum(batch.num_real))
    arrays = {k: v[indices] for k, v in enc.arrays.items()}
    units = int((arrays["labels"] != IGNORE_INDEX).sum()) if cfg.task == "tokens" else len(indices)
    return arrays, units, int(arrays["attention_mask"].sum())


def effective_batch_gradients(model: Model, task: str, host: list, training: bool = True,
                              label_smoothing: float = LABEL_SMOOTHING, parallel: Optional[DataParallel] = None,
                              seed: Optional[int] = None, step: int = 0) -> tuple:
    """``(grads, loss)`` of the effective batch made of the micro-batches ``host`` (``(arrays, units,
    tokens)`` each, the whole global batch): micro-batch i's loss weighted by n_i / N (module
    docstring), summed in index order by ``parallel`` (this rank's :class:`DataParallel`, which
    computes its own micro-batches; default one process). ``seed``: micro-batch i's dropout masks come
    from ``dropout_seed(seed, step, i)`` (None: the model's dropout stream, one process only)."""
    parallel = parallel or DataParallel(backends.comm.SingleProcess(), model)
    total = sum(units for _, units, _ in host)
    xp = model.xp

    def micro_batch(i: int):
        arrays, units, _ = host[i]
        batch = {k: model.backend.from_host(v) for k, v in arrays.items()}
        result = loss_and_grads(model, task, batch, training, units / total if total else 0.0, label_smoothing,
                                dropout_seed=None if seed is None else dropout_seed(seed, step, i))
        return result.grads, xp.reshape(result.loss, (1,))

    own = parallel.own_micro_batches(len(host), len(host[0][0]["input_ids"]))
    # Micro-batches with their own dropout seeds (or none) may run side by side (Backend.map_shards);
    # masks drawn in turn from the model's one stream may not.
    grads, (loss,) = parallel.sum_in_order(model, own, micro_batch, independent=seed is not None or not training)
    return grads, loss


def _step(job: Job, log, stop: int) -> None:
    """One optimiser step, its logging and its checkpoint (the shape of pretraining's step). Every rank
    draws the whole global batch on the host and computes its own micro-batches of it."""
    cfg, model, parallel = job.cfg, job.model, job.parallel
    lr = linear_warmup_decay(job.step, cfg.learning_rate(), cfg.steps, cfg.warmup_steps())
    host = [_host_batch(job, job.order.next_indices(cfg.batch_size), i) for i in range(cfg.grad_accum)]
    grads, loss = effective_batch_gradients(model, cfg.task, host, True, cfg.label_smoothing, parallel,
                                            seed=cfg.seed, step=job.step)
    checkpoint_now = job.step + 1 == stop or (job.step + 1) % cfg.checkpoint_every == 0
    log_now = checkpoint_now or (job.step + 1) % cfg.log_every == 0
    grad_norm = parallel.grad_norm(grads, model) if log_now else None   # before clipping
    parallel.update(job.optimizer, grads, lr, grad_norm, model)
    job.step += 1
    tokens = sum(t for _, _, t in host)
    job.tokens_seen += tokens
    log.count(tokens)
    if log_now:
        loss_value, norm = (float(v) for v in model.backend.to_host(model.xp.stack([loss, grad_norm])))
        record = log.record(job.step, lr, {"loss": loss_value}, norm, job.tokens_seen)
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            log.close()
            raise ValueError(f"step {job.step}: non-finite loss {loss_value} or gradient norm {norm}; the newest "
                             f"checkpoint is {job.newest}; expected finite values (try a lower --lr)")
        log.write(record)
        job.history.append(record)
    if checkpoint_now:
        _save_checkpoint(job, log.elapsed())


def _write_task(job: Job, directory: Path) -> None:
    """task.json beside the model files: the task and its classes (class names for evaluation)."""
    files.atomic_write_json(Path(directory) / TASK_NAME, job.task_info)


def _save_checkpoint(job: Job, elapsed: float) -> None:
    """Checkpoint the step just done, when every parameter and moment is finite (pretraining's rule:
    :func:`ref_bert.pretrain.loop.check_publishable`, on every rank alike); rank 0 writes it, and every
    rank learns its path."""
    check_publishable(job)
    cfg = job.cfg
    job.model.mark_trained()    # the fresh head has been trained from here on
    if job.parallel.rank != 0:
        job.newest = Path(job.parallel.comm.broadcast_text(None))
        return
    train_path = cfg.train or embedded_path(cfg.task, "train")
    job_settings = {k: getattr(cfg, k) for k in ("eval", "checkpoint_every", "keep_checkpoints", "log_every",
                                                 "threads")}
    job_settings["train_sha256"] = _file_digest(train_path)
    run_state = {"format": STATE_FORMAT, "run": cfg.run_settings(), "job": job_settings, "task": job.task_info,
                 "elapsed": elapsed, "tokens": job.tokens_seen}
    job.newest = rundir.save_checkpoint(job.out, job.step, job.model, job.optimizer, job.order,
                                        job.tokenizer, run_state, extra=lambda d: _write_task(job, d))
    rundir.prune_checkpoints(job.out, job.newest, cfg.keep_checkpoints)
    job.parallel.comm.broadcast_text(str(job.newest))


# --- evaluation --------------------------------------------------------------------------------------
def _batches(arrays: dict, n: int, size: int):
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in arrays.items()}


def predict(model: Model, task: str, encoded: Encoded, batch_size: int) -> list:
    """The head's outputs (host arrays, no dropout) for every example, batch by batch."""
    outputs = []
    be = model.backend
    for host in _batches(encoded.arrays, len(encoded), batch_size):
        batch = {k: be.from_host(v) for k, v in host.items() if k in ("input_ids", "token_type_ids", "attention_mask")}
        out = task_outputs(model, task, batch)
        outputs.append(tuple(be.to_host(o) for o in out) if isinstance(out, tuple) else be.to_host(out))
    return outputs


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, max_words: int = 30) -> tuple:
    """The word span (i, j), i <= j < i + max_words, with the largest start_logits[i] + end_logits[j]
    (BERT's run_squad.py: the best start + end score among valid spans)."""
    scores = start_logits[:, None] + end_logits[None, :]
    W = len(start_logits)
    valid = np.triu(np.ones((W, W), dtype=bool)) & ~np.triu(np.ones((W, W), dtype=bool), k=max_words)
    scores = np.where(valid, scores, -np.inf)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(i), int(j)


def evaluate(model: Model, data: TaskData, encoded: Encoded, tokenizer, batch_size: int = 16) -> dict:
    """The task's metrics (:mod:`ref_bert.finetune.metrics`) of ``model`` (with the task's head) on ``data``."""
    task, records = data.task, data.records
    if task == "seq2seq":
        from ..generate import generate

        room = model.config.max_position_embeddings - (max(len(s) for s, _ in encoded.pairs) + 2)
        longest_target = max(len(t) for _, t in encoded.pairs)
        predicted = []
        for start in range(0, len(encoded.pairs), batch_size):
            sources = [s for s, _ in encoded.pairs[start:start + batch_size]]
            out = generate(model, sources, max_length=max(1, min(room, longest_target + 4)))
            predicted += [tokenizer.decode(seq) for seq in out.sequences]
        return task_metrics.exact_match([r["target"] for r in records], predicted)
    outputs = predict(model, task, encoded, batch_size)
    if task == "qa":
        starts = np.concatenate([s for s, _ in outputs])
        ends = np.concatenate([e for _, e in outputs])
        predicted = []
        for n, (r, meta) in enumerate(zip(records, encoded.meta)):
            if not meta["words"]:
                predicted.append("")
                continue
            first = np.array(meta["first_piece"]) + meta["offset"]
            last = np.array(meta["last_piece"]) + meta["offset"]
            i, j = best_span(starts[n][first], ends[n][last])
            predicted.append(r["context"][meta["words"][i][0]:meta["words"][j][1]])
        return task_metrics.squad_scores([[a["text"] for a in r["answers"]] for r in records], predicted)
    logits = np.concatenate(outputs)
    if task == "regression":
        return task_metrics.regression_scores([r["label"] for r in records], logits.reshape(-1).tolist())
    if task == "tokens":
        gold, predicted = [], []
        labels = encoded.arrays["labels"]
        for n, r in enumerate(records):
            positions = np.nonzero(labels[n] != IGNORE_INDEX)[0]
            tags = [data.label_names[k] for k in logits[n][positions].argmax(axis=-1)]
            tags += ["O"] * (len(r["tags"]) - len(tags))       # words cut by truncation
            gold.append(list(r["tags"]))
            predicted.append(tags)
        return task_metrics.token_scores(gold, predicted)
    predicted = logits.argmax(axis=-1).tolist()
    gold = encoded.arrays["labels"].tolist()
    if task == "multiple-choice":
        return {"accuracy": task_metrics.classification_scores(gold, predicted, data.num_labels)["accuracy"]}
    return task_metrics.classification_scores(gold, predicted, data.num_labels)


def chance_scores(data: TaskData) -> dict:
    """What a model that ignores its input reaches on ``data`` (the learning tests' baseline):
    classification the majority class's share; multiple-choice 1 / choices."""
    if data.task == "classification":
        labels = [r["label"] for r in data.records]
        return {"accuracy": max(labels.count(x) for x in set(labels)) / len(labels)}
    if data.task == "multiple-choice":
        return {"accuracy": 1.0 / data.num_labels}
    return {}


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "prepare", "evaluate", "predict", "best_span",
           "ExampleOrder", "RUN_KEYS", "STATE_FORMAT", "TASK_NAME", "EVAL_NAME", "TASK_HEADS"]
