"""Softmax cross-entropy over the labelled rows, with an ignore label (Hugging Face: -100), optional
label smoothing (torch's ``CrossEntropyLoss(label_smoothing=eps)``) and two normalisations.

Forward, logits z (N, C), labels y (N,), valid rows S = {n : y_n != ignore_index}, count = |S|,
log p_n = z_n - logsumexp(z_n), and the per-row loss with smoothing eps (eps = 0: plain NLL)

    l_n  = (1 - eps) (-log p_n[y_n])  +  eps * (1/C) sum_c (-log p_n[c])
         = -sum_c q_n[c] log p_n[c]        with the smoothed target q_n = (1 - eps) onehot(y_n) + eps / C

    loss = (1 / D) sum_{n in S} l_n,  D = count             normalization="mean" (torch / Hugging Face;
                                                            0 when count == 0, where torch gives NaN)
                                      D = count + 1e-5      normalization="tf_albert" (TF ALBERT's
                                                            sum(w * nll) / (sum(w) + 1e-5), w = 1 on S)

torch smooths exactly this way, ignored rows included: they contribute neither term, and the mean
divides by the number of non-ignored rows (docs/reference.md §11.3).

Backward: d l_n / d z_n = sum_c q_n[c] (p_n - onehot(c)) = p_n - q_n (sum_c q_n[c] = 1), so
    dz_n = dloss * (softmax(z_n) - q_n) / D   for n in S;   rows not in S get 0.
"""
from __future__ import annotations

import backends

from .softmax import log_softmax

IGNORE_INDEX = -100
NORMALIZATIONS = ("mean", "tf_albert")
TF_ALBERT_EPSILON = 1e-5


def cross_entropy_forward(logits, labels, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                          normalization: str = "mean"):
    """Return ``(loss, cache)``; ``loss`` is a 0-d array of the logits' dtype. ``logits`` (N, C),
    ``labels`` (N,) integers."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} is invalid: expected a number in [0, 1]")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is invalid: expected one of {NORMALIZATIONS}")
    xp = backends.of(logits).xp
    valid = labels != ignore_index
    count = int(valid.sum())
    safe_labels = xp.where(valid, labels, 0)
    log_probs = log_softmax(logits)
    picked = xp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    weights = valid.astype(logits.dtype)
    denominator = max(count, 1) if normalization == "mean" else count + TF_ALBERT_EPSILON
    if label_smoothing == 0.0:
        loss = -(picked * weights).sum() / denominator
    else:
        eps, C = float(label_smoothing), logits.shape[-1]
        per_row = (1.0 - eps) * picked + (eps / C) * log_probs.sum(axis=-1)
        loss = -(per_row * weights).sum() / denominator
    return loss, (log_probs, safe_labels, weights, denominator, float(label_smoothing))


def cross_entropy_backward(dloss, cache):
    xp = backends.of(cache[0]).xp
    log_probs, safe_labels, weights, denominator, eps = cache
    dlogits = xp.exp(log_probs)
    rows = xp.arange(dlogits.shape[0])
    if eps == 0.0:
        dlogits[rows, safe_labels] -= 1.0
    else:      # q = (1 - eps) onehot + eps / C
        dlogits -= eps / dlogits.shape[-1]
        dlogits[rows, safe_labels] -= 1.0 - eps
    dlogits *= (weights * (dloss / denominator))[:, None]
    return dlogits
