"""Parameter layout: every tensor's name and shape, and one flat buffer with a named view per tensor.

As in llm.c, all parameters live in one contiguous 1-D array and each named tensor is a reshaped view
of a slice of it; gradients use the same layout, so zeroing them is one fill and an optimiser can
treat the whole model as one array (or go tensor by tensor, as LAMB must). Names:

    embeddings.word_embeddings                  (V, E)   tied to the MLM decoder
    embeddings.position_embeddings              (P, E)
    embeddings.token_type_embeddings            (types, E)
    embeddings.layer_norm.{weight,bias}         (E,)
    embeddings.projection.{weight (E, H), bias (H,)}     only when E != H (ALBERT's factorization)
    encoder.attention.{a}.{query,key,value,output}.{weight (H, H), bias (H,)}
    encoder.attention.{a}.layer_norm.{weight,bias}       (H,)
    encoder.ffn.{f}.intermediate.{weight (H, I), bias (I,)}
    encoder.ffn.{f}.output.{weight (I, H), bias (H,)}
    encoder.ffn.{f}.layer_norm.{weight,bias}             (H,)
    pooler.{weight (H, H), bias (H,)}                    when the architecture has one (Config.has_pooler)
    mlm.dense.{weight (H, E), bias (E,)}, mlm.layer_norm.{weight,bias} (E,), mlm.bias (V,)
                                                 heads pretraining, masked_lm, causal_lm
    sop.{weight (H, 2), bias (2,)}               heads pretraining, next_sentence
    classifier.{weight (H, L), bias (L,)}        heads sequence_classification, token_classification
                                                 (L = num_labels), multiple_choice (L = 1)
    qa_outputs.{weight (H, 2), bias (2,)}        head question_answering

``a`` and ``f`` index the distinct attention and FFN parameter sets (Config.block_schedule says which
layer uses which). Weights are (n_in, n_out): the forward computes ``x @ W``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from .config import Config

def parameter_shapes(config: Config, heads: bool = True) -> "OrderedDict[str, tuple[int, ...]]":
    """Every parameter's name and shape, in a fixed order (the order of initialisation).

    ``heads=True``: the model ``config.head`` describes (its pooler only when the architecture has one).
    ``heads=False``: the bare AlbertModel / BertModel (embeddings, encoder, pooler), whatever the head."""
    V, E, H, I = config.vocab_size, config.embedding_size, config.hidden_size, config.intermediate_size
    s: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    s["embeddings.word_embeddings"] = (V, E)
    s["embeddings.position_embeddings"] = (config.max_position_embeddings, E)
    s["embeddings.token_type_embeddings"] = (config.type_vocab_size, E)
    s["embeddings.layer_norm.weight"] = (E,)
    s["embeddings.layer_norm.bias"] = (E,)
    if config.has_projection:
        s["embeddings.projection.weight"] = (E, H)
        s["embeddings.projection.bias"] = (H,)
    for a in range(config.num_attention_sets):
        for part in ("query", "key", "value", "output"):
            s[f"encoder.attention.{a}.{part}.weight"] = (H, H)
            s[f"encoder.attention.{a}.{part}.bias"] = (H,)
        s[f"encoder.attention.{a}.layer_norm.weight"] = (H,)
        s[f"encoder.attention.{a}.layer_norm.bias"] = (H,)
    for f in range(config.num_ffn_sets):
        s[f"encoder.ffn.{f}.intermediate.weight"] = (H, I)
        s[f"encoder.ffn.{f}.intermediate.bias"] = (I,)
        s[f"encoder.ffn.{f}.output.weight"] = (I, H)
        s[f"encoder.ffn.{f}.output.bias"] = (H,)
        s[f"encoder.ffn.{f}.layer_norm.weight"] = (H,)
        s[f"encoder.ffn.{f}.layer_norm.bias"] = (H,)
    if not heads or config.has_pooler:
        s["pooler.weight"] = (H, H)
        s["pooler.bias"] = (H,)
    if not heads:
        return s
    head = config.head
    if head in ("pretraining", "masked_lm", "causal_lm"):
        s["mlm.dense.weight"] = (H, E)
        s["mlm.dense.bias"] = (E,)
        s["mlm.layer_norm.weight"] = (E,)
        s["mlm.layer_norm.bias"] = (E,)
        s["mlm.bias"] = (V,)
    if head in ("pretraining", "next_sentence"):
        s["sop.weight"] = (H, 2)
        s["sop.bias"] = (2,)
    if head in ("sequence_classification", "token_classification", "multiple_choice"):
        L = 1 if head == "multiple_choice" else config.num_labels
        s["classifier.weight"] = (H, L)
        s["classifier.bias"] = (L,)
    if head == "question_answering":
        s["qa_outputs.weight"] = (H, config.num_labels)
        s["qa_outputs.bias"] = (config.num_labels,)
    return s


def head_parameter_names(config: Config) -> list:
    """The names of the parameters the head adds on top of the bare encoder (pooler excluded)."""
    base = parameter_shapes(config, heads=False)
    return [name for name in parameter_shapes(config, heads=True) if name not in base]


def count_parameters(config: Config, heads: bool = False) -> int:
    """Unique parameter count (the tied MLM decoder counted once), computed without allocating."""
    return sum(math.prod(shape) for shape in parameter_shapes(config, heads=heads).values())


def init_kind(name: str) -> str:
    """How a tensor is initialised: LayerNorm weight "ones", biases "zeros", everything else "normal"."""
    if "layer_norm.weight" in name:
        return "ones"
    if name.endswith("bias"):
        return "zeros"
    return "normal"


class FlatBuffer:
    """One contiguous 1-D array with a named, shaped view per tensor.

    ``buf.flat`` is the whole array, ``buf[name]`` a view, ``buf.views`` the ordered name->view dict,
    ``buf.prefixed("encoder.attention.0.")`` the views under a prefix with the prefix stripped.
    """

    def __init__(self, shapes, xp, dtype, flat=None):
        self.shapes = OrderedDict(shapes)
        self.size = sum(math.prod(s) for s in self.shapes.values())
        self.flat = xp.zeros(self.size, dtype=dtype) if flat is None else flat
        self.views: OrderedDict = OrderedDict()
        offset = 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            self.views[name] = self.flat[offset:offset + n].reshape(shape)
            offset += n
        self._prefixed: dict[str, dict] = {}

    def __getitem__(self, name):
        return self.views[name]

    def __setitem__(self, name, value):
        # ``buf[name] += x`` adds in place into the view and then assigns it back to itself.
        view = self.views[name]
        if value is not view:
            view[...] = value

    def __contains__(self, name):
        return name in self.views

    def __iter__(self):
        return iter(self.views)

    def items(self):
        return self.views.items()

    def keys(self):
        return self.views.keys()

    def prefixed(self, prefix: str) -> dict:
        if prefix not in self._prefixed:
            self._prefixed[prefix] = {k[len(prefix):]: v for k, v in self.views.items() if k.startswith(prefix)}
        return self._prefixed[prefix]


def initialize(buffer: FlatBuffer, config: Config, backend, seed) -> None:
    """Fill ``buffer`` in place: normal(0, initializer_range) weights (truncated at 2 std when
    ``config.initializer == "truncated_normal"``, as TF), zero biases, LayerNorm gamma 1.

    Draws happen on the host from ``numpy.random.default_rng(seed)`` in the fixed order of
    :func:`parameter_shapes`, so a seed gives the same weights on every backend and dtype.
    """
    rng = backend.rng(seed)
    dtype = buffer.flat.dtype
    truncated = config.initializer == "truncated_normal"
    for name, view in buffer.items():
        kind = init_kind(name)
        if kind == "ones":
            view[...] = 1
        elif kind == "zeros":
            view[...] = 0
        else:
            view[...] = backend.normal(rng, view.shape, config.initializer_range, dtype, truncated=truncated)


__all__ = ["parameter_shapes", "head_parameter_names", "count_parameters", "FlatBuffer", "initialize", "init_kind"]
