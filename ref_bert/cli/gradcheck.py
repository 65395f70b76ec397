"""``ref-bert gradcheck`` (also ``python -m gradcheck``): the gradient-check battery
(the work is :func:`gradcheck.battery.run_battery`). Exit status 1 when any check fails."""
from __future__ import annotations

import time

from gradcheck.core import DEFAULT_FLOOR, DEFAULT_RTOL

from . import add_progress_flag


def add_arguments(parser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and directions (default 0)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance (default 1e-6)")
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR,
                        help="relative-error floor (default 1e-4: absolute 1e-10 for ~zero gradients)")
    parser.add_argument("--verbose", action="store_true", help="print every tensor's result")
    add_progress_flag(parser)


def run(args) -> int:
    from gradcheck import battery

    start = time.perf_counter()
    ok = battery.run_battery(seed=args.seed, rtol=args.rtol, floor=args.floor, verbose=args.verbose,
                             progress=not args.no_progress)
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if ok else 1
