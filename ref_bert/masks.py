"""UniLM self-attention masks (Dong et al. 2019, section 2; docs/reference.md §3.1).

One network, four language-modelling objectives: what changes is only which keys each query may see.
Entry ``[i, j]`` is True (1) when query ``i`` may attend key ``j``. With ``n`` the number of real
(non-pad) tokens, ``tril = j <= i`` and ``s`` the length of the source segment ([CLS] S1 [SEP]):

    bidirectional   real          = (i < n) & (j < n)
    left_to_right   tril   & real
    right_to_left   tril^T & real                        (j >= i)
    seq2seq         ((j < s) | tril) & real

So in seq2seq every token sees the whole source segment, the source is bidirectional inside itself and
never sees the target (for i < s, j >= s means j > i), and the target is causal, diagonal included.
Paper example ``[SOS] t1 t2 [EOS] t3 t4 t5 [EOS]`` (s = 4): t1 sees 4 tokens, t4 sees 6.

Padding is folded in: a pad key (j >= n) is never attended. A pad query row (i >= n) is all False;
the model adds the finite ``Config.attention_mask_value`` (-10000) to every score of that row, so its
softmax is a plain softmax of the unmasked scores (shifted by a constant): finite, never NaN, and its
output is ignored because no real query attends a pad key.

Masks are built on the host (NumPy booleans), where lengths are known; the boolean form is for people
and tests, and the model turns it into the additive form itself (``ops.attention.additive_mask_from``,
or :func:`additive_mask` here). A batch may mix kinds: :func:`batch_masks` takes one kind and one pair
of lengths per example.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MASK_KINDS = ("bidirectional", "left_to_right", "right_to_left", "seq2seq")


def normalize_kind(kind: str) -> str:
    """Canonical kind name; "left-to-right" and "left_to_right" are the same. Unknown -> ValueError."""
    canonical = str(kind).strip().lower().replace("-", "_")
    if canonical not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(MASK_KINDS)}")
    return canonical


def _check_lengths(kind: str, seq_len: int, num_real: int, source_len) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: expected a positive integer")
    if not is_int(num_real) or not 0 <= num_real <= seq_len:
        raise ValueError(f"num_real={num_real!r} is invalid: expected an integer in [0, seq_len={seq_len}]")
    if kind == "seq2seq":
        if source_len is None:
            raise ValueError("the seq2seq mask needs source_len (the length of [CLS] S1 [SEP])")
        if not is_int(source_len) or not 0 <= source_len <= num_real:
            raise ValueError(f"source_len={source_len!r} is invalid: expected an integer in "
                             f"[0, num_real={num_real}]")


def unilm_mask(kind: str, seq_len: int, num_real: int | None = None, source_len: int | None = None) -> np.ndarray:
    """One example's boolean mask, shape (seq_len, seq_len); True where query i may attend key j.

    ``num_real``: real tokens, the rest are padding (default: all ``seq_len``).
    ``source_len``: length of the source segment [CLS] S1 [SEP]; needed (and used) only by seq2seq.
    """
    kind = normalize_kind(kind)
    num_real = seq_len if num_real is None else num_real
    _check_lengths(kind, seq_len, num_real, source_len)
    i = np.arange(seq_len)[:, None]          # query index (T, 1)
    j = np.arange(seq_len)[None, :]          # key index   (1, T)
    real = (i < num_real) & (j < num_real)   # (T, T): the bidirectional mask
    if kind == "bidirectional":
        return real
    if kind == "left_to_right":
        return (j <= i) & real
    if kind == "right_to_left":
        return (j >= i) & real
    return ((j < source_len) | (j <= i)) & real


def batch_masks(kinds: Sequence[str], seq_len: int, num_real: Sequence[int],
                source_lens: Sequence[int | None] | None = None) -> np.ndarray:
    """Masks for a batch that may mix kinds: (B, seq_len, seq_len) booleans.

    ``kinds[b]``, ``num_real[b]`` and ``source_lens[b]`` describe example b (``source_lens[b]`` may be
    None for the kinds that do not use it).
    """
    B = len(kinds)
    if len(num_real) != B:
        raise ValueError(f"num_real has {len(num_real)} entries, expected one per example ({B})")
    if source_lens is None:
        source_lens = [None] * B
    if len(source_lens) != B:
        raise ValueError(f"source_lens has {len(source_lens)} entries, expected one per example ({B})")
    if B == 0:
        raise ValueError("batch_masks needs at least one example (got an empty list of kinds)")
    return np.stack([unilm_mask(k, seq_len, n, s) for k, n, s in zip(kinds, num_real, source_lens)])


def additive_mask(mask: np.ndarray, mask_value: float = -10000.0, dtype="float32") -> np.ndarray:
    """Boolean (..., T, T) -> additive: 0 where allowed, ``mask_value`` where not (what the model adds
    to the attention scores; ``Model`` does this itself from a 0/1 mask)."""
    return np.where(np.asarray(mask, dtype=bool), 0.0, mask_value).astype(dtype)


def token_labels(kind: str, source_tokens: int, target_tokens: int, pad: int = 0) -> list[str]:
    """Labels for the layout [CLS] s1..sN [SEP] t1..tM [SEP] [PAD]*pad used by the teaching grid.

    For the non-seq2seq kinds the two segments are sentence A and B (labelled a1.., b1..).
    """
    kind = normalize_kind(kind)
    first, second = ("s", "t") if kind == "seq2seq" else ("a", "b")
    return (["[CLS]"] + [f"{first}{k + 1}" for k in range(source_tokens)] + ["[SEP]"]
            + [f"{second}{k + 1}" for k in range(target_tokens)] + ["[SEP]"] + ["[PAD]"] * pad)


def format_mask(mask: np.ndarray, labels: Sequence[str], allowed: str = "1", blocked: str = ".") -> str:
    """A readable grid: one row per query, one column per key, ``allowed``/``blocked`` per entry."""
    mask = np.asarray(mask, dtype=bool)
    T = mask.shape[0]
    if mask.shape != (T, T) or len(labels) != T:
        raise ValueError(f"mask shape {mask.shape} and {len(labels)} labels do not match (expected (T, T), T labels)")
    row_width = max(len(s) for s in labels)
    col_width = max(row_width, 1)
    lines = [" " * row_width + " | " + " ".join(s.rjust(col_width) for s in labels)]
    lines.append("-" * len(lines[0]))
    for i, name in enumerate(labels):
        cells = " ".join((allowed if mask[i, j] else blocked).rjust(col_width) for j in range(T))
        lines.append(f"{name.rjust(row_width)} | {cells}   sees {int(mask[i].sum())}")
    return "\n".join(lines)


def teaching_mask(kind: str, source_tokens: int, target_tokens: int, pad: int = 0) -> tuple[np.ndarray, list[str]]:
    """``(mask, labels)`` of one kind in the teaching layout [CLS] s1..sN [SEP] t1..tM [SEP] [PAD]*pad
    (what ``ref-bert masks`` prints)."""
    labels = token_labels(kind, source_tokens, target_tokens, pad)
    num_real = source_tokens + target_tokens + 3
    mask = unilm_mask(kind, len(labels), num_real, source_len=source_tokens + 2)
    return mask, labels


def draw_masks_png(path: str, source_tokens: int, target_tokens: int, pad: int = 0) -> None:
    """Draw every kind's teaching mask side by side into the image ``path`` (needs matplotlib; a
    ValueError when it is not installed)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--png needs matplotlib, which is not installed (pip install matplotlib; a default dependency of ref-bert)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MASK_KINDS), figsize=(4.2 * len(MASK_KINDS), 5.0))
    for ax, kind in zip(axes, MASK_KINDS):
        mask, labels = teaching_mask(kind, source_tokens, target_tokens, pad)
        ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.6)  # allowed = grey, blocked = white
        ax.set_title(kind.replace("_", "-"))
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle("UniLM self-attention masks (shaded: query may attend key)")
    fig.tight_layout()
    import io

    from .files import atomic_write_bytes

    buffer = io.BytesIO()   # PNG whatever the name's extension (savefig would add one), written atomically
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


__all__ = ["MASK_KINDS", "normalize_kind", "unilm_mask", "batch_masks", "additive_mask", "token_labels",
           "format_mask", "teaching_mask", "draw_masks_png"]
