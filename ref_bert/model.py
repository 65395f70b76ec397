"""The ALBERT/BERT model: orchestration only. The math is in ``ops``, ``encoder``, ``heads`` (pooler,
MLM, SOP/NSP) and ``tasks`` (the fine-tuning heads and their losses).

    embeddings (+ projection E->H)  ->  L layers of post-LN blocks (shared per Config)  ->  pooler
                                                           |                                |
                                                       MLM head                     SOP/NSP head on pooled
    loss = MLM cross-entropy (mean over labels != -100) + SOP cross-entropy

That is the default head, ``Config.head="pretraining"`` (Albert/BertForPreTraining). ``Config.head``
chooses the Hugging Face architecture the model is (``Config.architecture`` names it):

    head                      architecture (HF class)          forward output      loss_and_grads labels
    pretraining               *ForPreTraining                  mlm_logits, sop_logits   mlm_labels, sop_labels
    base                      AlbertModel / BertModel          hidden states, pooled    (none: use backward)
    masked_lm                 *ForMaskedLM                     logits (B, T, V)    labels (B, T), -100 ignored
    causal_lm                 BertLMHeadModel (is_decoder)     logits (B, T, V)    labels (B, T), shifted inside
    next_sentence             BertForNextSentencePrediction    logits (B, 2)       labels (B,)
    sequence_classification   *ForSequenceClassification       logits (B, L)       labels (B,) int or (B, L) float
    token_classification      *ForTokenClassification          logits (B, T, L)    labels (B, T), -100 ignored
    question_answering        *ForQuestionAnswering            logits (B, T, 2),   start_positions, end_positions (B,)
                                                               start_logits, end_logits (B, T)
    multiple_choice           *ForMultipleChoice               logits (B, C)       labels (B,); inputs (B, C, T)

(L = ``Config.num_labels``.) Head parameters are named ``classifier.{weight,bias}`` (H, L) or (H, 1),
``qa_outputs.{weight,bias}`` (H, 2), ``mlm.*``, ``sop.*``; architectures without a pooler (masked LM,
causal LM, token classification, question answering, as in transformers) have no ``pooler.*`` either.
Sequence classification's loss follows ``Config.problem_type``, or transformers' choice when it is None
(:func:`ref_bert.tasks.sequence_problem_type`). A head can be put on any encoder:
``Model.from_hf(dir, head="sequence_classification", num_labels=3)`` loads the encoder and initialises
the rest freshly, with a warning; ``model.fresh_parameters`` names them until ``model.mark_trained()``.

The model-level contract is the ops' contract one level up (llm.c's gpt2_forward / gpt2_backward,
cs231n's ``forward -> (out, cache)`` / ``backward(dout, cache)``):

    out   = model.forward(ids, ..., keep_cache=True)      every output, and what backward needs
    grads = model.backward(out, d_hidden_states={-1: g}, d_pooled_output=..., d_mlm_logits=...,
                           d_sop_logits=...)              upstream gradients for any subset of outputs
    grads.params[name]                                    one gradient per parameter
    grads.inputs_embeds                                   dL/d(word-embedding lookup), (B, T, E)

    grads = model.backward(out, d_logits=g)               the head's task logits (every head but base
                                                          and pretraining; the shape of ``out.logits``)

``loss_and_grads`` is the composition for the head's loss: forward (an MLM head only at labelled
positions), the loss as transformers computes it, backward; it returns a :class:`LossAndGrads`, whatever
the head, so a training loop is the same for pretraining and fine-tuning:

    result = model.loss_and_grads(ids, types, mask, labels=y, training=True, dropout_seed=s)
    result.loss, result.grads[name], result.parts

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
from .ops.cross_entropy import NORMALIZATIONS
from .ops import embeddings_backward, embeddings_forward
from .params import FlatBuffer, count_parameters, initialize, parameter_shapes
from .tasks import (classifier_backward, classifier_forward, sequence_loss_backward, sequence_loss_forward,
                    sequence_problem_type, shift_labels, span_logits_backward, span_logits_forward,
                    span_loss_backward, span_loss_forward)
from .validate import (check_dtype, check_flag, check_inputs, check_labels, check_loss_weights, check_seed,
                       check_task_labels, flatten_choices)

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
    logits:        the head's task output (table in the module docstring); for masked_lm / causal_lm
                   it is ``mlm_logits``, for next_sentence ``sop_logits``; None for base and pretraining.
    pooled_output is None for architectures without a pooler. For multiple choice, hidden states and
    pooled output are per flattened (B * C) row.
    """

    hidden_states: list
    pooled_output: object
    mlm_logits: object
    sop_logits: object
    cache: object = None
    logits: object = None

    @property
    def last_hidden_state(self):
        return self.hidden_states[-1]

    @property
    def start_logits(self):
        """Question answering: (B, T), ``logits[..., 0]`` (a view)."""
        return None if self.logits is None else self.logits[..., 0]

    @property
    def end_logits(self):
        """Question answering: (B, T), ``logits[..., 1]`` (a view)."""
        return None if self.logits is None else self.logits[..., 1]


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

    loss:  the loss the gradients are of: pretraining ``w_mlm * mlm + w_sop * sop``; any other head its
           transformers loss times ``loss_scale``.
    grads: parameter name -> gradient (as :attr:`Gradients.params`).
    parts: the unweighted loss terms: pretraining ``{"mlm", "sop"}`` (0 for a loss without labels);
           question answering ``{"start", "end"}``; every other head ``{"task"}``.
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
    task: Optional[tuple] = None  # the classifier / QA head's cache


class Model:
    """ALBERT (or BERT, with ``sharing="none"`` and E == H) with the head ``config.head`` (default: the
    pretraining heads; see the module docstring for the others).

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
        if config.head == "causal_lm" and not config.is_decoder:
            warnings.warn("a causal_lm head (BertLMHeadModel) with is_decoder=False attends both ways, as "
                          "transformers' does; set is_decoder=True for left-to-right language modelling", stacklevel=2)
        self.config = config
        self.backend = backends.get(backend)
        self.xp = self.backend.xp
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.params = FlatBuffer(parameter_shapes(config, heads=True), self.xp, self.dtype)
        initialize(self.params, config, self.backend, seed)
        self.dropout_rng = self.backend.rng([seed, 1])
        # Names of parameters that were freshly initialised when the model was loaded (a head added to
        # an encoder checkpoint); save_hf refuses to present them as trained until mark_trained().
        self.fresh_parameters: tuple = ()
        self.tokenizer = None   # a ref_bert.Tokenizer when loaded from a directory that has one; save_hf writes it

    def mark_trained(self) -> None:
        """Declare the freshly initialised parameters trained (call after fine-tuning them)."""
        self.fresh_parameters = ()

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

        ``attention_mask`` is (B, T) (1 = real token) or (B, T, T) (1 = query i may attend key j); with
        ``config.is_decoder`` it is combined with the causal mask (key j <= query i), as BertLMHeadModel.
        Multiple choice takes (B, C, T) inputs (and a (B, C, T) mask), run as B * C rows.
        ``mlm_positions``: flat indices into the B*T positions; the MLM head then runs there only and
        ``mlm_logits`` is (N, V). ``keep_cache=True`` keeps what :meth:`backward` needs in
        ``out.cache``. ``trace(name, array)``, when given, is called with each activation in order.
        Dropout masks are drawn in the order the model runs (embeddings, each block, the SOP head or
        the classifier).
        """
        input_ids, token_type_ids, attention_mask, position_ids, num_choices = flatten_choices(
            self.config, input_ids, token_type_ids, attention_mask, position_ids)
        input_ids, token_type_ids, attention_mask, position_ids = check_inputs(
            self.config, self.backend, input_ids, token_type_ids, attention_mask, position_ids)
        return self._forward(input_ids, token_type_ids, attention_mask, position_ids, self._dropout(training, dropout_seed),
                             return_mlm_logits, return_sop_logits, mlm_positions, keep_cache, trace, num_choices)

    __call__ = forward

    def _decoder_mask(self, attention_mask):
        """BertModel with is_decoder: key j visible to query i only when j <= i (and the mask allows it).
        This is UniLM's left-to-right mask with pad *queries* left as transformers leaves them (they
        still see the real keys before them; no loss reads them)."""
        xp = self.xp
        T = attention_mask.shape[-1]
        causal = xp.tril(xp.ones((T, T), dtype=bool))
        allowed = attention_mask != 0
        if allowed.ndim == 2:
            allowed = allowed[:, None, :]
        return causal[None] & allowed

    def _forward(self, input_ids, token_type_ids, attention_mask, position_ids, drop, return_mlm_logits,
                 return_sop_logits, mlm_positions, keep_cache, trace, num_choices=None) -> ModelOutput:
        """:meth:`forward` on validated inputs."""
        cfg, p = self.config, self.params
        head = cfg.head
        emb_drop = drop(tuple(input_ids.shape) + (cfg.embedding_size,), cfg.hidden_dropout_prob)
        x, emb_cache = embeddings_forward(p.prefixed("embeddings."), input_ids, token_type_ids, position_ids,
                                          cfg.layer_norm_eps, emb_drop, project=cfg.has_projection,
                                          trace=scoped(trace, "embeddings."))
        if trace is not None:
            trace("embeddings.output", x)
        if cfg.is_decoder:
            attention_mask = self._decoder_mask(attention_mask)
        additive_mask = additive_mask_from(attention_mask, self.dtype, cfg.attention_mask_value)
        hidden_states, enc_cache = encoder_forward(x, p, additive_mask, cfg, drop, trace)
        last = hidden_states[-1]

        pooled, pool_cache = None, None
        if cfg.has_pooler:
            pooled, pool_cache = pooler_forward(last, p, trace)
            if trace is not None:
                trace("pooled_output", pooled)
        sop_logits, sop_cache = None, None
        if return_sop_logits and head in ("pretraining", "next_sentence"):
            sop_logits, sop_cache = sop_head_forward(pooled, p, drop(pooled.shape, cfg.head_dropout_prob))
            if trace is not None:
                trace("sop_logits", sop_logits)
        logits, task_cache = self._task_forward(last, pooled, drop, num_choices, trace)
        mlm_logits, mlm_cache = None, None
        if return_mlm_logits and head in ("pretraining", "masked_lm", "causal_lm"):
            if mlm_positions is None:
                mlm_logits, head_cache = mlm_head_forward(last, p, cfg, trace)                    # (B, T, V)
            else:
                B, T, H = last.shape
                mlm_logits, head_cache = mlm_head_forward(last.reshape(B * T, H)[mlm_positions], p, cfg, trace)
            mlm_cache = (head_cache, mlm_positions)
            if trace is not None:
                trace("mlm_logits", mlm_logits)
        if head in ("masked_lm", "causal_lm"):
            logits = mlm_logits
        elif head == "next_sentence":
            logits = sop_logits
        cache = _Cache(emb_cache, enc_cache, pool_cache, mlm_cache, sop_cache, task_cache) \
            if keep_cache else None
        return ModelOutput(hidden_states, pooled, mlm_logits, sop_logits, cache, logits)

    def _task_forward(self, last, pooled, drop, num_choices, trace):
        """The classifier / QA head (tasks.py): ``(logits, cache)``, (None, None) for the other heads.
        The trace's "head.logits" is the head's raw output ((B * C, 1) for multiple choice)."""
        cfg, p, head = self.config, self.params, self.config.head
        if head in ("sequence_classification", "multiple_choice"):
            raw, cache = classifier_forward(pooled, p["classifier.weight"], p["classifier.bias"],
                                            drop(pooled.shape, cfg.head_dropout_prob))
        elif head == "token_classification":
            raw, cache = classifier_forward(last, p["classifier.weight"], p["classifier.bias"],
                                            drop(last.shape, cfg.head_dropout_prob))
        elif head == "question_answering":
            _, raw, cache = span_logits_forward(last, p["qa_outputs.weight"], p["qa_outputs.bias"])
        else:
            return None, None
        if trace is not None:
            trace("head.logits", raw)
        # multiple choice: (B * C, 1) -> (B, C), one logit per choice
        return (raw.reshape(-1, num_choices) if head == "multiple_choice" else raw), cache

    # --- backward ------------------------------------------------------------------------------
    def backward(self, output: ModelOutput, *, d_hidden_states=None, d_pooled_output=None, d_mlm_logits=None,
                 d_sop_logits=None, d_logits=None) -> Gradients:
        """Gradients of a scalar loss L given dL/d(output) for any subset of ``output``'s tensors.

        ``output`` must come from ``forward(..., keep_cache=True)``. ``d_hidden_states`` maps a layer
        index i (0 = encoder input, -1 or L = last layer, as ``output.hidden_states``) to dL/dh_i
        (B, T, H); ``d_pooled_output`` is (B, H); ``d_mlm_logits``, ``d_sop_logits`` and ``d_logits`` have
        the shapes of ``output.mlm_logits`` / ``output.sop_logits`` / ``output.logits`` (``d_logits`` is
        the head's: for masked_lm / causal_lm it is d_mlm_logits, for next_sentence d_sop_logits). An
        output that L does not depend on is left None. Returns fresh gradient buffers (the model keeps
        no gradient state): see :class:`Gradients`.

        Backward runs the forward in reverse: heads (MLM, then SOP or the classifier into the pooler),
        the encoder (the gradient of each layer's output enters where that layer's output left), the
        embeddings.
        """
        cache = output.cache
        if not isinstance(cache, _Cache):
            raise ValueError("backward needs the output of forward(..., keep_cache=True); this output has no cache")
        xp, cfg = self.xp, self.config
        head = cfg.head
        if d_logits is not None:
            if head in ("pretraining", "base"):
                raise ValueError(f"d_logits was given but the {cfg.architecture} head has no task logits "
                                 f"(expected d_mlm_logits / d_sop_logits / d_hidden_states / d_pooled_output)")
            redirect = {"masked_lm": "d_mlm_logits", "causal_lm": "d_mlm_logits", "next_sentence": "d_sop_logits"}
            if head in redirect:
                if (d_mlm_logits if redirect[head] == "d_mlm_logits" else d_sop_logits) is not None:
                    raise ValueError(f"give d_logits or {redirect[head]}, not both (they are the same output "
                                     f"of the {cfg.architecture} head)")
                if redirect[head] == "d_mlm_logits":
                    d_mlm_logits, d_logits = d_logits, None
                else:
                    d_sop_logits, d_logits = d_logits, None
        last = output.hidden_states[-1]
        B, T, H = last.shape
        num_layers = len(output.hidden_states)
        d_layers = self._layer_gradients(d_hidden_states, num_layers, last.shape)
        grads = FlatBuffer(self.params.shapes, xp, self.dtype)
        dlast = xp.zeros_like(last)
        if d_mlm_logits is not None:
            if cache.mlm is None:
                raise ValueError("d_mlm_logits was given but forward did not compute MLM logits "
                                 "(return_mlm_logits=False, or a head without an MLM head)")
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
                                 "(return_sop_logits=False, or a head without an SOP/NSP head)")
            self._check_grad("d_sop_logits", d_sop_logits, output.sop_logits)
            d_pooled = sop_head_backward(d_sop_logits, cache.sop, grads)
        if d_logits is not None:
            self._check_grad("d_logits", d_logits, output.logits)
            if head in ("sequence_classification", "multiple_choice"):
                d_rows = d_logits.reshape(-1, 1) if head == "multiple_choice" else d_logits
                d_pooled = classifier_backward(d_rows, cache.task, grads["classifier.weight"], grads["classifier.bias"])
            elif head == "token_classification":
                dlast += classifier_backward(d_logits, cache.task, grads["classifier.weight"], grads["classifier.bias"])
            else:   # question_answering
                dlast += span_logits_backward(d_logits, cache.task, grads["qa_outputs.weight"], grads["qa_outputs.bias"])
        if d_pooled_output is not None:
            if output.pooled_output is None:
                raise ValueError(f"d_pooled_output was given but {cfg.architecture} has no pooler")
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

    # --- the head's loss: forward, loss, backward ------------------------------------------------
    def loss_and_grads(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None,
                       sop_labels=None, position_ids=None, *, labels=None, start_positions=None,
                       end_positions=None, training: bool = False, dropout_seed=None, loss_weights=(1.0, 1.0),
                       loss_scale: float = 1.0, label_smoothing: float = 0.0, mlm_normalization: str = "mean",
                       trace: Trace = None) -> LossAndGrads:
        """The head's loss and its gradient, as a :class:`LossAndGrads`.

        Pretraining: loss = w_mlm MLM + w_sop SOP (whichever of ``mlm_labels`` / ``sop_labels`` are
        given; -100 marks ignored entries), ``loss_weights=(w_mlm, w_sop)`` (ALBERT: (1, 1)); gradient
        accumulation uses it to weight micro-batches in one pass. The MLM head runs only at labelled
        positions (that is where the vocabulary-sized work is).

        Other heads (module docstring): ``labels`` (masked_lm, causal_lm, next_sentence, sequence /
        token classification, multiple choice) or ``start_positions`` and ``end_positions`` (question
        answering); the loss is transformers', times ``loss_scale``. The bare model has no loss.

        ``label_smoothing`` (torch's CrossEntropyLoss(label_smoothing=...), UniLM s2s-ft: 0.1) applies to
        every cross-entropy term; ``mlm_normalization`` "mean" (Hugging Face) or "tf_albert"
        (sum(nll) / (count + 1e-5), TF ALBERT) to the MLM / LM cross-entropy (ops.cross_entropy).
        """
        out, loss, parts, d_outputs = self._task_loss(
            input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids, labels, start_positions,
            end_positions, training, dropout_seed, loss_weights, loss_scale, label_smoothing, mlm_normalization,
            trace, keep_cache=True)
        grads = self.backward(out, **d_outputs())
        return LossAndGrads(loss, grads.params, parts)

    def loss(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None, sop_labels=None,
             position_ids=None, *, labels=None, start_positions=None, end_positions=None, training: bool = False,
             dropout_seed=None, loss_weights=(1.0, 1.0), loss_scale: float = 1.0, label_smoothing: float = 0.0,
             mlm_normalization: str = "mean", trace: Trace = None):
        """The loss of :meth:`loss_and_grads` alone (a 0-d array): the same forward, no backward."""
        _, loss, _, _ = self._task_loss(
            input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids, labels, start_positions,
            end_positions, training, dropout_seed, loss_weights, loss_scale, label_smoothing, mlm_normalization,
            trace, keep_cache=False)
        return loss

    def problem_type(self, labels) -> str:
        """Sequence classification: the problem type ``labels`` get (``config.problem_type``, or the one
        transformers chooses when it is None: regression for one label, single-label for integer labels,
        multi-label otherwise)."""
        return sequence_problem_type(self.config.problem_type, self.config.num_labels, labels)

    def _task_loss(self, input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids, labels,
                   start_positions, end_positions, training, dropout_seed, loss_weights, loss_scale, label_smoothing,
                   mlm_normalization, trace, keep_cache):
        """Forward and the head's loss: ``(output, loss, parts, d_outputs)``, ``d_outputs()`` the keyword
        arguments of :meth:`backward` for that loss (computed only when called)."""
        cfg, xp = self.config, self.xp
        head = cfg.head
        if mlm_normalization not in NORMALIZATIONS:
            raise ValueError(f"mlm_normalization={mlm_normalization!r} is invalid: expected one of {NORMALIZATIONS}")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} is invalid: expected a number in [0, 1]")
        ce = dict(label_smoothing=float(label_smoothing))
        if head == "pretraining":
            if labels is not None or start_positions is not None or end_positions is not None:
                raise ValueError("the pretraining head takes mlm_labels and sop_labels (labels, start_positions and "
                                 "end_positions are for the fine-tuning heads)")
            out, (mlm_loss, mlm_ce), (sop_loss, sop_ce) = self._pretraining_loss(
                input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids, training,
                dropout_seed, trace, keep_cache, dict(ce, normalization=mlm_normalization), ce)
            w_mlm, w_sop = check_loss_weights(loss_weights)
            scale = float(loss_scale)
            if scale != 1.0:
                w_mlm, w_sop = w_mlm * scale, w_sop * scale
            return out, w_mlm * mlm_loss + w_sop * sop_loss, {"mlm": mlm_loss, "sop": sop_loss}, lambda: dict(
                d_mlm_logits=None if mlm_ce is None else cross_entropy_backward(w_mlm, mlm_ce),
                d_sop_logits=None if sop_ce is None else cross_entropy_backward(w_sop, sop_ce))
        if head == "base":
            raise ValueError(f"{cfg.architecture} has no loss; run forward(..., keep_cache=True) and "
                             f"backward(out, d_hidden_states=..., d_pooled_output=...) with your own upstream gradient")
        if mlm_labels is not None or sop_labels is not None:
            raise ValueError(f"mlm_labels / sop_labels are the pretraining head's; the {cfg.architecture} head takes "
                             + ("start_positions and end_positions" if head == "question_answering" else "labels"))
        input_ids, token_type_ids, attention_mask, position_ids, num_choices = flatten_choices(
            cfg, input_ids, token_type_ids, attention_mask, position_ids)
        input_ids, token_type_ids, attention_mask, position_ids = check_inputs(
            cfg, self.backend, input_ids, token_type_ids, attention_mask, position_ids)
        batch = tuple(input_ids.shape) if num_choices is None else (input_ids.shape[0] // num_choices, num_choices)
        labels, start_positions, end_positions = check_task_labels(
            cfg, self.backend, batch, labels, start_positions, end_positions)
        drop = self._dropout(training, dropout_seed)
        scale = float(loss_scale)

        if head in ("masked_lm", "causal_lm"):
            targets = (shift_labels(labels) if head == "causal_lm" else labels).reshape(-1)
            positions = xp.nonzero(targets != IGNORE_INDEX)[0]
            out = self._forward(input_ids, token_type_ids, attention_mask, position_ids, drop, True, False, positions,
                                keep_cache, trace)
            loss, cache = cross_entropy_forward(out.mlm_logits, targets[positions], normalization=mlm_normalization, **ce)
            return out, scale * loss, {"task": loss}, lambda: dict(d_mlm_logits=cross_entropy_backward(scale, cache))

        out = self._forward(input_ids, token_type_ids, attention_mask, position_ids, drop, False, True, None,
                            keep_cache, trace, num_choices)
        if head == "question_answering":
            (loss, start_loss, end_loss), cache = span_loss_forward(out.start_logits, out.end_logits, start_positions,
                                                                    end_positions, **ce)
            return out, scale * loss, {"start": start_loss, "end": end_loss}, lambda: dict(
                d_logits=span_loss_backward(scale, cache))
        if head == "sequence_classification":
            loss, cache = sequence_loss_forward(out.logits, labels, self.problem_type(labels), **ce)
            return out, scale * loss, {"task": loss}, lambda: dict(d_logits=sequence_loss_backward(scale, cache))
        # next_sentence (B, 2), multiple_choice (B, C), token_classification (B, T, L): cross-entropy
        flat = out.logits.reshape(-1, out.logits.shape[-1])
        loss, cache = cross_entropy_forward(flat, labels.reshape(-1), **ce)
        return out, scale * loss, {"task": loss}, lambda: dict(
            d_logits=cross_entropy_backward(scale, cache).reshape(out.logits.shape))

    def _pretraining_loss(self, input_ids, token_type_ids, attention_mask, mlm_labels, sop_labels, position_ids,
                          training, dropout_seed, trace, keep_cache, mlm_options=None, sop_options=None):
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
        mlm = (zero, None) if mlm_labels is None else cross_entropy_forward(out.mlm_logits, flat_labels[positions],
                                                                            **(mlm_options or {}))
        sop = (zero, None) if sop_labels is None else cross_entropy_forward(out.sop_logits, sop_labels,
                                                                            **(sop_options or {}))
        return out, mlm, sop

    # --- Hugging Face checkpoints (the name map and file formats live in ref_bert/hf.py) ---------
    @classmethod
    def from_hf(cls, path, backend="numpy", dtype="float32", seed: int = 0, head: Optional[str] = None,
                tokenizer="auto", allow_nonfinite: bool = False, **options) -> "Model":
        """Load a Hugging Face ALBERT/BERT directory (config.json + model.safetensors, a shard index or
        pytorch_model.bin; a sentence-transformers directory's transformer module); see :mod:`ref_bert.hf`.

        The model is the checkpoint's architecture, or ``head`` (a :class:`Config` head) with ``options``
        (``num_labels``, ``problem_type``, ``classifier_dropout``, ``classifier_dropout_prob``,
        ``is_decoder``): e.g. ``Model.from_hf("bert-base", head="sequence_classification", num_labels=3)``
        puts a classifier on an encoder checkpoint. Parameters the checkpoint lacks are initialised from
        ``seed`` (as ``Model(config, seed=seed)``), named in a warning and in ``model.fresh_parameters``;
        the warning also names checkpoint head tensors the model does not use. Non-finite weights are
        refused unless ``allow_nonfinite`` (for debugging).

        ``tokenizer``: "auto" attaches the directory's tokenizer as ``model.tokenizer`` when it has one
        (:meth:`ref_bert.Tokenizer.from_hf`), None otherwise; True requires one (ValueError naming the files
        looked for); False skips it. An attached tokenizer must have exactly ``config.vocab_size`` tokens."""
        from .tokenization import Tokenizer, check_vocab_size, find_tokenizer

        if tokenizer not in ("auto", True, False):
            raise ValueError(f"tokenizer={tokenizer!r} is invalid: expected 'auto', True or False")
        directory = hf.transformer_directory(path)
        found = None
        if tokenizer is True:
            found = Tokenizer.from_hf(directory)
        elif tokenizer == "auto":
            found = find_tokenizer(directory)
        checkpoint = hf.read_hf(directory, head=head, allow_nonfinite=allow_nonfinite, **options)
        if found is not None:
            check_vocab_size(found, checkpoint.config.vocab_size, str(directory))
        model = cls(checkpoint.config, backend=backend, dtype=dtype, seed=seed)
        for name, array in checkpoint.tensors.items():
            model.params[name] = model.backend.from_host(array, dtype=model.dtype)
        model.fresh_parameters = tuple(checkpoint.missing)
        model.tokenizer = found
        notes = []
        if checkpoint.missing:
            groups = sorted({n.split(".")[0] for n in checkpoint.missing})
            notes.append(f"the {checkpoint.architecture} checkpoint has no {', '.join(groups)} weights for "
                         f"{model.config.architecture}; they are freshly initialised (seed {seed}) and must be "
                         f"trained (model.fresh_parameters)")
        if checkpoint.unused:
            groups = sorted({hf.head_group(n) for n in checkpoint.unused})
            notes.append(f"{model.config.architecture} does not use the checkpoint's {', '.join(groups)} weights")
        if notes:
            warnings.warn(f"{checkpoint.directory}: " + "; ".join(notes), stacklevel=2)
        return model

    def save_hf(self, path, allow_fresh: bool = False):
        """Write a directory that ``transformers`` loads as ``config.architecture`` (the architecture this
        model has); see :mod:`ref_bert.hf`. ``Model.from_hf(model.save_hf(d))`` reproduces every parameter
        bit for bit. With a tokenizer (``model.tokenizer``, set by ``from_hf`` or ``checkpoint.load_model``)
        its files are written too.

        A model whose ``fresh_parameters`` (a head freshly put on a checkpoint) were never declared trained
        (:meth:`mark_trained`) is refused, so that random weights are never published as a trained
        checkpoint; ``allow_fresh=True`` writes them anyway, with a warning."""
        if self.fresh_parameters:
            names = ", ".join(self.fresh_parameters[:6]) + (", ..." if len(self.fresh_parameters) > 6 else "")
            if not allow_fresh:
                raise ValueError(f"save_hf: {len(self.fresh_parameters)} parameters ({names}) are freshly initialised "
                                 f"and were never trained; train them and call model.mark_trained(), or pass "
                                 f"allow_fresh=True to write them as they are")
            warnings.warn(f"save_hf: writing freshly initialised (untrained) parameters: {names}", stacklevel=2)
        if self.tokenizer is not None:
            from .tokenization import check_vocab_size

            check_vocab_size(self.tokenizer, self.config.vocab_size, "save_hf")
        directory = hf.write_hf(path, self.config, self._host_tensors(), self.dtype.name)
        if self.tokenizer is not None:
            self.tokenizer.save_hf(directory)
        return directory

    def hf_state_dict(self, tensors=None) -> dict:
        """Our parameters (or any dict shaped like them, e.g. gradients) under Hugging Face names and
        layouts, as host NumPy arrays."""
        return hf.to_hf_names(self.config, self._host_tensors(tensors))

    def _host_tensors(self, tensors=None) -> dict:
        tensors = self.params if tensors is None else tensors
        return {name: self.backend.to_host(tensors[name]) for name in self.params.shapes if name in tensors}
