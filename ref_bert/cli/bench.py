"""``ref-bert bench`` (also ``python -m benchmarks``): ref-bert against Hugging Face transformers on
PyTorch, training step and forward pass (the measuring is :func:`benchmarks.bench.run_benchmark`)."""
from __future__ import annotations

import argparse

from benchmarks.bench import DEFAULT_CONFIGS, SYSTEMS   # standard library only at import time

from . import DTYPE_RULE, add_progress_flag, resolve_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), metavar="PRESET|FILE|DIR",
                        help="config(s) to measure, each a preset, a config.json file or a model directory (its "
                             "config; weights from --seed) (default albert-base); tiny, albert-base and bert-base "
                             "are the documented points")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--masked-fraction", type=float, default=0.15,
                        help="labelled MLM positions per sequence, as a fraction of --seq-len")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each system this many times, alternating (fresh process each); the median is "
                             "over every timed step of every round")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                        help="what to measure")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "cupy"),
                        help="numpy (CPU, against PyTorch CPU) or cupy (GPU, against PyTorch CUDA); both run in "
                             f"float32 (the rule: {DTYPE_RULE})")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS and PyTorch (default: all cores, os.cpu_count())")
    parser.add_argument("--shards", type=int, default=2,
                        help="ref-bert's step as the pretraining loop runs it: the batch in this many micro-batches, "
                             "side by side on the threads with one-thread BLAS each, summed in a fixed order (results "
                             "independent of --threads); 1: one pass over the whole batch, BLAS on every thread")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matrix size n of the n^3 sgemm peak (default 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--peak-repeats", type=int, default=5, help="sgemm repetitions; the best counts")
    parser.add_argument("--decode", type=int, nargs="*", default=None, metavar="LENGTH",
                        help="also time cached decoding per token at these target lengths (benchmarks/decode_cache.py)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="print a cProfile of this many ref-bert training steps (to stderr) before timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every number to FILE as JSON")
    add_progress_flag(parser)
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)


def check_args(args) -> None:
    """A ValueError naming the flag for values argparse's types let through."""
    for name in ("batch_size", "seq_len", "steps", "peak_repeats", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.masked_fraction <= 1.0:
        raise ValueError(f"--masked-fraction must be in (0, 1], got {args.masked_fraction}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.shards <= args.batch_size:
        raise ValueError(f"--shards must be between 1 and --batch-size ({args.batch_size}), got {args.shards}")


def run(args) -> int:
    from benchmarks import bench
    from ref_bert.config import PRESETS

    if args.worker is not None:
        return bench.worker_main(*args.worker)
    check_args(args)
    if args.backend == "cupy":
        import backends

        try:
            backends.get("cupy")
        except backends.BackendUnavailable as e:
            raise ValueError(f"--backend cupy cannot run here: {e}") from None
    configs = [value if value in PRESETS else resolve_config(value)[0] for value in args.config]
    bench.run_benchmark(configs=configs, batch=args.batch_size, seq=args.seq_len, masked_fraction=args.masked_fraction,
                        warmup=args.warmup, steps=args.steps, rounds=args.rounds, systems=args.systems,
                        backend=args.backend, threads=args.threads, shards=args.shards, peak_size=args.peak_size,
                        peak_repeats=args.peak_repeats, decode=args.decode, profile=args.profile, seed=args.seed,
                        json_path=args.json, progress=not args.no_progress)
    return 0
