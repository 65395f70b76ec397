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
