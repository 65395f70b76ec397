"""The two losses fine-tuning needs beside ``ops.cross_entropy``, each a forward/backward pair.

Mean squared error (Hugging Face's regression loss, ``MSELoss`` on the squeezed logits), predictions
p (N,), targets y (N,):

    loss = (1/N) sum_n (p_n - y_n)^2            dL/dp_n = dloss * 2 (p_n - y_n) / N

Cross-entropy with label smoothing eps (``torch.nn.CrossEntropyLoss(label_smoothing=eps)``; UniLM's
s2s-ft fine-tunes with eps = 0.1), logits z (N, C), labels y (N,), rows S = {n : y_n != -100}:

    q_n    = (1 - eps) onehot(y_n) + eps / C                  the smoothed target distribution
    loss   = -(1/|S|) sum_{n in S} sum_c q_n[c] log softmax(z_n)[c]
           = (1 - eps) CE + eps (1/|S|) sum_{n in S} mean_c(-log softmax(z_n)[c])
    dL/dz_n = dloss * (softmax(z_n) - q_n) / |S|   for n in S (sum_c q_n[c] = 1), 0 elsewhere

The last line: d/dz_n of -sum_c q_c log softmax(z)_c = -sum_c q_c (onehot(c) - softmax(z)) =
softmax(z) - q. With eps = 0 both reduce to ``ops.cross_entropy``.

Note: these stand in for the shared loss ops of issue 13's heads (ref_bert/ops); they are gradient-
checked in tests/test_finetune.py.
"""
from __future__ import annotations

import backends

from ..ops import IGNORE_INDEX
from ..ops.softmax import log_softmax


def mse_forward(predictions, targets):
    """``(mean((p - y)^2), cache)`` for predictions and targets of the same shape."""
    diff = predictions - targets
    return (diff * diff).mean(), (diff,)


def mse_backward(dloss, cache):
    (diff,) = cache
    return diff * (2.0 * dloss / diff.size)


def smoothed_cross_entropy_forward(logits, labels, smoothing: float, ignore_index: int = IGNORE_INDEX):
    """``(loss, cache)``: label-smoothed cross-entropy averaged over the labelled rows (module docstring)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing={smoothing!r} is invalid: expected a number in [0, 1)")
    xp = backends.of(logits).xp
    valid = labels != ignore_index
    count = int(valid.sum())
    safe_labels = xp.where(valid, labels, 0)
    log_probs = log_softmax(logits)
    nll = -xp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    uniform = -log_probs.mean(axis=-1)
    weights = valid.astype(logits.dtype)
    per_row = (1.0 - smoothing) * nll + smoothing * uniform
    loss = (per_row * weights).sum() / max(count, 1)
    return loss, (log_probs, safe_labels, weights, count, smoothing)


def smoothed_cross_entropy_backward(dloss, cache):
    log_probs, safe_labels, weights, count, smoothing = cache
    xp = backends.of(log_probs).xp
    C = log_probs.shape[-1]
    dlogits = xp.exp(log_probs) - smoothing / C
    dlogits[xp.arange(dlogits.shape[0]), safe_labels] -= 1.0 - smoothing
    dlogits *= (weights * (dloss / max(count, 1)))[:, None]
    return dlogits
