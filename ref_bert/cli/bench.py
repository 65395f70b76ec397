"""``ref-bert bench`` (also ``python -m benchmarks``): ref-bert against Hugging Face transformers on
PyTorch, training step and forward pass (the measuring is :func:`benchmarks.bench.run_benchmark`)."""
from __future__ import annotations

import argparse

from benchmarks.bench import DEFAULT_CONFIGS, SYSTEMS   # standard library only at import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ref_bert.config import PRESETS

    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), choices=sorted(PRESETS),
                        help="preset(s) to measure (default albert-base); tiny, albert-base and bert-base are the "
                             "documented points")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--masked-fraction", type=float, default=0.15,
                        help="labelled MLM positions per sequence, as a fraction of --seq (default 0.15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each system this many times, alternating (fresh process each); the median is "
                             "over every timed step of every round (default 1)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                        help="what to measure (default both)")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "cupy"),
                        help="numpy (CPU, against PyTorch CPU) or cupy (GPU, against PyTorch CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS and PyTorch (default: all cores, os.cpu_count())")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matrix size n of the n^3 sgemm peak (default 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--peak-repeats", type=int, default=5, help="sgemm repetitions; the best counts")
    parser.add_argument("--decode", type=int, nargs="*", default=None, metavar="LENGTH",
                        help="also time cached decoding per token at these target lengths (benchmarks/decode_cache.py)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="print a cProfile of this many ref-bert training steps (to stderr) before timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every number to FILE as JSON")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)


def check_args(args) -> None:
    """A ValueError naming the flag for values argparse's types let through."""
    for name in ("batch", "seq", "steps", "peak_repeats", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.masked_fraction <= 1.0:
        raise ValueError(f"--masked-fraction must be in (0, 1], got {args.masked_fraction}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def run(args) -> int:
    from benchmarks import bench

    if args.worker is not None:
        return bench.worker_main(*args.worker)
    check_args(args)
    if args.backend == "cupy":
        import backends

        try:
            backends.get("cupy")
        except backends.BackendUnavailable as e:
            raise ValueError(f"--backend cupy cannot run here: {e}") from None
    bench.run_benchmark(configs=args.config, batch=args.batch, seq=args.seq, masked_fraction=args.masked_fraction,
                        warmup=args.warmup, steps=args.steps, rounds=args.rounds, systems=args.systems,
                        backend=args.backend, threads=args.threads, peak_size=args.peak_size,
                        peak_repeats=args.peak_repeats, decode=args.decode, profile=args.profile, seed=args.seed,
                        json_path=args.json)
    return 0
