"""The ``ref-bert`` command: the command-line layer, and the only one.

Each subcommand is a module of this package (``ref_bert/cli/<name>.py``) exposing
``add_arguments(parser)`` and ``run(args) -> int`` (0 on success, 1 when the work ran and found a
failure, e.g. a divergence or a failing gradient check): argument parsing lives here, the work in
library functions (``ref_bert.pretrain``, ``ref_bert.golden``, ``ref_bert.verify``,
``benchmarks``, ...), which take arguments, not an argparse namespace. Subcommand modules keep heavy
or optional imports (torch, transformers, matplotlib) inside ``run`` so that building the parser stays
cheap and a missing optional dependency only affects the command that needs it.

Errors are reported in one place, :func:`main`: a ``ValueError`` (bad arguments, unreadable input, a
missing optional dependency) or ``backends.BackendUnavailable`` raised by any subcommand is printed as
``error: <message>`` on stderr, without a traceback, and the exit status is 2 (argparse's own status
for a usage error)."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("ref_bert.cli.gradcheck", "gradient-check every op and every model parameter (float64)"),
    "masks": ("ref_bert.cli.masks", "print the UniLM attention masks as labelled grids (--png to draw them)"),
    "generate": ("ref_bert.cli.generate", "seq2seq decoding (greedy or beam search) from a saved model"),
    "golden": ("ref_bert.cli.golden", "write a golden file: inputs, parameters, every activation, losses, gradients, K steps"),
    "verify": ("ref_bert.cli.verify", "divergence report: ref-bert vs transformers (--hf), or a candidate vs a golden file"),
    "pretrain": ("ref_bert.cli.pretrain", "ALBERT pretraining (MLM + SOP) with LAMB, atomic resumable checkpoints"),
    "bench": ("ref_bert.cli.bench", "time a training step and a forward pass against PyTorch (and the sgemm peak)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ref-bert", description="ALBERT/BERT/UniLM reference in NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    import backends

    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, backends.BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
