"""``ref-bert generate``: seq2seq decoding from a model directory (the decoding is
:func:`ref_bert.generate.generate`). Any kind of model directory ref-bert writes or reads is accepted:
its own (``save_model``, pretrain output and checkpoints), ``save_hf``'s, or a Hugging Face one; one
line on stderr names the kind found.

    ref-bert generate --checkpoint DIR --source "a sentence to transform"
    ref-bert generate --checkpoint DIR --source-ids "5 17 9" --source-ids "8 8" --beam-size 4

``--source`` (repeatable) is encoded with the SentencePiece tokenizer in DIR/spiece.model and the output
decoded with it; ``--source-ids`` (repeatable) takes token ids and prints ids, so the command works
without a tokenizer. Several sources are decoded as one batch; one output line per source.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import DTYPE_RULE


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="model directory: ref-bert's (save_model, pretrain), save_hf's, or a Hugging Face one")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--source", action="append", help="source text (repeatable); needs DIR/spiece.model")
    group.add_argument("--source-ids", action="append", metavar="IDS",
                       help='source token ids separated by spaces, e.g. "5 17 9" (repeatable)')
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy search (default 1)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="most tokens per output, final [SEP] included (default: what the position table allows)")
    parser.add_argument("--min-length", type=int, default=0, help="fewest tokens before [SEP] (default 0)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha (default 0: none)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams (0 = off)")
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence at every step")
    parser.add_argument("--backend", default=None, help="numpy or cupy (default: $REF_BERT_BACKEND or numpy)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help=f"default float32; the rule: {DTYPE_RULE}")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of any head a Hugging Face directory lacks (drawn fresh)")
    parser.add_argument("--scores", action="store_true", help="print each output's length-penalised log-probability")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        raise ValueError(f"--source-ids {text!r} is invalid: expected integers separated by spaces") from None


def run(args) -> int:
    from ref_bert.checkpoint import describe_kind, load_any
    from ref_bert.generate import generate

    model, kind = load_any(args.checkpoint, backend=args.backend, dtype=args.dtype, seed=args.seed)
    print(f"generate: found {describe_kind(kind)} at {args.checkpoint}", file=sys.stderr)
    tokenizer = None
    if args.source is not None:
        spiece = Path(args.checkpoint) / "spiece.model"
        if not spiece.is_file():
            raise ValueError(f"--source needs a tokenizer at {spiece}, which does not exist; "
                             f"pass token ids with --source-ids instead")
        from ref_bert.data.tokenizer import Tokenizer   # imported here: the command works without it for --source-ids

        tokenizer = Tokenizer.load(str(spiece))
        sources = [tokenizer.encode(text) for text in args.source]
    else:
        sources = [_parse_ids(text) for text in args.source_ids]
    out = generate(model, sources, max_length=args.max_length, beam_size=args.beam_size,
                   min_length=args.min_length, length_penalty_alpha=args.length_penalty,
                   no_repeat_ngram_size=args.no_repeat_ngram_size, use_cache=not args.no_cache)
    for sequence, score in zip(out.sequences, out.scores):
        text = tokenizer.decode(sequence) if tokenizer is not None else " ".join(str(t) for t in sequence)
        sys.stdout.write((f"{score:.6f}\t" if args.scores else "") + text + "\n")
    return 0
