"""Softmax cross-entropy averaged over the labelled rows, with an ignore label (Hugging Face: -100).

Forward, logits z (N, C), labels y (N,), valid rows S = {n : y_n != ignore_index}, count = |S|:
    log p_n = z_n - logsumexp(z_n)
    loss    = -(1 / count) sum_{n in S} log p_n[y_n]          (0 when count == 0; HF gives NaN there)
Backward, for n in S:  dz_n = dloss * (softmax(z_n) - onehot(y_n)) / count;  rows not in S get 0.
"""
from __future__ import annotations

import backends

from .softmax import log_softmax

IGNORE_INDEX = -100


def cross_entropy_forward(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Return ``(loss, cache)``; ``loss`` is a 0-d array of the logits' dtype."""
    xp = backends.of(logits).xp
    valid = labels != ignore_index
    count = int(valid.sum())
    safe_labels = xp.where(valid, labels, 0)
    log_probs = log_softmax(logits)
    picked = xp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    weights = valid.astype(logits.dtype)
    loss = -(picked * weights).sum() / max(count, 1)
    return loss, (log_probs, safe_labels, weights, count)


def cross_entropy_backward(dloss, cache):
    xp = backends.of(cache[0]).xp
    log_probs, safe_labels, weights, count = cache
    dlogits = xp.exp(log_probs)
    dlogits[xp.arange(dlogits.shape[0]), safe_labels] -= 1.0
    dlogits *= (weights * (dloss / max(count, 1)))[:, None]
    return dlogits
