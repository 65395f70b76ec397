"""The post-LN transformer encoder: one block is an attention sublayer then an FFN sublayer.

Attention sublayer (ALBERT/BERT, post-LN):
    context = self_attention(x)                                   (ops.attention)
    a       = LayerNorm(x + dropout(context Wo + bo))
FFN sublayer:
    f       = LayerNorm(a + dropout(act(a W1 + b1) W2 + b2))
Backward of ``y = LayerNorm(x + g(x))``: dz = LN_backward(dy); dx = dz + g_backward(dz) -- the
residual passes dz straight through and the branch adds its own contribution.

Layer i runs the K blocks listed in ``Config.block_schedule()[i]``; a parameter set used by several
blocks simply receives the sum of their gradients, because every backward *adds* into its buffer.
"""
from __future__ import annotations

from .ops import (activation_backward, activation_forward, dropout_backward, dropout_forward,
                  layer_norm_backward, layer_norm_forward, linear_backward, linear_forward,
                  self_attention_backward, self_attention_forward)


def scoped(trace, prefix: str):
    """``trace`` with ``prefix`` put before every name (None stays None)."""
    if trace is None:
        return None
    return lambda name, x: trace(prefix + name, x)


def attention_sublayer_forward(x, p, additive_mask, config, drop, trace=None, past=None):
    """``p``: the attention set's views (query/key/value/output .weight/.bias, layer_norm.*).
    ``drop(shape, prob)`` returns a frozen dropout mask or None. ``past``: the cached (keys, values) of
    earlier positions, for decoding (see ops.attention); the cache's ``[0].k`` / ``[0].v`` then hold
    every key and value attended."""
    B, T, H = x.shape
    keys = T if past is None else past[0].shape[2] + T
    probs_mask = drop((B, config.num_attention_heads, T, keys), config.attention_probs_dropout_prob)
    context, attn_cache = self_attention_forward(x, p, additive_mask, config.num_attention_heads, probs_mask,
                                                 trace=scoped(trace, "attention."), past=past)
    projected, out_cache = linear_forward(context, p["output.weight"], p["output.bias"])
    if trace is not None:
        trace("attention.output_projection", projected)
    dropped, drop_cache = dropout_forward(projected, drop((B, T, H), config.hidden_dropout_prob))
    out, ln_cache = layer_norm_forward(x + dropped, p["layer_norm.weight"], p["layer_norm.bias"],
                                       config.layer_norm_eps)
    return out, (attn_cache, out_cache, drop_cache, ln_cache)


def attention_sublayer_backward(dout, cache, g):
    attn_cache, out_cache, drop_cache, ln_cache = cache
    dresidual = layer_norm_backward(dout, ln_cache, g["layer_norm.weight"], g["layer_norm.bias"])
    dprojected = dropout_backward(dresidual, drop_cache)
    dcontext = linear_backward(dprojected, out_cache, g["output.weight"], g["output.bias"])
    return dresidual + self_attention_backward(dcontext, attn_cache, g)


def ffn_sublayer_forward(x, p, config, drop, trace=None):
    B, T, H = x.shape
    pre, in_cache = linear_forward(x, p["intermediate.weight"], p["intermediate.bias"])
    act, act_cache = activation_forward(config.hidden_act, pre)
    out, out_cache = linear_forward(act, p["output.weight"], p["output.bias"])
    if trace is not None:
        trace("ffn.intermediate", pre)
        trace("ffn.activation", act)
        trace("ffn.output_projection", out)
    mask = drop((B, T, H), config.hidden_dropout_prob) if config.ffn_output_dropout else None
    dropped, drop_cache = dropout_forward(out, mask)
    y, ln_cache = layer_norm_forward(x + dropped, p["layer_norm.weight"], p["layer_norm.bias"],
                                     config.layer_norm_eps)
    return y, (in_cache, act_cache, out_cache, drop_cache, ln_cache)


def ffn_sublayer_backward(dy, cache, g):
    in_cache, act_cache, out_cache, drop_cache, ln_cache = cache
    dresidual = layer_norm_backward(dy, ln_cache, g["layer_norm.weight"], g["layer_norm.bias"])
    dout = dropout_backward(dresidual, drop_cache)
    dact = linear_backward(dout, out_cache, g["output.weight"], g["output.bias"])
    dpre = activation_backward(dact, act_cache)
    return dresidual + linear_backward(dpre, in_cache, g["intermediate.weight"], g["intermediate.bias"])


def encoder_forward(x, params, additive_mask, config, drop, trace=None):
    """Run every layer. Returns ``(hidden_states, cache)``: hidden_states[0] is the encoder input
    (after the projection, as Hugging Face reports it) and hidden_states[i + 1] the output of layer i."""
    hidden_states = [x]
    caches = []
    for i, blocks in enumerate(config.block_schedule()):
        for m, (a, f) in enumerate(blocks):
            block_trace = scoped(trace, f"encoder.layer.{i}.block.{m}.")
            x, attn_cache = attention_sublayer_forward(
                x, params.prefixed(f"encoder.attention.{a}."), additive_mask, config, drop, block_trace)
            if trace is not None:
                trace(f"encoder.layer.{i}.block.{m}.attention_output", x)
            x, ffn_cache = ffn_sublayer_forward(x, params.prefixed(f"encoder.ffn.{f}."), config, drop,
                                                block_trace)
            if trace is not None:
                trace(f"encoder.layer.{i}.block.{m}.ffn_output", x)
            caches.append((a, f, attn_cache, ffn_cache))
        hidden_states.append(x)
    return hidden_states, caches


def encoder_backward(dhidden_states, caches, grads, config):
    """``dhidden_states[i]``: gradient reaching hidden_states[i] from outside (or None).
    Returns the gradient with respect to the encoder input."""
    K = config.inner_group_num
    dx = dhidden_states[-1]
    for i in reversed(range(config.num_hidden_layers)):
        for m in reversed(range(K)):
            a, f, attn_cache, ffn_cache = caches[i * K + m]
            dx = ffn_sublayer_backward(dx, ffn_cache, grads.prefixed(f"encoder.ffn.{f}."))
            dx = attention_sublayer_backward(dx, attn_cache, grads.prefixed(f"encoder.attention.{a}."))
        if dhidden_states[i] is not None:
            dx = dx + dhidden_states[i]
    return dx
