"""``ref-bert masks``: print the UniLM self-attention masks as labelled grids (for teaching; the masks
are :mod:`ref_bert.masks`).

    ref-bert masks --kind seq2seq --source 3 --target 4 --pad 2
    ref-bert masks --kind all --source 2 --target 2 --png masks.png

The layout is [CLS] s1..sN [SEP] t1..tM [SEP] [PAD]*pad (N = --source, M = --target); for the
bidirectional and unidirectional kinds the two segments are sentences A and B. Rows are queries,
columns keys; "1" means the query may attend the key.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ref_bert.masks import MASK_KINDS

MAX_TOKENS = 512   # per segment: a printed grid is for reading; 512 is BERT's whole sequence


def add_arguments(parser) -> None:
    parser.add_argument("--kind", default="all",
                        help=f"one of {', '.join(MASK_KINDS)} (hyphens allowed), or 'all' (default)")
    parser.add_argument("--source", type=int, default=3,
                        help="source (sentence A) tokens, without [CLS] and [SEP] (default 3)")
    parser.add_argument("--target", type=int, default=3,
                        help="target (sentence B) tokens, without the final [SEP] (default 3)")
    parser.add_argument("--pad", type=int, default=0, help="padding tokens after the final [SEP] (default 0)")
    parser.add_argument("--png", metavar="FILE", help="also draw every kind side by side into FILE (needs matplotlib)")


def run(args) -> int:
    from ref_bert.masks import draw_masks_png, format_mask, normalize_kind, teaching_mask

    for name in ("source", "target", "pad"):
        value = getattr(args, name)
        if not 0 <= value <= MAX_TOKENS:
            raise ValueError(f"--{name}={value} is invalid: expected an integer in [0, {MAX_TOKENS}] (the grid is "
                             f"printed for reading)")
    if args.png and Path(args.png).is_dir():   # before drawing, not after
        raise ValueError(f"--png {args.png} is a directory; expected the path of the image file to write")
    kinds = MASK_KINDS if args.kind == "all" else (normalize_kind(args.kind),)
    blocks = []
    for kind in kinds:
        mask, labels = teaching_mask(kind, args.source, args.target, args.pad)
        title = f"{kind} (rows: queries, columns: keys, 1 = may attend)"
        if kind == "seq2seq":
            title += f"; source segment = first {args.source + 2} tokens"
        blocks.append(title + "\n" + format_mask(mask, labels))
    sys.stdout.write("\n\n".join(blocks) + "\n")
    if args.png:
        draw_masks_png(args.png, args.source, args.target, args.pad)
        sys.stdout.write(f"wrote {args.png}\n")
    return 0
