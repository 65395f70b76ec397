"""``ref-bert masks``: print the UniLM self-attention masks as labelled grids (for teaching).

    ref-bert masks --kind seq2seq --source 3 --target 4 --pad 2
    ref-bert masks --kind all --source 2 --target 2 --png masks.png

The layout is [CLS] s1..sN [SEP] t1..tM [SEP] [PAD]*pad (N = --source, M = --target); for the
bidirectional and unidirectional kinds the two segments are sentences A and B. Rows are queries,
columns keys; "1" means the query may attend the key.
"""
from __future__ import annotations

import sys

from .masks import MASK_KINDS, format_mask, normalize_kind, token_labels, unilm_mask


def add_arguments(parser) -> None:
    parser.add_argument("--kind", default="all",
                        help=f"one of {', '.join(MASK_KINDS)} (hyphens allowed), or 'all' (default)")
    parser.add_argument("--source", type=int, default=3,
                        help="source (sentence A) tokens, without [CLS] and [SEP] (default 3)")
    parser.add_argument("--target", type=int, default=3,
                        help="target (sentence B) tokens, without the final [SEP] (default 3)")
    parser.add_argument("--pad", type=int, default=0, help="padding tokens after the final [SEP] (default 0)")
    parser.add_argument("--png", metavar="FILE", help="also draw every kind side by side into FILE (needs matplotlib)")


def _layout(kind: str, source: int, target: int, pad: int):
    """(mask, labels) for one kind in the teaching layout."""
    labels = token_labels(kind, source, target, pad)
    num_real = source + target + 3
    mask = unilm_mask(kind, len(labels), num_real, source_len=source + 2)
    return mask, labels


def _draw_png(path: str, source: int, target: int, pad: int) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--png needs matplotlib, which is not installed (pip install 'ref-bert[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MASK_KINDS), figsize=(4.2 * len(MASK_KINDS), 5.0))
    for ax, kind in zip(axes, MASK_KINDS):
        mask, labels = _layout(kind, source, target, pad)
        ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.6)  # allowed = grey, blocked = white
        ax.set_title(kind.replace("_", "-"))
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle("UniLM self-attention masks (shaded: query may attend key)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    for name in ("source", "target", "pad"):
        value = getattr(args, name)
        if value < 0:
            raise ValueError(f"--{name}={value} is invalid: expected a non-negative integer")
    kinds = MASK_KINDS if args.kind == "all" else (normalize_kind(args.kind),)
    blocks = []
    for kind in kinds:
        mask, labels = _layout(kind, args.source, args.target, args.pad)
        title = f"{kind} (rows: queries, columns: keys, 1 = may attend)"
        if kind == "seq2seq":
            title += f"; source segment = first {args.source + 2} tokens"
        blocks.append(title + "\n" + format_mask(mask, labels))
    sys.stdout.write("\n\n".join(blocks) + "\n")
    if args.png:
        _draw_png(args.png, args.source, args.target, args.pad)
        sys.stdout.write(f"wrote {args.png}\n")
    return 0
