"""The job: :func:`pretrain` prepares (everything that can fail on bad input, before anything is
written), opens the output directory, runs the loop and draws the plot."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..data import SentencePairStream, Tokenizer, check_pairable, default_corpus_path, read_corpus
from ..model import Model
from ..optim import global_grad_norm, make_optimizer
from . import rundir
from .accumulation import effective_batch_gradients
from .batches import make_stream, next_step_batch
from .metrics import StepLog, write_plot
from .settings import PretrainConfig, learning_rate, resolve_model_config, validate


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
class Job:
    """The live objects of a run and its host-side counters."""

    cfg: PretrainConfig
    out: Path
    model: Model
    optimizer: Any
    stream: SentencePairStream
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
    job = prepare(cfg)       # everything that can fail on bad input; nothing is written
    job.newest = rundir.open_output(job.out, job.history, job.tokenizer, job.model.config, job.resume_dir)
    train(job, on_step)      # from here on OUT is written
    plot = write_plot(job.out, job.history) if cfg.plot else None
    return PretrainResult(out_dir=job.out, checkpoint=job.newest, step=job.step,
                          metrics=job.history[-1] if job.history else {}, history=job.history,
                          wall_time=time.perf_counter() - started, plot=plot)


def prepare(cfg: PretrainConfig) -> Job:
    """Check the resume target, corpus and tokenizer; build the model, optimiser and data stream, and
    restore a checkpoint into them. Writes nothing, so a ValueError leaves OUT as it was."""
    out = Path(cfg.out)
    corpus = default_corpus_path() if cfg.corpus is None else str(cfg.corpus)
    model_config = resolve_model_config(cfg.config, cfg.config_overrides)
    resume_dir = rundir.resolve_resume(out, cfg.resume)
    if resume_dir is not None:
        state = rundir.load_checkpoint_state(resume_dir)
        rundir.check_resumable(cfg, model_config, resume_dir, state)
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
    optimizer = make_optimizer(cfg.optimizer, model.state_dict(), cfg.lr)
    job = Job(cfg=cfg, out=out, model=model, optimizer=optimizer, stream=stream, tokenizer=tokenizer,
              resume_dir=resume_dir)
    if resume_dir is not None:
        job.history = rundir.restore(resume_dir, state, out, model, optimizer, stream)
        job.step, job.elapsed_before, job.tokens_seen = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
    return job


def train(job: Job, on_step: OnStep = None) -> None:
    """The loop: steps ``job.step + 1 .. until`` (or ``steps``), logging and checkpointing as set.
    One step is described in the :mod:`ref_bert.pretrain` docstring: the rate is read before the
    update, from the number of updates already made."""
    cfg = job.cfg
    stop = cfg.steps if cfg.until is None else cfg.until
    log = StepLog(job.out, cfg.steps, job.step, job.elapsed_before, cfg.progress)
    try:
        while job.step < stop:
            lr = learning_rate(cfg, job.step)
            batch = next_step_batch(job.stream, cfg, job.model, job.step)
            grads, parts = effective_batch_gradients(job.model, batch.micro_batches, batch.mlm_counts,
                                                     training=True, sop_weight=cfg.sop_weight)
            checkpoint_now = job.step + 1 == stop or (job.step + 1) % cfg.checkpoint_every == 0
            log_now = checkpoint_now or (job.step + 1) % cfg.log_every == 0
            grad_norm = global_grad_norm(grads.values(), job.model.xp) if log_now else None   # before clipping
            job.optimizer.step(grads, lr=lr)
            job.step += 1
            job.tokens_seen += batch.tokens
            log.count(batch.tokens)
            record = log_step(job, log, lr, parts, grad_norm) if log_now else None
            if checkpoint_now:
                save_checkpoint(job, log.elapsed())
            if on_step is not None:
                on_step(job.step, record)
    except KeyboardInterrupt:
        log.close()
        print(f"\ninterrupted after step {job.step}; newest complete checkpoint: {job.newest} "
              f"(continue with --resume)", file=sys.stderr)
        raise
    finally:
        log.close()


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
    record = log.record(job.step, lr, loss, mlm, sop, norm, job.tokens_seen)
    if not all(math.isfinite(v) for v in (loss, mlm, sop, norm)):
        raise ValueError(f"the loss is not finite at step {job.step} (loss={loss}, mlm={mlm}, sop={sop}, "
                         f"grad_norm={norm}); this step was not checkpointed, the newest complete "
                         f"checkpoint is {job.newest}; expected finite values (try a lower --lr)")
    log.write(record)
    job.history.append(record)
    return record


def save_checkpoint(job: Job, elapsed: float) -> None:
    """Checkpoint the step just done (rundir.py), then prune the older checkpoints."""
    run_state = {"run": job.cfg.run_settings(), "config_source": str(job.cfg.config), "elapsed": elapsed,
                 "tokens": job.tokens_seen}
    job.newest = rundir.save_checkpoint(job.out, job.step, job.model, job.optimizer, job.stream, job.tokenizer,
                                        run_state)
    rundir.prune_checkpoints(job.out, job.newest, job.cfg.keep_checkpoints)
