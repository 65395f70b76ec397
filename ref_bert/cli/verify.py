"""``ref-bert verify``: the divergence report (the work is in :mod:`ref_bert.verify`).

    ref-bert verify --hf DIR                              transformers vs ref-bert on the same inputs and weights
    ref-bert verify --golden FILE --candidate FILE        another implementation's dump vs a golden file

Exit status 0 when every tensor is within tolerance, 1 when one is not, 2 for a usage error.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--hf", metavar="DIR", help="compare ref-bert with transformers on this HF model directory")
    parser.add_argument("--golden", metavar="FILE", help="a golden file (ref-bert golden)")
    parser.add_argument("--candidate", metavar="FILE", help="another implementation's dump in the golden format")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                        help="--hf only: the dtype both sides run in (default float64)")
    parser.add_argument("--seed", type=int, default=0, help="--hf only: inputs seed (default 0)")
    parser.add_argument("--batch", type=int, default=2, help="--hf only: batch size (default 2)")
    parser.add_argument("--seq-len", type=int, default=16, help="--hf only: sequence length (default 16)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance (default: 1e-10 float64, 1e-5 float32)")
    parser.add_argument("--atol", type=float, default=None,
                        help="absolute tolerance, times the section's largest value (default: 1e-12 / 1e-6)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="--golden only: candidate tensors that are absent do not fail the check")
    parser.add_argument("--failures-only", action="store_true", help="print only the rows out of tolerance")


def run(args) -> int:
    from ref_bert.verify import format_report, verify_files, verify_hf

    if args.hf is not None:
        if args.golden or args.candidate:
            raise ValueError("give either --hf DIR or --golden FILE --candidate FILE, not both")
        report = verify_hf(args.hf, args.dtype, args.seed, args.batch, args.seq_len, args.rtol, args.atol)
        title = f"ref-bert verify --hf {args.hf}"
    elif args.golden and args.candidate:
        report = verify_files(args.golden, args.candidate, args.rtol, args.atol, args.allow_missing)
        title = f"ref-bert verify --golden {args.golden} --candidate {args.candidate}"
    else:
        raise ValueError("give --hf DIR, or both --golden FILE and --candidate FILE")
    print(format_report(report, title, show="failures" if args.failures_only else "all"))
    return 0 if report.ok else 1
