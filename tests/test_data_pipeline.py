"""The data pipeline's labels, budgets and distributions, and the stream over many epochs (issue #18).

References are the published procedure (docs/reference.md §6, google-research/albert
``create_pretraining_data.py``; §3.2 for UniLM), written here independently of ref_bert's code:

- Exact rules (masking budget, whole words, the n-gram shortening / skipping rule, the SOP label) are
  replayed: a recording wrapper around the generator notes the random decisions the code made (the
  order of the start words, each n drawn), and a reimplementation of the rule as the reference states it
  turns those decisions into the selection that must come out, position for position.
- Distributions (n drawn with p(n) proportional to 1/n, the selection after shortening, the 80/10/10
  split, the short-sequence target length, the SOP label rate) are tested against exact probabilities
  (fractions, or an exhaustive enumeration of the published procedure) with a chi-square or an exact
  binomial test whose false-failure probability is ALPHA = 1e-6 per check. The seeds are fixed, so a run
  is reproducible; a correct implementation would fail a check with probability < 1e-6 over the choice
  of seed, and the bugs each check targets sit far outside the acceptance region at these sample sizes
  (stated per test).
- Stream tests give every token of a synthetic corpus a unique id, so each example's two segments can be
  traced back to their document, sentences and order.
"""
from __future__ import annotations

import itertools
import json
import re
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

import backends
from ref_bert import Config
from ref_bert.data import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, PretrainingDataset, SentencePairStream, Tokenizer,
                           assemble_pair, create_masked_lm_predictions, create_sentence_pairs, masking_budget, ngram_probabilities,
                           default_corpus_path, read_corpus, tokenize_documents, truncate_seq_pair, whole_words)
from ref_bert.data import stream as stream_module
from ref_bert.examples import BATCH_NAMES, make_batch, task_batch, task_labels, text_batch
from ref_bert.pretrain import batches as batches_module
from ref_bert.pretrain.settings import PretrainConfig
from ref_bert.unilm import (OBJECTIVE_SHARES, REPLACE_PROBS, choose_spans, layout, objective_kinds,
                            pretraining_batch, replace_tokens, seq2seq_finetune_batch)

IGNORE = -100
ALPHA = 1e-6  # false-failure probability of each statistical check


# --- statistics helpers --------------------------------------------------------------------------
def chi_square_ok(counts, probs, alpha=ALPHA):
    """Pearson's chi-square goodness of fit at level ``alpha``; cells with expected count < 5 are
    pooled into one (so the chi-square approximation holds). Returns (ok, statistic, threshold)."""
    counts, probs = np.asarray(counts, dtype=float), np.asarray(probs, dtype=float)
    assert counts.shape == probs.shape and abs(probs.sum() - 1) < 1e-12
    assert (counts[probs == 0] == 0).all(), "an outcome of probability 0 occurred"
    counts, probs = counts[probs > 0], probs[probs > 0]
    if len(counts) == 1:
        return True, 0.0, 0.0
    n = counts.sum()
    expected = n * probs
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    statistic = float(((counts - expected) ** 2 / expected).sum())
    threshold = float(stats.chi2.isf(alpha, len(counts) - 1))
    return statistic < threshold, statistic, threshold


def binomial_ok(k, n, p, alpha=ALPHA):
    """k successes in n Bernoulli(p) trials lie inside the central 1 - alpha interval (exact binomial)."""
    lo, hi = stats.binom.interval(1 - alpha, n, p)
    return lo <= k <= hi


class Recorder:
    """A numpy Generator that notes every call: (method, args, result). The code under test draws from it
    exactly as from the generator it wraps."""

    def __init__(self, rng):
        self._rng, self.log = rng, []

    def __getattr__(self, name):
        method = getattr(self._rng, name)

        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            self.log.append((name, args, kwargs, result))
            return result
        return call

    def calls(self, name):
        return [entry for entry in self.log if entry[0] == name]


# --- the published rules, written from docs/reference.md §6.2 -------------------------------------
def spec_budget(num_tokens, prob, cap):
    """ALBERT: min(max_predictions_per_seq, max(1, int(round(len(tokens) * masked_lm_prob)))) (Python round)."""
    return min(cap, max(1, int(round(num_tokens * prob))))


def spec_words(tokens, is_start):
    """Whole words: [CLS]/[SEP] split the sequence and belong to no word; inside each stretch between
    them, a word begins at a word-start piece or at the stretch's first piece (a continuation piece
    there has nothing to attach to) and takes the continuation pieces after it."""
    words, stretch = [], []
    for position, token in list(enumerate(tokens)) + [(len(tokens), SEP_ID)]:
        if token in (CLS_ID, SEP_ID):
            for q in stretch:
                if q == stretch[0] or is_start[tokens[q]]:
                    words.append([q])
                else:
                    words[-1].append(q)
            stretch = []
        else:
            stretch.append(position)
    return words


def spec_albert_selection(words, budget, start_order, ns_drawn):
    """The selection ALBERT's rule makes given the visiting order of start words and each n drawn:
    stop once the budget is reached; the n-gram is words w..w+n-1 (fewer at the end); the longest
    n' <= n that fits in the remaining budget is used, and if none (or it overlaps a chosen position)
    the start is skipped. Returns (chosen positions, [(n drawn, n used or 0)])."""
    chosen, draws, ns = set(), [], iter(ns_drawn)
    for w in start_order:
        if len(chosen) >= budget:
            break
        n = next(ns)
        fits = [m for m in range(1, n + 1) if len(chosen) + sum(len(x) for x in words[w:w + m]) <= budget]
        span = {q for x in words[w:w + max(fits)] for q in x} if fits else set()
        if not fits or span & chosen:
            draws.append((n, 0))
            continue
        chosen |= span
        draws.append((n, max(fits)))
    return chosen, draws


CONTINUATION = set(range(40, 60))                  # synthetic vocabulary 0..59: 40..59 continue a word
IS_START = np.array([i not in CONTINUATION for i in range(60)])


def random_sequence(rng, longest=30):
    """[CLS] A [SEP] B [SEP] with ids in 5..59 (about a third of them continuation pieces)."""
    a = rng.integers(5, 60, size=int(rng.integers(1, longest + 1))).tolist()
    b = rng.integers(5, 60, size=int(rng.integers(1, longest + 1))).tolist()
    return np.array([CLS_ID, *a, SEP_ID, *b, SEP_ID])


# --- masking: budget, words, selection rule ------------------------------------------------------
def test_masking_budget_is_the_published_formula():
    """Every length 1..600 at several probabilities and caps against ALBERT's expression; the halves
    where Python 3's round goes to even are pinned by hand (docs/reference.md §6.2)."""
    for prob in (0.01, 0.1, 0.15, 0.2, 0.5, 0.99, 1.0):
        for cap in (1, 2, 5, 20, 10**6):
            assert [masking_budget(n, prob, cap) for n in range(1, 601)] == \
                   [spec_budget(n, prob, cap) for n in range(1, 601)], (prob, cap)
    assert [masking_budget(n, 0.15, 20) for n in (10, 30, 50, 70, 3, 7, 128, 140, 512)] == \
           [2, 4, 8, 10, 1, 1, 19, 20, 20]   # 1.5 -> 2, 4.5 -> 4, 7.5 -> 8, 10.5 -> 10 (half to even)


def test_ngram_probabilities_are_one_over_n_normalised():
    for max_ngram in range(1, 7):
        harmonic = sum(Fraction(1, k) for k in range(1, max_ngram + 1))
        expected = [float(Fraction(1, n) / harmonic) for n in range(1, max_ngram + 1)]
        np.testing.assert_allclose(ngram_probabilities(max_ngram), expected, rtol=1e-15, atol=0)


def test_whole_words_against_the_rule():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = random_sequence(rng, 12)
        assert whole_words(tokens, IS_START) == spec_words(tokens.tolist(), IS_START)
    # Not starting with [CLS]: a leading continuation piece is a word of its own.
    assert whole_words(np.array([41, 42, 10, 43]), IS_START) == [[0, 1], [2, 3]]
    assert whole_words(np.array([10, CLS_ID, 41, SEP_ID]), IS_START) == [[0], [2]]


@pytest.mark.parametrize("prob, cap, max_ngram", [(0.15, 20, 3), (0.3, 4, 3), (0.5, 3, 4), (1.0, 20, 2),
                                                  (0.4, 1, 3), (0.25, 6, 1), (0.15, 20, [0.2, 0.3, 0.5]),
                                                  (0.3, 5, [0.0, 1.0]), (None, None, None)])
def test_selection_replays_the_published_rule(prob, cap, max_ngram):
    """Exact: for 150 random sequences each, the positions chosen and the (n drawn, n used) record equal
    what the published rule makes of the code's own random decisions (start-word order, n drawn). The
    parameters cover a budget of 1, budgets capped by max_predictions, every position allowed, custom
    n-gram probabilities (a list: ``ngram_probs``) and the defaults (None: 0.15, 20, 3)."""
    rng = np.random.default_rng([1, int((prob or 0) * 100), cap or 0, max_ngram if isinstance(max_ngram, int) else 9])
    ordinary = np.arange(5, 40)
    defaults = prob is None
    if defaults:
        prob, cap, max_ngram = 0.15, 20, 3
    for _ in range(150):
        tokens = random_sequence(rng)
        recorder = Recorder(rng)
        if defaults:
            out = create_masked_lm_predictions(tokens, IS_START, ordinary, recorder)
        elif isinstance(max_ngram, list):
            out = create_masked_lm_predictions(tokens, IS_START, ordinary, recorder, prob, cap, ngram_probs=max_ngram)
        else:
            out = create_masked_lm_predictions(tokens, IS_START, ordinary, recorder, prob, cap, max_ngram)
        words = spec_words(tokens.tolist(), IS_START)
        [(_, (num_words,), _, order)] = recorder.calls("permutation")
        assert num_words == len(words)
        ns = [int(result) + 1 for _, _, _, result in recorder.calls("choice")]
        for _, args, kwargs, _ in recorder.calls("choice"):
            p = ngram_probabilities(max_ngram) if isinstance(max_ngram, int) else max_ngram
            assert args == (len(p),) and np.allclose(kwargs["p"], p, rtol=1e-15, atol=0)
        budget = spec_budget(len(tokens), prob, cap)
        chosen, draws = spec_albert_selection(words, budget, order.tolist(), ns)
        assert np.flatnonzero(out.mlm_labels != IGNORE).tolist() == sorted(chosen)
        assert out.ngram_draws == draws
        assert len(ns) == len(draws)                                 # no draw after the budget is used
        assert 1 <= len(chosen) <= budget
        np.testing.assert_array_equal(out.mlm_labels[sorted(chosen)], tokens[sorted(chosen)])
        unchosen = np.setdiff1d(np.arange(len(tokens)), sorted(chosen))
        np.testing.assert_array_equal(out.input_ids[unchosen], tokens[unchosen])
        changed = out.input_ids[sorted(chosen)]
        assert np.isin(changed, np.concatenate([[MASK_ID], ordinary, tokens[sorted(chosen)]])).all()


@pytest.mark.parametrize("ngram_probs, message", [
    ([0.5, 0.4], "ngram_probs=[0.5, 0.4] is invalid: expected probabilities of n = 1, 2, ... summing to 1"),
    ([], "ngram_probs=[] is invalid"), ([[0.5, 0.5]], "ngram_probs=[[0.5, 0.5]] is invalid"),
    ([1.5, -0.5], "ngram_probs=[1.5, -0.5] is invalid"), ([0.5, 0.5, 0.5], "ngram_probs=[0.5, 0.5, 0.5] is invalid"),
])
def test_ngram_probs_are_checked(ngram_probs, message):
    tokens = np.array([CLS_ID, 10, 11, SEP_ID, 12, SEP_ID])
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        create_masked_lm_predictions(tokens, IS_START, np.arange(5, 40), np.random.default_rng(0),
                                     ngram_probs=ngram_probs)
    for valid in ([1.0], [0.0, 1.0], (0.25, 0.75)):          # one length, a zero entry, a tuple: accepted
        out = create_masked_lm_predictions(tokens, IS_START, np.arange(5, 40), np.random.default_rng(0),
                                           ngram_probs=valid)
        assert (out.mlm_labels != IGNORE).sum() == 1


def test_assemble_pair_is_the_published_layout():
    """[CLS] A [SEP] B [SEP], token type 0 up to and including the first [SEP] and 1 after, int64."""
    for a, b in (([7], [8]), ([7, 8, 9], [10]), ([7], [8, 9, 10, 11])):
        tokens, types = assemble_pair(a, b)
        assert tokens.dtype == np.int64 and types.dtype == np.int64
        assert tokens.tolist() == [CLS_ID, *a, SEP_ID, *b, SEP_ID]
        assert types.tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_zero_probability_draws_nothing_and_full_probability_fills_the_budget():
    tokens = np.array([CLS_ID, 10, 11, SEP_ID, 12, 13, 14, SEP_ID])
    recorder = Recorder(np.random.default_rng(0))
    out = create_masked_lm_predictions(tokens, IS_START, np.arange(5, 40), recorder, masked_lm_prob=0.0)
    assert recorder.log == [] and out.ngram_draws == []
    assert (out.mlm_labels == IGNORE).all() and np.array_equal(out.input_ids, tokens)
    for seed in range(20):        # 5 one-piece words, budget min(20, 8) = 8, unigrams: all, never a special
        out = create_masked_lm_predictions(tokens, IS_START, np.arange(5, 40), np.random.default_rng(seed),
                                           masked_lm_prob=1.0, max_ngram=1)
        assert np.flatnonzero(out.mlm_labels != IGNORE).tolist() == [1, 2, 4, 5, 6]


def enumerate_albert_selection(words, budget, p_n):
    """Exact distribution of (chosen positions, n-used multiset) under the published rule: every order
    of the start words (uniform), every n drawn (p_n), by exhaustive enumeration with exact fractions."""
    dist = {}

    def walk(order, chosen, used, prob):
        if not order or len(chosen) >= budget:
            key = (tuple(sorted(chosen)), tuple(sorted(used)))
            dist[key] = dist.get(key, 0) + prob
            return
        w = order[0]
        for n, pn in enumerate(p_n, start=1):
            fits = [m for m in range(1, n + 1) if len(chosen) + sum(len(x) for x in words[w:w + m]) <= budget]
            span = {q for x in words[w:w + max(fits)] for q in x} if fits else set()
            if not fits or span & chosen:
                walk(order[1:], chosen, used, prob * pn)
            else:
                walk(order[1:], chosen | span, used + [max(fits)], prob * pn)

    orders = list(itertools.permutations(range(len(words))))
    for order in orders:
        walk(order, frozenset(), [], Fraction(1, len(orders)))
    return dist


def test_selection_and_span_lengths_after_shortening_match_the_exact_distribution():
    """Statistical, exact reference: [CLS] w0 w1 [SEP] w2 w3 w4 [SEP] with words of 1, 2, 1, 1, 2 pieces,
    masked_lm_prob 0.3 (budget round(3.0) = 3), n ~ 6/11, 3/11, 2/11. The probability of every possible
    (chosen positions, span lengths used) outcome is enumerated exactly over the 120 start orders and the
    n drawn; 12,000 samples are compared cell by cell (chi-square, false failure 1e-6), and so are the
    span lengths after shortening (1, 2, 3 words). A uniform n, n proportional to 1/n^2, no shortening
    (skip an overflowing n-gram) or shortening that ignores the budget each move several cells by tens
    of standard deviations here."""
    tokens = np.array([CLS_ID, 10, 11, 41, SEP_ID, 12, 13, 14, 42, SEP_ID])
    words = spec_words(tokens.tolist(), IS_START)
    assert words == [[1], [2, 3], [5], [6], [7, 8]]
    budget = spec_budget(len(tokens), 0.3, 20)
    assert budget == 3
    p_n = [Fraction(6, 11), Fraction(3, 11), Fraction(2, 11)]
    exact = enumerate_albert_selection(words, budget, p_n)
    assert sum(exact.values()) == 1
    keys = sorted(exact)
    rng = np.random.default_rng(2024)
    counts = dict.fromkeys(keys, 0)
    N = 12_000
    for _ in range(N):
        out = create_masked_lm_predictions(tokens, IS_START, np.arange(5, 40), rng, masked_lm_prob=0.3)
        key = (tuple(np.flatnonzero(out.mlm_labels != IGNORE).tolist()),
               tuple(sorted(used for _, used in out.ngram_draws if used)))
        assert key in counts, key                                   # an outcome the rule cannot produce
        counts[key] += 1
    ok, statistic, threshold = chi_square_ok([counts[k] for k in keys], [float(exact[k]) for k in keys])
    assert ok, (statistic, threshold)
    # Span lengths after shortening, pooled over spans.
    span_counts, span_probs = np.zeros(3), np.zeros(3)
    for (_, used), p in exact.items():
        for m in used:
            span_probs[m - 1] += float(p)
    for (_, used), c in counts.items():
        for m in used:
            span_counts[m - 1] += c
    span_probs /= span_probs.sum()
    # Spans of one sample are dependent; this pooled test is an extra view of the same samples, whose
    # per-span variance is at most that of independent spans times the spans per sample (<= 3), so the
    # statistic is divided by 3 to keep the false-failure bound.
    ok, statistic, threshold = chi_square_ok(span_counts, span_probs)
    assert statistic / 3 < threshold, (span_counts / span_counts.sum(), span_probs)
    assert span_probs[2] > 0.01 and span_counts[2] > 0                 # a trigram can be used here


@pytest.mark.parametrize("max_ngram", [3, 5])
def test_n_is_drawn_with_probability_one_over_n(max_ngram):
    """Every n drawn (before shortening) over 600 sequences of 40 one-piece words, prob 0.5 with no cap:
    independent categorical draws, chi-square against (1/n) / H(max_ngram) at false failure 1e-6 (about
    5,000 draws). Uniform n or a max off by one is rejected by tens of deviations."""
    tokens = np.array([CLS_ID, *range(5, 25), SEP_ID, *range(5, 25), SEP_ID])
    rng = np.random.default_rng(max_ngram)
    drawn = np.zeros(max_ngram + 2)
    for _ in range(600):
        out = create_masked_lm_predictions(tokens, np.ones(60, bool), np.arange(5, 40), rng, 0.5, 10**6,
                                           max_ngram)
        for n, _ in out.ngram_draws:
            drawn[n] += 1
    harmonic = sum(1 / k for k in range(1, max_ngram + 1))
    probs = np.array([0.0] + [1 / n / harmonic for n in range(1, max_ngram + 1)] + [0.0])
    assert drawn.sum() > 4000
    ok, statistic, threshold = chi_square_ok(drawn, probs)
    assert ok, (drawn / drawn.sum(), probs)


def test_replacement_is_80_10_10_and_random_tokens_are_uniform_ordinary_ids():
    """Each chosen position: [MASK] 0.8, kept 0.1, a uniform draw from ordinary_ids 0.1. The original
    tokens (5..24) are outside ordinary_ids (50, 51, 52), so the three cases are told apart exactly.
    About 22,000 chosen positions; chi-square (df 2) at false failure 1e-6 for the split and for the
    uniformity of the three random ids (about 2,200 draws). A 0.8 or 0.5 threshold moved to another
    constant, or a draw that never picks the last id, fails by far more than the threshold."""
    tokens = np.array([CLS_ID, *range(5, 25), SEP_ID, *range(5, 25), SEP_ID])
    ordinary = np.array([50, 51, 52])
    rng = np.random.default_rng(7)
    split, random_ids = np.zeros(3), np.zeros(3)
    for _ in range(1000):
        out = create_masked_lm_predictions(tokens, np.ones(60, bool), ordinary, rng, 0.5, 10**6, 3)
        chosen = out.mlm_labels != IGNORE
        new, old = out.input_ids[chosen], tokens[chosen]
        split += [(new == MASK_ID).sum(), (new == old).sum(), np.isin(new, ordinary).sum()]
        random_ids += [(new == r).sum() for r in ordinary]
        assert ((new == MASK_ID) | (new == old) | np.isin(new, ordinary)).all()
    assert split.sum() > 20_000
    ok, statistic, threshold = chi_square_ok(split, [0.8, 0.1, 0.1])
    assert ok, split / split.sum()
    ok, statistic, threshold = chi_square_ok(random_ids, [1 / 3] * 3)
    assert ok, random_ids


# --- sentence pairs: target length, split, order, label ------------------------------------------
def one_token_sentences(count, first_id=1000):
    return [[first_id + k] for k in range(count)]


def test_short_sequence_target_length_range_and_probability():
    """A document of one-token sentences closes each chunk exactly at the target length (which is at
    most max_seq_length - 3, so nothing is truncated): the first pair's length is the target. With
    max_seq_length 13 (targets 2..10): short_seq_prob 1 gives a uniform target on [2, 10] (Python's
    inclusive randint), short_seq_prob 0.3 the mixture P(10) = 0.7 + 0.3 / 9, P(k) = 0.3 / 9 otherwise,
    and 0 always 10; each drawn once per document (every pair of the document but the last has the same
    length). 3,000 documents each; chi-square at false failure 1e-6. An exclusive upper bound (never 10
    in the short draw), a lower bound of 3, or a probability of 1 - short_seq_prob are rejected by
    tens of deviations."""
    max_seq_length, M = 13, 10
    document = one_token_sentences(47)
    for prob in (1.0, 0.3, 0.0):
        rng = np.random.default_rng([3, int(prob * 10)])
        lengths = np.zeros(M + 2)
        for _ in range(3000):
            pairs = create_sentence_pairs(document, max_seq_length, prob, rng)
            sizes = [len(p.tokens_a) + len(p.tokens_b) for p in pairs]
            assert len(set(sizes[:-1])) <= 1 and sizes[-1] <= max(sizes)   # one target per document
            assert sum(sizes) == 47 or sum(sizes) == 47 - 1                 # tiles it (a lone last dropped)
            lengths[sizes[0]] += 1
        probs = np.zeros(M + 2)
        probs[2:M + 1] = prob / (M - 1)
        probs[M] += 1 - prob
        ok, statistic, threshold = chi_square_ok(lengths, probs)
        assert ok, (prob, lengths)
        if prob == 1.0:
            assert lengths[2] > 0 and lengths[M] > 0 and lengths[:2].sum() == lengths[M + 1] == 0


def unique_id_documents(rng, num_documents, first_id=5, last_id=1000):
    """Documents whose every token id is different (ids first_id..last_id-1 shuffled): each token tells
    its document, sentence and place. Sentence counts 1..8, lengths 1..6; document 0 has one sentence."""
    ids = iter(rng.permutation(np.arange(first_id, last_id)).tolist())
    documents = []
    for d in range(num_documents):
        sentences = 1 if d == 0 else int(rng.integers(2, 9))
        documents.append([[next(ids) for _ in range(int(rng.integers(1, 7)))] for _ in range(sentences)])
    return documents


def locate(documents):
    """token id -> (document, sentence, rank of the token in its document)."""
    where = {}
    for d, document in enumerate(documents):
        rank = 0
        for s, sentence in enumerate(document):
            for token in sentence:
                where[token] = (d, s, rank)
                rank += 1
    return where


def check_pair(tokens_a, tokens_b, label, where, documents, max_num_tokens):
    """The published construction, checked from the source sentences: A and B come from one document,
    each a run of consecutive tokens (truncation trims only the ends), split between two sentences;
    label 0 when A precedes B in the document, 1 when it follows; at most max_num_tokens tokens, and a
    pair shorter than that is untruncated: whole consecutive sentences. Returns (document, first rank)."""
    assert len(tokens_a) >= 1 and len(tokens_b) >= 1 and len(tokens_a) + len(tokens_b) <= max_num_tokens
    a, b = [where[t] for t in tokens_a], [where[t] for t in tokens_b]
    assert len({d for d, _, _ in a + b}) == 1
    for segment in (a, b):
        assert [r for _, _, r in segment] == list(range(segment[0][2], segment[0][2] + len(segment)))
    first, second = (a, b) if a[0][2] < b[0][2] else (b, a)
    assert label == int(first is b)                       # the label is the order, and nothing else
    assert first[-1][1] < second[0][1]                    # split between sentences, never inside one
    if len(tokens_a) + len(tokens_b) < max_num_tokens:    # untruncated: whole sentences, no gap
        d, s0, _ = first[0]
        s1 = second[-1][1]
        assert [t for s in documents[d][s0:s1 + 1] for t in s] == \
               [t for t in (tokens_a + tokens_b if label == 0 else tokens_b + tokens_a)]
    return first[0][0], first[0][2]


def test_sentence_pairs_labels_and_tiling_from_the_source_sentences():
    """create_sentence_pairs on unique-id documents at max_seq_length 12 (9 tokens): every pair checked
    against its source sentences (check_pair); a document's pairs take consecutive chunks from its
    start (nothing skipped or reused except the truncated ends and a lone last sentence); the label
    rate is 1/2 (exact binomial, false failure 1e-6, over about 2,400 pairs)."""
    rng = np.random.default_rng(11)
    labels = []
    for trial in range(60):
        documents = unique_id_documents(rng, 20)
        where = locate(documents)
        for d, document in enumerate(documents):
            pairs = create_sentence_pairs(document, 12, 0.1, rng)
            if len(document) < 2:
                assert pairs == []
            previous_end = -1
            for pair in pairs:
                doc, _ = check_pair(pair.tokens_a, pair.tokens_b, pair.sop_label, where, documents, 9)
                assert doc == d
                sentences = sorted({where[t][1] for t in pair.tokens_a + pair.tokens_b})
                assert sentences[0] > previous_end                # chunks in order, never overlapping
                previous_end = sentences[-1]
                labels.append(pair.sop_label)
    assert 0 < sum(labels) < len(labels) and len(labels) > 2000
    assert binomial_ok(sum(labels), len(labels), 0.5)


def test_tokenize_documents_drops_empty_sentences_then_empty_documents():
    tokenizer = SimpleNamespace(encode=lambda s: [ord(c) for c in s])
    got = tokenize_documents([["ab", "", "c"], ["", ""], ["d"]], tokenizer)
    assert got == [[[97, 98], [99]], [[100]]]


# --- the stream: every example, every batch, several epochs -----------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(None, vocab_size=1000)


@pytest.fixture(scope="module")
def documents():
    return unique_id_documents(np.random.default_rng(5), 40)


SEQ = 16                        # max_seq_length of the stream tests: segments of at most 13 tokens


def make_stream(cls, tokenizer, documents, **kwargs):
    """A stream over ``documents`` (token ids), the corpus text replaced after tokenisation."""
    settings = {**dict(tokenizer=tokenizer, max_seq_length=SEQ, batch_size=5, seed=3), **kwargs}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream_module, "tokenize_documents", lambda text, tok: [list(d) for d in documents])
        return cls(**settings)


def segments(input_ids, mlm_labels):
    """(A, B) of one row: the original tokens (labels where masked) between [CLS], [SEP] and [SEP]."""
    original = np.where(mlm_labels != IGNORE, mlm_labels, input_ids).tolist()
    assert original[0] == CLS_ID
    first_sep = original.index(SEP_ID)
    second_sep = original.index(SEP_ID, first_sep + 1)
    return original[1:first_sep], original[first_sep + 1:second_sep], second_sep + 1


def test_every_example_sop_label_matches_its_construction(tokenizer, documents):
    """Four epochs of the ALBERT dataset (about 280 examples): each example's segments traced to their
    sentences (check_pair: label == order), the layout and token types, masking within the budget and
    never on a special; both labels present, label rate 1/2 (exact binomial, false failure 1e-6)."""
    dataset = make_stream(PretrainingDataset, tokenizer, documents)
    where = locate(documents)
    labels = []
    for epoch in range(4):
        batch = dataset.epoch_examples(epoch)
        for row in range(len(batch["sop_labels"])):
            ids, labels_row = batch["input_ids"][row], batch["mlm_labels"][row]
            a, b, n = segments(ids, labels_row)
            check_pair(a, b, int(batch["sop_labels"][row]), where, documents, SEQ - 3)
            assert (batch["attention_mask"][row] == (np.arange(SEQ) < n)).all()
            assert (batch["token_type_ids"][row] == ((np.arange(SEQ) >= len(a) + 2) & (np.arange(SEQ) < n))).all()
            assert (ids[n:] == PAD_ID).all() and (labels_row[n:] == IGNORE).all()
            chosen = np.flatnonzero(labels_row != IGNORE)
            assert 1 <= len(chosen) <= spec_budget(n, 0.15, 20)
            assert not np.isin(chosen, [0, len(a) + 1, n - 1]).any()
            labels.append(int(batch["sop_labels"][row]))
    assert set(labels) == {0, 1} and len(labels) > 200
    assert binomial_ok(sum(labels), len(labels), 0.5)


def test_dataset_passes_its_masking_settings_on(tokenizer, documents):
    """masked_lm_prob 1, max_predictions_per_seq 3, max_ngram 1: budget min(3, round(n)) = 3; with
    unigrams of whole words, c chosen positions leave only words longer than 3 - c unchosen (each
    was visited with at least that much budget left)."""
    dataset = make_stream(PretrainingDataset, tokenizer, documents, masked_lm_prob=1.0,
                          max_predictions_per_seq=3, max_ngram=1)
    batch = dataset.epoch_examples(0)
    counts = (batch["mlm_labels"] != IGNORE).sum(axis=1)
    original = np.where(batch["mlm_labels"] != IGNORE, batch["mlm_labels"], batch["input_ids"])
    for row, count in enumerate(counts):
        n = int(batch["attention_mask"][row].sum())
        words = spec_words(original[row, :n].tolist(), tokenizer.word_start_table)
        chosen = set(np.flatnonzero(batch["mlm_labels"][row] != IGNORE).tolist())
        assert 1 <= count <= 3
        for word in words:
            assert set(word) <= chosen or (not set(word) & chosen and len(word) > 3 - count)
    assert (counts == 3).mean() > 0.8


def test_batches_carry_each_examples_sop_label(tokenizer, documents):
    """The stream's batches are the epoch's examples in order, every key row for row (a batch that
    drops or flips the sop label differs from its examples), across the first epoch boundary."""
    dataset = make_stream(PretrainingDataset, tokenizer, documents)
    epochs = [dataset.epoch_examples(e) for e in (0, 1)]
    stream = {k: np.concatenate([e[k] for e in epochs]) for k in epochs[0]}
    got = [dataset.next_batch() for _ in range(len(epochs[0]["sop_labels"]) // 5 + 2)]
    for k in stream:
        joined = np.concatenate([g[k] for g in got])
        np.testing.assert_array_equal(joined, stream[k][:len(joined)], err_msg=k)
    assert set(np.concatenate([g["sop_labels"] for g in got]).tolist()) == {0, 1}


def tiny_model(type_vocab_size=2):
    return SimpleNamespace(backend=backends.get("numpy"), config=Config.preset("tiny", type_vocab_size=type_vocab_size))


def test_step_batch_builder_keeps_albert_examples_and_their_counts(tokenizer, documents):
    """next_step_batch, ALBERT: the micro-batches (those in ``indices`` only) are the stream's next
    grad_accum batches unchanged, sop labels included (each checked against its sentences); mlm_counts
    are each micro-batch's labelled positions, sizes its rows, tokens the non-pad tokens of all of them."""
    cfg = PretrainConfig(objective="albert", batch_size=5, grad_accum=3, seq_len=SEQ, seed=0)
    stream, twin = (make_stream(PretrainingDataset, tokenizer, documents) for _ in range(2))
    where = locate(documents)
    for step in range(4):           # about 60 examples, past the first epoch boundary
        expected = [twin.next_batch() for _ in range(3)]
        indices = [[0, 1, 2], [2], [0, 2], None][step]
        got = batches_module.next_step_batch(stream, cfg, tiny_model(), step, indices)
        assert got.indices == (indices or [0, 1, 2])
        assert got.mlm_counts == [int((e["mlm_labels"] != IGNORE).sum()) for e in expected]
        assert got.sizes == [5, 5, 5]
        assert got.tokens == sum(int((e["input_ids"] != PAD_ID).sum()) for e in expected)
        assert len(got.micro_batches) == len(got.indices)
        for micro, i in zip(got.micro_batches, got.indices):
            assert set(micro) == set(batches_module.MODEL_INPUTS)
            for key in micro:
                np.testing.assert_array_equal(micro[key], expected[i][key], err_msg=key)
            for row in range(5):
                a, b, _ = segments(micro["input_ids"][row], micro["mlm_labels"][row])
                check_pair(a, b, int(micro["sop_labels"][row]), where, documents, SEQ - 3)
    assert stream.state_dict() == twin.state_dict()
    single = batches_module.next_step_batch(stream, PretrainConfig(objective="albert", batch_size=5, grad_accum=1,
                                                                   seq_len=SEQ, seed=0), tiny_model(), 4)
    expected = twin.next_batch()
    assert single.indices == [0] and single.sizes == [5] and len(single.micro_batches) == 1
    for key in expected:
        np.testing.assert_array_equal(single.micro_batches[0][key], expected[key])


@pytest.mark.parametrize("type_vocab_size", [2, 6])
def test_step_batch_builder_unilm_labels_and_order(tokenizer, documents, type_vocab_size):
    """next_step_batch, UniLM: each pair is given in document order, and only bidirectional rows get a
    sentence-order label, which says whether the first segment follows the second in the document;
    every other row keeps document order and -100. Token types are UniLM's six when the config has
    them. The micro-batch i of step s is unilm_host_batch of the same pairs with seed (seed, s, i), so a
    resumed run rebuilds it; tokens counts [CLS] A [SEP] B [SEP] of every pair."""
    cfg = PretrainConfig(objective="unilm", batch_size=6, grad_accum=2, seq_len=SEQ, seed=4)
    model = tiny_model(type_vocab_size)
    stream, twin = (make_stream(SentencePairStream, tokenizer, documents, batch_size=6) for _ in range(2))
    where = locate(documents)
    sop, kinds_seen = [], set()
    for step in range(5):
        pairs = [twin.next_batch() for _ in range(2)]
        got = batches_module.next_step_batch(stream, cfg, model, step)
        assert got.sizes == [6, 6] and got.indices == [0, 1]
        assert got.tokens == sum(len(p.tokens_a) + len(p.tokens_b) + 3 for ps in pairs for p in ps)
        assert got.tokens == sum(int((m["input_ids"] != PAD_ID).sum()) for m in got.micro_batches)
        assert got.mlm_counts == [int((m["mlm_labels"] != IGNORE).sum()) for m in got.micro_batches]
        for i, micro in enumerate(got.micro_batches):
            rebuilt = batches_module.unilm_host_batch(pairs[i], SEQ, model.config, seed=(4, step, i))
            for key in micro:
                np.testing.assert_array_equal(micro[key], rebuilt[key], err_msg=key)
            for row in range(6):
                a, b, n = segments(micro["input_ids"][row], micro["mlm_labels"][row])
                label = int(micro["sop_labels"][row])
                types = micro["token_type_ids"][row]
                if label == IGNORE:
                    check_pair(a, b, 0, where, documents, SEQ - 3)       # document order
                else:
                    check_pair(a, b, label, where, documents, SEQ - 3)
                    sop.append(label)
                if type_vocab_size == 6:
                    first, second = int(types[0]), int(types[n - 1])
                    kinds_seen.add((first, second))
                    assert (first, second) in {(0, 1), (2, 2), (3, 3), (4, 5)}
                    assert (label != IGNORE) == ((first, second) == (0, 1))
                else:
                    assert (types[:len(a) + 2] == 0).all() and (types[len(a) + 2:n] == 1).all()
    assert set(sop) == {0, 1}
    if type_vocab_size == 6:
        assert kinds_seen == {(0, 1), (2, 2), (3, 3), (4, 5)}
    # the draw is a function of (run seed, step, micro-batch): the same triple rebuilds it, any other differs
    draws = {seed: batches_module.unilm_host_batch(pairs[0], SEQ, model.config, seed=seed)
             for seed in ((4, 0, 0), (4, 0, 1), (4, 1, 0), (5, 0, 0))}
    for a, b in itertools.combinations(draws.values(), 2):
        assert not np.array_equal(a["mlm_labels"], b["mlm_labels"])
    again = batches_module.unilm_host_batch(pairs[0], SEQ, model.config, seed=(4, 0, 1))
    for key in again:
        np.testing.assert_array_equal(again[key], draws[(4, 0, 1)][key])


def test_data_seed_and_make_stream():
    """The stream's seed is SeedSequence([seed, 0xDA7A]) (a stored run's data order depends on it),
    distinct from the run seed; make_stream picks the objective's stream with the run's settings."""
    assert batches_module.data_seed(0) == int(np.random.SeedSequence([0, 0xDA7A]).generate_state(1)[0])
    assert batches_module.data_seed(7) == int(np.random.SeedSequence([7, 0xDA7A]).generate_state(1)[0])
    assert len({batches_module.data_seed(s) for s in range(50)} | set(range(50))) == 100


def test_make_stream_objectives(tokenizer, tmp_path):
    """make_stream: the objective's stream class on the given corpus, tokenizer and config, with the run's
    batch size, length and derived data seed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat.\nIt purred.\n\nRain fell all day.\nThe river rose.\nBoats were tied up.\n")
    config = Config.preset("tiny")
    albert = batches_module.make_stream("albert", str(corpus), tokenizer, 3, 24, 5, config)
    unilm = batches_module.make_stream("unilm", str(corpus), tokenizer, 3, 24, 5, config)
    assert type(albert) is PretrainingDataset and type(unilm) is SentencePairStream
    for stream in (albert, unilm):
        assert (stream.batch_size, stream.max_seq_length, stream.seed) == (3, 24, batches_module.data_seed(5))
        assert stream.corpus_path == str(corpus) and stream.tokenizer is tokenizer
        assert [len(d) for d in stream.documents] == [2, 3]
    with pytest.raises(ValueError, match="max_seq_length=200 is invalid"):    # checked against the config
        batches_module.make_stream("albert", str(corpus), tokenizer, 3, 200, 5, config)


# --- the stream over several epoch boundaries --------------------------------------------------------
EPOCHS = 6


def test_each_epoch_is_a_new_pass_over_the_whole_corpus(tokenizer, documents):
    """Epochs 0..5: each uses every document that has two sentences, each document's chunks in order and
    disjoint (no example repeated within an epoch), examples shuffled across documents; no two epochs
    alike (not the same epoch repeated: different order, different splits)."""
    stream = make_stream(SentencePairStream, tokenizer, documents)
    where = locate(documents)
    seen = []
    pairable = {d for d, document in enumerate(documents) if len(document) >= 2}
    for epoch in range(EPOCHS):
        pairs = stream.epoch_examples(epoch)
        located = [check_pair(p.tokens_a, p.tokens_b, p.sop_label, where, documents, SEQ - 3) for p in pairs]
        assert {d for d, _ in located} == pairable
        per_document = {}
        for pair, (d, _) in zip(pairs, located):
            per_document.setdefault(d, []).append(sorted(where[t][1] for t in pair.tokens_a + pair.tokens_b))
        for d, ranges in per_document.items():
            ranges.sort()
            assert all(r0[-1] < r1[0] for r0, r1 in zip(ranges, ranges[1:]))   # disjoint chunks
        same_document_neighbours = sum(d0 == d1 for (d0, _), (d1, _) in zip(located, located[1:]))
        assert same_document_neighbours < 0.5 * (len(pairs) - len(pairable))   # shuffled, not by document
        seen.append([(p.tokens_a, p.tokens_b, p.sop_label) for p in pairs])
    for e0, e1 in itertools.combinations(range(EPOCHS), 2):
        assert seen[e0] != seen[e1] and [x[0] for x in seen[e0]] != [x[0] for x in seen[e1]]
        assert sorted(seen[e0]) != sorted(seen[e1])                       # new splits/swaps, not only order


@pytest.mark.parametrize("batch_size", [7, 130])
def test_stream_crosses_several_epoch_boundaries_without_gap_or_repeat(tokenizer, documents, batch_size):
    """The stream is epoch 0, 1, 2, ... concatenated, whatever the batch size (7: many batches straddle
    boundaries; 130: more than two epochs in one batch); epoch and position after every batch are
    the count of examples consumed, split at the epoch sizes."""
    stream = make_stream(SentencePairStream, tokenizer, documents, batch_size=batch_size)
    reference = make_stream(SentencePairStream, tokenizer, documents)
    sizes = [len(reference.epoch_examples(e)) for e in range(EPOCHS + 6)]
    flat = [p for e in range(EPOCHS + 6) for p in reference.epoch_examples(e)]
    consumed = 0
    while stream.epoch < EPOCHS:
        batch = stream.next_batch()
        assert batch == flat[consumed:consumed + batch_size]
        consumed += batch_size
        epoch, position = 0, consumed
        while position >= sizes[epoch]:
            position -= sizes[epoch]
            epoch += 1
        assert (stream.epoch, stream.position) == (epoch, position)
    assert len(stream._cache) <= 2          # a batch needs at most two epochs held (documented bound)


def test_resume_at_every_batch_across_several_boundaries(tokenizer, documents):
    """A state saved after any batch (JSON round trip), including exactly at an epoch boundary, loaded
    into a fresh ALBERT dataset, gives the same next batches as the uninterrupted stream, past the
    following boundaries."""
    original = make_stream(PretrainingDataset, tokenizer, documents, batch_size=9)
    states, outputs = [], []
    for _ in range(40):              # about 5 epochs
        states.append(json.loads(json.dumps(original.state_dict())))
        outputs.append(original.next_batch())
    assert states[-1]["epoch"] >= 4
    first_in_epoch = [next(k for k, s in enumerate(states) if s["epoch"] == e) for e in range(1, 5)]
    for k in sorted(set(range(0, 40, 5)) | set(first_in_epoch)):
        resumed = make_stream(PretrainingDataset, tokenizer, documents, batch_size=9)
        resumed.load_state_dict(states[k])
        for expected in outputs[k:k + 12]:
            got = resumed.next_batch()
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    for epoch in range(1, 5):               # exactly at a boundary: position 0 of a later epoch
        resumed = make_stream(PretrainingDataset, tokenizer, documents, batch_size=9)
        resumed.load_state_dict({**states[0], "epoch": epoch, "position": 0})
        np.testing.assert_array_equal(resumed.next_batch()["input_ids"],
                                      original.epoch_examples(epoch)["input_ids"][:9])


def test_a_batch_at_the_end_of_an_epoch_and_exact_multiples(tokenizer, documents):
    """batch_size equal to the epoch size: every batch is exactly one epoch, and position stays 0."""
    probe = make_stream(SentencePairStream, tokenizer, documents)
    size = len(probe.epoch_examples(0))
    stream = make_stream(SentencePairStream, tokenizer, documents, batch_size=size)
    assert stream.next_batch() == probe.epoch_examples(0)
    assert (stream.epoch, stream.position) == (1, 0)
    following = probe.epoch_examples(1) + probe.epoch_examples(2)
    assert stream.next_batch() == following[:size]
    size1 = len(probe.epoch_examples(1))
    assert (stream.epoch, stream.position) == ((1, size) if size < size1 else (2, size - size1))


def test_load_state_dict_checks_every_field(tokenizer, documents):
    stream = make_stream(SentencePairStream, tokenizer, documents)
    state = stream.state_dict()
    assert state == {"seed": 3, "epoch": 0, "position": 0, "fingerprint": stream.fingerprint}
    last = len(stream.epoch_examples(2)) - 1
    stream.load_state_dict({**state, "epoch": 2, "position": last})          # the last example of epoch 2
    assert (stream.epoch, stream.position) == (2, last)
    assert stream.next_batch()[0] == stream.epoch_examples(2)[last]
    assert (stream.epoch, stream.position) == (3, 4)
    with pytest.raises(ValueError, match=rf"position'\]={last + 1} is invalid: expected less than {last + 1}, "
                                         r"the examples in epoch 2"):
        stream.load_state_dict({**state, "epoch": 2, "position": last + 1})
    with pytest.raises(ValueError, match=r"epoch'\]=-1 is invalid: expected a non-negative integer"):
        stream.load_state_dict({**state, "epoch": -1})
    with pytest.raises(ValueError, match=r"position'\]=-1 is invalid: expected a non-negative integer"):
        stream.load_state_dict({**state, "position": -1})
    with pytest.raises(ValueError, match=r"epoch'\]=1.0 is invalid"):
        stream.load_state_dict({**state, "epoch": 1.0})
    with pytest.raises(ValueError, match=r"keys \['epoch', 'fingerprint', 'position', 'seed', 'x'\], expected "
                                         r"\['epoch', 'fingerprint', 'position', 'seed'\]"):
        stream.load_state_dict({**state, "x": 1})
    with pytest.raises(ValueError, match=r"dataset state has keys list"):
        stream.load_state_dict([])
    with pytest.raises(ValueError, match=r"^dataset state has fingerprint='0', expected '[0-9a-f]{16}': it was saved "
                                         r"with another corpus, tokenizer or masking/length settings$"):
        stream.load_state_dict({**state, "fingerprint": "0"})
    with pytest.raises(ValueError, match=r"^dataset state has seed=1, expected this dataset's seed=3$"):
        stream.load_state_dict({**state, "seed": 1})
    assert (stream.epoch, stream.position) == (3, 4)                          # failed loads change nothing


@pytest.mark.parametrize("change", [dict(masked_lm_prob=0.2), dict(max_predictions_per_seq=19), dict(max_ngram=2),
                                    dict(short_seq_prob=0.2), dict(max_seq_length=SEQ + 1)])
def test_fingerprint_depends_on_every_example_setting(tokenizer, documents, change):
    """A state from a dataset with other masking or length settings is refused (its examples differ)."""
    base = make_stream(PretrainingDataset, tokenizer, documents)
    other = make_stream(PretrainingDataset, tokenizer, documents, **change)
    assert other.fingerprint != base.fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(base.state_dict())
    pairs = make_stream(SentencePairStream, tokenizer, documents)
    assert pairs.fingerprint != base.fingerprint
    assert make_stream(PretrainingDataset, tokenizer, documents, seed=9).fingerprint == base.fingerprint


# --- settings: defaults, validation ------------------------------------------------------------------
def test_defaults_are_albert_flags(tokenizer, documents):
    """ALBERT's create_pretraining_data.py flags (docs/reference.md §6): masked_lm_prob 0.15,
    max_predictions_per_seq 20, ngram 3, short_seq_prob 0.1; the stream's own: batch 8, T 128, seed 0.
    The masking function's defaults, replayed on a 200-token sequence: budget min(20, round(30)) = 20
    and n drawn from 1..3 only."""
    for cls in (PretrainingDataset, SentencePairStream):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stream_module, "tokenize_documents", lambda text, tok: [list(d) for d in documents])
            dataset = cls(tokenizer=tokenizer)
        assert (dataset.batch_size, dataset.max_seq_length, dataset.seed, dataset.short_seq_prob) == (8, 128, 0, 0.1)
        assert (dataset.epoch, dataset.position) == (0, 0)
        first = dataset.next_batch()
        assert len(first["sop_labels"] if cls is PretrainingDataset else first) == 8
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream_module, "tokenize_documents", lambda text, tok: [list(d) for d in documents])
        dataset = PretrainingDataset(tokenizer=tokenizer)
    assert (dataset.masked_lm_prob, dataset.max_predictions_per_seq, dataset.max_ngram) == (0.15, 20, 3)
    rng = np.random.default_rng(12)
    tokens = np.array([CLS_ID, *rng.integers(5, 60, 99), SEP_ID, *rng.integers(5, 60, 98), SEP_ID])
    seen = set()
    for _ in range(30):
        recorder = Recorder(rng)
        out = create_masked_lm_predictions(tokens, IS_START, np.arange(5, 40), recorder)
        [(_, _, _, order)] = recorder.calls("permutation")
        ns = [int(result) + 1 for _, _, _, result in recorder.calls("choice")]
        chosen, draws = spec_albert_selection(spec_words(tokens.tolist(), IS_START), 20, order.tolist(), ns)
        assert np.flatnonzero(out.mlm_labels != IGNORE).tolist() == sorted(chosen) and out.ngram_draws == draws
        seen |= set(ns)
    assert seen == {1, 2, 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0 is invalid: expected a positive integer"),
    (dict(batch_size=2.0), "batch_size=2.0 is invalid: expected a positive integer"),
    (dict(max_seq_length=4), "max_seq_length=4 is invalid: expected an integer >= 5 (room for [CLS] a [SEP] b [SEP])"),
    (dict(max_seq_length=16.0), "max_seq_length=16.0 is invalid: expected an integer >= 5 (room for [CLS] a [SEP] b "
                                "[SEP])"),
    (dict(seed=-1), "seed=-1 is invalid: expected a non-negative integer"),
    (dict(seed=True), "seed=True is invalid: expected a non-negative integer"),
    (dict(short_seq_prob=1.5), "short_seq_prob=1.5 is invalid: expected a probability in [0, 1]"),
    (dict(short_seq_prob=-0.1), "short_seq_prob=-0.1 is invalid: expected a probability in [0, 1]"),
    (dict(short_seq_prob="0.1"), "short_seq_prob='0.1' is invalid: expected a probability in [0, 1]"),
    (dict(masked_lm_prob=-0.1), "masked_lm_prob=-0.1 is invalid: expected a probability in [0, 1]"),
    (dict(masked_lm_prob=1.01), "masked_lm_prob=1.01 is invalid: expected a probability in [0, 1]"),
    (dict(masked_lm_prob="0.1"), "masked_lm_prob='0.1' is invalid: expected a probability in [0, 1]"),
    (dict(max_predictions_per_seq=0), "max_predictions_per_seq=0 is invalid: expected a positive integer"),
    (dict(max_predictions_per_seq=2.0), "max_predictions_per_seq=2.0 is invalid: expected a positive integer"),
    (dict(max_ngram=0), "max_ngram=0 is invalid: expected a positive integer"),
    (dict(max_ngram=1.0), "max_ngram=1.0 is invalid: expected a positive integer"),
    (dict(config=Config.preset("tiny", type_vocab_size=1)),
     "config.type_vocab_size=1 is invalid: expected at least 2 (segments A and B)"),
    (dict(config=Config.preset("tiny", pad_token_id=3)), "config.pad_token_id=3 is invalid: expected 0"),
    (dict(config=Config.preset("tiny"), max_seq_length=129),
     "max_seq_length=129 is invalid: expected at most config.max_position_embeddings=128"),
    (dict(config=Config.preset("tiny", vocab_size=999)),
     "tokenizer vocab_size=1000 does not match config.vocab_size=999; expected equal sizes (train the tokenizer "
     "with vocab_size=999 or change the config)"),
])
def test_settings_are_validated_with_exact_messages(tokenizer, documents, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        make_stream(PretrainingDataset, tokenizer, documents, **kwargs)


def test_boundary_settings_are_accepted(tokenizer, documents):
    """The inclusive ends of every range: batch 1, T 5 and T = max_position_embeddings, seed 0,
    probabilities 0 and 1, max_predictions_per_seq 1, max_ngram 1, a config with exactly two token
    types; numpy integers count as integers."""
    low = make_stream(PretrainingDataset, tokenizer, documents, batch_size=1, max_seq_length=5, seed=0,
                      short_seq_prob=0, masked_lm_prob=0, max_predictions_per_seq=1, max_ngram=1)
    batch = low.next_batch()
    assert batch["input_ids"].shape == (1, 5) and (batch["mlm_labels"] == IGNORE).all()   # nothing masked at 0
    high = make_stream(PretrainingDataset, tokenizer, documents, batch_size=np.int64(2), max_seq_length=128,
                       short_seq_prob=1, masked_lm_prob=1, max_predictions_per_seq=np.int32(1),
                       config=Config.preset("tiny", type_vocab_size=2))
    batch = high.next_batch()
    assert batch["input_ids"].shape == (2, 128) and ((batch["mlm_labels"] != IGNORE).sum(axis=1) == 1).all()
    for key, value in batch.items():
        assert value.dtype == np.int64, key


def test_fingerprint_is_16_hex_digits(tokenizer, documents):
    stream = make_stream(SentencePairStream, tokenizer, documents)
    assert re.fullmatch("[0-9a-f]{16}", stream.fingerprint)
    assert stream.state_dict()["fingerprint"] == stream.fingerprint


# --- UniLM's batches (docs/reference.md §3.2, ref_bert/unilm.py's docstring) ---------------------------
def spec_unilm_spans(candidates, budget, start_order, ns_drawn):
    """UniLM's span rule as documented: starts visited in the drawn order until the budget is used; each
    takes the longest length m <= n drawn whose positions start..start+m-1 are all uncovered candidates
    within the remaining budget (none fitting: skipped). Returns (sorted spans, draws used)."""
    candidates, covered, spans, ns = set(candidates), set(), [], iter(ns_drawn)
    used = 0
    for start in start_order:
        if len(covered) >= budget:
            break
        n, used = next(ns), used + 1
        fitting = [m for m in range(1, n + 1) if len(covered) + m <= budget
                   and all(p in candidates and p not in covered for p in range(start, start + m))]
        if fitting:
            covered |= set(range(start, start + max(fitting)))
            spans.append((start, max(fitting)))
    return sorted(spans), used


@pytest.mark.parametrize("ngram_probs", [None, {3: 1.0}, {1: 0.2, 2: 0.3, 3: 0.5}, {2: 0.5, 4: 0.5}])
def test_unilm_spans_replay_the_documented_rule(ngram_probs):
    """Exact: 200 random candidate sets (gaps where specials sit) and budgets 1..12; the spans equal the
    documented rule applied to the code's own random decisions (start order, n drawn), and no n is
    drawn once the budget is used."""
    rng = np.random.default_rng(31)
    kwargs = {} if ngram_probs is None else {"ngram_probs": ngram_probs}
    for _ in range(200):
        candidates = sorted(set(rng.integers(1, 40, size=int(rng.integers(1, 30))).tolist()))
        budget = int(rng.integers(1, 13))
        recorder = Recorder(rng)
        spans = choose_spans(candidates, budget, recorder, **kwargs)
        [(_, (order_in,), _, order)] = recorder.calls("permutation")
        assert order_in.tolist() == candidates
        ns = [int(result) for _, _, _, result in recorder.calls("choice")]
        expected, used = spec_unilm_spans(candidates, budget, order.tolist(), ns)
        assert spans == expected and len(ns) == used
        positions = [p for s, m in spans for p in range(s, s + m)]
        assert len(positions) == min(budget, len(candidates))      # the fallback to n = 1 always fills


def largest_remainder(batch_size, shares):
    """Counts by the largest-remainder method with exact fractions: (sure counts, tied kinds, seats left
    for the tied kinds)."""
    exact = {k: Fraction(s).limit_denominator(1000) * batch_size for k, s in shares.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    left = batch_size - sum(counts.values())
    order = sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)
    if left == 0:
        return counts, [], 0
    cutoff = exact[order[left - 1]] - counts[order[left - 1]]
    for k in order:
        if exact[k] - counts[k] > cutoff:
            counts[k] += 1
            left -= 1
    tied = [k for k in order if exact[k] - counts[k] == cutoff]
    if len(tied) == left:                      # every tied kind gets a seat: no choice to make
        for k in tied:
            counts[k] += 1
        return counts, [], 0
    return counts, tied, left


def test_unilm_objective_counts_are_largest_remainder_with_random_ties():
    """For every batch size 1..13 and 40 seeds: the kinds' counts are the largest-remainder allocation of
    1/3, 1/3, 1/6, 1/6 (exact fractions), the seats left for tied remainders going to a random choice of
    the tied kinds (each tied kind wins in some seed and loses in another); the order is shuffled."""
    for B in range(1, 14):
        sure, tied, left = largest_remainder(B, OBJECTIVE_SHARES)
        winners = {k: 0 for k in tied}
        for seed in range(40):
            kinds = objective_kinds(B, np.random.default_rng([B, seed]))
            counts = {k: kinds.count(k) for k in OBJECTIVE_SHARES}
            assert len(kinds) == B
            extra = {k: counts[k] - sure[k] for k in OBJECTIVE_SHARES}
            assert all(extra[k] == 0 for k in OBJECTIVE_SHARES if k not in tied), (B, counts, sure)
            assert sum(extra[k] for k in tied) == left and all(extra[k] in (0, 1) for k in tied)
            for k in tied:
                winners[k] += extra[k]
        assert all(0 < w < 40 for w in winners.values()), (B, winners)
    orders = {tuple(objective_kinds(6, np.random.default_rng(seed))) for seed in range(30)}
    assert len(orders) > 10                                            # shuffled, not in a fixed order


def test_unilm_replacement_is_80_10_10_with_uniform_non_special_tokens():
    """replace_tokens on 30,000 positions holding id 500 with vocab_size 8: [MASK] 0.8, a uniform token
    of 5..7 (never a special) 0.1, unchanged 0.1; chi-square (df 2) at false failure 1e-6 for the split
    and for the uniformity of the random tokens (about 3,000). Other positions untouched, labels the
    original ids there and -100 elsewhere. A custom split (0.5, 0.3, 0.2) = ([MASK], random, unchanged) is followed too."""
    for probs in (REPLACE_PROBS, (0.5, 0.3, 0.2)):
        rng = np.random.default_rng(17)
        split, random_ids = np.zeros(3), np.zeros(3)
        for _ in range(300):
            ids = np.full(120, 500)
            positions = np.sort(rng.choice(120, size=100, replace=False))
            kwargs = {} if probs is REPLACE_PROBS else {"replace_probs": probs}
            labels = replace_tokens(ids, positions, 8, rng, **kwargs)
            assert (labels[positions] == 500).all() and (np.delete(labels, positions) == IGNORE).all()
            assert (np.delete(ids, positions) == 500).all()
            new = ids[positions]
            split += [(new == MASK_ID).sum(), np.isin(new, [5, 6, 7]).sum(), (new == 500).sum()]
            random_ids += [(new == r).sum() for r in (5, 6, 7)]
        assert split.sum() == 30_000
        assert chi_square_ok(split, probs)[0], (probs, split)
        assert chi_square_ok(random_ids, [1 / 3] * 3)[0], random_ids


@pytest.mark.parametrize("mask_prob, max_predictions", [(0.15, 20), (0.3, 20), (0.5, 3), (0.9, 1000), (0.05, 1),
                                                      (0.05, 20)])
def test_unilm_masking_budget_is_albert_count(mask_prob, max_predictions):
    """Every example masks exactly min(max_predictions, max(1, round(mask_prob * real)), candidates)
    positions (real counting [CLS] and both [SEP]s; the candidates are the sentence tokens), never a
    special, labels the original ids; random replacements are non-special ids below vocab_size; every
    array int64, kinds one per example."""
    rng = np.random.default_rng(8)
    pairs = [(rng.integers(5, 90, int(rng.integers(1, 30))).tolist(), rng.integers(5, 90, int(rng.integers(1, 30))).tolist())
             for _ in range(60)]
    batch = pretraining_batch(pairs, 64, 100, seed=5, mask_prob=mask_prob, max_predictions=max_predictions)
    for name in ("input_ids", "token_type_ids", "mlm_labels", "sop_labels"):
        assert getattr(batch, name).dtype == np.int64, name
    assert len(batch.kinds) == 60 and set(batch.kinds) == set(OBJECTIVE_SHARES)
    labelled = batch.mlm_labels != IGNORE
    replaced = labelled & (batch.input_ids != MASK_ID) & (batch.input_ids != batch.mlm_labels)
    assert ((batch.input_ids[replaced] >= 5) & (batch.input_ids[replaced] < 100)).all()
    for b in range(60):
        real, source = batch.num_real[b], batch.source_lens[b]
        labelled = np.flatnonzero(batch.mlm_labels[b] != IGNORE)
        assert len(labelled) == min(max_predictions, max(1, int(round(mask_prob * real))), real - 3)
        assert not np.isin(labelled, [0, source - 1, real - 1]).any() and labelled.max() < real
        original = np.where(batch.mlm_labels[b] != IGNORE, batch.mlm_labels[b], batch.input_ids[b])
        a, b_tokens = original[1:source - 1].tolist(), original[source:real - 1].tolist()
        assert sorted([a, b_tokens]) == sorted([list(pairs[b][0]), list(pairs[b][1])])


def test_unilm_defaults_and_truncation():
    """Defaults (docs/reference.md §3.2): 15% masking capped at 20 predictions (a 160-token example
    masks 20, a 100-token one round(15.0) = 15), sentence-order pairs, UniLM's six segment ids; pairs
    longer than seq_len - 3 are truncated from the ends of the longer side, not refused."""
    long_pair = (list(range(5, 85)), list(range(85, 162)))              # 80 + 77 + 3 = 160 tokens
    short_pair = (list(range(5, 52)), list(range(52, 102)))             # 47 + 50 + 3 = 100 tokens
    batch = pretraining_batch([long_pair, short_pair] * 3, 160, 200, shares={"seq2seq": 1.0})
    counts = (batch.mlm_labels != IGNORE).sum(axis=1).tolist()
    assert counts == [20, 15] * 3
    assert (batch.token_type_ids[0, :82] == 4).all() and (batch.token_type_ids[0, 82:160] == 5).all()
    again = pretraining_batch([long_pair, short_pair] * 3, 160, 200, seed=0, shares={"seq2seq": 1.0})
    np.testing.assert_array_equal(batch.input_ids, again.input_ids)     # seed 0 is the default
    bidirectional = pretraining_batch([short_pair] * 40, 104, 200, shares={"bidirectional": 1.0})
    assert set(bidirectional.sop_labels.tolist()) == {0, 1}             # SOP: labels 0/1 on every row
    for b, label in enumerate(bidirectional.sop_labels):
        original = np.where(bidirectional.mlm_labels[b] != IGNORE, bidirectional.mlm_labels[b], bidirectional.input_ids[b])
        assert label == int(original[1] == 52)                           # B (52, 53, ...) first: swapped
    truncated = pretraining_batch([long_pair], 40, 200, shares={"left_to_right": 1.0})
    original = np.where(truncated.mlm_labels[0] != IGNORE, truncated.mlm_labels[0], truncated.input_ids[0])
    assert truncated.num_real == [40]
    a, b = original[1:truncated.source_lens[0] - 1], original[truncated.source_lens[0]:39]
    assert len(a) + len(b) == 37 and abs(len(a) - len(b)) <= 1
    assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()          # runs: trimmed only at the ends


def test_unilm_next_sentence_takes_a_uniform_other_pair():
    """pair_task='nsp': a swapped bidirectional example takes B from one of the other B - 1 pairs,
    uniformly (chi-square over the offsets, false failure 1e-6), never its own; a batch of one pair
    cannot, so its label is 0."""
    pairs = [([10 + k] * 2, [60 + k] * 3) for k in range(4)]
    offsets = np.zeros(4)
    for seed in range(600):
        batch = pretraining_batch(pairs, 10, 100, seed=seed, shares={"bidirectional": 1.0}, pair_task="nsp",
                                  mask_prob=0.01)
        for row in range(4):
            original = np.where(batch.mlm_labels[row] != IGNORE, batch.mlm_labels[row], batch.input_ids[row])
            a_pair, b_pair = original[1] - 10, original[batch.source_lens[row]] - 60
            assert a_pair == row
            assert batch.sop_labels[row] == int(b_pair != row)
            offsets[(b_pair - row) % 4] += 1
    assert offsets[0] > 0 and chi_square_ok(offsets[1:], [1 / 3] * 3)[0], offsets
    assert binomial_ok(offsets[1:].sum(), offsets.sum(), 0.5)
    for seed in range(8):                                        # a swap drawn or not: label 0, own B
        single = pretraining_batch(pairs[:1], 10, 100, seed=seed, shares={"bidirectional": 1.0}, pair_task="nsp")
        assert single.sop_labels.tolist() == [0] and 60 in single.input_ids[0].tolist() + single.mlm_labels[0].tolist()
    labels = []
    for seed in range(8):                                        # two pairs: the other one's B when swapped
        two = pretraining_batch(pairs[:2], 10, 100, seed=seed, shares={"bidirectional": 1.0}, pair_task="nsp",
                                mask_prob=0.01)
        for row in range(2):
            original = np.where(two.mlm_labels[row] != IGNORE, two.mlm_labels[row], two.input_ids[row])
            assert two.sop_labels[row] == int(original[two.source_lens[row]] - 60 != row)
            labels.append(int(two.sop_labels[row]))
    assert set(labels) == {0, 1}


def test_unilm_finetune_counts_candidates_and_replacement():
    """seq2seq fine-tuning: max(1, round(mask_prob * (|target| + 1))) positions, capped by
    max_predictions, all in the target or on the final [SEP], drawn without repeats; replace_probs is
    followed ((1, 0, 0): all [MASK]; (0, 0, 1): all unchanged); an empty target still predicts the
    final [SEP]; the default rate is UniLM's 0.7 and mask_prob 1 is allowed."""
    rng = np.random.default_rng(4)
    pairs = [(rng.integers(5, 50, int(rng.integers(1, 6))).tolist(), rng.integers(5, 50, int(rng.integers(0, 9))).tolist())
             for _ in range(40)]
    for mask_prob, cap in ((0.7, None), (0.3, None), (1.0, None), (1.0, 2)):
        kwargs = {} if mask_prob == 0.7 else {"mask_prob": mask_prob}
        batch = seq2seq_finetune_batch(pairs, 16, 50, seed=2, max_predictions=cap, **kwargs)
        for b, (source, target) in enumerate(pairs):
            labelled = np.flatnonzero(batch.mlm_labels[b] != IGNORE)
            count = max(1, int(round(mask_prob * (len(target) + 1))))
            assert len(labelled) == (count if cap is None else min(count, cap))
            assert labelled.min() >= len(source) + 2 and labelled.max() <= len(source) + len(target) + 2
            assert batch.mlm_labels[b, len(source) + len(target) + 2] in (IGNORE, SEP_ID)
        assert batch.kinds == ["seq2seq"] * 40 and batch.sop_labels is None
    all_mask = seq2seq_finetune_batch(pairs, 16, 50, seed=2, replace_probs=(1.0, 0.0, 0.0))
    labelled = all_mask.mlm_labels != IGNORE
    assert (all_mask.input_ids[labelled] == MASK_ID).all()
    assert all_mask.source_lens == [len(a) + 2 for a, _ in pairs]
    assert all_mask.num_real == [len(a) + len(b) + 3 for a, b in pairs]
    randomised = seq2seq_finetune_batch(pairs, 16, 50, seed=2, replace_probs=(0.0, 1.0, 0.0))
    labelled = randomised.mlm_labels != IGNORE
    assert ((randomised.input_ids[labelled] >= 5) & (randomised.input_ids[labelled] < 50)).all()
    assert len(np.unique(randomised.input_ids[labelled])) > 20                    # uniform draws, not a constant
    unchanged = seq2seq_finetune_batch(pairs, 16, 50, seed=2, replace_probs=(0.0, 0.0, 1.0))
    labelled = unchanged.mlm_labels != IGNORE
    assert (unchanged.input_ids[labelled] == unchanged.mlm_labels[labelled]).all()
    default, zero, again = (seq2seq_finetune_batch(pairs, 16, 50, **kw) for kw in ({}, {"seed": 0}, {"seed": 0}))
    for name in ("input_ids", "token_type_ids", "mlm_labels"):
        np.testing.assert_array_equal(getattr(default, name), getattr(zero, name))      # default seed 0
        np.testing.assert_array_equal(getattr(again, name), getattr(zero, name))        # deterministic
        assert getattr(default, name).dtype == np.int64, name
    assert not np.array_equal(seq2seq_finetune_batch(pairs, 16, 50, seed=1).mlm_labels, zero.mlm_labels)
    with pytest.raises(ValueError, match=r"^mask_prob=1\.5 is invalid: expected a probability in \(0, 1\]$"):
        seq2seq_finetune_batch(pairs, 16, 50, mask_prob=1.5)
    empty = seq2seq_finetune_batch([([7, 8], [])], 5, 50)
    assert np.flatnonzero(empty.mlm_labels[0] != IGNORE).tolist() == [4] and empty.mlm_labels[0, 4] == SEP_ID
    exact_fit = seq2seq_finetune_batch([([7, 8], [9, 10])], 7, 50)          # 7 positions in 7: fits
    assert exact_fit.num_real == [7] and (exact_fit.token_type_ids[0] == [4, 4, 4, 4, 5, 5, 5]).all()


@pytest.mark.parametrize("call, message", [
    (lambda: pretraining_batch([([5], [6])], 3, 100), "seq_len=3 is invalid: expected an integer >= 4 ([CLS] A [SEP] B [SEP])"),
    (lambda: pretraining_batch([([5], [6])], 4.0, 100), "seq_len=4.0 is invalid: expected an integer >= 4 ([CLS] A [SEP] B [SEP])"),
    (lambda: pretraining_batch([([5], [6])], 8, 5), "vocab_size=5 is invalid: expected an integer > 5"),
    (lambda: pretraining_batch([([5], [6])], 8, 6.0), "vocab_size=6.0 is invalid: expected an integer > 5"),
    (lambda: pretraining_batch([], 8, 100), "the batch needs at least one (A, B) pair, got none"),
    (lambda: pretraining_batch([([5], [6])], 8, 100, pair_task="SOP"), "pair_task='SOP' is invalid: expected 'sop' or 'nsp'"),
    (lambda: pretraining_batch([([5], [6])], 8, 100, mask_prob=0.0), "mask_prob=0.0 is invalid: expected a probability in (0, 1)"),
    (lambda: pretraining_batch([([5], [6])], 8, 100, mask_prob=1.0), "mask_prob=1.0 is invalid: expected a probability in (0, 1)"),
    (lambda: pretraining_batch([([5], [6])], 8, 100, shares={"bidirectional": 0.5}),
     "shares={'bidirectional': 0.5} is invalid: expected mask kinds ('bidirectional', 'left_to_right', 'right_to_left', "
     "'seq2seq') with shares summing to 1"),
    (lambda: pretraining_batch([([5], [6])], 8, 100, shares={"sideways": 1.0}),
     "shares={'sideways': 1.0} is invalid: expected mask kinds ('bidirectional', 'left_to_right', 'right_to_left', "
     "'seq2seq') with shares summing to 1"),
    (lambda: pretraining_batch([([5], [6]), ([], [6])], 8, 100), "pairs[1][0] is empty: expected at least one token id"),
    (lambda: pretraining_batch([([5], [])], 8, 100), "pairs[0][1] is empty: expected at least one token id"),
    (lambda: pretraining_batch([([5], [100])], 8, 100), "pairs[0][1] contains token id 100, expected ids in [0, 100) other "
                                                        "than the structural specials PAD=0, CLS=2, SEP=3, MASK=4"),
    (lambda: pretraining_batch([([5, 6, -1, 3], [7])], 8, 100), "pairs[0][0] contains token id -1, expected ids in [0, 100) "
                                                               "other than the structural specials PAD=0, CLS=2, SEP=3, MASK=4"),
    (lambda: pretraining_batch([([5, 0], [7])], 8, 100), "pairs[0][0] contains token id 0, expected ids"),
    (lambda: pretraining_batch([([5, 4], [7])], 8, 100), "pairs[0][0] contains token id 4, expected ids"),
    (lambda: pretraining_batch([([5], [True])], 8, 100), "pairs[0][1] must be a list of integer token ids, got [True]"),
    (lambda: pretraining_batch([([5], "ab")], 8, 100), "pairs[0][1] must be a list of integer token ids, got 'ab'"),
    (lambda: pretraining_batch([([5], [6.0])], 8, 100), "pairs[0][1] must be a list of integer token ids, got [6.0]"),
    (lambda: seq2seq_finetune_batch([([5, 6], [7, 8])], 6, 100),
     "pairs[0] needs 7 positions ([CLS] source [SEP] target [SEP]), more than seq_len=6"),
    (lambda: seq2seq_finetune_batch([([5, 6], [7, 8])], 7, 100, mask_prob=0.0), "mask_prob=0.0 is invalid: expected a "
                                                                                  "probability in (0, 1]"),
    (lambda: seq2seq_finetune_batch([([], [7, 8])], 7, 100), "pairs[0] source is empty: expected at least one token id"),
    (lambda: seq2seq_finetune_batch([([5], [7, 3])], 7, 100), "pairs[0] target contains token id 3, expected ids"),
    (lambda: seq2seq_finetune_batch([], 7, 100), "the batch needs at least one (A, B) pair, got none"),
])
def test_unilm_arguments_are_validated_with_exact_messages(call, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call()


def test_unilm_accepts_unk_numpy_ids_and_the_smallest_sizes():
    """[UNK] (1) is ordinary text; numpy arrays and integers are token ids; seq_len 4 and vocab_size 6
    are the smallest allowed; model_inputs moves the five model arrays (no sop_labels in fine-tuning)."""
    batch = pretraining_batch([(np.array([1]), [np.int64(5)])], 5, 6, seed=0)
    assert batch.input_ids[0].tolist()[:3] in ([CLS_ID, 1, SEP_ID], [CLS_ID, 5, SEP_ID], [CLS_ID, MASK_ID, SEP_ID])
    tiny = seq2seq_finetune_batch([([5], [])], 4, 6)
    assert tiny.num_real == [4]
    numpy = backends.get("numpy")
    inputs = batch.model_inputs(numpy)
    assert list(inputs) == ["input_ids", "token_type_ids", "attention_mask", "mlm_labels", "sop_labels"]
    for name, value in inputs.items():
        np.testing.assert_array_equal(value, getattr(batch, name))
    assert list(tiny.model_inputs(numpy)) == ["input_ids", "token_type_ids", "attention_mask", "mlm_labels"]


# --- ref_bert.examples: the synthetic batches, against their documented recipes ------------------------
def small_config(**overrides):
    return Config.preset("tiny", **{"vocab_size": 7, "pad_token_id": 3, "type_vocab_size": 3,
                                    "max_position_embeddings": 40, **overrides})


def test_rows_recipe_lengths_ids_types_labels():
    """"rows": row 0 full and the others uniform in [max(2, T // 2), T - 1]; real ids uniform over the
    vocabulary without the pad id; token type 0 on the first n // 2 real tokens and 1 after (0 on pads);
    labels only on real positions, each chosen with probability label_rate plus one forced per row
    (so a row of n has 1 + Binomial(n - 1, rate) labels, the forced one uniform over the n positions),
    label ids uniform over the whole vocabulary; SOP labels uniform 0/1. Exact binomial / chi-square
    at false failure 1e-6."""
    config = small_config()
    lengths_seen, id_counts, label_ids = [], np.zeros(7), np.zeros(7)
    for seed in range(300):
        x = make_batch(config, 4, 16, seed)
        assert tuple(x) == BATCH_NAMES and all(v.dtype == np.int64 for v in x.values())
        n = x["attention_mask"].sum(axis=1)
        assert n[0] == 16 and ((x["attention_mask"] == (np.arange(16) < n[:, None])).all())
        lengths_seen += n[1:].tolist()
        real = x["attention_mask"] == 1
        assert (x["input_ids"][~real] == 3).all()
        id_counts += np.bincount(x["input_ids"][real], minlength=7)
        for b in range(4):
            assert (x["token_type_ids"][b] == ((np.arange(16) >= n[b] // 2) & (np.arange(16) < n[b]))).all()
        labelled = x["mlm_labels"] != IGNORE
        assert not labelled[~real].any() and (labelled.sum(axis=1) >= 1).all()
        label_ids += np.bincount(x["mlm_labels"][labelled], minlength=7)
        assert (x["position_ids"] == np.arange(16)).all()
    rows_all_equal = sum(len(set(x["mlm_labels"][b][x["mlm_labels"][b] != IGNORE].tolist())) == 1
                         for seed in range(100) for x in [make_batch(config, 4, 16, seed, label_rate=0.5)] for b in range(4))
    assert rows_all_equal < 100                    # label ids drawn per position (all equal in a row: 400 of 400)
    odd = [int(n) for seed in range(100) for n in make_batch(config, 4, 15, seed)["attention_mask"].sum(axis=1)[1:]]
    assert set(odd) == set(range(7, 15))           # T = 15: [max(2, 15 // 2), 14] = [7, 14]
    assert set(lengths_seen) == set(range(8, 16))
    assert chi_square_ok(np.bincount(lengths_seen, minlength=16)[8:], [1 / 8] * 8)[0]
    assert id_counts[3] == 0 and chi_square_ok(np.delete(id_counts, 3), [1 / 6] * 6)[0], id_counts
    assert chi_square_ok(label_ids, [1 / 7] * 7)[0], label_ids
    # label counts and the forced position, at fixed lengths
    rate, n = 0.1, 5
    extra, forced_at, sop = 0, np.zeros(n), 0
    for seed in range(2000):
        x = make_batch(config, 3, 8, seed, lengths=[n] * 3, label_rate=rate)
        labelled = x["mlm_labels"][:, :n] != IGNORE
        extra += int(labelled.sum()) - 3
        sop += int(x["sop_labels"].sum())
        forced_at += labelled[labelled.sum(axis=1) == 1].sum(axis=0)   # rows with only the forced label
    assert binomial_ok(extra, 2000 * 3 * (n - 1), rate), extra / (6000 * (n - 1))
    assert chi_square_ok(forced_at, [1 / n] * n)[0], forced_at        # the forced one: any position
    assert binomial_ok(sop, 6000, 0.5)
    # the shortest rows: T = 2 and 3 give rows of exactly 2; one token type gives all zeros
    assert (make_batch(config, 5, 2, 1)["attention_mask"].sum(axis=1) == 2).all()
    assert (make_batch(config, 5, 3, 1)["attention_mask"].sum(axis=1)[1:] == 2).all()
    assert (make_batch(small_config(type_vocab_size=1), 3, 9, 0)["token_type_ids"] == 0).all()
    assert (make_batch(small_config(type_vocab_size=2), 1, 9, 0)["token_type_ids"][0] == [0] * 4 + [1] * 5).all()


def test_matrix_recipe_draws_whole_arrays():
    """"matrix": ids uniform over the whole vocabulary (pad included, pads keep random ids), token types
    uniform in [0, type_vocab_size), padding only where ``lengths`` says, labels on real positions
    with probability label_rate exactly (no forced label), label ids uniform; SOP labels uniform."""
    config = small_config()
    ids, types, label_ids = np.zeros(7), np.zeros(3), np.zeros(7)
    labelled_total = real_total = sop = 0
    for seed in range(200):
        x = make_batch(config, 4, 10, seed, recipe="matrix", lengths=[10, 7, 3, 1], label_rate=0.2)
        assert (x["attention_mask"].sum(axis=1) == [10, 7, 3, 1]).all()
        real = x["attention_mask"] == 1
        ids += np.bincount(x["input_ids"].ravel(), minlength=7)
        types += np.bincount(x["token_type_ids"].ravel(), minlength=3)
        labelled = x["mlm_labels"] != IGNORE
        assert not labelled[~real].any()
        labelled_total += int(labelled.sum())
        real_total += int(real.sum())
        label_ids += np.bincount(x["mlm_labels"][labelled], minlength=7)
        sop += int(x["sop_labels"].sum())
    assert chi_square_ok(ids, [1 / 7] * 7)[0] and chi_square_ok(types, [1 / 3] * 3)[0], (ids, types)
    assert chi_square_ok(label_ids, [1 / 7] * 7)[0] and binomial_ok(labelled_total, real_total, 0.2)
    assert binomial_ok(sop, 800, 0.5)
    for recipe in ("rows", "matrix", "counted"):
        x = make_batch(config, 2, 6, 0, recipe=recipe)
        assert all(v.dtype == np.int64 for v in x.values()), recipe
        assert {k: v.shape for k, v in x.items()} == {k: (2,) if k == "sop_labels" else (2, 6) for k in BATCH_NAMES}
    x = make_batch(config, 4, 10, 0, recipe="matrix", label_rate=0.5)
    assert len(set(x["mlm_labels"][x["mlm_labels"] != IGNORE].tolist())) > 1       # label ids drawn per position
    default = make_batch(config)
    explicit = make_batch(config, 2, 16, 0, recipe="rows", label_rate=0.15)
    assert default["input_ids"].shape == (2, 16)
    for name in BATCH_NAMES:
        np.testing.assert_array_equal(default[name], explicit[name])
    unpadded = make_batch(config, 2, 6, 0, recipe="matrix")
    assert unpadded["attention_mask"].all() and unpadded["input_ids"].shape == (2, 6)
    assert make_batch(config, 1, 1, 0, recipe="matrix")["input_ids"].shape == (1, 1)   # T = 1 allowed


def test_counted_recipe_labels_an_exact_number():
    """"counted": exactly min(T - 1, max(1, round(label_rate * T))) labelled positions a row (1 at T = 1),
    never position 0 when T > 1, all distinct; ids and label ids uniform in [5, V); token type 1 from
    T // 2 on (all 0 with one type); no padding; SOP labels uniform."""
    config = small_config(vocab_size=9)
    for T in range(1, 41):
        for rate in (0.0, 0.1, 0.15, 0.5, 0.97):
            x = make_batch(config, 2, T, T, recipe="counted", label_rate=rate)
            count = 1 if T == 1 else min(T - 1, max(1, int(round(rate * T))))
            labelled = x["mlm_labels"] != IGNORE
            assert (labelled.sum(axis=1) == count).all(), (T, rate)
            assert T == 1 or not labelled[:, 0].any()
            assert x["attention_mask"].all() and (x["token_type_ids"] == (np.arange(T) >= T // 2)).all()
    ids, label_ids, sop = np.zeros(9), np.zeros(9), 0
    for seed in range(200):
        x = make_batch(config, 3, 20, seed, recipe="counted", label_rate=0.3)
        ids += np.bincount(x["input_ids"].ravel(), minlength=9)
        label_ids += np.bincount(x["mlm_labels"][x["mlm_labels"] != IGNORE], minlength=9)
        sop += int(x["sop_labels"].sum())
    assert ids[:5].sum() == 0 and chi_square_ok(ids[5:], [1 / 4] * 4)[0], ids
    assert label_ids[:5].sum() == 0 and chi_square_ok(label_ids[5:], [1 / 4] * 4)[0], label_ids
    assert binomial_ok(sop, 600, 0.5)
    assert (make_batch(small_config(type_vocab_size=1), 2, 8, 0, recipe="counted")["token_type_ids"] == 0).all()
    two_types = make_batch(small_config(type_vocab_size=2), 2, 8, 0, recipe="counted")["token_type_ids"]
    assert (two_types == (np.arange(8) >= 4)).all()
    same = sum(len(set(row[row != IGNORE].tolist())) == 1
               for seed in range(50) for row in make_batch(config, 4, 20, seed, recipe="counted", label_rate=0.3)["mlm_labels"])
    assert same < 50                              # label ids drawn per position (6 labels of 4 ids: rarely all equal)


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe="nope"), "recipe='nope' is invalid: expected one of rows, matrix, counted"),
    (dict(batch_size=0), "need batch >= 1 and seq_len >= 2, got batch=0, seq_len=8"),
    (dict(seq_len=1), "need batch >= 1 and seq_len >= 2, got batch=2, seq_len=1"),
    (dict(seq_len=0, recipe="matrix"), "need batch >= 1 and seq_len >= 1, got batch=2, seq_len=0"),
    (dict(seq_len=41), "seq_len=41 exceeds max_position_embeddings=40"),
    (dict(lengths=[4]), "lengths=[4] is invalid: expected 2 lengths in [1, 8]"),
    (dict(lengths=[4, 0]), "lengths=[4, 0] is invalid: expected 2 lengths in [1, 8]"),
    (dict(lengths=[9, 4]), "lengths=[9, 4] is invalid: expected 2 lengths in [1, 8]"),
    (dict(recipe="counted", lengths=[4, 4]), "the 'counted' recipe does not pad: lengths must be None"),
])
def test_make_batch_errors_in_full(kwargs, message):
    args = {"batch_size": 2, "seq_len": 8, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        make_batch(small_config(), **args)


def test_make_batch_accepts_its_boundaries():
    config = small_config()
    assert make_batch(config, 1, 40, 0)["input_ids"].shape == (1, 40)            # T = max_position_embeddings
    x = make_batch(config, 2, 8, 0, lengths=[8, 1])                                # lengths 1 and T
    assert (x["attention_mask"].sum(axis=1) == [8, 1]).all()
    with pytest.raises(ValueError, match="^vocab_size=1 leaves no id besides the pad id$"):
        make_batch(small_config(vocab_size=1, pad_token_id=0), 1, 4, 0)
    two = make_batch(small_config(vocab_size=2, pad_token_id=0), 2, 4, 0)
    assert (two["input_ids"][two["attention_mask"] == 1] == 1).all()


@pytest.mark.parametrize("head, extra", [
    ("masked_lm", {}), ("causal_lm", {"model_type": "bert"}), ("next_sentence", {"model_type": "bert"}),
    ("multiple_choice", {}), ("token_classification", {"num_labels": 4}), ("question_answering", {}),
    ("sequence_classification", {"num_labels": 3}), ("sequence_classification", {"num_labels": 1}),
    ("sequence_classification", {"num_labels": 3, "problem_type": "multi_label_classification"}),
    ("sequence_classification", {"num_labels": 2, "problem_type": "regression"}),
    ("pretraining", {}), ("base", {}),
])
def test_task_batch_labels_follow_each_head(head, extra):
    """task_batch: the "rows" batch of the same seed (B * C rows viewed (B, C, T) for multiple choice),
    the head's labels drawn from default_rng([*seed, 3]) as task_labels documents; pretraining keeps
    mlm/sop labels and equals make_batch, other heads drop them."""
    config = Config.preset("tiny", head=head, **extra)
    B, T, C = 3, 9, 2
    lengths = [9, 6, 4] if head != "multiple_choice" else [9, 6, 4, 5, 9, 2]
    x = task_batch(config, B, T, seed=4, lengths=lengths, num_choices=C)
    rows = make_batch(config, B * C if head == "multiple_choice" else B, T, [4], lengths=lengths)
    if head == "multiple_choice":
        assert x["input_ids"].shape == (B, C, T)
        np.testing.assert_array_equal(x["input_ids"].reshape(B * C, T), rows["input_ids"])
    else:
        for name in ("input_ids", "token_type_ids", "attention_mask", "position_ids"):
            np.testing.assert_array_equal(x[name], rows[name])
    mask = x["attention_mask"]
    L = config.num_labels
    if head == "pretraining":
        assert set(x) == set(BATCH_NAMES)
        for name in BATCH_NAMES:
            np.testing.assert_array_equal(x[name], rows[name])
        return
    assert "mlm_labels" not in x and "sop_labels" not in x
    labels = {k: x[k] for k in ("labels", "start_positions", "end_positions") if k in x}
    if head == "base":
        assert labels == {}
    elif head == "masked_lm":
        np.testing.assert_array_equal(x["labels"], rows["mlm_labels"])
    elif head == "causal_lm":
        np.testing.assert_array_equal(x["labels"], np.where(mask == 1, x["input_ids"], IGNORE))
    elif head == "next_sentence":
        np.testing.assert_array_equal(x["labels"], rows["sop_labels"])
    elif head == "multiple_choice":
        assert x["labels"].shape == (B,) and ((0 <= x["labels"]) & (x["labels"] < C)).all()
    elif head == "token_classification":
        assert ((x["labels"] == IGNORE) == (mask == 0)).all() and x["labels"][mask == 1].max() < L
    elif head == "question_answering":
        n = mask.sum(axis=1)
        assert (0 <= x["start_positions"]).all() and (x["start_positions"] <= x["end_positions"]).all()
        assert (x["end_positions"] < n).all()
    elif extra.get("problem_type") == "multi_label_classification":
        assert x["labels"].shape == (B, L) and x["labels"].dtype == np.float64 and set(np.unique(x["labels"])) <= {0, 1}
    elif extra.get("problem_type") == "regression" or L == 1:
        assert x["labels"].shape == ((B,) if L == 1 else (B, L)) and x["labels"].dtype == np.float64
    else:
        assert x["labels"].shape == (B,) and ((0 <= x["labels"]) & (x["labels"] < L)).all()
    if head != "base":
        again = task_labels(config, {k: v for k, v in x.items() if k not in labels} |
                            ({"mlm_labels": rows["mlm_labels"], "sop_labels": rows["sop_labels"]}
                             if head in ("masked_lm", "next_sentence") else {}),
                            np.random.default_rng([4, 3]))
        for k in labels:
            np.testing.assert_array_equal(again[k], labels[k])


def test_task_batch_defaults_and_settings():
    """task_batch's defaults (2 examples of 16 tokens, seed 0, 2 choices, label rate 0.15, float64) and
    its label_rate and dtype passed on."""
    mc = Config.preset("tiny", head="multiple_choice")
    default, explicit = task_batch(mc), task_batch(mc, 2, 16, 0, num_choices=2, label_rate=0.15, dtype="float64")
    assert default["input_ids"].shape == (2, 2, 16)
    for name in default:
        np.testing.assert_array_equal(default[name], explicit[name])
    pre = Config.preset("tiny")
    dense = task_batch(pre, 4, 16, seed=1, label_rate=0.9)
    np.testing.assert_array_equal(dense["mlm_labels"], make_batch(pre, 4, 16, [1], label_rate=0.9)["mlm_labels"])
    reg = Config.preset("tiny", head="sequence_classification", num_labels=1)
    assert task_batch(reg, 3, 8, seed=2, dtype="float32")["labels"].dtype == np.float32
    assert task_batch(reg, 3, 8, seed=2)["labels"].dtype == np.float64


def test_task_labels_distributions():
    """task_labels' draws over many rows: class ids uniform over num_labels (multiple choice over C),
    question-answering start uniform over the real tokens and end uniform over [start, n), multi-label
    targets Bernoulli(1/2), regression targets N(0, 1) in the requested dtype (chi-square / binomial
    at false failure 1e-6; the normal's mean within 5.3 standard errors, its variance within 5.3 of
    its standard errors)."""
    rng = np.random.default_rng(0)
    mask = np.ones((4000, 6), np.int64)
    mask[:, 4:] = 0                                                    # 4 real tokens
    inputs = {"attention_mask": mask, "input_ids": np.ones((4000, 6), np.int64)}
    qa = task_labels(Config.preset("tiny", head="question_answering"), inputs, rng)
    assert chi_square_ok(np.bincount(qa["start_positions"], minlength=4), [1 / 4] * 4)[0]
    pairs = np.bincount(qa["start_positions"] * 4 + qa["end_positions"], minlength=16)
    probs = [(1 / 4) / (4 - s) if e >= s else 0.0 for s in range(4) for e in range(4)]
    assert chi_square_ok(pairs, probs)[0], pairs
    cls = task_labels(Config.preset("tiny", head="sequence_classification", num_labels=5), inputs, rng)["labels"]
    assert chi_square_ok(np.bincount(cls, minlength=5), [1 / 5] * 5)[0]
    tok = task_labels(Config.preset("tiny", head="token_classification", num_labels=3), inputs, rng)["labels"]
    assert (tok[:, 4:] == IGNORE).all() and chi_square_ok(np.bincount(tok[:, :4].ravel(), minlength=3), [1 / 3] * 3)[0]
    mc = task_labels(Config.preset("tiny", head="multiple_choice"), {"attention_mask": np.ones((4000, 3, 5))}, rng)
    assert chi_square_ok(np.bincount(mc["labels"], minlength=3), [1 / 3] * 3)[0]
    multi = task_labels(Config.preset("tiny", head="sequence_classification", num_labels=3,
                                      problem_type="multi_label_classification"), inputs, rng, dtype="float32")
    assert multi["labels"].dtype == np.float32 and binomial_ok(int(multi["labels"].sum()), 12000, 0.5)
    reg = task_labels(Config.preset("tiny", head="sequence_classification", num_labels=1), inputs, rng,
                      dtype="float32")["labels"]
    assert reg.dtype == np.float32
    reg = reg.astype(np.float64)
    assert reg.shape == (4000,) and abs(reg.mean()) < 5.3 / math.sqrt(4000)
    assert abs(reg.var() - 1) < 5.3 * math.sqrt(2 / 4000)


class FakeTextTokenizer:
    """Stands for a checkpoint tokenizer: ``batch`` lays each text out as [CLS] one id per character
    [SEP] (and the pair after it), padded on the right with 0."""

    def __init__(self, vocab_size=50):
        self.vocab_size = vocab_size
        self.calls = []

    def batch(self, texts, pairs=None, *, max_length=None, truncation=False):
        self.calls.append((list(texts), pairs, max_length, truncation))
        rows = []
        for k, text in enumerate(texts):
            ids = [2] + [10 + (ord(c) % 30) for c in text] + [3]
            types = [0] * len(ids)
            if pairs is not None:
                more = [10 + (ord(c) % 30) for c in pairs[k]] + [3]
                ids, types = ids + more, types + [1] * len(more)
            if len(ids) > max_length:
                if not truncation:
                    raise ValueError(f"text {k} has {len(ids)} tokens, more than max_length={max_length}")
                ids, types = ids[:max_length], types[:max_length]
            rows.append((ids, types))
        T = max(len(i) for i, _ in rows)
        out = {"input_ids": np.zeros((len(rows), T), np.int64), "token_type_ids": np.zeros((len(rows), T), np.int64),
               "attention_mask": np.zeros((len(rows), T), np.int64)}
        for b, (ids, types) in enumerate(rows):
            out["input_ids"][b, :len(ids)] = ids
            out["token_type_ids"][b, :len(ids)] = types
            out["attention_mask"][b, :len(ids)] = 1
        return out


def test_text_batch_labels_real_positions_after_cls():
    """text_batch: the tokenizer's layout unchanged (no [MASK] put in), max_length the position table;
    labels the token id already there, on about label_rate of each row's real positions after [CLS],
    at least one, drawn from default_rng([seed, 3]) (a list seed used as is); SOP labels 0; position ids."""
    config = Config.preset("tiny", vocab_size=50, max_position_embeddings=24)
    tokenizer = FakeTextTokenizer()
    texts = ["hello there", "a", "the river rose fast"]
    x = text_batch(tokenizer, config, texts, seed=5, label_rate=0.3)
    assert tokenizer.calls[-1] == (texts, None, 24, False)
    plain = tokenizer.batch(texts, max_length=24)
    assert tuple(x) == BATCH_NAMES
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(x[name], plain[name])
    assert (x["sop_labels"] == 0).all() and x["sop_labels"].shape == (3,)
    assert (x["position_ids"] == np.arange(x["input_ids"].shape[1])).all()
    labelled = x["mlm_labels"] != IGNORE
    assert not labelled[:, 0].any() and not labelled[x["attention_mask"] == 0].any()
    assert (labelled.sum(axis=1) >= 1).all()
    np.testing.assert_array_equal(x["mlm_labels"][labelled], x["input_ids"][labelled])
    np.testing.assert_array_equal(text_batch(tokenizer, config, texts, seed=[5, 3], label_rate=0.3)["mlm_labels"],
                                  x["mlm_labels"])
    # label counts: 1 + Binomial(n - 2, rate) per row of n real tokens (one forced among the n - 1 after [CLS])
    long_text = ["abcdefghijklmnopqrstuv"]                                 # 24 tokens with [CLS], [SEP]
    extra = sum(int((text_batch(tokenizer, config, long_text, seed=s, label_rate=0.25)["mlm_labels"] != IGNORE).sum()) - 1
                for s in range(400))
    assert binomial_ok(extra, 400 * 22, 0.25)
    assert all(v.dtype == np.int64 for v in x.values())
    default, explicit = text_batch(tokenizer, config, texts), text_batch(tokenizer, config, texts, seed=0, label_rate=0.15)
    for name in BATCH_NAMES:
        np.testing.assert_array_equal(default[name], explicit[name])
    # with label_rate 0 only the forced label is left: uniform over the n - 1 positions after [CLS], the
    # final [SEP] included (chi-square, false failure 1e-6)
    forced = np.zeros(8)
    for seed in range(700):
        row = text_batch(tokenizer, config, ["abcdef"], seed=seed, label_rate=0.0)["mlm_labels"][0]
        forced[np.flatnonzero(row != IGNORE)] += 1
    assert forced[0] == 0 and forced.sum() == 700 and chi_square_ok(forced[1:], [1 / 7] * 7)[0], forced
    pairs = text_batch(tokenizer, config, ["ab", "c"], pairs=["de", "fgh"], seed=1)
    assert (pairs["token_type_ids"][1, :6] == [0, 0, 0, 1, 1, 1]).all()
    with pytest.raises(ValueError, match=re.escape("(max_length is the model's position table, config "
                                                   "max_position_embeddings=24)")):
        text_batch(tokenizer, config, ["x" * 30])
    cut = text_batch(tokenizer, config, ["x" * 30], truncation=True)
    assert cut["input_ids"].shape == (1, 24) and tokenizer.calls[-1][3] is True
    with pytest.raises(ValueError, match="^inputs from text need the checkpoint's tokenizer, and there is none$"):
        text_batch(None, config, texts)
    with pytest.raises(ValueError, match=re.escape("the tokenizer has 51 tokens but the model's word embeddings "
                                                   "have 50 rows; expected the same number")):
        text_batch(FakeTextTokenizer(51), config, texts)
    with pytest.raises(ValueError, match=re.escape("text pairs need token type 1, but the model has "
                                                   "type_vocab_size=1")):
        text_batch(tokenizer, Config.preset("tiny", vocab_size=50, type_vocab_size=1), ["a"], pairs=["b"])


def test_dataset_masks_each_pair_with_its_own_settings(tokenizer, documents):
    """Each example is its pair laid out by assemble_pair and masked by create_masked_lm_predictions with
    the dataset's masked_lm_prob, max_predictions_per_seq and max_ngram, the tokenizer's word-start table
    and ordinary ids, and the epoch's generator (observed by wrapping the function)."""
    from ref_bert.data import pretraining as pretraining_module
    seen = []
    real = pretraining_module.create_masked_lm_predictions

    def spy(tokens, table, ordinary, rng, *args, **kwargs):
        seen.append((tokens.copy(), table, ordinary, args, kwargs))
        return real(tokens, table, ordinary, rng, *args, **kwargs)
    dataset = make_stream(PretrainingDataset, tokenizer, documents, masked_lm_prob=0.25,
                          max_predictions_per_seq=7, max_ngram=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretraining_module, "create_masked_lm_predictions", spy)
        batch = dataset.epoch_examples(0)
    assert len(seen) == len(batch["sop_labels"]) > 20
    originals = {tuple(np.where(l != IGNORE, l, i)[:int(m.sum())].tolist())
                 for i, l, m in zip(batch["input_ids"], batch["mlm_labels"], batch["attention_mask"])}
    for tokens, table, ordinary, args, kwargs in seen:
        assert table is tokenizer.word_start_table and ordinary is tokenizer.ordinary_ids
        assert tuple(args) + tuple(kwargs.values()) == (0.25, 7, 2)
        assert tuple(tokens.tolist()) in originals


def test_truncate_seq_pair_rule():
    """ALBERT's truncate_seq_pair: while the pair is longer than the limit, one token leaves the longer
    segment (B on a tie), from the front or the back with probability 1/2 each (exact binomial over 2,000
    removals, false failure 1e-6); nothing happens to a pair within the limit."""
    front = removals = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        a, b = list(range(100, 108)), list(range(200, 203))
        truncate_seq_pair(a, b, 6, rng)                      # 11 tokens -> 6
        assert len(a) + len(b) == 6
        la, lb = 8, 3                                        # the lengths the rule gives
        while la + lb > 6:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        assert (len(a), len(b)) == (la, lb)
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))
        front += (a[0] - 100) + (b[0] - 200)
        removals += 5
    assert binomial_ok(front, removals, 0.5), front / removals
    a, b = [1, 2], [3, 4]
    truncate_seq_pair(a, b, 4, np.random.default_rng(0))
    assert (a, b) == ([1, 2], [3, 4])
    a, b = [1, 2], [3, 4]
    truncate_seq_pair(a, b, 3, np.random.default_rng(0))
    assert a == [1, 2] and len(b) == 1                     # a tie: B is trimmed


def test_unilm_layout_replace_and_span_draws():
    """layout: [CLS] a [SEP] b [SEP] padded, int64 ids and types, source length |a| + 2; replace_tokens
    with no positions changes nothing; the span length drawn by choose_spans is 1, 2, 3 with 0.8, 0.1,
    0.1 (UniLM's "20% bigram or trigram"), chi-square over about 6,000 draws at false failure 1e-6."""
    ids, types, real, source = layout([7, 8], [9], "seq2seq", 8, True)
    assert ids.dtype == np.int64 and types.dtype == np.int64
    assert ids.tolist() == [CLS_ID, 7, 8, SEP_ID, 9, SEP_ID, PAD_ID, PAD_ID] and (real, source) == (6, 4)
    assert types.tolist() == [4, 4, 4, 4, 5, 5, 0, 0]
    assert layout([7], [9], "left_to_right", 6, False)[1].tolist() == [0, 0, 0, 1, 1, 0]
    unchanged = np.array([CLS_ID, 7, 8, SEP_ID])
    labels = replace_tokens(unchanged, [], 50, np.random.default_rng(0))
    assert labels.tolist() == [IGNORE] * 4 and unchanged.tolist() == [CLS_ID, 7, 8, SEP_ID]
    rng = np.random.default_rng(3)
    drawn = np.zeros(4)
    for _ in range(300):
        recorder = Recorder(rng)
        choose_spans(list(range(60)), 20, recorder)
        for _, args, kwargs, result in recorder.calls("choice"):
            drawn[int(result)] += 1
    assert drawn[0] == 0 and drawn.sum() > 5000
    assert chi_square_ok(drawn[1:], [0.8, 0.1, 0.1])[0], drawn


def test_stream_trains_or_loads_its_tokenizer(tmp_path):
    """Without a tokenizer the stream trains one on its own corpus with vocab_size pieces (else the
    config's vocab_size, else 1000); a path is loaded as a SentencePiece model; a corpus without a
    two-sentence document is refused, naming the file."""
    flat = [s for doc in read_corpus(default_corpus_path()) for s in doc][:400]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(flat[i:i + 4]) for i in range(0, 400, 4)) + "\n")
    own = PretrainingDataset(corpus, None, vocab_size=300, max_seq_length=32)   # passed on to the stream's
    assert own.tokenizer.vocab_size == 300
    assert own.tokenizer.model_proto == Tokenizer.train(str(corpus), vocab_size=300).model_proto  # this corpus
    from_config = SentencePairStream(corpus, None, max_seq_length=32, config=Config.preset("tiny", vocab_size=320))
    assert from_config.tokenizer.vocab_size == 320
    default = SentencePairStream(None, None, max_seq_length=32)
    assert default.tokenizer.vocab_size == 1000
    own.tokenizer.save_to(tmp_path / "tok")
    loaded = PretrainingDataset(corpus, tmp_path / "tok" / "spiece.model", max_seq_length=32)
    assert loaded.tokenizer.model_proto == own.tokenizer.model_proto and loaded.fingerprint == own.fingerprint
    lonely = tmp_path / "lonely.txt"
    lonely.write_text("One sentence here.\n\nAnother document, alone.\n")
    with pytest.raises(ValueError, match=re.escape(f"corpus {str(lonely)!r} has no document with at least two "
                                                   "sentences")):
        SentencePairStream(lonely, own.tokenizer)


def test_fingerprint_depends_on_the_documents_and_its_format_is_pinned(tokenizer, documents):
    """A stream over other documents has another fingerprint (its saved state is refused). The
    fingerprint is stored in every checkpoint's data state, so its value for given inputs is part of the
    checkpoint format (a run saved before must resume after): pinned here for a fixed model proto,
    settings and documents, for both streams."""
    changed = [list(map(list, d)) for d in documents]
    changed[3][0][0] = 4_000
    assert make_stream(SentencePairStream, tokenizer, changed).fingerprint != \
        make_stream(SentencePairStream, tokenizer, documents).fingerprint
    fake = SimpleNamespace(tokenizer=SimpleNamespace(model_proto=b"spm-model", lower_case=False), max_seq_length=16,
                           short_seq_prob=0.1, documents=[[[5, 6], [7]], [[8, 9, 10], [11]]], masked_lm_prob=0.15,
                           max_predictions_per_seq=20, max_ngram=3)
    fake._fingerprint_settings = lambda: SentencePairStream._fingerprint_settings(fake)
    assert SentencePairStream._fingerprint(fake) == "1e3701318ab55388"
    fake._fingerprint_settings = lambda: PretrainingDataset._fingerprint_settings(fake)
    assert SentencePairStream._fingerprint(fake) == "be7ca11b3983d0a4"
