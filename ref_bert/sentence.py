"""Sentence embeddings from a sentence-transformers directory: its transformer, tokenizer, pooling and
normalisation, run by ref-bert.

    >>> encoder = SentenceEncoder.from_dir("all-MiniLM-L6-v2", dtype="float64")     # doctest: +SKIP
    >>> embeddings = encoder.encode(["A sentence.", "Another one."])                  # (2, 384) host array

A sentence-transformers directory lists its modules in ``modules.json`` (docs/reference.md §7.2):
``...Transformer`` (path "" = the directory itself, or a sub-directory: a Hugging Face BERT/ALBERT
checkpoint with its tokenizer and ``sentence_bert_config.json``: ``max_seq_length``, ``do_lower_case``),
``...Pooling`` (its ``config.json``: ``pooling_mode`` or the older ``pooling_mode_*_tokens`` flags) and,
optionally, ``...Normalize`` (L2 normalisation). Any other module is a ValueError naming it.

As sentence-transformers does: texts are lower-cased first when ``do_lower_case``, tokenized with
truncation to ``max_seq_length`` (longest first), padded on the right; the last hidden state is pooled
over the real tokens with each mode in turn (several modes are concatenated in the order of
:data:`ref_bert.ops.POOLING_MODES`), then normalised. The math is :mod:`ref_bert.ops.pooling`, with its
backward: :meth:`SentenceEncoder.backward` turns the gradient of a loss on the embeddings into one
gradient per model parameter.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import read_json
from .hf import sentence_transformers_modules, transformer_directory
from .model import Model
from .ops import POOLING_MODES, l2_normalize_backward, l2_normalize_forward, pooling_backward, pooling_forward

# sentence-transformers' older Pooling config flags, in the order its modes are concatenated
_LEGACY_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def read_pooling_config(path: Path) -> tuple:
    """The pooling modes of a Pooling module's config.json, in sentence-transformers' order."""
    config = read_json(path, "sentence-transformers pooling config")
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for flag, mode in _LEGACY_FLAGS.items() if config.get(flag))
    if not modes:
        raise ValueError(f"{path} selects no pooling mode; expected one of {POOLING_MODES}")
    unsupported = [m for m in modes if m not in POOLING_MODES]
    if unsupported:
        raise ValueError(f"{path}: pooling mode(s) {unsupported} are not supported; expected {POOLING_MODES}")
    if config.get("include_prompt") is False:
        raise ValueError(f"{path}: include_prompt=false is not supported (expected true or absent)")
    return modes


@dataclass
class EmbeddingCache:
    output: object          # the model's ModelOutput (with its cache)
    pool_caches: list
    normalize_cache: object = None


@dataclass
class SentenceEncoder:
    """A transformer with its tokenizer, pooling modes and normalisation (see the module docstring)."""

    model: Model
    pooling: tuple = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    directory: Path | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, path, backend=None, dtype="float32", seed: int = 0) -> "SentenceEncoder":
        """Load a sentence-transformers directory (``modules.json``). ValueError when it has none, lacks a
        tokenizer, or has modules ref-bert does not run."""
        directory = Path(path)
        modules = sentence_transformers_modules(directory)
        if modules is None:
            raise ValueError(f"{directory} has no modules.json; expected a sentence-transformers directory")
        pooling, normalize = None, False
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]
            if kind == "Transformer":
                continue
            if kind == "Pooling" and pooling is None:
                pooling = read_pooling_config(directory / module["path"] / "config.json")
            elif kind == "Normalize" and not normalize:
                normalize = True
            else:
                raise ValueError(f"{directory / 'modules.json'}: module {module.get('name')!r} of type "
                                 f"{module['type']!r} is not supported; ref-bert runs Transformer, Pooling and "
                                 f"Normalize modules")
        if pooling is None:
            raise ValueError(f"{directory / 'modules.json'} lists no Pooling module; expected one")
        transformer = transformer_directory(directory)
        with warnings.catch_warnings():      # a BertModel has no pretraining heads; embeddings never use them
            warnings.filterwarnings("ignore", message=".*freshly initialised")
            model = Model.from_hf(transformer, backend=backend, dtype=dtype, seed=seed, tokenizer=True)
        settings = {}
        if (transformer / "sentence_bert_config.json").is_file():
            settings = read_json(transformer / "sentence_bert_config.json", "sentence-transformers settings")
        max_len = settings.get("max_seq_length")
        limit = model.config.max_position_embeddings
        max_len = limit if max_len is None else min(int(max_len), limit)
        return cls(model, pooling, normalize, max_len, bool(settings.get("do_lower_case", False)), directory)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def tokenize(self, sentences) -> dict:
        """Model inputs for ``sentences``: (B, T) host int64 arrays, truncated to ``max_seq_length``."""
        if isinstance(sentences, str):
            sentences = [sentences]
        texts = [s.lower() if self.do_lower_case else s for s in sentences]
        return self.tokenizer.batch(texts, max_length=self.max_seq_length, truncation=True)

    def forward(self, inputs: dict, keep_cache: bool = False):
        """Embeddings (B, D) on the model's backend for tokenized ``inputs``, and the cache for
        :meth:`backward` (None unless ``keep_cache``)."""
        bk = self.model.backend
        ids, types, mask = (bk.from_host(inputs[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
        out = self.model.forward(ids, token_type_ids=types, attention_mask=mask, keep_cache=keep_cache,
                                 return_mlm_logits=False, return_sop_logits=False)
        last = out.hidden_states[-1]
        pooled, caches = [], []
        for mode in self.pooling:
            y, c = pooling_forward(last, mask, mode)
            pooled.append(y)
            caches.append(c)
        embedding = pooled[0] if len(pooled) == 1 else self.model.xp.concatenate(pooled, axis=-1)
        cache = EmbeddingCache(out, caches)
        if self.normalize:
            embedding, cache.normalize_cache = l2_normalize_forward(embedding)
        return embedding, (cache if keep_cache else None)

    def backward(self, d_embedding, cache: EmbeddingCache):
        """One gradient per model parameter (``Gradients`` of :meth:`ref_bert.Model.backward`) for the
        gradient ``d_embedding`` (B, D) of a loss on the embeddings."""
        d = d_embedding
        if self.normalize:
            d = l2_normalize_backward(d, cache.normalize_cache)
        H = self.model.config.hidden_size
        d_last = None
        for k, c in enumerate(cache.pool_caches):
            part = pooling_backward(d[:, k * H:(k + 1) * H], c)
            d_last = part if d_last is None else d_last + part
        return self.model.backward(cache.output, d_hidden_states={-1: d_last})

    def encode(self, sentences, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings (N, D) as a host array, ``batch_size`` sentences at a time."""
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        if not sentences:
            raise ValueError("sentences is empty; expected at least one")
        parts = []
        for start in range(0, len(sentences), batch_size):
            embedding, _ = self.forward(self.tokenize(sentences[start:start + batch_size]))
            parts.append(self.model.backend.to_host(embedding))
        return np.concatenate(parts, axis=0)


__all__ = ["SentenceEncoder", "read_pooling_config"]
