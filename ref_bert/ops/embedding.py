"""Embedding lookup, and ALBERT's embedding layer built from it.

Lookup forward:   out[b, t] = table[ids[b, t]]                 table: (V, E), ids: (B, T), out: (B, T, E)
Lookup backward:  dtable[v] += sum over (b, t) with ids[b, t] = v of dout[b, t]   (a scatter-add: an id
                  that occurs several times receives the sum of its rows' gradients)

Embedding layer (ALBERT modeling.py embedding_lookup + embedding_postprocessor, then
``embedding_hidden_mapping_in``):
    e   = word[input_ids] + position[position_ids] + token_type[token_type_ids]      (B, T, E)
    e   = dropout(LayerNorm(e))
    out = e Wp + bp        when E != H (the factorized projection: no activation, LN or dropout after)
Backward runs the same steps in reverse; the sum sends the same gradient to all three lookups.
"""
from __future__ import annotations

import backends

from .dropout import dropout_backward, dropout_forward
from .layer_norm import layer_norm_backward, layer_norm_forward
from .linear import linear_backward, linear_forward


def embedding_forward(table, ids):
    return table[ids], ids


def embedding_backward(dout, cache, dtable):
    """Scatter-add ``dout`` rows into ``dtable`` at the looked-up ids (returns nothing: ids are discrete)."""
    ids = cache
    backends.of(dtable).scatter_add(dtable, ids.reshape(-1), dout.reshape(-1, dout.shape[-1]))


def embeddings_forward(p, input_ids, token_type_ids, position_ids, eps: float, dropout_mask=None,
                       project: bool = True, trace=None):
    """``p``: word_embeddings, position_embeddings, token_type_embeddings, layer_norm.{weight,bias},
    and projection.{weight,bias} when ``project``. Returns ``(out, cache)``, out (B, T, H or E).
    ``trace(name, array)``, when given, sees "sum" and "layer_norm" (B, T, E)."""
    word, word_cache = embedding_forward(p["word_embeddings"], input_ids)
    pos, pos_cache = embedding_forward(p["position_embeddings"], position_ids)
    typ, typ_cache = embedding_forward(p["token_type_embeddings"], token_type_ids)
    summed = word + pos + typ
    if trace is not None:
        trace("sum", summed)
    normed, ln_cache = layer_norm_forward(summed, p["layer_norm.weight"], p["layer_norm.bias"], eps)
    if trace is not None:
        trace("layer_norm", normed)
    out, drop_cache = dropout_forward(normed, dropout_mask)
    proj_cache = None
    if project:
        out, proj_cache = linear_forward(out, p["projection.weight"], p["projection.bias"])
    return out, (word_cache, pos_cache, typ_cache, ln_cache, drop_cache, proj_cache)


def embeddings_backward(dout, cache, g):
    """Accumulate every embedding-layer gradient into ``g`` (same keys as ``p``). Returns the gradient
    with respect to the sum ``e`` (B, T, E), which is also each lookup's upstream gradient."""
    word_cache, pos_cache, typ_cache, ln_cache, drop_cache, proj_cache = cache
    if proj_cache is not None:
        dout = linear_backward(dout, proj_cache, g["projection.weight"], g["projection.bias"])
    dnormed = dropout_backward(dout, drop_cache)
    dsummed = layer_norm_backward(dnormed, ln_cache, g["layer_norm.weight"], g["layer_norm.bias"])
    embedding_backward(dsummed, word_cache, g["word_embeddings"])
    embedding_backward(dsummed, pos_cache, g["position_embeddings"])
    embedding_backward(dsummed, typ_cache, g["token_type_embeddings"])
    return dsummed
