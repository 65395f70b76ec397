"""UniLM batches: mixed-objective pretraining and seq2seq fine-tuning (Dong et al. 2019, sections 2.3-2.4).

Every example is laid out as ``[CLS] A [SEP] B [SEP] [PAD]...`` and carries its own mask kind
(:mod:`ref_bert.masks`); the objectives differ only in the mask and in which tokens are predicted.

Pretraining (:func:`pretraining_batch`), per batch:
    1/3 bidirectional (plus the sentence-pair loss), 1/3 seq2seq (A = source, B = target),
    1/6 left-to-right, 1/6 right-to-left. Counts are allocated by largest remainder (ties broken at
    random), then shuffled, so a batch of 6k examples has exactly 2k/2k/k/k.
    Masking: 15% of the tokens (ALBERT's count: min(max_predictions, max(1, round(0.15 * len))),
    len counting [CLS] and [SEP]), chosen among the sentence tokens of both segments (specials are
    never predicted in pretraining; in seq2seq pretraining both segments are masked). A masked unit is
    a single token 80% of the time, a bigram 10% and a trigram 10% (UniLM's "20% bigram or trigram");
    a span that would overlap a chosen token, leave its segment or overflow the budget falls back to
    shorter n, as ALBERT's n-gram masking does. Each chosen token: 80% [MASK], 10% a uniformly random
    non-special token, 10% unchanged.
    Sentence-pair loss: sentence-order prediction (ALBERT's, what this model's head is for): with
    probability 1/2 A and B are swapped, label 1 = swapped. UniLM v1 itself used next-sentence
    prediction; ``pair_task="nsp"`` replaces B by the B of another pair instead (label 1 = random).
    sop_labels are -100 for the non-bidirectional examples, so that loss applies only to those.

Fine-tuning (:func:`seq2seq_finetune_batch`): source A, target B, seq2seq mask; only target tokens and
the final [SEP] are candidates (so the model learns to stop), ``mask_prob`` of them chosen (UniLM's
fine-tuning used 0.7), single tokens, same 80/10/10 replacement.

Segment ids: with ``unilm_segments=True`` (type_vocab_size 6) the original code's ids:
bidirectional A=0 B=1, left-to-right all 2, right-to-left all 3, seq2seq source 4 target 5, pads 0;
otherwise plain 0 up to and including the first [SEP], then 1.

Everything here is host-side NumPy driven by ``numpy.random.default_rng(seed)``: the same seed gives
the same batch. Outputs are NumPy arrays; ``batch.model_inputs(backend)`` moves them to a backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .masks import MASK_KINDS, batch_masks
from .ops import IGNORE_INDEX

from .data.stream import truncate_seq_pair
# Special token ids are fixed for the whole project and defined once, by the tokenizer; random
# replacements are drawn from [NUM_SPECIAL, vocab).
from .data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, UNK_ID

# Share of each objective in a pretraining batch (UniLM section 2.3).
OBJECTIVE_SHARES = {"bidirectional": 1 / 3, "seq2seq": 1 / 3, "left_to_right": 1 / 6, "right_to_left": 1 / 6}

# (first segment, second segment) token type ids per kind.
UNILM_SEGMENT_IDS = {"bidirectional": (0, 1), "left_to_right": (2, 2), "right_to_left": (3, 3), "seq2seq": (4, 5)}
PLAIN_SEGMENT_IDS = {kind: (0, 1) for kind in MASK_KINDS}
UNILM_TYPE_VOCAB_SIZE = 6

# Masked-unit length n with its probability: 80% single tokens, 20% split evenly over bigrams and trigrams.
NGRAM_PROBS = {1: 0.8, 2: 0.1, 3: 0.1}
# What happens to a chosen token: [MASK], a random token, or unchanged.
REPLACE_PROBS = (0.8, 0.1, 0.1)


@dataclass
class UnilmBatch:
    """One batch. Arrays are host NumPy; B examples of T tokens.

    input_ids, token_type_ids: (B, T) int64;  attention_mask: (B, T, T) bool (True = may attend);
    mlm_labels: (B, T) int64, the original token where predicted and -100 elsewhere;
    sop_labels: (B,) int64, -100 for examples without the sentence-pair loss (None in fine-tuning
    batches, which have no sentence-pair loss at all);
    kinds[b], num_real[b], source_lens[b]: what built example b's mask.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    mlm_labels: np.ndarray
    sop_labels: np.ndarray | None
    kinds: list = field(default_factory=list)
    num_real: list = field(default_factory=list)
    source_lens: list = field(default_factory=list)

    def model_inputs(self, backend) -> dict:
        """Keyword arguments for ``Model.loss_and_grads`` with every array moved to ``backend``."""
        names = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "sop_labels")
        return {name: backend.from_host(getattr(self, name)) for name in names if getattr(self, name) is not None}


# --- validation -----------------------------------------------------------------------------------
def _check_ids(name: str, ids, vocab_size: int, allow_empty: bool) -> list[int]:
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{name} must be a list of integer token ids, got {ids!r:.80}")
    if not ids and not allow_empty:
        raise ValueError(f"{name} is empty: expected at least one token id")
    # [UNK] is ordinary text as far as a sentence is concerned; the other specials are structure.
    bad = [t for t in ids if not 0 <= t < vocab_size or t in (PAD_ID, CLS_ID, SEP_ID, MASK_ID)]
    if bad:
        raise ValueError(f"{name} contains token id {bad[0]}, expected ids in [0, {vocab_size}) other than "
                         f"the structural specials PAD={PAD_ID}, CLS={CLS_ID}, SEP={SEP_ID}, MASK={MASK_ID}")
    return [int(t) for t in ids]


def _check_common(pairs, seq_len: int, vocab_size: int):
    if not isinstance(seq_len, int) or seq_len < 4:
        raise ValueError(f"seq_len={seq_len!r} is invalid: expected an integer >= 4 ([CLS] A [SEP] B [SEP])")
    if not isinstance(vocab_size, int) or vocab_size <= NUM_SPECIAL:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid: expected an integer > {NUM_SPECIAL}")
    if len(pairs) == 0:
        raise ValueError("the batch needs at least one (A, B) pair, got none")


# --- pieces ---------------------------------------------------------------------------------------
def objective_kinds(batch_size: int, rng: np.random.Generator, shares: dict = OBJECTIVE_SHARES) -> list[str]:
    """One mask kind per example, in the given shares (largest remainder, random ties), shuffled."""
    kinds = list(shares)
    exact = np.array([shares[k] for k in kinds]) * batch_size
    counts = np.floor(exact).astype(int)
    remainder = exact - counts
    tie_break = rng.random(len(kinds))
    for index in sorted(range(len(kinds)), key=lambda k: (-remainder[k], tie_break[k]))[:batch_size - counts.sum()]:
        counts[index] += 1
    out = [kind for kind, count in zip(kinds, counts) for _ in range(count)]
    rng.shuffle(out)
    return out


def truncate_pair(a: list, b: list, max_tokens: int, rng: np.random.Generator) -> tuple[list, list]:
    """ALBERT's truncate_seq_pair (ref_bert.data.stream) on copies: trim the longer sentence, from a
    random end, until both fit."""
    a, b = list(a), list(b)
    truncate_seq_pair(a, b, max_tokens, rng)
    return a, b


def layout(a: Sequence[int], b: Sequence[int], kind: str, seq_len: int, unilm_segments: bool):
    """[CLS] a [SEP] b [SEP] padded to seq_len: (input_ids (T,), token_type_ids (T,), num_real, source_len)."""
    first, second = (UNILM_SEGMENT_IDS if unilm_segments else PLAIN_SEGMENT_IDS)[kind]
    tokens = [CLS_ID, *a, SEP_ID, *b, SEP_ID]
    source_len = len(a) + 2
    num_real = len(tokens)
    input_ids = np.full(seq_len, PAD_ID, dtype=np.int64)
    input_ids[:num_real] = tokens
    token_type_ids = np.zeros(seq_len, dtype=np.int64)   # pads 0
    token_type_ids[:source_len] = first
    token_type_ids[source_len:num_real] = second
    return input_ids, token_type_ids, num_real, source_len


def choose_spans(candidates: Sequence[int], budget: int, rng: np.random.Generator,
                 ngram_probs: dict = NGRAM_PROBS) -> list[tuple[int, int]]:
    """Spans ``(start, length)`` of consecutive candidate positions to predict, at most ``budget``
    positions in all, sorted by start.

    Start positions are visited in random order; each draws n from ``ngram_probs``; if the n positions
    from the start are not all uncovered candidates, or would exceed the budget, shorter n are tried.
    """
    candidate_set = set(int(c) for c in candidates)
    covered: set[int] = set()
    spans = []
    sizes = np.array(sorted(ngram_probs))
    probs = np.array([ngram_probs[n] for n in sizes], dtype=float)
    for start in rng.permutation(np.array(sorted(candidate_set), dtype=np.int64)):
        if len(covered) >= budget:
            break
        n = int(rng.choice(sizes, p=probs))
        for length in range(n, 0, -1):
            span = range(int(start), int(start) + length)
            if (len(covered) + length <= budget
                    and all(p in candidate_set and p not in covered for p in span)):
                covered.update(span)
                spans.append((int(start), length))
                break
    return sorted(spans)


def replace_tokens(input_ids: np.ndarray, positions: Sequence[int], vocab_size: int,
                   rng: np.random.Generator, replace_probs=REPLACE_PROBS) -> np.ndarray:
    """In place: each position becomes [MASK], a random non-special token, or stays (80/10/10).
    Returns the labels (T,): the original tokens at ``positions``, -100 elsewhere."""
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    labels[positions] = input_ids[positions]
    action = rng.choice(3, size=len(positions), p=np.asarray(replace_probs, dtype=float))
    random_tokens = rng.integers(NUM_SPECIAL, vocab_size, size=len(positions))
    input_ids[positions[action == 0]] = MASK_ID
    input_ids[positions[action == 1]] = random_tokens[action == 1]
    return labels


# --- batches --------------------------------------------------------------------------------------
def pretraining_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, vocab_size: int,
                      seed=0, *, unilm_segments: bool = True, mask_prob: float = 0.15,
                      max_predictions: int = 20, pair_task: str = "sop",
                      shares: dict = OBJECTIVE_SHARES) -> UnilmBatch:
    """A mixed-objective UniLM pretraining batch from token-id sentence pairs (ids >= NUM_SPECIAL).

    ``seed``: an int (or a ``numpy.random.Generator``); the same seed gives the same batch.
    Pairs longer than ``seq_len - 3`` are truncated (:func:`truncate_pair`).
    """
    _check_common(pairs, seq_len, vocab_size)
    if pair_task not in ("sop", "nsp"):
        raise ValueError(f"pair_task={pair_task!r} is invalid: expected 'sop' or 'nsp'")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob={mask_prob!r} is invalid: expected a probability in (0, 1)")
    if set(shares) - set(MASK_KINDS) or not np.isclose(sum(shares.values()), 1.0):
        raise ValueError(f"shares={shares!r} is invalid: expected mask kinds {MASK_KINDS} with shares summing to 1")
    pairs = [(_check_ids(f"pairs[{n}][0]", a, vocab_size, allow_empty=False),
              _check_ids(f"pairs[{n}][1]", b, vocab_size, allow_empty=False)) for n, (a, b) in enumerate(pairs)]
    rng = np.random.default_rng(seed)
    B = len(pairs)
    kinds = objective_kinds(B, rng, shares)
    input_ids = np.zeros((B, seq_len), dtype=np.int64)
    token_type_ids = np.zeros((B, seq_len), dtype=np.int64)
    mlm_labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    sop_labels = np.full(B, IGNORE_INDEX, dtype=np.int64)
    num_real, source_lens = [], []
    for n, ((a, b), kind) in enumerate(zip(pairs, kinds)):
        if kind == "bidirectional":
            swapped = bool(rng.random() < 0.5)
            if swapped and pair_task == "sop":
                a, b = b, a
            elif swapped and pair_task == "nsp":
                # the B of a random *other* pair (a batch of one pair has no other: label 0)
                swapped = B > 1
                if swapped:
                    b = pairs[(n + 1 + int(rng.integers(B - 1))) % B][1]
            sop_labels[n] = int(swapped)
        a, b = truncate_pair(a, b, seq_len - 3, rng)
        input_ids[n], token_type_ids[n], real, source_len = layout(a, b, kind, seq_len, unilm_segments)
        candidates = [p for p in range(real) if input_ids[n, p] not in (CLS_ID, SEP_ID)]
        budget = min(max_predictions, max(1, int(round(real * mask_prob))))
        spans = choose_spans(candidates, budget, rng)
        positions = [p for start, length in spans for p in range(start, start + length)]
        mlm_labels[n] = replace_tokens(input_ids[n], positions, vocab_size, rng)
        num_real.append(real)
        source_lens.append(source_len)
    attention_mask = batch_masks(kinds, seq_len, num_real, source_lens)
    return UnilmBatch(input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, kinds, num_real,
                      source_lens)


def seq2seq_finetune_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, vocab_size: int,
                           seed=0, *, unilm_segments: bool = True, mask_prob: float = 0.7,
                           max_predictions: int | None = None, replace_probs=REPLACE_PROBS) -> UnilmBatch:
    """A seq2seq fine-tuning batch from (source, target) pairs: ``[CLS] source [SEP] target [SEP]``
    with the seq2seq mask; ``mask_prob`` of the target tokens and the final [SEP] (at least one) are
    predicted. A pair that does not fit in ``seq_len`` is a ValueError (no silent truncation)."""
    _check_common(pairs, seq_len, vocab_size)
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob={mask_prob!r} is invalid: expected a probability in (0, 1]")
    rng = np.random.default_rng(seed)
    B = len(pairs)
    input_ids = np.zeros((B, seq_len), dtype=np.int64)
    token_type_ids = np.zeros((B, seq_len), dtype=np.int64)
    mlm_labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    num_real, source_lens = [], []
    for n, (source, target) in enumerate(pairs):
        source = _check_ids(f"pairs[{n}] source", source, vocab_size, allow_empty=False)
        target = _check_ids(f"pairs[{n}] target", target, vocab_size, allow_empty=True)
        if len(source) + len(target) + 3 > seq_len:
            raise ValueError(f"pairs[{n}] needs {len(source) + len(target) + 3} positions "
                             f"([CLS] source [SEP] target [SEP]), more than seq_len={seq_len}")
        input_ids[n], token_type_ids[n], real, source_len = layout(source, target, "seq2seq", seq_len,
                                                                   unilm_segments)
        candidates = np.arange(source_len, real)          # target tokens and the final [SEP]
        count = max(1, int(round(mask_prob * len(candidates))))
        if max_predictions is not None:
            count = min(count, max_predictions)
        positions = np.sort(rng.choice(candidates, size=count, replace=False))
        mlm_labels[n] = replace_tokens(input_ids[n], positions, vocab_size, rng, replace_probs)
        num_real.append(real)
        source_lens.append(source_len)
    kinds = ["seq2seq"] * B
    attention_mask = batch_masks(kinds, seq_len, num_real, source_lens)
    return UnilmBatch(input_ids, token_type_ids, attention_mask, mlm_labels, None, kinds, num_real,
                      source_lens)


__all__ = ["PAD_ID", "UNK_ID", "CLS_ID", "SEP_ID", "MASK_ID", "NUM_SPECIAL", "OBJECTIVE_SHARES",
           "UNILM_SEGMENT_IDS", "PLAIN_SEGMENT_IDS", "UNILM_TYPE_VOCAB_SIZE", "NGRAM_PROBS", "REPLACE_PROBS",
           "UnilmBatch", "objective_kinds", "truncate_pair", "layout", "choose_spans", "replace_tokens",
           "pretraining_batch", "seq2seq_finetune_batch"]
