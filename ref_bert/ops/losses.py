"""The other losses of the Hugging Face heads: binary cross-entropy with logits (multi-label
classification) and mean squared error (regression). Both average over every element, as torch's
``BCEWithLogitsLoss()`` and ``MSELoss()`` with their default ``reduction="mean"``.

Binary cross-entropy with logits, z and y of the same shape, N = z.size, y in [0, 1] (soft targets
allowed), sigma(z) = 1 / (1 + exp(-z)):

    l     = -[y log sigma(z) + (1 - y) log(1 - sigma(z))]
          = max(z, 0) - z y + log(1 + exp(-|z|))          (the stable form torch uses: no exp overflows,
                                                           and log1p keeps the tail accurate)
    loss  = (1 / N) sum l
    dz    = dloss * (sigma(z) - y) / N                     (d/dz [log(1 + e^z) - z y] = sigma(z) - y)

sigma is evaluated as 1 / (1 + exp(-z)) for z >= 0 and exp(z) / (1 + exp(z)) for z < 0, so neither
branch overflows.

Mean squared error, z and y of the same shape, N = z.size:

    loss  = (1 / N) sum (z - y)^2
    dz    = dloss * 2 (z - y) / N

Targets get no gradient (they are labels). N = 0 gives loss 0 and an empty gradient.
"""
from __future__ import annotations

import backends


def _check_same_shape(name, logits, targets):
    if tuple(logits.shape) != tuple(targets.shape):
        raise ValueError(f"{name}: targets have shape {tuple(targets.shape)}, expected the logits' shape "
                         f"{tuple(logits.shape)}")


def bce_with_logits_forward(logits, targets):
    """Return ``(loss, cache)``: mean binary cross-entropy of ``sigmoid(logits)`` against ``targets``."""
    _check_same_shape("bce_with_logits", logits, targets)
    xp = backends.of(logits).xp
    targets = targets.astype(logits.dtype, copy=False)
    n = max(int(logits.size), 1)
    per_element = xp.maximum(logits, 0) - logits * targets + xp.log1p(xp.exp(-xp.abs(logits)))
    return per_element.sum() / n, (logits, targets, n)


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp of a non-positive number only."""
    xp = backends.of(x).xp
    e = xp.exp(-xp.abs(x))                     # in (0, 1]
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def bce_with_logits_backward(dloss, cache):
    logits, targets, n = cache
    return (sigmoid(logits) - targets) * (dloss / n)


def mse_forward(predictions, targets):
    """Return ``(loss, cache)``: the mean of ``(predictions - targets)^2`` over every element."""
    _check_same_shape("mse", predictions, targets)
    diff = predictions - targets.astype(predictions.dtype, copy=False)
    n = max(int(predictions.size), 1)
    return (diff * diff).sum() / n, (diff, n)


def mse_backward(dloss, cache):
    diff, n = cache
    return diff * (2.0 * dloss / n)
