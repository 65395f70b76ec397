"""``ref-bert pretrain``: argument parsing and error reporting (the work is in :mod:`ref_bert.pretrain`).

    ref-bert pretrain                                   # tiny config, packaged corpus
    ref-bert pretrain --out runs/a --steps 2000 --checkpoint-every 200 --until 1000
    ref-bert pretrain --out runs/a --resume                 # the recorded settings: on to step 2000
    ref-bert pretrain --out runs/a --resume --steps 3000    # extend the finished run
    mpiexec -n 2 ref-bert pretrain --out runs/b --grad-accum 2   # data parallel, bit-identical to one process
"""
from __future__ import annotations


from . import add_run_arguments, parse_override
from ..config import PRESETS
from ..model import DTYPES
from ..pretrain import OPTIMIZERS, SCHEDULES, PretrainConfig, pretrain
from ..pretrain.metrics import METRICS_NAME, PLOT_NAME
from ..pretrain.rundir import TOKENIZER_NAME

# Flags whose value a resume takes from the checkpoint unless given: their argparse default is None
# (--set's an empty list), so that "given" is "not None"; the default shown in --help is PretrainConfig's.
RECORDED_FLAGS = ("corpus", "config", "objective", "sop_weight", "steps", "batch_size", "grad_accum", "seq_len",
                  "optimizer", "lr", "schedule", "warmup", "seed", "dtype", "checkpoint_every",
                  "keep_checkpoints", "log_every")



def add_arguments(parser) -> None:
    d = PretrainConfig()
    parser.epilog = (
        "Resume: --resume continues OUT's run with the settings its checkpoint recorded (model config, corpus, "
        "steps, batch, schedule, seed, dtype, checkpointing, threads); a flag given with it overrides, except those "
        "that change the run's arithmetic (all of the above but --steps and the checkpoint/log flags), which "
        "must match. --resume --steps N extends a run (also a finished one): the learning-rate schedule is "
        "re-derived for N steps (the recorded warmup kept), so the steps after the checkpoint take the rates "
        "of an N-step run while those already done keep theirs; the result is not that of an N-step run "
        "from scratch. Ctrl-C writes a checkpoint of the last completed step (a second Ctrl-C stops at once). "
        "Threads: on a CPU the job uses one BLAS thread by default (--threads): the tiny config's matrices "
        "are too small for threads to pay, and threads sharing busy cores wait on each other. Larger "
        "configs may gain from --threads N with --grad-accum >= N: each step's micro-batches run N at a time, "
        "one BLAS thread each, so the results are the same bit for bit whatever N.")
    a = parser.add_argument
    a("--out", default=d.out, metavar="DIR", help=f"output directory (default {d.out})")
    a("--corpus", default=None, metavar="FILE",
      help="UTF-8 text, one sentence per line, blank lines between documents (default: the packaged corpus)")
    a("--tokenizer", default=None, metavar="FILE|DIR",
      help="SentencePiece model file, or a checkpoint directory with one (an ALBERT checkpoint, save_hf output, a "
           "pretraining run; its tokenizer_config.json gives lower-casing and accents); default: train one on the "
           "corpus with the config's vocab_size (saved as OUT/spiece.model)")
    a("--config", default=None, metavar="PRESET|FILE|DIR",
      help=f"model config: a preset ({', '.join(sorted(PRESETS))}), a config.json, or a model directory "
           f"(ref-bert's or Hugging Face's) (default {d.config})")
    a("--set", action="append", default=[], metavar="KEY=VALUE", dest="config_set",
      help="override a config field, e.g. --set hidden_dropout_prob=0 (repeatable; VALUE is JSON or a string; "
           "default: none)")
    a("--backend", default=None, help="numpy or cupy (default: $REF_BERT_BACKEND or numpy)")
    a("--dtype", default=None, choices=DTYPES,
      help=f"(default {d.dtype}: float64 where numbers are compared to another implementation (golden, verify), "
           f"float32 where a model is trained, timed or used (pretrain, bench, generate))")
    a("--objective", default=None, help=f"albert (MLM + SOP) or unilm (UniLM's mix of bidirectional + SOP, seq2seq, "
                                        f"left-to-right and right-to-left masks; default {d.objective})")
    a("--sop-weight", type=float, default=None,
      help=f"weight w of the SOP loss in MLM + w * SOP (default {d.sop_weight:g}, which lets SOP leave chance "
           f"within the default job; ALBERT's recipe is 1)")
    a("--steps", type=int, default=None,
      help=f"optimiser steps; the schedule spans them; with --resume, a new total extends the run (see below) "
           f"(default {d.steps})")
    a("--batch-size", type=int, default=None, help=f"examples per micro-batch (default {d.batch_size})")
    a("--grad-accum", type=int, default=None,
      help=f"micro-batches per step, gradients weighted to equal one batch of grad_accum*batch_size "
           f"(default {d.grad_accum})")
    a("--seq-len", type=int, default=None, help=f"tokens per example, [CLS] and [SEP]s included (default {d.seq_len})")
    a("--optimizer", default=None, choices=OPTIMIZERS,
      help=f"lamb (= ALBERT's LAMB), another LAMB preset, or adamw / adamw-bert (default {d.optimizer})")
    a("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    a("--schedule", default=None, choices=SCHEDULES,
      help=f"albert: warmup then polynomial decay counted from step 0; linear: Hugging Face's (default {d.schedule})")
    a("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    a("--seed", type=int, default=None, help=f"weights, dropout and data all derive from it (default {d.seed})")
    a("--checkpoint-every", type=int, default=None, metavar="N",
      help=f"write a checkpoint every N steps, at the end, and on Ctrl-C (default {d.checkpoint_every})")
    a("--keep-checkpoints", type=int, default=None, metavar="K",
      help=f"keep the K newest checkpoints, 0 = all (default {d.keep_checkpoints})")
    a("--log-every", type=int, default=None, metavar="N",
      help=f"log (and read the loss on the host: a device sync on GPUs) every N steps (default {d.log_every})")
    a("--shard-optimizer", action="store_true",
      help="ZeRO stage 1: each rank keeps the optimiser moments of its share of the tensors only; "
           "bit-identical to the default (replicated) optimiser (default: replicated)")
    add_run_arguments(parser, "pretraining")
    a("--no-plot", action="store_true", help=f"do not draw OUT/{PLOT_NAME} (default: drawn)")


def config_from_args(args) -> tuple:
    """The job's settings from the parsed flags: ``(base, given)``, ``given`` holding only the flags
    passed on the command line (for :func:`ref_bert.pretrain.pretrain`'s keywords, so that a resume takes
    the others from the checkpoint)."""
    given = {name: getattr(args, name) for name in RECORDED_FLAGS if getattr(args, name) is not None}
    if args.config_set:
        given["config_overrides"] = dict(parse_override(text) for text in args.config_set)
    if args.warmup is None:
        given.pop("warmup", None)
    base = PretrainConfig(out=args.out, tokenizer=args.tokenizer, backend=args.backend, resume=args.resume,
                          until=args.until, threads=args.threads, comm=args.comm,
                          shard_optimizer=args.shard_optimizer, progress=not args.no_progress,
                          plot=not args.no_plot, overwrite=args.overwrite)
    return base, given


def run(args) -> int:
    """The CLI entry; bad input raises ValueError, which :func:`ref_bert.cli.main` reports as ``error: ...``
    with exit status 2. Ctrl-C exits 130 (after writing a checkpoint of the last completed step)."""
    base, given = config_from_args(args)
    try:
        result = pretrain(base, **given)
    except KeyboardInterrupt:
        return 130
    if result.rank != 0:   # a data-parallel run: rank 0 reports
        return 0
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
