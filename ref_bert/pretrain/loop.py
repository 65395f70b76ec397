"""The job: :func:`pretrain` prepares (everything that can fail on bad input, before anything is
written), opens the output directory, runs the loop and draws the plot."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import backends.comm

from .. import files
from ..data import SentencePairStream, Tokenizer, check_pairable, default_corpus_path, read_corpus
from ..model import Model
from . import rundir
from .batches import make_stream, next_step_batch
from .data_parallel import DataParallel, check_split, every_rank_ends_on_error
from .metrics import StepLog, write_plot
from .settings import (PretrainConfig, learning_rate, merge_settings, resolve_model_config, resolve_threads,
                       thread_limit, validate)


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns.

    out_dir: the output directory; checkpoint: the newest complete checkpoint; step: the last step
    done; metrics: the last logged metrics line; history: every line of OUT/metrics.jsonl (earlier
    runs of a resumed job included); wall_time: seconds this call took; plot: OUT/loss.png or None;
    rank: this process's rank in a data-parallel run (0 in one process; only rank 0 writes OUT).
    """

    out_dir: Path
    checkpoint: Optional[Path]
    step: int
    metrics: dict
    history: list
    wall_time: float
    plot: Optional[Path] = None
    rank: int = 0

    def mean(self, key: str, first: bool, count: int = 10) -> float:
        """Mean of ``key`` over the first (or last) ``count`` logged steps of the history."""
        values = [r[key] for r in self.history]
        chosen = values[:count] if first else values[-count:]
        return float(np.mean(chosen)) if chosen else float("nan")


OnStep = Optional[Callable[[int, Optional[dict]], None]]


@dataclass
class Job:
    """The live objects of a run and its host-side counters."""

    cfg: PretrainConfig
    out: Path
    model: Model
    optimizer: Any
    stream: SentencePairStream
    tokenizer: Tokenizer
    parallel: DataParallel         # this rank's side of the collectives (one process: the identity)
    resume_dir: Optional[Path] = None
    step: int = 0                  # updates done
    elapsed_before: float = 0.0    # seconds spent by earlier runs of this job (from the checkpoint)
    tokens_seen: int = 0           # real (non-pad) tokens consumed so far
    history: list = field(default_factory=list)
    newest: Optional[Path] = None  # newest complete checkpoint
    config_source: str = ""        # the model config as first named (state.json's config_source)


def pretrain(cfg: PretrainConfig | None = None, on_step: OnStep = None, comm=None, **settings) -> PretrainResult:
    """Run (or resume) a pretraining job; ``settings`` override fields of ``cfg`` (or of the defaults).

    Data parallel: started by ``mpiexec -n N`` (or given a ``comm``, a :class:`backends.comm.
    Communicator`), every process runs this call; each computes its share of every global batch and
    the result is bit-identical to one process (ref_bert/pretrain/data_parallel.py). Rank 0 alone
    writes OUT. An exception on any rank ends every rank (MPI_Abort, exit status 2 for a ValueError)
    rather than leaving the others waiting.

    Threads: for the duration of the call the BLAS thread count is the ``threads`` setting's (one
    thread on the NumPy backend by default, as ``ref-bert pretrain``), restored on return.

    Resuming (``resume=True`` or a checkpoint directory) takes the run's settings from the checkpoint
    (``state.json`` records them: every RUN_KEYS setting, the corpus, checkpoint_every,
    keep_checkpoints, log_every; the model config is the checkpoint's), except those given: the
    keywords in ``settings``, and the fields of ``cfg`` that differ from PretrainConfig's defaults. A
    given setting that changes the run's arithmetic (RUN_KEYS but ``steps``) must equal the
    checkpoint's, else a ValueError names it.

    Extending a run: ``steps`` may differ from the checkpoint's (``--resume --steps N``), also after
    the run finished. The learning-rate schedule is then re-derived for the new total: step s after the
    checkpoint takes the rate that step s of a run configured with N steps (and the checkpoint's
    warmup steps) would have had. The steps already done keep the rates they had under the old total,
    so an extended run is not bit-identical to an N-step run from scratch (with a decaying schedule
    the rate jumps up at the checkpoint); resuming within the extended run is exact again.

    ``on_step(step, metrics)`` is called after every completed step (after its logging and its
    checkpoint), with the step's metrics dict or None on steps that are not logged. Ctrl-C (or a
    KeyboardInterrupt raised from ``on_step``) between steps writes a checkpoint of the last completed
    step, then propagates; a first Ctrl-C during a step lets the step finish first (a second one stops
    at once, without a checkpoint of that step).
    """
    cfg, given = merge_settings(PretrainConfig, cfg, settings, "pretrain")
    if not (cfg.resume is False or cfg.resume is True or isinstance(cfg.resume, (str, os.PathLike))) \
            or not isinstance(cfg.out, (str, os.PathLike)) or not isinstance(cfg.overwrite, bool):
        validate(cfg)   # raises for resume, out or overwrite
    resume_dir = rundir.resolve_resume(Path(cfg.out), cfg.resume)
    state = None
    if resume_dir is not None:
        state = rundir.load_checkpoint_state(resume_dir)
        cfg = rundir.recorded_settings(cfg, given, resume_dir, state)
    validate(cfg)
    comm = comm if comm is not None else backends.comm.communicator(cfg.comm, cfg.backend)
    check_split(cfg.grad_accum, cfg.batch_size, comm.size)
    with every_rank_ends_on_error(comm):   # the other ranks may be waiting in a collective: end them all
        return _run(cfg, resume_dir, state, on_step, comm)


def _run(cfg: PretrainConfig, resume_dir, state, on_step: OnStep, comm) -> PretrainResult:
    with thread_limit(resolve_threads(cfg.threads, cfg.backend)) as found:
        if cfg.threads and not found and comm.rank == 0:
            print(f"note: no BLAS library found: threads={cfg.threads} set only ref-bert's own threads "
                  f"(set OMP_NUM_THREADS before starting Python for BLAS)", file=sys.stderr)
        started = time.perf_counter()
        if comm.rank == 0:   # rank 0 alone writes OUT; its errors end every rank (pretrain's except)
            rundir.check_output(Path(cfg.out), resume_dir, cfg.overwrite)
        job = prepare(cfg, resume_dir, state, comm)   # everything that can fail on bad input; nothing is written
        comm.barrier()                                # every rank has read the checkpoint before OUT changes
        with files.claim_run_directory(job.out) if comm.rank == 0 else contextlib.nullcontext():
            newest = None                             # one writer per run directory, until the run ends
            if comm.rank == 0:
                # What was checked before the lock must still hold now that no one else can write OUT.
                rundir.check_output(job.out, resume_dir, cfg.overwrite)
                if cfg.resume is True and \
                        files.read_pointer(job.out / rundir.LATEST_NAME).resolve() != resume_dir.resolve():
                    raise ValueError(f"{job.out / rundir.LATEST_NAME} changed while this run was preparing (another "
                                     f"run wrote {job.out}); run --resume again")
                newest = rundir.open_output(job.out, job.history, job.tokenizer, job.resume_dir, cfg.overwrite)
            newest = comm.broadcast_text(None if newest is None else str(newest))
            job.newest = Path(newest) if newest else None
            train(job, on_step)                       # from here on OUT is written (by rank 0)
            plot = write_plot(job.out, job.history, cfg.sop_weight) if cfg.plot and comm.rank == 0 else None
            comm.barrier()
    return PretrainResult(out_dir=job.out, checkpoint=job.newest, step=job.step,
                          metrics=job.history[-1] if job.history else {}, history=job.history,
                          wall_time=time.perf_counter() - started, plot=plot, rank=comm.rank)


def prepare(cfg: PretrainConfig, resume_dir: Optional[Path] = None, state: Optional[dict] = None,
            comm=None) -> Job:
    """Check the resume target, corpus and tokenizer; build the model, optimiser and data stream, and
    restore a checkpoint (``resume_dir``, its ``state``) into them; the parameters are then rank 0's
    on every rank of ``comm`` (default: one process). Writes nothing, so a ValueError leaves OUT as
    it was."""
    out = Path(cfg.out)
    corpus = default_corpus_path() if cfg.corpus is None else str(cfg.corpus)
    model_config = resolve_model_config(cfg.config, cfg.config_overrides)
    config_source = str(cfg.config)
    if resume_dir is not None:
        rundir.check_resumable(cfg, model_config, resume_dir, state)
        if Path(config_source) == resume_dir:   # the config was taken from the checkpoint
            config_source = str(state.get("config_source", config_source))
    # Corpus first: its errors (missing, empty, undecodable, one sentence) are clearer than the
    # tokenizer trainer's, which would fail on the same text.
    check_pairable(read_corpus(corpus), corpus)
    if resume_dir is not None:
        tokenizer = rundir.checkpoint_tokenizer(resume_dir, cfg.tokenizer)
    elif cfg.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        tokenizer = Tokenizer.train(corpus, vocab_size=model_config.vocab_size)
    stream = make_stream(cfg.objective, corpus, tokenizer, cfg.batch_size, cfg.seq_len, cfg.seed, model_config)
    model = Model(model_config, backend=cfg.backend, dtype=cfg.dtype, seed=cfg.seed)
    parallel = DataParallel(comm or backends.comm.SingleProcess(), model, cfg.shard_optimizer)
    optimizer = parallel.make_optimizer(cfg.optimizer, model, cfg.lr)
    job = Job(cfg=cfg, out=out, model=model, optimizer=optimizer, stream=stream, tokenizer=tokenizer,
              parallel=parallel, resume_dir=resume_dir, config_source=config_source)
    if resume_dir is not None:
        job.history = rundir.restore(resume_dir, state, out, model, parallel.restorable(optimizer), stream)
        job.step, job.elapsed_before, job.tokens_seen = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
    parallel.broadcast_parameters(model)
    return job


class _DeferredInterrupt:
    """While active (main thread only), a first Ctrl-C only asks the loop to stop after the current
    step; a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(job: Job, on_step: OnStep = None, step: Optional[Callable] = None, save: Optional[Callable] = None,
          desc: str = "pretrain") -> None:
    """The loop: steps ``job.step + 1 .. until`` (or ``steps``), logging and checkpointing as set.
    One step is described in the :mod:`ref_bert.pretrain` docstring: the rate is read before the
    update, from the number of updates already made.

    ``step(job, log, stop)`` runs one step with its logging and checkpoint and ``save(job, elapsed)``
    writes a checkpoint of the last completed step; they default to pretraining's (:func:`_step`,
    :func:`save_checkpoint`). ``ref-bert finetune`` (:mod:`ref_bert.finetune.loop`) passes its own, so
    both jobs share this loop, its Ctrl-C handling and its progress bar (``desc``). ``job`` needs the
    attributes of :class:`Job` that the loop reads: cfg (steps, until, progress), out, step,
    elapsed_before, history, newest.

    Ctrl-C: a KeyboardInterrupt between steps (a first Ctrl-C is deferred to the end of the step it
    arrives in; ``on_step`` may raise one) writes a checkpoint of the last completed step, as every
    checkpoint is written (atomically), then propagates. One raised inside a step (a second Ctrl-C)
    propagates without a checkpoint of that step: its update may be half done."""
    cfg = job.cfg
    step = step or _step            # looked up at call time (tests replace loop._step)
    save = save or save_checkpoint
    stop = cfg.steps if cfg.until is None else cfg.until
    log = StepLog(job.out, cfg.steps, job.step, job.elapsed_before, cfg.progress, desc=desc,
                  writer=job.parallel.rank == 0)
    try:
        _train(job, on_step, log, stop, step, save)
    except OSError as e:   # a full disk, a lost mount: one line, the file and the checkpoint to resume from
        where = e.filename or job.out
        try:   # what OUT/latest names is complete (it may be newer than job.newest if the failure came after it)
            newest = files.read_pointer(job.out / rundir.LATEST_NAME)
        except (ValueError, OSError):
            newest = job.newest
        raise ValueError(f"cannot write {where}: {e.strerror or e} (at step {job.step}); the newest complete "
                         f"checkpoint is {newest}{' (resume from it with --resume once fixed)' if newest else ''}"
                         ) from e
    finally:
        log.close()


def _train(job: Job, on_step: OnStep, log: StepLog, stop: int, step: Callable, save: Callable) -> None:
    between_steps = True   # False from the start of a step until it is logged and checkpointed
    with _DeferredInterrupt() as interrupt:
        try:
            while job.step < stop:
                if job.parallel.comm.any(interrupt.requested):   # every rank stops at the same step
                    raise KeyboardInterrupt
                between_steps = False
                step(job, log, stop)
                between_steps = True
                if on_step is not None:
                    on_step(job.step, job.history[-1] if job.history and job.history[-1]["step"] == job.step
                            else None)
        except KeyboardInterrupt:
            newest_step = rundir.checkpoint_step(job.newest) if job.newest is not None else None
            if between_steps and job.step > 0 and newest_step != job.step:
                save(job, log.elapsed())
                log.close()
                print(f"\ninterrupted after step {job.step}: wrote checkpoint {job.newest} "
                      f"(continue with --resume)", file=sys.stderr)
            else:
                log.close()
                where = f"after step {job.step}" if between_steps else f"during step {job.step + 1}"
                print(f"\ninterrupted {where}; newest complete checkpoint: {job.newest} "
                      f"(continue with --resume)", file=sys.stderr)
            raise


def _step(job: Job, log: StepLog, stop: int) -> None:
    """One optimiser step, its logging (on logged steps) and its checkpoint (on checkpoint steps)."""
    cfg, parallel = job.cfg, job.parallel
    lr = learning_rate(cfg, job.step)
    own = parallel.own_micro_batches(cfg.grad_accum, cfg.batch_size)   # this rank's share of the global batch
    batch = next_step_batch(job.stream, cfg, job.model, job.step, own)
    # The gradient of the whole global batch (this rank's shard of it when the optimiser is sharded),
    # summed over its micro-batches in index order whatever the number of ranks (data_parallel.py).
    grads, parts = parallel.gradients(job.model, batch.micro_batches, batch.indices, batch.mlm_counts, batch.sizes,
                                      cfg.sop_weight, cfg.seed, job.step)
    checkpoint_now = job.step + 1 == stop or (job.step + 1) % cfg.checkpoint_every == 0
    log_now = checkpoint_now or (job.step + 1) % cfg.log_every == 0
    # Before clipping; a sharded optimiser needs it every step (its clipping cannot see every tensor).
    grad_norm = parallel.grad_norm(grads, job.model) if log_now or parallel.sharded else None
    parallel.update(job.optimizer, grads, lr, grad_norm, job.model)
    job.step += 1
    job.tokens_seen += batch.tokens
    log.count(batch.tokens)
    if log_now:
        log_step(job, log, lr, parts, grad_norm)
    if checkpoint_now:
        save_checkpoint(job, log.elapsed())


def log_step(job: Job, log: StepLog, lr: float, parts: dict, grad_norm) -> dict:
    """Read the step's losses on the host, check them, append the metrics line; return it.

    Everything per step stays on the model's backend: losses, gradient norm and the optimiser's norms
    are 0-d device arrays. This is the step's host sync: four of them read as one host array (on CuPy
    it waits for the step's kernels, so the clock read after it is honest). It happens only on logged
    steps (``log_every``, and every checkpoint step, so that a non-finite loss is caught before it is
    saved). ``Model.loss_and_grads`` itself validates labels and counts them, which syncs on CuPy;
    that is the model's, not this loop's.
    """
    xp = job.model.xp
    loss, mlm, sop, norm = (float(v) for v in job.model.backend.to_host(
        xp.stack([parts["loss"], parts["mlm"], parts["sop"], grad_norm])))
    record = log.record(job.step, lr, {"loss": loss, "mlm": mlm, "sop": sop}, norm, job.tokens_seen)
    if not all(math.isfinite(v) for v in (loss, mlm, sop, norm)):
        raise ValueError(f"the loss is not finite at step {job.step} (loss={loss}, mlm={mlm}, sop={sop}, "
                         f"grad_norm={norm}); this step was not checkpointed, the newest complete "
                         f"checkpoint is {job.newest}; expected finite values (try a lower --lr)")
    log.write(record)
    job.history.append(record)
    return record


def check_publishable(job: Job) -> None:
    """Every parameter and optimiser moment finite, else a ValueError naming the first that is not and
    the newest checkpoint that is finite. The loss logged at step s is computed from the parameters
    *before* step s's update, so a finite loss does not show that the update left finite parameters:
    this check, run before anything of the step is published, does."""
    xp = job.model.xp
    suspects = [("parameter", job.model.params.flat, None)]
    suspects += [("optimiser moment", v, k) for k, v in job.optimizer.state_dict()["tensors"].items()]
    for what, array, name in suspects:
        if bool(xp.isfinite(array).all()):
            continue
        if name is None:
            name = next(n for n, v in job.model.params.items() if not bool(xp.isfinite(v).all()))
        newest = (f"the newest checkpoint, all finite, is {job.newest}" if job.newest is not None
                  else "no checkpoint was written yet")
        raise ValueError(f"the update of step {job.step} made {what} {name!r} non-finite (NaN or inf); step "
                         f"{job.step} was not checkpointed and OUT's model was not replaced; {newest}; "
                         f"expected finite values (try a new run with a lower --lr)")


def save_checkpoint(job: Job, elapsed: float) -> None:
    """Checkpoint the step just done (rundir.py), then prune the older checkpoints. Every rank calls
    it (a sharded optimiser's moments are gathered); rank 0 writes, and every rank learns the path.
    Nothing non-finite is published (:func:`check_publishable`)."""
    check_publishable(job)
    cfg = job.cfg
    optimizer = job.parallel.checkpoint_optimizer(job.optimizer, job.model)
    if job.parallel.rank != 0:
        job.newest = Path(job.parallel.comm.broadcast_text(None))
        return
    job_settings = {k: getattr(cfg, k) for k in ("checkpoint_every", "keep_checkpoints", "log_every", "threads")}
    job_settings["corpus"] = None if cfg.corpus is None else os.path.abspath(str(cfg.corpus))
    run_state = {"run": cfg.run_settings(), "job": job_settings, "config_source": job.config_source,
                 "elapsed": elapsed, "tokens": job.tokens_seen}
    job.newest = rundir.save_checkpoint(job.out, job.step, job.model, optimizer, job.stream, job.tokenizer,
                                        run_state)
    rundir.prune_checkpoints(job.out, job.newest, job.cfg.keep_checkpoints)
    job.parallel.comm.broadcast_text(str(job.newest))
