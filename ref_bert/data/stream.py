"""The corpus stream: documents -> sentence-order pairs -> examples -> batches, one pass for every objective.

Follows google-research/albert ``create_pretraining_data.py`` (docs/reference.md §6), with NumPy's
``default_rng`` as the only source of randomness. Per epoch:

    corpus file -> documents of sentences -> token ids (once, no randomness)
    rng = default_rng([seed, epoch])
    shuffle documents                                        (ALBERT: rng.shuffle(all_documents))
    for each document: create_sentence_pairs -> SentencePair (A, B, swapped or not)
        and, right after the document's pairs, each pair -> an example (``_example(pair, rng)``)
    shuffle the examples                                     (ALBERT: rng.shuffle(instances))
    cut into batches; the stream continues into epoch + 1 without a gap or a repeat

One epoch plays the role of one of ALBERT's ``dupe_factor`` passes: the same text, new chunk lengths,
new A/B splits, new swaps (and, for ALBERT's objective, new masks).

:class:`SentencePairStream` yields the pairs themselves; it is what UniLM's mixed-objective batches
(:func:`ref_bert.unilm.pretraining_batch`) are built from. :class:`ref_bert.data.PretrainingDataset`
is the same stream whose example is ALBERT's: the pair laid out as ``[CLS] A [SEP] B [SEP]`` and masked
with whole-word n-grams, drawn from the epoch's generator as ALBERT does. Neither undoes the other's
work: nothing is masked that is later un-masked.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..validate import is_int, require
from .corpus import PathLike, check_pairable, default_corpus_path, read_corpus
from .tokenizer import PAD_ID, Tokenizer

# Smallest layout with a token on each side: [CLS] a [SEP] b [SEP]. ALBERT's shorter-target draw
# randint(2, max_seq_length - 3) needs the same bound.
MIN_SEQ_LENGTH = 5
DEFAULT_VOCAB_SIZE = 1000  # the "tiny" preset's; the default corpus supports up to about 3100 pieces


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

    def in_document_order(self) -> tuple[list[int], list[int]]:
        """(first, second): the two segments in the order the document has them, the swap undone."""
        return (self.tokens_b, self.tokens_a) if self.sop_label == 1 else (self.tokens_a, self.tokens_b)


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


# --- the stream ------------------------------------------------------------------------------------
class SentencePairStream:
    """An endless, deterministic stream of sentence-order pairs from a corpus, in batches.

    Batch k is a pure function of (corpus, tokenizer, settings, seed, k): epoch e's examples are built
    and shuffled with ``default_rng([seed, e])`` (module docstring), and batches are consecutive runs
    of ``batch_size`` examples of the stream epoch 0, epoch 1, ... (a batch may straddle two epochs).
    The position is ``(epoch, position)``: :meth:`state_dict` returns it as a JSON-able dict,
    :meth:`load_state_dict` restores it, so a resumed run continues exactly where it stopped.

    Here an example is the :class:`SentencePair` itself and a batch a list of them. A consumer that
    builds its examples from the epoch's generator (ALBERT's masking) overrides :meth:`_example`,
    :meth:`_collate` and :meth:`_fingerprint_settings`.

    Args:
        corpus: corpus file (format of :func:`ref_bert.data.read_corpus`); None for the packaged
            default corpus.
        tokenizer: a :class:`Tokenizer`, a path to a SentencePiece model, or None to train one on the
            corpus with ``vocab_size`` pieces (default: ``config.vocab_size`` if a config is given, else
            1000, the "tiny" preset's).
        batch_size, max_seq_length: B and T of every batch (T counts [CLS] and both [SEP]s).
        seed: the stream's seed.
        config: a ``ref_bert.Config`` to check against: T <= max_position_embeddings, equal vocabulary
            sizes, pad id 0, two token types.
        short_seq_prob: ALBERT's flag (default 0.1).
    """

    def __init__(self, corpus: Optional[PathLike] = None, tokenizer: Union[Tokenizer, PathLike, None] = None, *,
                 batch_size: int = 8, max_seq_length: int = 128, seed: int = 0, config=None,
                 short_seq_prob: float = 0.1, vocab_size: Optional[int] = None):
        require(is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
        require(is_int(max_seq_length) and max_seq_length >= MIN_SEQ_LENGTH, "max_seq_length", max_seq_length,
                f"an integer >= {MIN_SEQ_LENGTH} (room for [CLS] a [SEP] b [SEP])")
        require(is_int(seed) and seed >= 0, "seed", seed, "a non-negative integer")
        require(isinstance(short_seq_prob, (int, float)) and 0 <= short_seq_prob <= 1, "short_seq_prob",
                short_seq_prob, "a probability in [0, 1]")
        if config is not None:
            require(max_seq_length <= config.max_position_embeddings, "max_seq_length", max_seq_length,
                    f"at most config.max_position_embeddings={config.max_position_embeddings}")
            require(config.type_vocab_size >= 2, "config.type_vocab_size", config.type_vocab_size,
                    "at least 2 (segments A and B)")
            require(config.pad_token_id == PAD_ID, "config.pad_token_id", config.pad_token_id, f"{PAD_ID}")

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
        check_pairable(self.documents, corpus_path)
        self.tokenizer = tokenizer
        self.corpus_path = corpus_path
        self.batch_size = int(batch_size)
        self.max_seq_length = int(max_seq_length)
        self.seed = int(seed)
        self.short_seq_prob = float(short_seq_prob)
        self.fingerprint = self._fingerprint()
        self._epoch = 0
        self._position = 0
        self._cache: dict[int, list] = {}

    # --- what an example is (overridden by consumers that build more than the pair) ------------
    def _example(self, pair: SentencePair, rng: np.random.Generator):
        """The example made of ``pair``, drawn from the epoch's generator right after its document's pairs."""
        return pair

    def _collate(self, examples: list):
        """One batch of examples."""
        return list(examples)

    def _fingerprint_settings(self) -> list:
        """The settings the examples depend on, besides the tokenizer, the documents and the seed."""
        return ["sentence pairs", self.tokenizer.lower_case, self.max_seq_length, self.short_seq_prob]

    def _fingerprint(self) -> str:
        """Hash of everything the example stream depends on except the seed (kept in the state as is)."""
        h = hashlib.sha256()
        h.update(self.tokenizer.model_proto)
        h.update(json.dumps(self._fingerprint_settings()).encode())
        for document in self.documents:
            h.update(json.dumps(document, separators=(",", ":")).encode())
        return h.hexdigest()[:16]

    # --- one epoch ---------------------------------------------------------------------------
    def _epoch_list(self, epoch: int) -> list:
        """The examples of ``epoch`` in stream order (cached: a batch needs at most this epoch and the next)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self._build_epoch(epoch)
        return self._cache[epoch]

    def _build_epoch(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, epoch])
        examples = []
        for document_index in rng.permutation(len(self.documents)).tolist():
            for pair in create_sentence_pairs(self.documents[document_index], self.max_seq_length,
                                              self.short_seq_prob, rng):
                examples.append(self._example(pair, rng))
        shuffled = [None] * len(examples)
        for row, slot in enumerate(rng.permutation(len(examples)).tolist()):
            shuffled[slot] = examples[row]
        return shuffled

    def epoch_examples(self, epoch: int):
        """All examples of ``epoch`` in stream order, collated as one batch."""
        return self._collate(self._epoch_list(epoch))

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

    def __next__(self):
        return self.next_batch()

    def next_batch(self):
        """The next ``batch_size`` examples, collated."""
        taken = []
        needed = self.batch_size
        while needed:
            examples = self._epoch_list(self._epoch)
            take = min(needed, len(examples) - self._position)
            taken.extend(examples[self._position:self._position + take])
            self._position += take
            needed -= take
            if self._position == len(examples):
                self._epoch, self._position = self._epoch + 1, 0
        return self._collate(taken)

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
        require(is_int(epoch) and epoch >= 0, "state['epoch']", epoch, "a non-negative integer")
        require(is_int(position) and position >= 0, "state['position']", position, "a non-negative integer")
        count = len(self._epoch_list(epoch))
        require(position < count, "state['position']", position, f"less than {count}, the examples in epoch {epoch}")
        self._epoch, self._position = int(epoch), int(position)
