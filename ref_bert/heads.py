"""Pooler and pretraining heads.

Pooler (both models):  pooled = tanh(h[:, 0] Wp + bp)                     h: (B, T, H) -> (B, H)
MLM head (ALBERT AlbertMLMHead, BERT BertLMPredictionHead), on N gathered positions x: (N, H):
    t      = LayerNorm_E(act(x Wd + bd))                                   (N, E)
    logits = t word_embeddings^T + mlm.bias                                (N, V)
    The decoder is tied to the input word embeddings, so its gradient dW_word += dlogits^T t is
    *added* to the lookup's scatter-add gradient; dt = dlogits word_embeddings.
SOP/NSP head on the pooled output:  logits = dropout(pooled) Ws + bs     (B, 2)
"""
from __future__ import annotations

from .ops import (activation_backward, activation_forward, dropout_backward, dropout_forward,
                  layer_norm_backward, layer_norm_forward, linear_backward, linear_forward)


def pooler_forward(hidden, p, trace=None):
    """``p``: the params buffer; uses pooler.weight / pooler.bias."""
    first = hidden[:, 0]
    pre, lin_cache = linear_forward(first, p["pooler.weight"], p["pooler.bias"])
    if trace is not None:
        trace("pooler.dense", pre)
    pooled, act_cache = activation_forward("tanh", pre)
    return pooled, (lin_cache, act_cache, hidden.shape)


def pooler_backward(dpooled, cache, g, xp):
    lin_cache, act_cache, hidden_shape = cache
    dfirst = linear_backward(activation_backward(dpooled, act_cache), lin_cache, g["pooler.weight"],
                             g["pooler.bias"])
    dhidden = xp.zeros(hidden_shape, dtype=dpooled.dtype)
    dhidden[:, 0] = dfirst
    return dhidden


def mlm_head_forward(x, p, config, trace=None):
    """x: (N, H) hidden states at the positions to predict (any leading shape works, e.g. (B, T, H)).
    Returns ``(logits (N, V), cache)``."""
    pre, dense_cache = linear_forward(x, p["mlm.dense.weight"], p["mlm.dense.bias"])
    act, act_cache = activation_forward(config.hidden_act, pre)
    t, ln_cache = layer_norm_forward(act, p["mlm.layer_norm.weight"], p["mlm.layer_norm.bias"],
                                     config.layer_norm_eps)
    if trace is not None:
        trace("mlm.dense", pre)
        trace("mlm.activation", act)
        trace("mlm.layer_norm", t)
    word = p["embeddings.word_embeddings"]
    logits = t @ word.T + p["mlm.bias"]
    return logits, (dense_cache, act_cache, ln_cache, t, word)


def mlm_head_backward(dlogits, cache, g):
    """dlogits: (N, V), or (B, T, V) when the head ran on every position; returns dx of x's shape."""
    dense_cache, act_cache, ln_cache, t, word = cache
    V, E = word.shape
    rows, t_rows = dlogits.reshape(-1, V), t.reshape(-1, E)      # (N, V), (N, E): views
    g["embeddings.word_embeddings"] += rows.T @ t_rows    # tied decoder: adds to the lookup's gradient
    g["mlm.bias"] += rows.sum(axis=0)
    dt = (rows @ word).reshape(t.shape)
    dact = layer_norm_backward(dt, ln_cache, g["mlm.layer_norm.weight"], g["mlm.layer_norm.bias"])
    dpre = activation_backward(dact, act_cache)
    return linear_backward(dpre, dense_cache, g["mlm.dense.weight"], g["mlm.dense.bias"])


def sop_head_forward(pooled, p, dropout_mask=None):
    dropped, drop_cache = dropout_forward(pooled, dropout_mask)
    logits, lin_cache = linear_forward(dropped, p["sop.weight"], p["sop.bias"])
    return logits, (drop_cache, lin_cache)


def sop_head_backward(dlogits, cache, g):
    drop_cache, lin_cache = cache
    return dropout_backward(linear_backward(dlogits, lin_cache, g["sop.weight"], g["sop.bias"]), drop_cache)
