"""``ref-bert verify``: the divergence report (the work is in :mod:`ref_bert.verify`).

    ref-bert verify --hf DIR                              transformers vs ref-bert on the same inputs and weights
    ref-bert verify --hf DIR --text "Your sentence."      ... on the checkpoint's own tokenization of your text
    ref-bert verify --golden FILE --candidate FILE        another implementation's dump vs a golden file

``--hf DIR`` takes any kind of model directory ref-bert writes or reads: a Hugging Face one (transformers'
or ``save_hf``'s) is loaded by both sides; a ref-bert one (``save_model``, pretrain) is written once with
``save_hf`` into a temporary directory, which both sides then load. One line on stderr names the kind found.

Exit status 0 when every tensor is within tolerance, 1 when one is not, 2 for a usage error.
"""
from __future__ import annotations

import sys

from . import DTYPE_RULE, add_progress_flag, add_text_arguments, describe_text_batch, read_texts


def add_arguments(parser) -> None:
    parser.add_argument("--hf", metavar="DIR",
                        help="compare ref-bert with transformers on this model directory (Hugging Face's, "
                             "save_hf's, or ref-bert's, converted through save_hf)")
    parser.add_argument("--golden", metavar="FILE", help="a golden file (ref-bert golden)")
    parser.add_argument("--candidate", metavar="FILE", help="another implementation's dump in the golden format")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                        help=f"--hf only: the dtype both sides run in (default float64; the rule: {DTYPE_RULE})")
    parser.add_argument("--seed", type=int, default=0, help="--hf only: inputs seed")
    parser.add_argument("--batch-size", type=int, default=2, help="--hf only: sequences in the batch")
    parser.add_argument("--seq-len", type=int, default=16, help="--hf only: tokens per sequence")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance (default: 1e-10 float64, 1e-5 float32)")
    parser.add_argument("--atol", type=float, default=None,
                        help="absolute tolerance, times the section's largest value (default: 1e-12 / 1e-6)")
    add_text_arguments(parser, "compare")
    parser.add_argument("--allow-missing", action="store_true",
                        help="--golden only: candidate tensors that are absent do not fail the check")
    parser.add_argument("--equal-nan", action="store_true",
                        help="--golden only: a NaN on both sides counts as a match (default: a mismatch)")
    parser.add_argument("--failures-only", action="store_true", help="print only the rows out of tolerance")
    add_progress_flag(parser)


def _verify_directory(args):
    """verify_hf on ``args.hf`` of either kind; a ref-bert directory goes through save_hf first."""
    import tempfile

    from ref_bert.checkpoint import REF_BERT_DIRECTORY, describe_kind, directory_kind, load_any
    from ref_bert.verify import require_transformers, verify_hf

    require_transformers()   # before looking at the directory: the missing dependency is the first problem
    texts = read_texts(args)
    kind = directory_kind(args.hf)
    run = dict(dtype=args.dtype, seed=args.seed, batch=args.batch_size, seq_len=args.seq_len, rtol=args.rtol,
               atol=args.atol, progress=not args.no_progress)
    text_notes = []

    def text_inputs(tokenizer, config):
        from ref_bert.examples import text_batch

        inputs = text_batch(tokenizer, config, texts, truncation=args.truncate, seed=args.seed)
        text_notes.extend(describe_text_batch(tokenizer, inputs))
        return inputs

    if kind != REF_BERT_DIRECTORY:
        print(f"verify: found {describe_kind(kind)} at {args.hf}", file=sys.stderr)
        if texts is not None:
            from ref_bert.checkpoint import load_config_any
            from ref_bert.hf import transformer_directory
            from ref_bert.tokenization import Tokenizer

            run["inputs"] = text_inputs(Tokenizer.from_hf(transformer_directory(args.hf)),
                                        load_config_any(args.hf)[0])
        report = verify_hf(args.hf, **run)
        report.notes[1:1] = text_notes
        return report
    note = "found a ref-bert model directory; comparing it with transformers through save_hf"
    print(f"verify: {note} ({args.hf})", file=sys.stderr)
    model, _ = load_any(args.hf, dtype=args.dtype, tokenizer=texts is not None)
    if texts is not None:
        run["inputs"] = text_inputs(model.tokenizer, model.config)
    with tempfile.TemporaryDirectory(prefix="ref-bert-verify-") as tmp:
        model.save_hf(tmp)
        report = verify_hf(tmp, **run)
    report.notes[1:1] = text_notes
    report.notes.insert(0, f"note: {note}")
    return report


def run(args) -> int:
    from ref_bert.verify import format_report, verify_files

    if args.hf is None and (args.text is not None or args.text_file is not None):
        raise ValueError("--text and --text-file need --hf DIR (the checkpoint whose tokenizer reads them)")
    if args.hf is not None:
        if args.golden or args.candidate:
            raise ValueError("give either --hf DIR or --golden FILE --candidate FILE, not both")
        report = _verify_directory(args)
        title = f"ref-bert verify --hf {args.hf}"
    elif args.golden and args.candidate:
        report = verify_files(args.golden, args.candidate, args.rtol, args.atol, args.allow_missing, args.equal_nan)
        title = f"ref-bert verify --golden {args.golden} --candidate {args.candidate}"
    else:
        raise ValueError("give --hf DIR, or both --golden FILE and --candidate FILE")
    print(format_report(report, title, show="failures" if args.failures_only else "all"))
    return 0 if report.ok else 1
