"""The ALBERT/BERT model: orchestration only. The math is in ``ops``, ``encoder`` and ``heads``.

    embeddings (+ projection E->H)  ->  L layers of post-LN blocks (shared per Config)  ->  pooler
                                                           |                                |
                                          MLM head at labelled positions        SOP/NSP head on pooled
    loss = MLM cross-entropy (mean over labels != -100) + SOP cross-entropy

``Model.forward`` returns every layer's hidden states, the pooled output, MLM logits at every position
and SOP logits. ``Model.loss_and_grads`` runs the forward pass, the loss, and the hand-written backward
pass, and returns the loss with one gradient per parameter.

Arrays live on the model's backend: inputs must already be there (``model.backend.from_host(ids)``),
outputs stay there (``model.backend.to_host(x)`` to read them). Nothing is moved implicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

import backends

from .config import Config
from .encoder import encoder_backward, encoder_forward, scoped
from .heads import (mlm_head_backward, mlm_head_forward, pooler_backward, pooler_forward, sop_head_backward,
                    sop_head_forward)
from .ops import IGNORE_INDEX, additive_mask_from, cross_entropy_backward, cross_entropy_forward
from .ops import embeddings_backward, embeddings_forward
from .params import FlatBuffer, count_parameters, initialize, parameter_shapes
from .validate import check_inputs, check_labels

DTYPES = ("float32", "float64")
Trace = Optional[Callable[[str, object], None]]


@dataclass
class ModelOutput:
    """What ``Model.forward`` returns. All arrays are on the model's backend.

    hidden_states: L + 1 arrays (B, T, H); [0] is the encoder input (after the E->H projection).
    pooled_output: (B, H); mlm_logits: (B, T, V) or None; sop_logits: (B, 2).
    """

    hidden_states: list
    pooled_output: object
    mlm_logits: object
    sop_logits: object

    @property
    def last_hidden_state(self):
        return self.hidden_states[-1]


class Model:
    """ALBERT (or BERT, with ``sharing="none"`` and E == H) with pretraining heads.

    Args:
        config:  a :class:`Config` or a preset name.
        backend: "numpy", "cupy", a :class:`backends.Backend`, or None for $REF_BERT_BACKEND.
        dtype:   "float32" or "float64"; every array of the model has it (no silent promotion).
        seed:    initial weights are drawn on the host from ``numpy.random.default_rng(seed)``; the
                 dropout stream used when ``training=True`` and no ``dropout_seed`` is given is
                 ``default_rng([seed, 1])``.
    """

    def __init__(self, config: Config | str, backend=None, dtype="float32", seed: int = 0):
        if isinstance(config, str):
            config = Config.preset(config)
        if not isinstance(config, Config):
            raise ValueError(f"config must be a ref_bert.Config or a preset name, got {type(config).__name__}")
        if str(np.dtype(dtype)) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.config = config
        self.backend = backends.get(backend)
        self.xp = self.backend.xp
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.params = FlatBuffer(parameter_shapes(config, heads=True), self.xp, self.dtype)
        initialize(self.params, config, self.backend, seed)
        self.dropout_rng = self.backend.rng([seed, 1])

    def __repr__(self) -> str:
        return (f"Model({self.config.name!r}, backend={self.backend.name!r}, dtype={self.dtype.name!r}, "
                f"parameters={self.num_parameters(include_heads=True):,})")

    # --- bookkeeping ---------------------------------------------------------------------------
    def num_parameters(self, include_heads: bool = False) -> int:
        """Unique parameters; without heads this is Hugging Face's AlbertModel/BertModel count."""
        return count_parameters(self.config, heads=include_heads)

    def named_parameters(self) -> dict:
        """Name -> view into the flat parameter buffer (writing to a view changes the model)."""
        return dict(self.params.items())

    def _dropout(self, training: bool, dropout_seed):
        """A ``drop(shape, prob)`` function: frozen masks from ``dropout_seed``, the model's own
        stream when training without one, and no dropout at all when not training."""
        if not training:
            return lambda shape, prob: None
        rng = self.dropout_rng if dropout_seed is None else self.backend.rng(dropout_seed)

        def drop(shape, prob):
            if prob == 0:
                return None
            return self.backend.keep_mask(rng, shape, 1.0 - prob, self.dtype)

        return drop

    # --- forward -------------------------------------------------------------------------------
    def _encode(self, input_ids, token_type_ids, attention_mask, position_ids, drop, trace):
        input_ids, token_type_ids, attention_mask, position_ids = check_inputs(
            self.config, self.backend, input_ids, token_type_ids, attention_mask, position_ids)
        cfg, p = self.config, self.params
        emb_drop = drop(tuple(input_ids.shape) + (cfg.embedding_size,), cfg.hidden_dropout_prob)
        x, emb_cache = embeddings_forward(p.prefixed("embeddings."), input_ids, token_type_ids, position_ids,
                                          cfg.layer_norm_eps, emb_drop, project=cfg.has_projection,
                                          trace=scoped(trace, "embeddings."))
        if trace is not None:
            trace("embeddings.output", x)
        additive_mask = additive_mask_from(attention_mask, self.dtype, cfg.attention_mask_value)
        hidden_states, enc_cache = encoder_forward(x, p, additive_mask, cfg, drop, trace)
        return hidden_states, (emb_cache, enc_cache)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, *,
                training: bool = False, dropout_seed=None, return_mlm_logits: bool = True,
                trace: Trace = None) -> ModelOutput:
        """Run the model. ``attention_mask`` is (B, T) (1 = real token) or (B, T, T) (1 = query i may
        attend key j). ``trace(name, array)``, when given, is called with each activation in order."""
        drop = self._dropout(training, dropout_seed)
        hidden_states, _ = self._encode(input_ids, token_type_ids, attention_mask, position_ids, drop, trace)
        last = hidden_states[-1]
        pooled, _ = pooler_forward(last, self.params, trace)
        if trace is not None:
            trace("pooled_output", pooled)
        sop_logits, _ = sop_head_forward(pooled, self.params, drop(pooled.shape, self.config.classifier_dropout_prob))
        if trace is not None:
            trace("sop_logits", sop_logits)
        mlm_logits = None
        if return_mlm_logits:
            mlm_logits, _ = mlm_head_forward(last, self.params, self.config, trace)  # (B, T, V)
            if trace is not None:
                trace("mlm_logits", mlm_logits)
        return ModelOutput(hidden_states, pooled, mlm_logits, sop_logits)

    __call__ = forward

    # --- loss and backward ---------------------------------------------------------------------
    def loss_and_grads(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None,
                       sop_labels=None, position_ids=None, *, training: bool = False, dropout_seed=None,
                       return_parts: bool = False, trace: Trace = None, loss_weights=(1.0, 1.0),
                       _backward: bool = True):
        """Loss = MLM + SOP (whichever labels are given; -100 marks ignored entries) and its gradient.

        Returns ``(loss, grads)``: ``loss`` a 0-d array on the backend, ``grads`` a dict with one
        fresh array per parameter name (same names and shapes as ``named_parameters()``), all views of
        one flat buffer laid out like the parameters. With ``return_parts=True`` a
        third element ``{"mlm": ..., "sop": ...}`` holds the two (unweighted) losses.
        ``loss_weights=(w_mlm, w_sop)`` returns ``w_mlm * MLM + w_sop * SOP`` and its gradient (ALBERT:
        (1, 1)); gradient accumulation uses it to weight micro-batches in one pass.
        The MLM head runs only at labelled positions (that is where the vocabulary-sized work is).
        """
        xp, cfg = self.xp, self.config
        w_mlm, w_sop = (float(w) for w in loss_weights)
        drop = self._dropout(training, dropout_seed)
        hidden_states, (emb_cache, enc_cache) = self._encode(
            input_ids, token_type_ids, attention_mask, position_ids, drop, trace)
        B, T, H = hidden_states[-1].shape
        check_labels(cfg, self.backend, (B, T), mlm_labels, sop_labels)
        last = hidden_states[-1]
        grads = FlatBuffer(self.params.shapes, xp, self.dtype)
        dlast = xp.zeros_like(last)
        zero = xp.zeros((), dtype=self.dtype)
        mlm_loss, sop_loss = zero, zero

        if mlm_labels is not None:
            flat_labels = mlm_labels.reshape(-1)
            positions = xp.nonzero(flat_labels != IGNORE_INDEX)[0]
            gathered = last.reshape(B * T, H)[positions]
            logits, head_cache = mlm_head_forward(gathered, self.params, cfg)
            mlm_loss, ce_cache = cross_entropy_forward(logits, flat_labels[positions])
            if _backward:
                dgathered = mlm_head_backward(cross_entropy_backward(w_mlm, ce_cache), head_cache, grads)
                dlast.reshape(B * T, H)[positions] += dgathered
        if sop_labels is not None:
            pooled, pool_cache = pooler_forward(last, self.params)
            logits, sop_cache = sop_head_forward(pooled, self.params, drop(pooled.shape, cfg.classifier_dropout_prob))
            sop_loss, ce_cache = cross_entropy_forward(logits, sop_labels)
            if _backward:
                dpooled = sop_head_backward(cross_entropy_backward(w_sop, ce_cache), sop_cache, grads)
                dlast += pooler_backward(dpooled, pool_cache, grads, xp)

        loss = w_mlm * mlm_loss + w_sop * sop_loss
        if not _backward:
            return loss, None, {"mlm": mlm_loss, "sop": sop_loss}
        dhidden = [None] * (len(hidden_states) - 1) + [dlast]
        dx = encoder_backward(dhidden, enc_cache, grads, cfg)
        embeddings_backward(dx, emb_cache, grads.prefixed("embeddings."))
        out_grads = dict(grads.items())
        if return_parts:
            return loss, out_grads, {"mlm": mlm_loss, "sop": sop_loss}
        return loss, out_grads

    def loss(self, *args, **kwargs):
        """The loss of :meth:`loss_and_grads` alone: the same forward code, no backward pass."""
        return self.loss_and_grads(*args, _backward=False, **kwargs)[0]

    # --- Hugging Face checkpoints (the mapping lives in ref_bert/hf.py) --------------------------
    @classmethod
    def from_hf(cls, path, backend="numpy", dtype="float32", seed: int = 0) -> "Model":
        """Load a Hugging Face ALBERT/BERT directory (config.json + model.safetensors); see :mod:`ref_bert.hf`.
        Heads missing from the checkpoint are initialised from ``seed`` (with a warning)."""
        from .hf import load_hf

        return load_hf(path, backend=backend, dtype=dtype, seed=seed)

    def save_hf(self, path):
        """Write a directory that ``transformers`` loads as Albert/BertForPreTraining; see :mod:`ref_bert.hf`."""
        from .hf import save_hf

        return save_hf(self, path)

    def hf_state_dict(self, tensors=None) -> dict:
        """Our parameters (or any dict shaped like them, e.g. gradients) under Hugging Face names and layouts."""
        from .hf import hf_state_dict

        return hf_state_dict(self, tensors)
