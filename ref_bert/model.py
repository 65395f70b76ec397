"""The ALBERT/BERT model: orchestration only. The math is in ``ops``, ``encoder`` and ``heads``.

    embeddings (+ projection E->H)  ->  L layers of post-LN blocks (shared per Config)  ->  pooler
                                                           |                                |
                                                       MLM head                     SOP/NSP head on pooled
    loss = MLM cross-entropy (mean over labels != -100) + SOP cross-entropy

The model-level contract is the ops' contract one level up (llm.c's gpt2_forward / gpt2_backward,
cs231n's ``forward -> (out, cache)`` / ``backward(dout, cache)``):

    out   = model.forward(ids, ..., keep_cache=True)      every output, and what backward needs
    grads = model.backward(out, d_hidden_states={-1: g}, d_pooled_output=..., d_mlm_logits=...,
                           d_sop_logits=...)              upstream gradients for any subset of outputs
    grads.params[name]                                    one gradient per parameter
    grads.inputs_embeds                                   dL/d(word-embedding lookup), (B, T, E)

``loss_and_grads`` is the composition for the pretraining loss: forward (the MLM head only at labelled
positions), the two cross-entropies, backward; it returns a :class:`LossAndGrads`.

Arrays live on the model's backend: inputs must already be there (``model.backend.from_host(ids)``),
outputs stay there (``model.backend.to_host(x)`` to read them). Nothing is moved implicitly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

import backends

from . import hf
from .config import Config
from .encoder import encoder_backward, encoder_forward, scoped
from .heads import (mlm_head_backward, mlm_head_forward, pooler_backward, pooler_forward, sop_head_backward,
                    sop_head_forward)
from .ops import IGNORE_INDEX, additive_mask_from, cross_entropy_backward, cross_entropy_forward
from .ops import embeddings_backward, embeddings_forward
from .params import FlatBuffer, count_parameters, initialize, parameter_shapes
from .validate import check_dtype, check_flag, check_inputs, check_labels, check_loss_weights, check_seed

DTYPES = ("float32", "float64")
Trace = Optional[Callable[[str, object], None]]


@dataclass
class ModelOutput:
    """What ``Model.forward`` returns. All arrays are on the model's backend.

    hidden_states: L + 1 arrays (B, T, H); [0] is the encoder input (after the E->H projection).
    pooled_output: (B, H).
    mlm_logits:    (B, T, V); (N, V) at the N flat positions ``mlm_positions`` when given; None when
                   not asked for.
    sop_logits:    (B, 2); None when not asked for.
    cache:         what :meth:`Model.backward` needs (only with ``keep_cache=True``); opaque.
    """

    hidden_states: list
    pooled_output: object
    mlm_logits: object
    sop_logits: object
    cache: object = None

    @property
    def last_hidden_state(self):
        return self.hidden_states[-1]


@dataclass
class Gradients:
    """What ``Model.backward`` returns.

    params:        parameter name -> gradient, the names and shapes of ``Model.state_dict()``; all
                   views of one flat buffer laid out like the parameters.
    inputs_embeds: (B, T, E), the gradient with respect to the word-embedding lookup's output (what
                   Hugging Face calls ``inputs_embeds``; position and token-type embeddings are added to
                   it, so it is also their lookups' upstream gradient).
    """

    params: dict
    inputs_embeds: object


@dataclass
class LossAndGrads:
    """What ``Model.loss_and_grads`` returns: 0-d backend arrays and one gradient per parameter.

    loss:  ``w_mlm * mlm + w_sop * sop``, the loss the gradients are of.
    grads: parameter name -> gradient (as :attr:`Gradients.params`).
    parts: ``{"mlm": ..., "sop": ...}``, the unweighted losses (0 for a loss without labels).
    """

    loss: object
    grads: dict
    parts: dict


@dataclass
class _Cache:
    embeddings: tuple
    encoder: list
    pooler: tuple
    mlm: Optional[tuple]          # (head cache, flat positions or None)
    sop: Optional[tuple]


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
        check_dtype("dtype", dtype, DTYPES)
        check_seed("seed", seed)
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

    def named_parameters(self) -> Iterator[tuple[str, object]]:
        """``(name, array)`` pairs in the flat buffer's order, as PyTorch's ``named_parameters()``;
        each array is a view into the flat parameter buffer (writing to it changes the model)."""
        return iter(list(self.params.items()))

    def parameters(self) -> Iterator[object]:
        """The parameter arrays (views), in the order of :meth:`named_parameters`."""
        return (array for _, array in self.named_parameters())

    def state_dict(self) -> dict:
        """Name -> parameter array, a dict of the same views (as PyTorch's ``state_dict()``, the arrays
        share memory with the model). Optimisers and gradient checks take this dict."""
        return dict(self.params.items())

    def _dropout(self, training: bool, dropout_seed):
        """A ``drop(shape, prob)`` function: frozen masks from ``dropout_seed``, the model's own
        stream when training without one, and no dropout at all when not training."""
        if not check_flag("training", training):
            return lambda shape, prob: None
        if dropout_seed is not None:
            check_seed("dropout_seed", dropout_seed, allow_sequence=True)
        rng = self.dropout_rng if dropout_seed is None else self.backend.rng(dropout_seed)

        def drop(shape, prob):
            if prob == 0:
                return None
            return self.backend.keep_mask(rng, shape, 1.0 - prob, self.dtype)

        return drop

    # --- forward -------------------------------------------------------------------------------
    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None, *,
                training: bool = False, dropout_seed=None, return_mlm_logits: bool = True,
                return_sop_logits: bool = True, mlm_positions=None, keep_cache: bool = False,
                trace: Trace = None) -> ModelOutput:
        """Run the model.

        ``attention_mask`` is (B, T) (1 = real token) or (B, T, T) (1 = query i may attend key j).
        ``mlm_positions``: flat indices into the B*T positions; the MLM head then runs there only and
        ``mlm_logits`` is (N, V). ``keep_cache=True`` keeps what :meth:`backward` needs in
        ``out.cache``. ``trace(name, array)``, when given, is called with each activation in order.
        Dropout masks are drawn in the order the model runs (embeddings, each block, the SOP head).
        """
        input_ids, token_type_ids, attention_mask, position_ids = check_inputs(
            self.config, self.backend, input_ids, token_type_ids, attention_mask, position_ids)
        return self._forward(input_ids, token_type_ids, attention_mask, position_ids, self._dropout(training, dropout_seed),
                             return_mlm_logits, return_sop_logits, mlm_positions, keep_cache, trace)

    __call__ = forward

    def _forward(self, input_ids, token_type_ids, attention_mask, position_ids, drop, return_mlm_logits,
                 return_sop_logits, mlm_positions, keep_cache, trace) -> ModelOutput:
        """:meth:`forward` on validated inputs."""
        cfg, p = self.config, self.params
        emb_drop = drop(tuple(input_ids.shape) + (cfg.embedding_size,), cfg.hidden_dropout_prob)
        x, emb_cache = embeddings_forward(p.prefixed("embeddings."), input_ids, token_type_ids, position_ids,
                                          cfg.layer_norm_eps, emb_drop, project=cfg.has_projection,
                                          trace=scoped(trace, "embeddings."))
        if trace is not None:
            trace("embeddings.output", x)
        additive_mask = additive_mask_from(attention_mask, self.dtype, cfg.attention_mask_value)
        hidden_states, enc_cache = encoder_forward(x, p, additive_mask, cfg, drop, trace)
        last = hidden_states[-1]

        pooled, pool_cache = pooler_forward(last, p, trace)
        if trace is not None:
            trace("pooled_output", pooled)
        sop_logits, sop_cache = None, None
        if return_sop_logits:
            sop_logits, sop_cache = sop_head_forward(pooled, p, drop(pooled.shape, cfg.classifier_dropout_prob))
            if trace is not None:
                trace("sop_logits", sop_logits)
        mlm_logits, mlm_cache = None, None
        if return_mlm_logits:
            if mlm_positions is None:
                mlm_logits, head_cache = mlm_head_forward(last, p, cfg, trace)                    # (B, T, V)
            else:
                B, T, H = last.shape
                mlm_logits, head_cache = mlm_head_forward(last.reshape(B * T, H)[mlm_positions], p, cfg, trace)
            mlm_cache = (head_cache, mlm_positions)
            if trace is not None:
                trace("mlm_logits", mlm_logits)
        cache = _Cache(emb_cache, enc_cache, pool_cache, mlm_cache, sop_cache) if keep_cache else None
        return ModelOutput(hidden_states, pooled, mlm_logits, sop_logits, cache)

    # --- backward ------------------------------------------------------------------------------
    def backward(self, output: ModelOutput, *, d_hidden_states=None, d_pooled_output=None, d_mlm_logits=None,
                 d_sop_logits=None) -> Gradients:
        """Gradients of a scalar loss L given dL/d(output) for any subset of ``output``'s tensors.

        ``output`` must come from ``forward(..., keep_cache=True)``. ``d_hidden_states`` maps a layer
        index i (0 = encoder input, -1 or L = last layer, as ``output.hidden_states``) to dL/dh_i
        (B, T, H); ``d_pooled_output`` is (B, H); ``d_mlm_logits`` and ``d_sop_logits`` have the shapes of
        ``output.mlm_logits`` / ``output.sop_logits``. An output that L does not depend on is left None.
        Returns fresh gradient buffers (the model keeps no gradient state): see :class:`Gradients`.

        Backward runs the forward in reverse: heads (MLM, then SOP into the pooler), the encoder (the
        gradient of each layer's output enters where that layer's output left), the embeddings.
        """
        cache = output.cache
        if not isinstance(cache, _Cache):
            raise ValueError("backward needs the output of forward(..., keep_cache=True); this output has no cache")
        xp, cfg = self.xp, self.config
        last = output.hidden_states[-1]
        B, T, H = last.shape
        num_layers = len(output.hidden_states)
        d_layers = self._layer_gradients(d_hidden_states, num_layers, last.shape)
        grads = FlatBuffer(self.params.shapes, xp, self.dtype)
        dlast = xp.zeros_like(last)
        if d_mlm_logits is not None:
            if cache.mlm is None:
                raise ValueError("d_mlm_logits was given but forward did not compute MLM logits "
                                 "(return_mlm_logits=False)")
            self._check_grad("d_mlm_logits", d_mlm_logits, output.mlm_logits)
            head_cache, positions = cache.mlm
            d_rows = mlm_head_backward(d_mlm_logits, head_cache, grads)
            if positions is None:
                dlast += d_rows
            else:   # a scatter-add: a position given twice receives both rows' gradients
                self.backend.scatter_add(dlast.reshape(B * T, H), positions, d_rows)
        d_pooled = None
        if d_sop_logits is not None:
            if cache.sop is None:
                raise ValueError("d_sop_logits was given but forward did not compute SOP logits "
                                 "(return_sop_logits=False)")
            self._check_grad("d_sop_logits", d_sop_logits, output.sop_logits)
            d_pooled = sop_head_backward(d_sop_logits, cache.sop, grads)
        if d_pooled_output is not None:
            self._check_grad("d_pooled_output", d_pooled_output, output.pooled_output)
            d_pooled = d_pooled_output if d_pooled is None else d_pooled + d_pooled_output
        if d_pooled is not None:
            dlast += pooler_backward(d_pooled, cache.pooler, grads, xp)
        if d_layers[-1] is not None:
            dlast += d_layers[-1]
        dx = encoder_backward(d_layers[:-1] + [dlast], cache.encoder, grads, cfg)
        d_inputs_embeds = embeddings_backward(dx, cache.embeddings, grads.prefixed("embeddings."))
        return Gradients(dict(grads.items()), d_inputs_embeds)

    def _layer_gradients(self, d_hidden_states, num_layers: int, shape) -> list:
        """``d_hidden_states`` (a dict index -> array, or a list of L + 1 arrays or None) as a list."""
        out = [None] * num_layers
        if d_hidden_states is None:
            return out
        if isinstance(d_hidden_states, dict):
            items = d_hidden_states.items()
        elif isinstance(d_hidden_states, (list, tuple)):
            if len(d_hidden_states) != num_layers:
                raise ValueError(f"d_hidden_states has {len(d_hidden_states)} entries, expected {num_layers} "
                                 f"(one per hidden state, or a dict layer index -> gradient)")
            items = enumerate(d_hidden_states)
        else:
            raise ValueError(f"d_hidden_states must be a dict layer index -> array or a list of {num_layers}, "
                             f"got {type(d_hidden_states).__name__}")
        for index, grad in items:
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                    or not -num_layers <= index < num_layers:
                raise ValueError(f"d_hidden_states has layer index {index!r}, expected an integer in "
                                 f"[{-num_layers}, {num_layers})")
            if grad is not None:
                self._check_grad(f"d_hidden_states[{index}]", grad, shape)
                if out[int(index) % num_layers] is not None:
                    raise ValueError(f"d_hidden_states names layer {int(index) % num_layers} twice (index {index!r}); "
                                     f"expected each hidden state once")
                out[int(index) % num_layers] = grad
        return out

    def _check_grad(self, name: str, grad, like) -> None:
        shape = tuple(like) if isinstance(like, tuple) else tuple(like.shape)
        if not self.backend.is_array(grad):
            raise ValueError(f"{name} must be an array of the model's backend ({self.backend.name}), "
                             f"got {type(grad).__name__}")
        if tuple(grad.shape) != shape or grad.dtype != self.dtype:
            raise ValueError(f"{name} has shape {tuple(grad.shape)} and dtype {grad.dtype}, expected shape {shape} "
                             f"and dtype {self.dtype}")

    # --- the pretraining loss: forward, loss, backward -----------------------------------------
    def loss_and_grads(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None,
                       sop_labels=None, position_ids=None, *, training: bool = False, dropout_seed=None,
                       loss_weights=(1.0, 1.0), trace: Trace = None) -> LossAndGrads:
        """Loss = w_mlm MLM + w_sop SOP (whichever labels are given; -100 marks ignored entries) and
        its gradient, as a :class:`LossAndGrads`.

        ``loss_weights=(w_mlm, w_sop)`` (ALBERT: (1, 1)); gradient accumulation uses it to weight
        micro-batches in one pass. The MLM head runs only at labelled positions (that is where the
        vocabulary-sized work is).
        """
        w_mlm, w_sop = check_loss_weights(loss_weights)
        out, (mlm_loss, mlm_ce), (sop_loss, sop_ce) = self._pretraining_loss(
            input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids, training,
            dropout_seed, trace, keep_cache=True)
        grads = self.backward(
            out,
            d_mlm_logits=None if mlm_ce is None else cross_entropy_backward(w_mlm, mlm_ce),
            d_sop_logits=None if sop_ce is None else cross_entropy_backward(w_sop, sop_ce))
        return LossAndGrads(w_mlm * mlm_loss + w_sop * sop_loss, grads.params, {"mlm": mlm_loss, "sop": sop_loss})

    def loss(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None, sop_labels=None,
             position_ids=None, *, training: bool = False, dropout_seed=None, loss_weights=(1.0, 1.0),
             trace: Trace = None):
        """The loss of :meth:`loss_and_grads` alone (a 0-d array): the same forward, no backward."""
        w_mlm, w_sop = check_loss_weights(loss_weights)
        _, (mlm_loss, _), (sop_loss, _) = self._pretraining_loss(
            input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids, training,
            dropout_seed, trace, keep_cache=False)
        return w_mlm * mlm_loss + w_sop * sop_loss

    def _pretraining_loss(self, input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids,
                          training, dropout_seed, trace, keep_cache):
        """Forward and the two cross-entropies: ``(output, (mlm, cache), (sop, cache))``; a loss without
        labels is 0 with cache None."""
        input_ids, token_type_ids, attention_mask, position_ids = check_inputs(
            self.config, self.backend, input_ids, token_type_ids, attention_mask, position_ids)
        check_labels(self.config, self.backend, tuple(input_ids.shape), mlm_labels, sop_labels)
        positions = None
        if mlm_labels is not None:
            flat_labels = mlm_labels.reshape(-1)
            positions = self.xp.nonzero(flat_labels != IGNORE_INDEX)[0]
        out = self._forward(input_ids, token_type_ids, attention_mask, position_ids,
                            self._dropout(training, dropout_seed), mlm_labels is not None, sop_labels is not None,
                            positions, keep_cache, trace)
        zero = self.xp.zeros((), dtype=self.dtype)
        mlm = (zero, None) if mlm_labels is None else cross_entropy_forward(out.mlm_logits, flat_labels[positions])
        sop = (zero, None) if sop_labels is None else cross_entropy_forward(out.sop_logits, sop_labels)
        return out, mlm, sop

    # --- Hugging Face checkpoints (the name map and file formats live in ref_bert/hf.py) ---------
    @classmethod
    def from_hf(cls, path, backend="numpy", dtype="float32", seed: int = 0,
                allow_nonfinite: bool = False) -> "Model":
        """Load a Hugging Face ALBERT/BERT directory (config.json + model.safetensors); see :mod:`ref_bert.hf`.
        Heads missing from the checkpoint keep their initialisation from ``seed`` (with a warning).
        Non-finite weights are refused unless ``allow_nonfinite`` (for debugging)."""
        checkpoint = hf.read_hf(path, allow_nonfinite=allow_nonfinite)
        model = cls(checkpoint.config, backend=backend, dtype=dtype, seed=seed)
        for name, array in checkpoint.tensors.items():
            model.params[name] = model.backend.from_host(array, dtype=model.dtype)
        if checkpoint.missing:
            groups = sorted({n.split(".")[0] for n in checkpoint.missing})
            warnings.warn(f"{checkpoint.directory}: the {checkpoint.architecture} checkpoint has no "
                          f"{', '.join(groups)} weights; they are freshly initialised (seed {seed})", stacklevel=2)
        return model

    def save_hf(self, path):
        """Write a directory that ``transformers`` loads as Albert/BertForPreTraining; see :mod:`ref_bert.hf`.
        ``Model.from_hf(model.save_hf(d))`` reproduces every parameter bit for bit."""
        return hf.write_hf(path, self.config, self._host_tensors(), self.dtype.name)

    def hf_state_dict(self, tensors=None) -> dict:
        """Our parameters (or any dict shaped like them, e.g. gradients) under Hugging Face names and
        layouts, as host NumPy arrays."""
        return hf.to_hf_names(self.config, self._host_tensors(tensors))

    def _host_tensors(self, tensors=None) -> dict:
        tensors = self.params if tensors is None else tensors
        return {name: self.backend.to_host(tensors[name]) for name in self.params.shapes if name in tensors}
