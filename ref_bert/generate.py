"""Seq2seq generation as UniLM decodes (Dong et al. 2019, section 2.4; unilm-v1 decode_seq2seq.py).

The input is ``[CLS] source [SEP]``; decoding then repeats
    1. append [MASK] at the next position (target segment id, next position id);
    2. run the model under the seq2seq mask and predict the [MASK] with the MLM head;
    3. write the chosen token at that same position (same position and segment ids);
until [SEP] is chosen or ``max_length`` tokens have been produced.

Batched layout (N rows = sources x beams). The source block is ``[CLS] source [SEP]`` padded to the
longest one (S columns); target token k of every row sits in column S + k with position id
``len([CLS] source [SEP]) + k``, so each row reads exactly as it would alone (pads get position 0
and are never attended: exp(-10000) underflows to exactly 0 in the softmax). The attention mask is
the seq2seq mask with pad keys removed:
    allowed[i, j] = key_is_real[j] & ((j < S) | (j <= i))

Two ways to run step 2, which must agree (tests/test_generate.py checks tokens and logits):
    * :class:`CachedStepper`  -- only the new positions run, each block's attention reads the earlier
      positions' keys and values from a cache (:mod:`ref_bert.decoding`): a step is linear in length.
    * :class:`FullStepper`    -- the whole sequence is re-run through ``Model.forward`` at every step.

Search (on the host, over log-softmax of the MLM logits):
    * greedy (``beam_size=1``): the most probable token at each step;
    * beam search: every live beam is extended by every token, the ``beam_size`` best candidates per
      source survive (ranked by length-penalised score); a beam that chose [SEP] is frozen (its one
      continuation keeps its score and length). The result is the best finished beam (or the best
      beam at ``max_length`` when none finished).
    Constraints, for both: [PAD], [CLS] and [MASK] are never produced; [SEP] is forbidden while fewer
    than ``min_length`` tokens have been produced; with ``no_repeat_ngram_size`` n > 0 a token that
    would repeat an n-gram of the target so far is forbidden (UniLM's default is 3).
    GNMT length penalty: score = log P(y) / ((5 + |y|) / 6) ** alpha, |y| counting the final [SEP].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .decoding import KVCache, incremental_forward
from .heads import mlm_head_forward
from .ops import log_softmax
from .unilm import CLS_ID, MASK_ID, PAD_ID, PLAIN_SEGMENT_IDS, SEP_ID, UNILM_SEGMENT_IDS, UNILM_TYPE_VOCAB_SIZE

NEVER_GENERATED = (PAD_ID, CLS_ID, MASK_ID)
# Beam search scores sources x beam x vocab candidates per step in float64 (a few arrays of that size):
# beyond 2^26 of them (512 MB per array) a beam is a mistake, not a search.
MAX_CANDIDATES = 1 << 26
MAX_ALPHA = 10.0   # ((5 + 512) / 6) ** 10 ~ 2e19: scores stay finite


@dataclass
class GenerationOutput:
    """What :func:`generate` returns, one entry per source.

    sequences: the chosen target token ids, without the final [SEP];
    scores: their length-penalised log-probabilities; finished: True when [SEP] was chosen;
    step_logits: with ``keep_logits=True``, the MLM logits of every step as host arrays (N, V),
    N = sources x beams (rows in beam order after the previous step's reordering).
    """

    sequences: list
    scores: list
    finished: list
    step_logits: list | None = field(default=None, repr=False)


def length_penalty(length, alpha: float):
    """GNMT (Wu et al. 2016): ((5 + length) / 6) ** alpha."""
    return ((5.0 + np.asarray(length, dtype=np.float64)) / 6.0) ** alpha


# --- the decoding layout ------------------------------------------------------------------------------
class DecodingLayout:
    """Token, segment and position ids and masks of the N decoding rows (sources repeated per beam)."""

    def __init__(self, sources: list[list[int]], repeat: int, max_length: int, source_type: int, target_type: int):
        self.S = max(len(s) for s in sources) + 2              # source block width
        rows = [s for s in sources for _ in range(repeat)]
        N = len(rows)
        self.source_ids = np.full((N, self.S), PAD_ID, dtype=np.int64)
        self.source_types = np.zeros((N, self.S), dtype=np.int64)
        self.source_positions = np.zeros((N, self.S), dtype=np.int64)
        self.source_lens = np.array([len(s) + 2 for s in rows], dtype=np.int64)   # len([CLS] s [SEP])
        for n, s in enumerate(rows):
            self.source_ids[n, :len(s) + 2] = [CLS_ID, *s, SEP_ID]
            self.source_types[n, :len(s) + 2] = source_type
            self.source_positions[n, :len(s) + 2] = np.arange(len(s) + 2)
        self.target_type = target_type
        self.max_length = max_length
        self.num_rows = N

    def target_positions(self, first: int, count: int) -> np.ndarray:
        """Position ids (N, count) of target tokens first .. first + count - 1."""
        return self.source_lens[:, None] + np.arange(first, first + count)[None, :]

    def target_types(self, count: int) -> np.ndarray:
        return np.full((self.num_rows, count), self.target_type, dtype=np.int64)

    def mask(self, query_start: int, query_end: int) -> np.ndarray:
        """(N, query_end - query_start, query_end) booleans: columns query_start.. as queries, every
        column before query_end as keys. allowed = key_is_real[j] & ((j < S) | (j <= i))."""
        i = np.arange(query_start, query_end)[None, :, None]
        j = np.arange(query_end)[None, None, :]
        key_is_real = (j < self.source_lens[:, None, None]) | (j >= self.S)
        return key_is_real & ((j < self.S) | (j <= i))


# --- one decoding step, with and without the cache -------------------------------------------------
class _Stepper:
    def __init__(self, model, layout: DecodingLayout):
        self.model, self.layout = model, layout
        self.backend = model.backend

    def _device(self, a):
        return self.backend.from_host(a)

    def _mask_logits(self, hidden_at_mask) -> np.ndarray:
        """MLM head on the [MASK] slot's last hidden state (N, H) -> host logits (N, V)."""
        logits, _ = mlm_head_forward(hidden_at_mask, self.model.params, self.model.config)
        return self.backend.to_host(logits)


class CachedStepper(_Stepper):
    """Steps with the incremental forward: each step runs [previous token, new MASK] only."""

    def __init__(self, model, layout: DecodingLayout):
        super().__init__(model, layout)
        self.cache = KVCache(model.config, layout.num_rows, layout.S + layout.max_length, model.xp, model.dtype)
        self.generated = 0     # target tokens committed to the cache

    def first(self) -> np.ndarray:
        L = self.layout
        ids = np.concatenate([L.source_ids, np.full((L.num_rows, 1), MASK_ID)], axis=1)
        types = np.concatenate([L.source_types, L.target_types(1)], axis=1)
        positions = np.concatenate([L.source_positions, L.target_positions(0, 1)], axis=1)
        hidden = incremental_forward(self.model, self.cache, self._device(ids), self._device(types),
                                     self._device(positions), self._device(L.mask(0, L.S + 1)), commit=L.S)
        return self._mask_logits(hidden[:, -1])

    def next(self, tokens: np.ndarray) -> np.ndarray:
        """Write ``tokens`` (N,) into the [MASK] slot and predict a new [MASK] after it."""
        L, t = self.layout, self.generated
        ids = np.stack([np.asarray(tokens, dtype=np.int64), np.full(L.num_rows, MASK_ID)], axis=1)
        column = L.S + t
        hidden = incremental_forward(self.model, self.cache, self._device(ids), self._device(L.target_types(2)),
                                     self._device(L.target_positions(t, 2)),
                                     self._device(L.mask(column, column + 2)), commit=1)
        self.generated += 1
        return self._mask_logits(hidden[:, -1])

    def reorder(self, index: np.ndarray) -> None:
        self.cache.reorder(self._device(index))


class FullStepper(_Stepper):
    """Steps by re-running ``Model.forward`` on the whole sequence (quadratic; the reference)."""

    def __init__(self, model, layout: DecodingLayout):
        super().__init__(model, layout)
        self.targets = np.zeros((layout.num_rows, 0), dtype=np.int64)

    def _run(self) -> np.ndarray:
        L, t = self.layout, self.targets.shape[1]
        ids = np.concatenate([L.source_ids, self.targets, np.full((L.num_rows, 1), MASK_ID)], axis=1)
        types = np.concatenate([L.source_types, L.target_types(t + 1)], axis=1)
        positions = np.concatenate([L.source_positions, L.target_positions(0, t + 1)], axis=1)
        out = self.model.forward(self._device(ids), self._device(types), self._device(L.mask(0, L.S + t + 1)),
                                 self._device(positions), return_mlm_logits=False)
        return self._mask_logits(out.last_hidden_state[:, -1])

    def first(self) -> np.ndarray:
        return self._run()

    def next(self, tokens: np.ndarray) -> np.ndarray:
        self.targets = np.concatenate([self.targets, np.asarray(tokens, dtype=np.int64)[:, None]], axis=1)
        return self._run()

    def reorder(self, index: np.ndarray) -> None:
        self.targets = self.targets[index]


# --- search -----------------------------------------------------------------------------------------
def banned_by_ngrams(hypothesis: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``hypothesis``."""
    if n <= 0 or len(hypothesis) < n - 1:
        return set()
    prefix = tuple(hypothesis[len(hypothesis) - (n - 1):])
    return {hypothesis[k + n - 1] for k in range(len(hypothesis) - n + 1)
            if tuple(hypothesis[k:k + n - 1]) == prefix}


def constrained_log_probs(logits: np.ndarray, hypotheses: list, step: int, min_length: int,
                          no_repeat_ngram_size: int) -> np.ndarray:
    """log-softmax (N, V) in float64 with the forbidden tokens at -inf."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64))
    log_probs[:, list(NEVER_GENERATED)] = -np.inf
    if step < min_length:
        log_probs[:, SEP_ID] = -np.inf
    for n, hypothesis in enumerate(hypotheses):
        banned = banned_by_ngrams(hypothesis, no_repeat_ngram_size)
        if banned:
            log_probs[n, sorted(banned)] = -np.inf
    return log_probs


def check_some_token_allowed(log_probs: np.ndarray, live: np.ndarray, step: int, min_length: int,
                             no_repeat_ngram_size: int) -> None:
    """Every live hypothesis (rows of ``log_probs`` where ``live``) must have a token it may take; else a
    ValueError (taking the argmax of a row of -inf would emit a forbidden token)."""
    stuck = live & np.isneginf(log_probs).all(axis=-1)
    if stuck.any():
        raise ValueError(f"at target step {step + 1} every token is forbidden for a hypothesis ([PAD], [CLS] and [MASK] "
                         f"never, [SEP] before min_length={min_length}, no_repeat_ngram_size={no_repeat_ngram_size} "
                         f"bans each token already produced, of vocab_size={log_probs.shape[-1]}); expected "
                         f"constraints that leave at least one token: lower min_length or no_repeat_ngram_size")


def greedy_search(stepper, num_rows: int, max_length: int, min_length: int, no_repeat_ngram_size: int,
                  alpha: float, step_logits: list | None):
    hypotheses = [[] for _ in range(num_rows)]
    log_prob = np.zeros(num_rows)
    finished = np.zeros(num_rows, dtype=bool)
    logits = stepper.first()
    for step in range(max_length):
        if step > 0:
            logits = stepper.next(tokens)
        if step_logits is not None:
            step_logits.append(logits.copy())
        log_probs = constrained_log_probs(logits, hypotheses, step, min_length, no_repeat_ngram_size)
        check_some_token_allowed(log_probs, ~finished, step, min_length, no_repeat_ngram_size)
        tokens = log_probs.argmax(axis=-1)
        for n in np.flatnonzero(~finished):
            log_prob[n] += log_probs[n, tokens[n]]
            if tokens[n] == SEP_ID:
                finished[n] = True
            else:
                hypotheses[n].append(int(tokens[n]))
        if finished.all():
            break
    lengths = np.array([len(h) for h in hypotheses]) + finished
    scores = log_prob / length_penalty(lengths, alpha)
    return hypotheses, scores.tolist(), finished.tolist()


def beam_search(stepper, num_sources: int, beam_size: int, max_length: int, min_length: int,
                no_repeat_ngram_size: int, alpha: float, step_logits: list | None):
    B, K = num_sources, beam_size
    log_prob = np.full((B, K), -np.inf)
    log_prob[:, 0] = 0.0                       # one live beam at the start: no duplicate hypotheses
    lengths = np.zeros((B, K), dtype=np.int64)
    finished = np.zeros((B, K), dtype=bool)
    hypotheses = [[[] for _ in range(K)] for _ in range(B)]
    logits = stepper.first()
    for step in range(max_length):
        if step > 0:
            logits = stepper.next(tokens.reshape(-1))
        if step_logits is not None:
            step_logits.append(logits.copy())
        V = logits.shape[-1]
        flat_hypotheses = [h for beams in hypotheses for h in beams]
        log_probs = constrained_log_probs(logits, flat_hypotheses, step, min_length,
                                          no_repeat_ngram_size).reshape(B, K, V)
        # A finished beam is frozen: one continuation ([SEP] again, not appended) with log-probability 0.
        frozen_row = np.full(V, -np.inf)
        frozen_row[SEP_ID] = 0.0
        log_probs = np.where(finished[:, :, None], frozen_row, log_probs)
        check_some_token_allowed(log_probs, np.isfinite(log_prob) & ~finished, step, min_length,
                                 no_repeat_ngram_size)
        candidates = log_prob[:, :, None] + log_probs                         # (B, K, V)
        new_lengths = lengths + ~finished                                     # (B, K)
        ranking = candidates / length_penalty(new_lengths, alpha)[:, :, None]
        best = np.argsort(-ranking.reshape(B, K * V), axis=1, kind="stable")[:, :K]   # (B, K)
        beam, tokens = best // V, best % V
        rows = np.arange(B)[:, None]
        log_prob = candidates.reshape(B, K * V)[rows, best]
        lengths = new_lengths[rows, beam]
        was_finished = finished[rows, beam]
        finished = was_finished | (tokens == SEP_ID)
        hypotheses = [[hypotheses[b][beam[b, k]] + ([] if finished[b, k] else [int(tokens[b, k])])
                       for k in range(K)] for b in range(B)]
        stepper.reorder((rows * K + beam).reshape(-1))
        if finished.all():
            break
    scores = log_prob / length_penalty(lengths, alpha)
    sequences, best_scores, best_finished = [], [], []
    for b in range(B):
        pool = np.flatnonzero(finished[b]) if finished[b].any() else np.arange(K)
        k = pool[np.argmax(scores[b, pool])]
        sequences.append(hypotheses[b][k])
        best_scores.append(float(scores[b, k]))
        best_finished.append(bool(finished[b, k]))
    return sequences, best_scores, best_finished


# --- the API ----------------------------------------------------------------------------------------
def _as_sources(source_ids, vocab_size: int) -> list[list[int]]:
    if isinstance(source_ids, np.ndarray):
        source_ids = source_ids.tolist()
    if not isinstance(source_ids, (list, tuple)):
        raise ValueError(f"source_ids must be a list of token ids or a list of such lists, got {type(source_ids).__name__}")

    def is_id(t):
        return isinstance(t, (int, np.integer)) and not isinstance(t, bool)

    if len(source_ids) > 0 and all(is_id(t) for t in source_ids):
        source_ids = [source_ids]
    if len(source_ids) == 0:
        raise ValueError("source_ids is empty: expected at least one source with at least one token id")
    sources = []
    for n, source in enumerate(source_ids):
        if isinstance(source, np.ndarray):
            source = source.tolist()
        if not isinstance(source, (list, tuple)) or not all(is_id(t) for t in source):
            raise ValueError(f"source {n} must be a list of integer token ids, got {source!r:.80}")
        if len(source) == 0:
            raise ValueError(f"source {n} is empty: expected at least one token id")
        bad = [t for t in source if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"source {n} contains token id {bad[0]}, outside [0, vocab_size={vocab_size})")
        sources.append([int(t) for t in source])
    return sources


def generate(model, source_ids, *, max_length: int | None = None, beam_size: int = 1, min_length: int = 0,
             length_penalty_alpha: float = 0.0, no_repeat_ngram_size: int = 0, use_cache: bool = True,
             unilm_segments: bool | None = None, keep_logits: bool = False) -> GenerationOutput:
    """Decode a target for each source with UniLM's seq2seq mask.

    source_ids: one source (a list of token ids, without [CLS]/[SEP]) or a list of them (batched).
    max_length: most tokens produced per source, the final [SEP] included (default: as many as the
        position table allows after the longest source). min_length: fewest tokens before [SEP].
    beam_size: 1 for greedy search, more for beam search. length_penalty_alpha: GNMT alpha.
    no_repeat_ngram_size: forbid repeating an n-gram of the target (0 = off).
    use_cache: incremental decoding (True) or re-running the whole sequence each step (False).
    unilm_segments: segment ids source 4 / target 5 (True) or 0 / 1 (False); default: True when the
        model has UniLM's type_vocab_size of 6 or more.
    """
    if model.config.head not in ("pretraining", "masked_lm") or model.config.is_decoder:
        raise ValueError(f"generate needs a bidirectional model with an MLM head (UniLM's seq2seq mask is its "
                         f"own attention pattern); this model is {model.config.architecture}"
                         f"{' with is_decoder=True' if model.config.is_decoder else ''}. Load a *ForPreTraining or "
                         f"*ForMaskedLM checkpoint, or from_hf(..., head='masked_lm') for a bare encoder")
    cfg = model.config
    sources = _as_sources(source_ids, cfg.vocab_size)
    if not isinstance(beam_size, (int, np.integer)) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r} is invalid: expected an integer >= 1")
    most = MAX_CANDIDATES // (cfg.vocab_size * len(sources))
    if beam_size > max(most, 1):
        raise ValueError(f"beam_size={beam_size} is invalid: {len(sources)} source(s) x beam_size x vocab_size="
                         f"{cfg.vocab_size} candidates per step exceed {MAX_CANDIDATES}; expected beam_size <= {most}")
    if not isinstance(min_length, (int, np.integer)) or isinstance(min_length, bool) or min_length < 0:
        raise ValueError(f"min_length={min_length!r} is invalid: expected an integer >= 0")
    if not isinstance(no_repeat_ngram_size, (int, np.integer)) or isinstance(no_repeat_ngram_size, bool) \
            or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size={no_repeat_ngram_size!r} is invalid: expected an integer >= 0")
    if not isinstance(length_penalty_alpha, (int, float)) or isinstance(length_penalty_alpha, bool) \
            or not math.isfinite(length_penalty_alpha) or abs(length_penalty_alpha) > MAX_ALPHA:
        raise ValueError(f"length_penalty_alpha={length_penalty_alpha!r} is invalid: expected a number in "
                         f"[-{MAX_ALPHA:g}, {MAX_ALPHA:g}] (GNMT uses 0.6 to 2; beyond 10 the penalty overflows)")
    P = cfg.max_position_embeddings
    longest = max(len(s) for s in sources)
    if longest + 3 > P:
        raise ValueError(f"a source of {longest} tokens needs {longest + 3} positions ([CLS] source [SEP] and "
                         f"one target slot), more than max_position_embeddings={P}")
    room = P - (longest + 2)
    if max_length is None:
        max_length = room
    if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or not 1 <= max_length <= room:
        raise ValueError(f"max_length={max_length!r} is invalid: expected an integer in [1, {room}] "
                         f"(max_position_embeddings={P} minus the longest [CLS] source [SEP], {longest + 2})")
    if unilm_segments is None:
        unilm_segments = cfg.type_vocab_size >= UNILM_TYPE_VOCAB_SIZE
    if unilm_segments and cfg.type_vocab_size < UNILM_TYPE_VOCAB_SIZE:
        raise ValueError(f"unilm_segments=True needs type_vocab_size >= {UNILM_TYPE_VOCAB_SIZE}, "
                         f"the model has {cfg.type_vocab_size}")
    source_type, target_type = (UNILM_SEGMENT_IDS if unilm_segments else PLAIN_SEGMENT_IDS)["seq2seq"]

    layout = DecodingLayout(sources, beam_size, int(max_length), source_type, target_type)
    stepper = (CachedStepper if use_cache else FullStepper)(model, layout)
    step_logits = [] if keep_logits else None
    if beam_size == 1:
        sequences, scores, finished = greedy_search(stepper, len(sources), int(max_length), int(min_length),
                                                    int(no_repeat_ngram_size), float(length_penalty_alpha),
                                                    step_logits)
    else:
        sequences, scores, finished = beam_search(stepper, len(sources), int(beam_size), int(max_length),
                                                  int(min_length), int(no_repeat_ngram_size),
                                                  float(length_penalty_alpha), step_logits)
    return GenerationOutput(sequences, scores, finished, step_logits)


__all__ = ["GenerationOutput", "generate", "length_penalty", "DecodingLayout", "CachedStepper", "FullStepper",
           "greedy_search", "beam_search", "banned_by_ngrams", "constrained_log_probs", "NEVER_GENERATED"]
