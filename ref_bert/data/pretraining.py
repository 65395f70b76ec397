"""ALBERT pretraining examples: sentence-order pairs with whole-word n-gram masking.

Follows google-research/albert ``create_pretraining_data.py`` (docs/reference.md §6), with NumPy's
``default_rng`` as the only source of randomness. :class:`PretrainingDataset` is the corpus stream of
:mod:`ref_bert.data.stream` whose example is ALBERT's: each sentence pair, as soon as its document's
pairs are drawn, is laid out as ``[CLS] A [SEP] B [SEP]`` (:func:`assemble_pair`) and masked
(:func:`create_masked_lm_predictions`) with the epoch's generator, as ALBERT's
``create_instances_from_document`` does.

Batch format (what ``Model.loss_and_grads(**batch)`` takes, after ``backend.from_host``), int64:
    input_ids, token_type_ids, attention_mask, mlm_labels: (B, T); sop_labels: (B,)
``mlm_labels`` holds the original token id at each selected position and -100 (``IGNORE_INDEX``)
elsewhere; ``sop_labels`` is 1 when A and B were swapped, 0 in the original order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np

from ..ops import IGNORE_INDEX
from ..validate import is_int, require
from .corpus import PathLike
from .stream import SentencePair, SentencePairStream
from .tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, Tokenizer


# --- one example ------------------------------------------------------------------------------------
def assemble_pair(tokens_a: list[int], tokens_b: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` and its token types: 0 up to and including the first [SEP], then 1."""
    tokens = np.array([CLS_ID, *tokens_a, SEP_ID, *tokens_b, SEP_ID], dtype=np.int64)  # (n,)
    token_type_ids = np.zeros(len(tokens), dtype=np.int64)                          # (n,)
    token_type_ids[len(tokens_a) + 2:] = 1
    return tokens, token_type_ids


# --- whole-word n-gram masking ---------------------------------------------------------------------
def ngram_probabilities(max_ngram: int) -> np.ndarray:
    """p(n) proportional to 1/n for n = 1..max_ngram (ALBERT's ``favor_shorter_ngram``): 6/11, 3/11, 2/11."""
    inverse = 1.0 / np.arange(1, max_ngram + 1)
    return inverse / inverse.sum()


def whole_words(tokens: np.ndarray, word_start_table: np.ndarray) -> list[list[int]]:
    """Positions of ``tokens`` grouped into whole words: a word-start piece (U+2581) and the continuation
    pieces after it. [CLS] and [SEP] belong to no word. A continuation piece right after [CLS] or [SEP]
    (left there when truncation cut a word) starts a word of its own; ALBERT would instead glue one
    after [SEP] onto the last word of segment A."""
    words: list[list[int]] = []
    previous_special = True
    for position, token in enumerate(tokens.tolist()):
        if token == CLS_ID or token == SEP_ID:
            previous_special = True
            continue
        if previous_special or word_start_table[token]:
            words.append([position])
        else:
            words[-1].append(position)
        previous_special = False
    return words


class MaskedLmPredictions(NamedTuple):
    """Result of :func:`create_masked_lm_predictions`.

    input_ids:  (n,) the tokens after replacement ([MASK] / kept / random).
    mlm_labels: (n,) the original id at each selected position, IGNORE_INDEX (-100) elsewhere.
    ngram_draws: one (n drawn, n used) pair per candidate n-gram considered, in order; n used is 0 when
        the candidate was skipped (budget or overlap). For measuring the n-gram distribution.
    """

    input_ids: np.ndarray
    mlm_labels: np.ndarray
    ngram_draws: list[tuple[int, int]]


def masking_budget(num_tokens: int, masked_lm_prob: float, max_predictions_per_seq: int) -> int:
    """ALBERT: min(max_predictions_per_seq, max(1, int(round(num_tokens * masked_lm_prob)))), with
    ``num_tokens`` counting [CLS] and [SEP] and Python's round (half to even)."""
    return min(max_predictions_per_seq, max(1, int(round(num_tokens * masked_lm_prob))))


def create_masked_lm_predictions(tokens: np.ndarray, word_start_table: np.ndarray, ordinary_ids: np.ndarray,
                                 rng: np.random.Generator, masked_lm_prob: float = 0.15,
                                 max_predictions_per_seq: int = 20, max_ngram: int = 3,
                                 ngram_probs=None) -> MaskedLmPredictions:
    """Select whole-word n-grams for masked-LM prediction and corrupt them 80/10/10 (ALBERT's
    ``create_masked_lm_predictions`` with ``do_whole_word_mask`` and ``favor_shorter_ngram``).

    1. Group positions into whole words (:func:`whole_words`); [CLS]/[SEP] are never candidates.
    2. Budget: :func:`masking_budget` of the sequence length.
    3. Visit the words in a random order (ALBERT shuffles the list of candidate start words,
       ``rng.shuffle(ngram_indexes)``). Stop once the budget is used. For start word ``w``:
       draw n with p(n) = (1/n) / sum_k (1/k); the n-gram is words w .. w+n-1 (fewer at the end of the
       sequence: ALBERT slices ``cand_indexes[idx:idx+n]`` and so draws n from the full distribution
       even there); [SEP] is not a word, so an n-gram may run from A into B, as in ALBERT.
       While the n-gram's pieces would overflow the budget, try n - 1; at n = 1 still overflowing, skip.
       If any of its positions is already selected, skip. Otherwise select all of its positions.
    4. Each selected position independently: with probability 0.8 [MASK]; else with probability 1/2 the
       original token; else a uniform draw from ``ordinary_ids`` (ALBERT draws from the whole vocabulary).

    Args:
        tokens: (n,) int ids of ``[CLS] A [SEP] B [SEP]``, unpadded.
        word_start_table: (V,) bool, piece id -> starts a word.
        ordinary_ids: (k,) ids for the random replacement.
        ngram_probs: p(n) for n = 1..len(ngram_probs), replacing the 1/n rule and ``max_ngram`` (another
            span mix, e.g. UniLM's mostly-unigram one, docs/reference.md §3.2).
    """
    output = tokens.copy()                                        # (n,)
    mlm_labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)  # (n,)
    draws: list[tuple[int, int]] = []
    if masked_lm_prob == 0:
        return MaskedLmPredictions(output, mlm_labels, draws)
    words = whole_words(tokens, word_start_table)
    budget = masking_budget(len(tokens), masked_lm_prob, max_predictions_per_seq)
    if ngram_probs is None:
        p_ngram = ngram_probabilities(max_ngram)
    else:
        p_ngram = np.asarray(ngram_probs, dtype=np.float64)
        if p_ngram.ndim != 1 or len(p_ngram) == 0 or (p_ngram < 0).any() or not np.isclose(p_ngram.sum(), 1.0):
            raise ValueError(f"ngram_probs={ngram_probs!r} is invalid: expected probabilities of n = 1, 2, ... "
                             f"summing to 1")
    max_ngram = len(p_ngram)
    covered = np.zeros(len(tokens), dtype=bool)                   # (n,)
    num_selected = 0
    for start in rng.permutation(len(words)).tolist():
        if num_selected >= budget:
            break
        n_drawn = int(rng.choice(max_ngram, p=p_ngram)) + 1
        n = n_drawn
        positions = [q for word in words[start:start + n] for q in word]
        while num_selected + len(positions) > budget and n > 1:
            n -= 1
            positions = [q for word in words[start:start + n] for q in word]
        if num_selected + len(positions) > budget or covered[positions].any():
            draws.append((n_drawn, 0))
            continue
        draws.append((n_drawn, n))
        for q in positions:
            covered[q] = True
            mlm_labels[q] = tokens[q]
            if rng.random() < 0.8:
                output[q] = MASK_ID
            elif rng.random() < 0.5:
                pass  # keep the original token
            else:
                output[q] = ordinary_ids[rng.integers(len(ordinary_ids))]
        num_selected += len(positions)
    return MaskedLmPredictions(output, mlm_labels, draws)


# --- the dataset -----------------------------------------------------------------------------------
BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "sop_labels")


class PretrainingDataset(SentencePairStream):
    """An endless, deterministic stream of ALBERT pretraining batches (MLM + SOP) from a corpus.

    The corpus stream (:class:`ref_bert.data.stream.SentencePairStream`: epochs, shuffles, position,
    :meth:`state_dict`) with ALBERT's example: ``[CLS] A [SEP] B [SEP]`` masked with whole-word
    n-grams. Batches are dicts of int64 arrays (module docstring); :meth:`epoch_examples` gives a whole
    epoch as one such dict, (N, T) and sop_labels (N,).

    Args: those of :class:`~ref_bert.data.stream.SentencePairStream`, and ALBERT's masking flags
        masked_lm_prob, max_predictions_per_seq, max_ngram (defaults 0.15, 20, 3).
    """

    def __init__(self, corpus: Optional[PathLike] = None, tokenizer: Union[Tokenizer, PathLike, None] = None, *,
                 batch_size: int = 8, max_seq_length: int = 128, seed: int = 0, config=None,
                 masked_lm_prob: float = 0.15, max_predictions_per_seq: int = 20, max_ngram: int = 3,
                 short_seq_prob: float = 0.1, vocab_size: Optional[int] = None):
        require(isinstance(masked_lm_prob, (int, float)) and 0 <= masked_lm_prob <= 1, "masked_lm_prob",
                masked_lm_prob, "a probability in [0, 1]")
        require(is_int(max_predictions_per_seq) and max_predictions_per_seq >= 1, "max_predictions_per_seq",
                max_predictions_per_seq, "a positive integer")
        require(is_int(max_ngram) and max_ngram >= 1, "max_ngram", max_ngram, "a positive integer")
        self.masked_lm_prob = float(masked_lm_prob)
        self.max_predictions_per_seq = int(max_predictions_per_seq)
        self.max_ngram = int(max_ngram)
        super().__init__(corpus, tokenizer, batch_size=batch_size, max_seq_length=max_seq_length, seed=seed,
                         config=config, short_seq_prob=short_seq_prob, vocab_size=vocab_size)

    def _fingerprint_settings(self) -> list:
        return [self.tokenizer.lower_case, self.max_seq_length, self.masked_lm_prob,
                self.max_predictions_per_seq, self.max_ngram, self.short_seq_prob]

    def _example(self, pair: SentencePair, rng: np.random.Generator):
        """(input_ids, token_type_ids, mlm_labels, sop_label): the pair laid out and masked."""
        tokens, token_type_ids = assemble_pair(pair.tokens_a, pair.tokens_b)
        masked = create_masked_lm_predictions(
            tokens, self.tokenizer.word_start_table, self.tokenizer.ordinary_ids, rng,
            self.masked_lm_prob, self.max_predictions_per_seq, self.max_ngram)
        return masked.input_ids, token_type_ids, masked.mlm_labels, pair.sop_label

    def _collate(self, examples: list) -> dict[str, np.ndarray]:
        """Rows padded to T: input_ids, token_type_ids, attention_mask, mlm_labels (B, T); sop_labels (B,)."""
        N, T = len(examples), self.max_seq_length
        batch = {
            "input_ids": np.full((N, T), PAD_ID, dtype=np.int64),
            "token_type_ids": np.zeros((N, T), dtype=np.int64),
            "attention_mask": np.zeros((N, T), dtype=np.int64),
            "mlm_labels": np.full((N, T), IGNORE_INDEX, dtype=np.int64),
            "sop_labels": np.zeros(N, dtype=np.int64),
        }
        for row, (input_ids, token_type_ids, mlm_labels, sop_label) in enumerate(examples):
            n = len(input_ids)
            batch["input_ids"][row, :n] = input_ids
            batch["token_type_ids"][row, :n] = token_type_ids
            batch["attention_mask"][row, :n] = 1
            batch["mlm_labels"][row, :n] = mlm_labels
            batch["sop_labels"][row] = sop_label
        return batch
