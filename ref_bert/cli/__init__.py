"""The ``ref-bert`` command: the command-line layer, and the only one.

Each subcommand is a module of this package (``ref_bert/cli/<name>.py``) exposing
``add_arguments(parser)`` and ``run(args) -> int`` (0 on success, 1 when the work ran and found a
failure, e.g. a divergence or a failing gradient check): argument parsing lives here, the work in
library functions (``ref_bert.pretrain``, ``ref_bert.golden``, ``ref_bert.verify``,
``benchmarks``, ...), which take arguments, not an argparse namespace. Subcommand modules keep heavy
or optional imports (torch, transformers, matplotlib) inside ``run`` so that building the parser stays
cheap and a missing optional dependency only affects the command that needs it.

Errors are reported in one place, :func:`main`: a ``ValueError`` (bad arguments, unreadable input, a
missing optional dependency), ``backends.BackendUnavailable`` or an ``OSError`` (a path that cannot be
written or read: a directory where a file was expected, a full disk, no permission) raised by any
subcommand is printed as ``error: <message>`` on stderr, without a traceback, and the exit status is 2
(argparse's own status for a usage error). ``ref-bert --debug COMMAND ...`` shows the traceback too.

One vocabulary of flags across the commands: ``--batch-size``, ``--seq-len``, ``--threads`` (BLAS and
PyTorch threads), ``--config PRESET|FILE|DIR`` (:func:`resolve_config`), ``--dtype`` (its default follows
:data:`DTYPE_RULE`), ``--no-progress`` (progress bars go to stderr), ``--seed``, ``--backend``. Every
default is shown in ``--help`` (:class:`HelpFormatter`)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

DTYPE_RULE = ("float64 where numbers are compared to another implementation (golden, verify), float32 where a "
              "model is trained, timed or used (pretrain, bench, generate)")


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default in ``--help``: "(default: X)" is appended to a help text that does not
    already name its default (an option whose default is None or False has none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def version() -> str:
    """ref-bert's version: ``ref_bert.__version__``, else the installed distribution's, else "unknown"."""
    try:
        from ref_bert import __version__

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("ref-bert")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def resolve_config(value: str):
    """``--config PRESET|FILE|DIR`` -> (Config, a description for messages): a preset name, a ref-bert
    Config JSON file, or a model directory of either kind (:func:`ref_bert.checkpoint.load_config_any`)."""
    from pathlib import Path

    from ref_bert.config import PRESETS, Config

    if value in PRESETS:
        return Config.preset(value), f"preset:{value}"
    path = Path(value)
    if path.is_dir():
        from ref_bert.checkpoint import describe_kind, load_config_any

        config, kind = load_config_any(path)
        return config, f"config of {describe_kind(kind)} {path}"
    if path.is_file():
        from ref_bert.files import read_json

        raw = read_json(path, "config file")
        if not isinstance(raw, dict):
            raise ValueError(f"--config {value}: holds a JSON {type(raw).__name__}, expected a Config object")
        return Config.from_dict(raw), f"config file {path}"
    raise ValueError(f"--config {value!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
                     f"config.json file or model directory")


def add_progress_flag(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")


def add_run_arguments(parser, job: str) -> None:
    """The flags of a training run's directory and processes, shared by ``pretrain`` and ``finetune``
    (``job`` names the run in the help): --until, --resume, --overwrite, --threads, --comm, --no-progress."""
    from backends.comm import KINDS as COMM_KINDS

    a = parser.add_argument
    a("--until", type=int, default=None, metavar="STEP",
      help="stop after this step with a checkpoint; --resume later to finish the --steps schedule "
           "(default: run to --steps)")
    a("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
      help=f"continue from OUT/latest, or from the given checkpoint directory, with its recorded settings "
           f"(default: a new {job} run; OUT must not hold one)")
    a("--overwrite", action="store_true",
      help="let --out be an existing directory that is not this run's (a model directory, another run): this run "
           "replaces its files (default: refused, so that nothing that is not this run's is overwritten)")
    a("--threads", type=int, default=None, metavar="N",
      help="BLAS threads (and the numpy backend's own) for the run; 0 leaves them alone (default: 1 on the "
           "numpy backend unless OPENBLAS_NUM_THREADS or OMP_NUM_THREADS is set, else 0)")
    a("--comm", default="auto", choices=COMM_KINDS,
      help="communicator of a data-parallel run: auto = one process unless started by 'mpiexec -n N' (then "
           "mpi on the numpy backend, nccl on cupy); --grad-accum must be a multiple of N; the parameters are "
           "bit-identical to one process with the same --batch-size and --grad-accum (default auto)")
    a("--no-progress", action="store_true", help="no progress bar (default: shown)")


def parse_override(text: str) -> tuple:
    """``--set KEY=VALUE``: (KEY, VALUE parsed as JSON, or the bare string, e.g. --set hidden_act=relu)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r} is invalid: expected KEY=VALUE with KEY a Config field")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value

def add_text_arguments(parser, command: str) -> None:
    """``--text``, ``--text-file``, ``--truncate``: run on the checkpoint's own tokenization of real text."""
    parser.add_argument("--text", action="append", default=None, metavar="TEXT",
                        help=f"--hf only: {command} on this text, tokenized by the checkpoint's own tokenizer "
                             f"(repeatable: one sequence each; default: synthetic ids)")
    parser.add_argument("--text-file", default=None, metavar="FILE",
                        help="--hf only: texts from a UTF-8 file, one sequence a line (blank lines skipped)")
    parser.add_argument("--truncate", action="store_true",
                        help="cut a text longer than the model's position table (default: it is an error)")


def read_texts(args):
    """The texts of ``--text`` and ``--text-file`` (in that order), or None when neither was given."""
    from pathlib import Path

    texts = list(args.text or [])
    if args.text_file is not None:
        path = Path(args.text_file)
        if not path.is_file():
            raise ValueError(f"--text-file {args.text_file!r} does not exist; expected a UTF-8 text file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"--text-file {args.text_file!r} is not UTF-8 text ({e})") from None
        file_texts = [line for line in lines if line.strip()]
        if not file_texts:
            raise ValueError(f"--text-file {args.text_file!r} has no non-blank line; expected one text a line")
        texts += file_texts
    if args.text_file is None and args.text is None:
        return None
    return texts


def describe_text_batch(tokenizer, inputs: dict, limit: int = 16) -> list:
    """One line per row of a text batch: its length and first tokens, for the report."""
    lines = []
    for b, row in enumerate(inputs["input_ids"]):
        n = int(inputs["attention_mask"][b].sum())
        tokens = [tokenizer.id_to_token(i) for i in row[:min(n, limit)]]
        lines.append(f"note: text {b}: {n} tokens: {' '.join(tokens)}{' ...' if n > limit else ''}")
    return lines


# name -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("ref_bert.cli.gradcheck", "gradient-check every op and every model parameter (float64)"),
    "masks": ("ref_bert.cli.masks", "print the UniLM attention masks as labelled grids (--png to draw them)"),
    "generate": ("ref_bert.cli.generate", "seq2seq decoding (greedy or beam search) from a saved model"),
    "golden": ("ref_bert.cli.golden", "write a golden file: inputs, parameters, every activation, losses, gradients, K steps"),
    "verify": ("ref_bert.cli.verify", "divergence report: ref-bert vs transformers (--hf), or a candidate vs a golden file"),
    "pretrain": ("ref_bert.cli.pretrain", "ALBERT pretraining (MLM + SOP) with LAMB, atomic resumable checkpoints"),
    "finetune": ("ref_bert.cli.finetune", "fine-tune a task head (classification, regression, tokens, qa, multiple-choice, "
                                          "seq2seq) with checkpoints, exact resume and evaluation"),
    "bench": ("ref_bert.cli.bench", "time a training step and a forward pass against PyTorch (and the sgemm peak)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ref-bert", description="ALBERT/BERT/UniLM reference in NumPy/CuPy")
    parser.add_argument("--version", action="version", version=f"ref-bert {version()}",
                        help="print ref-bert's version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    import backends

    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, backends.BackendUnavailable, OSError) as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(e, OSError) and e.strerror:
            paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
            print(f"error: {paths + ': ' if paths else ''}{e.strerror}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
