"""``ref-bert pretrain``: argument parsing and error reporting (the work is in :mod:`ref_bert.pretrain`).

    ref-bert pretrain                                   # tiny config, packaged corpus
    ref-bert pretrain --out runs/a --steps 2000 --checkpoint-every 200
    ref-bert pretrain --out runs/a --steps 2000 --checkpoint-every 200 --resume
"""
from __future__ import annotations

import json
import os
import sys

import backends

from ..config import PRESETS
from ..model import DTYPES
from ..pretrain import OPTIMIZERS, SCHEDULES, PretrainConfig, limit_blas_threads, pretrain
from ..pretrain.metrics import METRICS_NAME, PLOT_NAME
from ..pretrain.rundir import TOKENIZER_NAME


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
           f"within the default job; ALBERT's recipe is 1)")
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
    """The CLI entry; bad input raises ValueError, which :func:`ref_bert.cli.main` reports as ``error: ...``
    with exit status 2. Ctrl-C exits 130."""
    cfg = config_from_args(args)
    threads = _default_blas_threads(args) if args.blas_threads is None else args.blas_threads
    if threads < 0:
        raise ValueError(f"--blas-threads={threads} is invalid: expected 0 (leave alone) or a positive count")
    if threads and limit_blas_threads(threads) is None:
        print(f"note: no BLAS library found: --blas-threads {threads} set only ref-bert's own threads "
              f"(set OMP_NUM_THREADS before starting Python for BLAS)", file=sys.stderr)
    try:
        result = pretrain(cfg)
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
