"""The ``ref-bert`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, importing lazily so
``ref-bert --help`` stays fast and a subcommand's optional dependencies load only when it runs."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("gradcheck.battery", "gradient-check every op and every model parameter (float64)"),
    "pretrain": ("ref_bert.train", "ALBERT pretraining (MLM + SOP) with LAMB, atomic resumable checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ref-bert", description="ALBERT/BERT/UniLM reference in NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        try:
            command_module = importlib.import_module(module)
        except ModuleNotFoundError as e:
            # A command whose own module is not in this checkout (yet) must not break the others;
            # a missing *dependency* of an existing module still raises.
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise
            p = sub.add_parser(name, help=f"(unavailable: module {module} is missing)")
            p.set_defaults(_module=module, _missing=f"ref-bert {name}: module {module} is not installed")
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        command_module.add_arguments(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        sys.stderr.write(args._missing + "\n")
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
