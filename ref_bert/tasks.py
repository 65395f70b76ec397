"""The Hugging Face task heads (fine-tuning) and their losses: forward/backward pairs.

Each head sits on the encoder's last hidden state h (B, T, H) or on the pooled output
pooled = tanh(h[:, 0] Wp + bp) (B, H) (``heads.pooler_forward``), and matches the transformers class of
the same name in structure, parameter names and loss (docs/reference.md §11):

    head (Config.head)        transformers class                 on        logits                   loss
    sequence_classification   *ForSequenceClassification         pooled    dropout(x) Wc + bc (B, L) problem_type
    token_classification      *ForTokenClassification            h         dropout(h) Wc + bc (B,T,L) CE, -100 ignored
    question_answering        *ForQuestionAnswering              h         h Wqa + bqa (B, T, 2)     (CE_s + CE_e) / 2
    multiple_choice           *ForMultipleChoice                 pooled    dropout(x) Wc + bc -> (B, C) CE over choices
    next_sentence             BertForNextSentencePrediction      pooled    x Ws + bs (B, 2)          CE
    masked_lm                 *ForMaskedLM                       h         MLM head (heads.py)       CE, -100 ignored
    causal_lm                 BertLMHeadModel (is_decoder)       h         MLM head (heads.py)       shifted CE

The classifier (``classifier_forward``) is one dropout and one dense layer:

    forward:   d = x * m  (m the dropout mask, 1/keep or 0),  logits = d Wc + bc
    backward:  dWc += d^T dlogits,  dbc += sum dlogits,  dd = dlogits Wc^T,  dx = dd * m
               (ops.linear and ops.dropout: the chain rule through the two)

The question-answering output is a dense layer without dropout whose two columns are the start and end
logits: start = logits[..., 0], end = logits[..., 1] (transformers' ``logits.split(1, dim=-1)``), so
dlogits = stack(dstart, dend) on the last axis.

Losses (the ops are in ``ops``; this module only chooses and arranges them as transformers does):

* ``problem_type`` (``sequence_problem_type``): the config's when set, else as transformers chooses it
  when unset: num_labels == 1 -> "regression"; num_labels > 1 and integer labels ->
  "single_label_classification"; otherwise "multi_label_classification".
  regression: MSE; with num_labels == 1 transformers squeezes logits (B, 1) and labels to (B,) (both
  sides alike, so the mean is over B); otherwise MSE over (B, L). single label: cross-entropy over
  (B, L), -100 ignored. multi label: BCE with logits over (B, L), float targets.
* question answering (``span_loss_forward``): transformers clamps start and end positions to [0, T]
  and ignores index T: a position at or past the end is ignored, a negative one counts as 0.
  loss = (CE(start) + CE(end)) / 2, so each CE receives dloss / 2.
* causal LM (``shift_labels``): position t predicts token t + 1: the labels are shifted left by one and
  padded with -100 (transformers' ForCausalLMLoss), then the usual mean cross-entropy.
"""
from __future__ import annotations

import backends

from .ops import (IGNORE_INDEX, bce_with_logits_backward, bce_with_logits_forward, cross_entropy_backward,
                  cross_entropy_forward, dropout_backward, dropout_forward, linear_backward, linear_forward,
                  mse_backward, mse_forward)


# --- the classifier: dropout then dense ------------------------------------------------------------
def classifier_forward(x, weight, bias, dropout_mask=None):
    """x (..., H) -> logits (..., n) = dropout(x) W + b; returns ``(logits, cache)``."""
    dropped, drop_cache = dropout_forward(x, dropout_mask)
    logits, lin_cache = linear_forward(dropped, weight, bias)
    return logits, (drop_cache, lin_cache)


def classifier_backward(dlogits, cache, dweight, dbias):
    """Adds into ``dweight`` / ``dbias``; returns dx (..., H)."""
    drop_cache, lin_cache = cache
    return dropout_backward(linear_backward(dlogits, lin_cache, dweight, dbias), drop_cache)


# --- question answering: start and end logits ---------------------------------------------------
def span_logits_forward(hidden, weight, bias):
    """hidden (B, T, H), weight (H, 2) -> ``((start (B, T), end (B, T)), logits (B, T, 2), cache)``."""
    logits, cache = linear_forward(hidden, weight, bias)
    return (logits[..., 0], logits[..., 1]), logits, cache


def span_logits_backward(dlogits, cache, dweight, dbias):
    """dlogits (B, T, 2) (dstart in [..., 0], dend in [..., 1]); returns dhidden (B, T, H)."""
    return linear_backward(dlogits, cache, dweight, dbias)


# --- the losses as transformers computes them ----------------------------------------------------
def sequence_problem_type(problem_type, num_labels: int, labels) -> str:
    """transformers' rule (Albert/BertForSequenceClassification.forward) when ``problem_type`` is None."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if labels.dtype.kind in "iu":
        return "single_label_classification"
    return "multi_label_classification"


def sequence_loss_forward(logits, labels, problem_type: str, label_smoothing: float = 0.0):
    """logits (B, L); labels (B,) integers for single label, (B, L) (or (B,) when L == 1) floats for the
    others. Returns ``(loss, cache)``."""
    B, L = logits.shape
    if problem_type == "regression":
        if L == 1:   # transformers: MSELoss()(logits.squeeze(), labels.squeeze()): both (B,)
            loss, cache = mse_forward(logits.reshape(B), labels.reshape(B))
        else:
            loss, cache = mse_forward(logits, labels)
        return loss, ("regression", cache, logits.shape)
    if problem_type == "single_label_classification":
        loss, cache = cross_entropy_forward(logits, labels.reshape(-1), label_smoothing=label_smoothing)
        return loss, ("single_label_classification", cache, logits.shape)
    loss, cache = bce_with_logits_forward(logits, labels)
    return loss, ("multi_label_classification", cache, logits.shape)


def sequence_loss_backward(dloss, cache):
    """Returns dlogits (B, L)."""
    problem_type, inner, shape = cache
    if problem_type == "regression":
        return mse_backward(dloss, inner).reshape(shape)
    if problem_type == "single_label_classification":
        return cross_entropy_backward(dloss, inner)
    return bce_with_logits_backward(dloss, inner)


def span_loss_forward(start_logits, end_logits, start_positions, end_positions, label_smoothing: float = 0.0):
    """transformers' question-answering loss. start/end logits (B, T); positions (B,) (or (B, 1)).

    Positions are clamped to [0, T] and T is the ignore index: a position >= T ("outside the model
    inputs") is ignored, a negative one is clamped to 0 and so *counts* as position 0. Then
    loss = (CE(start_logits, start) + CE(end_logits, end)) / 2, each CE a mean over its own
    non-ignored rows (0 when every row is ignored; transformers gives NaN there).
    Returns ``((loss, start_loss, end_loss), cache)``.
    """
    xp = backends.of(start_logits).xp
    T = start_logits.shape[1]
    start = xp.clip(start_positions.reshape(-1), 0, T)
    end = xp.clip(end_positions.reshape(-1), 0, T)
    start_loss, start_cache = cross_entropy_forward(start_logits, start, ignore_index=T, label_smoothing=label_smoothing)
    end_loss, end_cache = cross_entropy_forward(end_logits, end, ignore_index=T, label_smoothing=label_smoothing)
    return ((start_loss + end_loss) / 2, start_loss, end_loss), (start_cache, end_cache)


def span_loss_backward(dloss, cache):
    """Returns dlogits (B, T, 2): d start in [..., 0], d end in [..., 1] (each dloss / 2 into its CE)."""
    start_cache, end_cache = cache
    dstart = cross_entropy_backward(dloss / 2, start_cache)
    dend = cross_entropy_backward(dloss / 2, end_cache)
    return backends.of(dstart).xp.stack([dstart, dend], axis=-1)


def shift_labels(labels):
    """transformers' ForCausalLMLoss: labels (B, T) -> (B, T) with position t holding labels[t + 1] and
    the last position -100: pad(labels, (0, 1), value=-100)[..., 1:]."""
    xp = backends.of(labels).xp
    shifted = xp.full(labels.shape, IGNORE_INDEX, dtype=labels.dtype)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


__all__ = ["classifier_forward", "classifier_backward", "span_logits_forward", "span_logits_backward",
           "sequence_problem_type", "sequence_loss_forward", "sequence_loss_backward", "span_loss_forward",
           "span_loss_backward", "shift_labels"]
