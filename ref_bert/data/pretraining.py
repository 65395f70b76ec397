"""ALBERT pretraining examples: sentence-order pairs with whole-word n-gram masking.

Follows google-research/albert ``create_pretraining_data.py`` (REFERENCE.md section 1), with NumPy's
``default_rng`` as the only source of randomness. Pipeline, per epoch:

    corpus file -> documents of sentences -> token ids (once, no randomness)
    rng = default_rng([seed, epoch])
    shuffle documents                                        (ALBERT: rng.shuffle(all_documents))
    for each document: create_sentence_pairs -> [CLS] A [SEP] B [SEP] -> create_masked_lm_predictions
    shuffle the examples                                     (ALBERT: rng.shuffle(instances))
    cut into batches; the stream continues into epoch + 1 without a gap or a repeat

One epoch plays the role of one of ALBERT's ``dupe_factor`` passes: the same text, new chunk lengths,
new A/B splits, new swaps and new masks.

Corpus format (:func:`read_corpus`), ALBERT's own: UTF-8 text, one sentence per line, documents
separated by one or more blank lines; a line whose first character is ``#`` is a comment. Sentence
boundaries matter: A and B are split between sentences, never inside one.

Batch format (what ``Model.loss_and_grads(**batch)`` takes, after ``backend.from_host``), int64:
    input_ids, token_type_ids, attention_mask, mlm_labels: (B, T); sop_labels: (B,)
``mlm_labels`` holds the original token id at each selected position and -100 (``IGNORE_INDEX``)
elsewhere; ``sop_labels`` is 1 when A and B were swapped, 0 in the original order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np

from ..ops import IGNORE_INDEX
from .tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, Tokenizer

PathLike = Union[str, "os.PathLike[str]"]
# Smallest layout with a token on each side: [CLS] a [SEP] b [SEP]. ALBERT's shorter-target draw
# randint(2, max_seq_length - 3) needs the same bound.
MIN_SEQ_LENGTH = 5
DEFAULT_VOCAB_SIZE = 1000  # the "tiny" preset's; the default corpus supports up to about 3100 pieces


def default_corpus_path() -> str:
    """Path of the corpus shipped with the package (see the header of ``ref_bert/data/corpus.txt``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")


# --- reading ---------------------------------------------------------------------------------------
def read_corpus(path: PathLike) -> list[list[str]]:
    """Read a corpus file into documents, each a list of sentences (stripped, non-empty strings).

    Format: UTF-8, one sentence per line, blank lines (empty or whitespace only) between documents,
    lines starting with ``#`` ignored (they do not end a document). Raises ValueError for a missing
    file, bytes that are not UTF-8 (naming the byte offset and line) and a file with no sentences.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"corpus file {path!r} does not exist; expected a UTF-8 text file with one sentence "
                         f"per line and blank lines between documents")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"corpus file {path!r} is not valid UTF-8: byte 0x{data[error.start]:02x} at byte "
                         f"offset {error.start} (line {line}) cannot be decoded ({error.reason}); "
                         f"expected UTF-8 text") from None
    documents: list[list[str]] = [[]]
    for line in text.lstrip("\ufeff").splitlines():
        if line.startswith("#"):
            continue
        sentence = line.strip()
        if sentence:
            documents[-1].append(sentence)
        elif documents[-1]:
            documents.append([])
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError(f"corpus file {path!r} contains no sentences; expected one sentence per line "
                         f"with blank lines between documents")
    return documents


def tokenize_documents(documents: list[list[str]], tokenizer: Tokenizer) -> list[list[list[int]]]:
    """Token ids of every sentence. As in ALBERT, a sentence with no pieces is dropped, then empty documents."""
    tokenized = []
    for document in documents:
        sentences = [ids for ids in (tokenizer.encode(s) for s in document) if ids]
        if sentences:
            tokenized.append(sentences)
    return tokenized


# --- sentence-order pairs --------------------------------------------------------------------------
@dataclass
class SentencePair:
    """Segments A and B (token ids, already truncated) and the SOP label (1 = swapped)."""

    tokens_a: list[int]
    tokens_b: list[int]
    sop_label: int


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: np.random.Generator):
    """ALBERT's ``truncate_seq_pair``, in place: while len(A) + len(B) > max_num_tokens, drop one token of
    the longer segment (B on a tie), from the front or the back with probability 1/2 each, "to add more
    randomness and avoid biases"."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def create_sentence_pairs(document: list[list[int]], max_seq_length: int, short_seq_prob: float,
                          rng: np.random.Generator) -> list[SentencePair]:
    """Cut one document into chunks of consecutive sentences and turn each into a SOP pair.

    ALBERT's ``create_instances_from_document``:
    - target length ``max_seq_length - 3`` (room for [CLS], [SEP], [SEP]); with probability
      ``short_seq_prob`` a uniform integer in [2, max_seq_length - 3] instead, drawn once per document
      (as ALBERT does), to reduce the mismatch with short fine-tuning inputs;
    - sentences are added to the chunk until its length reaches the target or the document ends;
    - A = the first ``a_end`` sentences, ``a_end`` uniform in [1, len(chunk) - 1], B = the rest;
    - with probability 1/2, A and B are swapped (label 1);
    - :func:`truncate_seq_pair` to ``max_seq_length - 3`` (the target is a soft goal, this a hard limit).

    Deviation: ALBERT pairs a one-sentence chunk with text from a random *other* document and labels it
    1, a left-over of BERT's next-sentence negatives that says nothing about sentence order. Here a chunk
    closes only once it holds at least two sentences (a long sentence takes the next one along, and
    truncation trims the pair); a lone sentence left at the end of a document is dropped.
    """
    max_num_tokens = max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = int(rng.integers(2, max_num_tokens + 1))
    pairs = []
    chunk: list[list[int]] = []
    chunk_length = 0
    for i, sentence in enumerate(document):
        chunk.append(sentence)
        chunk_length += len(sentence)
        at_end = i == len(document) - 1
        if (at_end or chunk_length >= target_seq_length) and len(chunk) >= 2:
            a_end = int(rng.integers(1, len(chunk)))  # ALBERT: rng.randint(1, len(chunk) - 1), inclusive
            tokens_a = [t for s in chunk[:a_end] for t in s]
            tokens_b = [t for s in chunk[a_end:] for t in s]
            sop_label = 0
            if rng.random() < 0.5:
                tokens_a, tokens_b, sop_label = tokens_b, tokens_a, 1
            truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            pairs.append(SentencePair(tokens_a, tokens_b, sop_label))
            chunk, chunk_length = [], 0
    return pairs


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
            span mix, e.g. UniLM's mostly-unigram one, REFERENCE.md section 3).
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


def _require(condition: bool, name: str, value, expected: str):
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class PretrainingDataset:
    """An endless, deterministic stream of ALBERT pretraining batches (MLM + SOP) from a corpus.

    Batch k is a pure function of (corpus, tokenizer, settings, seed, k): epoch e's examples are built
    and shuffled with ``default_rng([seed, e])``, and batches are consecutive runs of ``batch_size``
    examples of the stream epoch 0, epoch 1, ... (a batch may straddle two epochs). The position is
    ``(epoch, position)``: :meth:`state_dict` returns it as a JSON-able dict, :meth:`load_state_dict`
    restores it, so a resumed run continues exactly where it stopped.

    Args:
        corpus: corpus file (format of :func:`read_corpus`); None for the packaged default corpus.
        tokenizer: a :class:`Tokenizer`, a path to a SentencePiece model, or None to train one on the
            corpus with ``vocab_size`` pieces (default: ``config.vocab_size`` if a config is given, else
            1000, the "tiny" preset's).
        batch_size, max_seq_length: B and T of every batch.
        seed: the stream's seed.
        config: a ``ref_bert.Config`` to check against: T <= max_position_embeddings, equal vocabulary
            sizes, pad id 0, two token types.
        masked_lm_prob, max_predictions_per_seq, max_ngram, short_seq_prob: ALBERT's flags (defaults 0.15,
            20, 3, 0.1).
    """

    def __init__(self, corpus: Optional[PathLike] = None, tokenizer: Union[Tokenizer, PathLike, None] = None, *,
                 batch_size: int = 8, max_seq_length: int = 128, seed: int = 0, config=None,
                 masked_lm_prob: float = 0.15, max_predictions_per_seq: int = 20, max_ngram: int = 3,
                 short_seq_prob: float = 0.1, vocab_size: Optional[int] = None):
        _require(_is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
        _require(_is_int(max_seq_length) and max_seq_length >= MIN_SEQ_LENGTH, "max_seq_length", max_seq_length,
                 f"an integer >= {MIN_SEQ_LENGTH} (room for [CLS] a [SEP] b [SEP])")
        _require(_is_int(seed) and seed >= 0, "seed", seed, "a non-negative integer")
        _require(isinstance(masked_lm_prob, (int, float)) and 0 <= masked_lm_prob <= 1, "masked_lm_prob",
                 masked_lm_prob, "a probability in [0, 1]")
        _require(_is_int(max_predictions_per_seq) and max_predictions_per_seq >= 1, "max_predictions_per_seq",
                 max_predictions_per_seq, "a positive integer")
        _require(_is_int(max_ngram) and max_ngram >= 1, "max_ngram", max_ngram, "a positive integer")
        _require(isinstance(short_seq_prob, (int, float)) and 0 <= short_seq_prob <= 1, "short_seq_prob",
                 short_seq_prob, "a probability in [0, 1]")
        if config is not None:
            _require(max_seq_length <= config.max_position_embeddings, "max_seq_length", max_seq_length,
                     f"at most config.max_position_embeddings={config.max_position_embeddings}")
            _require(config.type_vocab_size >= 2, "config.type_vocab_size", config.type_vocab_size,
                     "at least 2 (segments A and B)")
            _require(config.pad_token_id == PAD_ID, "config.pad_token_id", config.pad_token_id, f"{PAD_ID}")

        corpus_path = default_corpus_path() if corpus is None else os.fspath(corpus)
        documents = read_corpus(corpus_path)
        if tokenizer is None:
            if vocab_size is None:
                vocab_size = config.vocab_size if config is not None else DEFAULT_VOCAB_SIZE
            tokenizer = Tokenizer.train(corpus_path, vocab_size=vocab_size)
        elif not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.load(tokenizer)
        if config is not None and tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} does not match config.vocab_size="
                             f"{config.vocab_size}; expected equal sizes (train the tokenizer with "
                             f"vocab_size={config.vocab_size} or change the config)")

        self.documents = tokenize_documents(documents, tokenizer)
        num_sentences = sum(len(d) for d in self.documents)
        if not any(len(d) >= 2 for d in self.documents):
            raise ValueError(f"corpus {corpus_path!r} has no document with at least two sentences ({num_sentences} "
                             f"sentence(s) in {len(self.documents)} document(s)); expected at least one document "
                             f"of two or more lines, since each example splits a document's consecutive "
                             f"sentences into segments A and B")
        self.tokenizer = tokenizer
        self.corpus_path = corpus_path
        self.batch_size = int(batch_size)
        self.max_seq_length = int(max_seq_length)
        self.seed = int(seed)
        self.masked_lm_prob = float(masked_lm_prob)
        self.max_predictions_per_seq = int(max_predictions_per_seq)
        self.max_ngram = int(max_ngram)
        self.short_seq_prob = float(short_seq_prob)
        self.fingerprint = self._fingerprint()
        self._epoch = 0
        self._position = 0
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def _fingerprint(self) -> str:
        """Hash of everything the example stream depends on except the seed (kept in the state as is)."""
        h = hashlib.sha256()
        h.update(self.tokenizer.model_proto)
        settings = [self.tokenizer.lower_case, self.max_seq_length, self.masked_lm_prob,
                    self.max_predictions_per_seq, self.max_ngram, self.short_seq_prob]
        h.update(json.dumps(settings).encode())
        for document in self.documents:
            h.update(json.dumps(document, separators=(",", ":")).encode())
        return h.hexdigest()[:16]

    # --- one epoch ---------------------------------------------------------------------------
    def epoch_examples(self, epoch: int) -> dict[str, np.ndarray]:
        """All examples of ``epoch`` in stream order: arrays (N, T) and sop_labels (N,)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # a batch needs at most the current epoch and the next
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self._build_epoch(epoch)
        return self._cache[epoch]

    def _build_epoch(self, epoch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        T = self.max_seq_length
        rows = []
        for document_index in rng.permutation(len(self.documents)).tolist():
            pairs = create_sentence_pairs(self.documents[document_index], T, self.short_seq_prob, rng)
            for pair in pairs:
                tokens, token_type_ids = assemble_pair(pair.tokens_a, pair.tokens_b)
                masked = create_masked_lm_predictions(
                    tokens, self.tokenizer.word_start_table, self.tokenizer.ordinary_ids, rng,
                    self.masked_lm_prob, self.max_predictions_per_seq, self.max_ngram)
                rows.append((masked.input_ids, token_type_ids, masked.mlm_labels, pair.sop_label))
        N = len(rows)
        batch = {
            "input_ids": np.full((N, T), PAD_ID, dtype=np.int64),
            "token_type_ids": np.zeros((N, T), dtype=np.int64),
            "attention_mask": np.zeros((N, T), dtype=np.int64),
            "mlm_labels": np.full((N, T), IGNORE_INDEX, dtype=np.int64),
            "sop_labels": np.zeros(N, dtype=np.int64),
        }
        for row, slot in enumerate(rng.permutation(N).tolist()):
            input_ids, token_type_ids, mlm_labels, sop_label = rows[row]
            n = len(input_ids)
            batch["input_ids"][slot, :n] = input_ids
            batch["token_type_ids"][slot, :n] = token_type_ids
            batch["attention_mask"][slot, :n] = 1
            batch["mlm_labels"][slot, :n] = mlm_labels
            batch["sop_labels"][slot] = sop_label
        return batch

    # --- the stream --------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Index, within the current epoch, of the next example to be emitted."""
        return self._position

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next ``batch_size`` examples: dict of int64 arrays (B, T), sop_labels (B,)."""
        parts = []
        needed = self.batch_size
        while needed:
            examples = self.epoch_examples(self._epoch)
            count = len(examples["sop_labels"])
            take = min(needed, count - self._position)
            parts.append({k: v[self._position:self._position + take] for k, v in examples.items()})
            self._position += take
            needed -= take
            if self._position == count:
                self._epoch, self._position = self._epoch + 1, 0
        return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}

    def state_dict(self) -> dict:
        """JSON-able position in the stream, plus the seed and a fingerprint of corpus, tokenizer and
        settings so that a state is not loaded into a different stream by mistake."""
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict):
        """Continue from a :meth:`state_dict`. Raises ValueError if it belongs to another stream."""
        expected_keys = {"seed", "epoch", "position", "fingerprint"}
        if not isinstance(state, dict) or set(state) != expected_keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"dataset state has keys {got}, expected {sorted(expected_keys)}")
        if state["seed"] != self.seed:
            raise ValueError(f"dataset state has seed={state['seed']!r}, expected this dataset's seed={self.seed}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"dataset state has fingerprint={state['fingerprint']!r}, expected {self.fingerprint!r}: "
                             f"it was saved with another corpus, tokenizer or masking/length settings")
        epoch, position = state["epoch"], state["position"]
        _require(_is_int(epoch) and epoch >= 0, "state['epoch']", epoch, "a non-negative integer")
        _require(_is_int(position) and position >= 0, "state['position']", position, "a non-negative integer")
        count = len(self.epoch_examples(epoch)["sop_labels"])
        _require(position < count, "state['position']", position, f"less than {count}, the examples in epoch {epoch}")
        self._epoch, self._position = int(epoch), int(position)
