"""The job's data: the corpus stream for its objective, and each step's micro-batches on the device.

Both objectives read the same corpus stream of sentence-order pairs (:mod:`ref_bert.data.stream`):

    albert  :class:`ref_bert.data.PretrainingDataset`: each pair, as it is drawn, laid out as
            ``[CLS] A [SEP] B [SEP]`` and masked with whole-word n-grams (ALBERT's MLM + SOP).
    unilm   :class:`ref_bert.data.SentencePairStream`: the pairs themselves, in document order; each
            micro-batch of them becomes a UniLM mixed-objective batch (:func:`unilm_host_batch`).

Either way the stream's position is the data state of a checkpoint, so a resumed run continues
exactly where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..data import PretrainingDataset, SentencePairStream, Tokenizer
from ..ops import IGNORE_INDEX
from ..unilm import pretraining_batch as unilm_pretraining_batch
from .settings import PretrainConfig

# The data stream's seed is derived from --seed with its own SeedSequence key, so that the data's
# generators (default_rng([data_seed, epoch])) never coincide with the model's (default_rng(seed) for
# the weights, default_rng([seed, 1]) for dropout).
DATA_STREAM_KEY = 0xDA7A
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "sop_labels")


def data_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, DATA_STREAM_KEY]).generate_state(1)[0])


def make_stream(objective: str, corpus: str, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                model_config: Config) -> SentencePairStream:
    """The corpus stream of ``objective`` ("albert": masked examples; "unilm": sentence pairs)."""
    stream = PretrainingDataset if objective == "albert" else SentencePairStream
    return stream(corpus, tokenizer, batch_size=batch_size, max_seq_length=seq_len, seed=data_seed(seed),
                  config=model_config)


def unilm_host_batch(pairs: list, seq_len: int, config: Config, seed) -> dict:
    """One UniLM mixed-objective batch from the stream's sentence pairs (host arrays).

    Each pair is taken in document order (the stream's SOP swap undone); :func:`ref_bert.unilm.
    pretraining_batch` then gives each example its mask kind (1/3 bidirectional with the
    sentence-order loss, 1/3 seq2seq, 1/6 left-to-right, 1/6 right-to-left), draws its own swap and
    masks (15%, 80/10/10, spans of 1 to 3 tokens). ``seed`` makes the draw a function of (run seed,
    step, micro-batch), so a resumed run rebuilds the same batches. UniLM's segment ids (6 types) are
    used when the config has ``type_vocab_size >= 6``.
    """
    batch = unilm_pretraining_batch([pair.in_document_order() for pair in pairs], seq_len, config.vocab_size,
                                    seed=np.random.default_rng(list(seed)),
                                    unilm_segments=config.type_vocab_size >= 6)
    return {key: getattr(batch, key) for key in MODEL_INPUTS}


@dataclass
class StepBatch:
    """One step's data: this rank's micro-batches on the model's backend, and the host counts of all
    ``grad_accum`` micro-batches of the global batch (every rank knows every micro-batch's weight)."""

    micro_batches: list   # dicts of backend arrays, ``Model.loss_and_grads`` keyword arguments
    indices: list         # each one's index in the global batch (0 .. grad_accum - 1)
    mlm_counts: list      # labelled MLM positions of every micro-batch of the global batch (host integers)
    sizes: list           # examples of every micro-batch of the global batch
    tokens: int           # real (non-pad) tokens of the whole global batch


def next_step_batch(stream: SentencePairStream, cfg: PretrainConfig, model, step: int, indices=None) -> StepBatch:
    """The next ``cfg.grad_accum`` micro-batches of the stream for the step after ``step`` updates, all
    built on the host (so that the stream's position is the same on every rank); those numbered in
    ``indices`` (default: all) are moved with one ``backend.from_host`` per array, then sliced on the
    device."""
    host_batches, tokens = [], 0
    for i in range(cfg.grad_accum):
        examples = stream.next_batch()
        if cfg.objective == "albert":
            host_batches.append(examples)
            tokens += int(examples["attention_mask"].sum())      # (B, T) padding masks
        else:
            host_batches.append(unilm_host_batch(examples, cfg.seq_len, model.config, seed=(cfg.seed, step, i)))
            tokens += sum(len(pair.tokens_a) + len(pair.tokens_b) + 3 for pair in examples)   # [CLS] A [SEP] B [SEP]
    indices = list(range(cfg.grad_accum)) if indices is None else list(indices)
    mlm_counts = [int((hb["mlm_labels"] != IGNORE_INDEX).sum()) for hb in host_batches]
    sizes = [len(hb["sop_labels"]) for hb in host_batches]
    batch = {key: model.backend.from_host(np.concatenate([host_batches[i][key] for i in indices]))
             for key in host_batches[0]}
    starts = [int(n) for n in np.cumsum([0] + [sizes[i] for i in indices])]
    micro_batches = [{key: value[starts[t]:starts[t + 1]] for key, value in batch.items()} for t in range(len(indices))]
    return StepBatch(micro_batches, indices, mlm_counts, sizes, tokens)
