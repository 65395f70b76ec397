"""Model helpers shared by the tests (no torch here)."""
import numpy as np

from ref_bert import Model


def perturbed_model(config, dtype="float64", seed=0, std=0.3):
    """A model whose every parameter gets N(0, std^2) noise on top of its initialisation: LayerNorm
    gammas and biases are no longer 1 and 0, and activations are O(1), where gelu and gelu_new differ
    by ~1e-4 and a wrong epsilon shows."""
    model = Model(config, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.params.views.values():
        view[...] += rng.normal(0, std, view.shape)
    return model


def dropout_case(seed: int, hidden_act: str = "gelu_new"):
    """A 2-layer tiny config (vocabulary 50) with every dropout at 0.1, and loss_and_grads keyword
    arguments: a batch of 2 x 9 with row 1 padded after 6 tokens, MLM labels on ~40% of positions,
    SOP labels, frozen dropout masks (dropout_seed 3)."""
    from ref_bert import Config

    config = Config.preset("tiny", vocab_size=50, num_hidden_layers=2, hidden_act=hidden_act,
                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.1)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, 6:] = 0
    labels = np.where(rng.random((2, 9)) < 0.4, rng.integers(0, 50, (2, 9)), -100)
    return config, dict(input_ids=ids, attention_mask=mask, mlm_labels=labels, sop_labels=np.array([0, 1]),
                        training=True, dropout_seed=3)
