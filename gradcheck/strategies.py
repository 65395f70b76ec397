"""Hypothesis strategies for model configurations and inputs (kept tiny so examples run in ~1 s).

``configs()`` covers: E < H and E == H; every sharing variant; 1 to 3 layers; 1 to 4 heads;
num_hidden_groups and inner_group_num above 1; both GELU forms; dropout off or on (the checks freeze
the masks with a dropout seed). ``model_inputs(config)`` draws a batch with padded or unpadded
attention masks, token types, MLM labels at some real positions and SOP labels.

Weights are drawn larger than ALBERT's 0.02 (``initializer_range`` 0.2 to 0.4) so that the
nonlinearities are actually exercised: at 0.02 the network is nearly linear and a wrong second-order
term in a backward pass could hide. Much larger (0.8) makes the loss so curved that the finite
difference itself, not the backward pass, becomes the limit (measured: 2e-6 relative at h = 1e-3).
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ref_bert import Config
from ref_bert.config import SHARING


@st.composite
def configs(draw, *, max_layers: int = 3, dropout: bool | None = None, activations=("gelu", "gelu_new"),
            sharing=SHARING) -> Config:
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(2, 4))
    if heads * head_dim < 4:
        # LayerNorm over 2 features is degenerate: xhat = +-1, a step function of the inputs whose
        # finite difference is meaningless. Keep H and E at least 4.
        head_dim = 4
    H = heads * head_dim
    E = draw(st.sampled_from([H, max(4, H // 2), H + 2]))
    layers = draw(st.integers(1, max_layers))
    groups = draw(st.integers(1, layers))
    # keep only group counts every layer-to-group rule reaches (Config validates this too)
    rule = draw(st.sampled_from(["hf", "tf"]))
    used = {(int(i / (layers / groups)) if rule == "hf" else int(i / layers * groups)) for i in range(layers)}
    if len(used) != groups:
        groups = 1
    use_dropout = draw(st.booleans()) if dropout is None else dropout
    p = draw(st.sampled_from([0.1, 0.25])) if use_dropout else 0.0
    return Config(
        vocab_size=draw(st.integers(8, 24)), embedding_size=E, hidden_size=H, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=draw(st.integers(4, 2 * H + 2)),
        hidden_act=draw(st.sampled_from(list(activations))), hidden_dropout_prob=p,
        attention_probs_dropout_prob=p, classifier_dropout_prob=p, max_position_embeddings=draw(st.integers(6, 10)),
        type_vocab_size=draw(st.integers(1, 3)), num_hidden_groups=groups, inner_group_num=draw(st.integers(1, 2)),
        sharing=draw(st.sampled_from(list(sharing))), group_rule=rule,
        ffn_output_dropout=draw(st.booleans()), initializer_range=draw(st.sampled_from([0.2, 0.3, 0.4])),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5])), name="hypothesis")


@st.composite
def model_inputs(draw, config: Config, *, padded: bool | None = None) -> dict:
    """Keyword arguments for ``Model.loss_and_grads``: ids, types, mask, labels, dropout seed.

    Every sequence keeps at least its first token real (the pooler reads position 0) and at least
    one position carries an MLM label, so both losses reach every parameter.
    """
    B = draw(st.integers(1, 3))
    T = draw(st.integers(2, min(6, config.max_position_embeddings)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, config.vocab_size, size=(B, T))
    token_type_ids = rng.integers(0, config.type_vocab_size, size=(B, T))
    attention_mask = np.ones((B, T), dtype=np.int64)
    if padded if padded is not None else draw(st.booleans()):
        for b in range(B):
            attention_mask[b, rng.integers(1, T + 1):] = 0
    mlm_labels = np.full((B, T), -100, dtype=np.int64)
    real = np.argwhere(attention_mask == 1)
    picks = real[rng.random(len(real)) < 0.5]
    if len(picks) == 0:
        picks = real[:1]
    mlm_labels[picks[:, 0], picks[:, 1]] = rng.integers(0, config.vocab_size, size=len(picks))
    sop_labels = rng.integers(0, 2, size=B)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                mlm_labels=mlm_labels, sop_labels=sop_labels, training=True, dropout_seed=seed)
