"""The math: every op is a ``*_forward(...) -> (out, cache)`` / ``*_backward(dout, cache, ...)`` pair.

Backward functions *add* parameter gradients into buffers they are given (so a weight used by several
layers, or tied between the embedding and the MLM decoder, needs no special case) and return the
gradient with respect to the op's input. Read them in model order: embedding, layer_norm, linear,
attention (softmax, dropout), activations, cross_entropy, and the heads' other losses (losses: binary
cross-entropy with logits, mean squared error).

The code here is the reference: each op computes the formula of its docstring. A few ops are wrapped,
``op = backends.fast_path(op)`` on the line after the function; a backend may run a faster arrangement of the same arithmetic in their place
(``op.reference`` is always this code). Those variants live in backends/ and are tested against these. (A line after
the function rather than a decorator, because the mutation tool, docs/testing.md, does not mutate
decorated functions.)
"""
from .activations import activation_backward, activation_forward
from .attention import (additive_mask_from, merge_heads, self_attention_backward, self_attention_forward,
                        split_heads)
from .cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from .losses import bce_with_logits_backward, bce_with_logits_forward, mse_backward, mse_forward, sigmoid
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward, embeddings_backward, embeddings_forward
from .layer_norm import layer_norm_backward, layer_norm_forward
from .linear import linear_backward, linear_forward
from .pooling import POOLING_MODES, l2_normalize_backward, l2_normalize_forward, pooling_backward, pooling_forward
from .softmax import log_softmax, masked_softmax_backward, masked_softmax_forward, softmax_backward, softmax_forward

__all__ = [
    "log_softmax",
    "activation_forward", "activation_backward", "additive_mask_from", "split_heads", "merge_heads",
    "self_attention_forward", "self_attention_backward", "IGNORE_INDEX", "cross_entropy_forward",
    "cross_entropy_backward", "dropout_forward", "dropout_backward", "embedding_forward",
    "embedding_backward", "embeddings_forward", "embeddings_backward", "layer_norm_forward",
    "layer_norm_backward", "linear_forward", "linear_backward", "softmax_forward", "softmax_backward",
    "masked_softmax_forward", "masked_softmax_backward", "bce_with_logits_forward", "bce_with_logits_backward",
    "mse_forward", "mse_backward", "sigmoid",
    "masked_softmax_forward", "masked_softmax_backward", "POOLING_MODES", "pooling_forward", "pooling_backward",
    "l2_normalize_forward", "l2_normalize_backward",
]
