"""Gradient accumulation: one step's gradient from k micro-batches, equal to one batch of all of them.

The loss of one batch is ``w_mlm MLM + w_sop SOP`` (ALBERT: weights 1) where MLM is a mean over the
batch's labelled positions and SOP a mean over its examples. Micro-batch i has n_i labelled positions
and b_i examples (N = sum n_i, B = sum b_i), so the effective batch's loss is

    L = sum_i w_mlm (n_i / N) MLM_i + sum_i w_sop (b_i / B) SOP_i

and its gradient carries the same weights. The two losses need *different* weights (n_i / N is not
b_i / B unless every micro-batch has the same number of masks), so each micro-batch runs one pass
with ``loss_weights=(w_mlm n_i / N, w_sop b_i / B)``. Weighting a combined gradient by n_i / N alone
would be exact for MLM only and would weight each example's SOP term by its mask count. The result
equals one batch of k*b examples up to rounding (tested at 1e-12 in float64 with dropout off; with
dropout on, the masks of k micro-batches are different draws). A micro-batch without masks has MLM
loss 0 and weight 0.

With k = 1 this is one ``Model.loss_and_grads`` with ``loss_weights=(1, w_sop)``.
"""
from __future__ import annotations

from ..model import Model
from ..params import FlatBuffer


def effective_batch_gradients(model: Model, micro_batches: list, mlm_counts: list, training: bool = True,
                              sop_weight: float = 1.0):
    """Gradient of the effective batch made of ``micro_batches`` (see the module docstring).

    Args:
        micro_batches: dicts of backend arrays (``Model.loss_and_grads`` keyword arguments: input_ids,
            token_type_ids, attention_mask, mlm_labels (b_i, T), sop_labels (b_i,)).
        mlm_counts: host integers n_i, the labelled MLM positions of each micro-batch (counted on the
            host before the transfer, so no device read is needed for the weights).
        sop_weight: w_sop (ALBERT: 1); w_mlm is 1.
    Returns:
        ``(grads, parts)``: grads a dict name -> backend array (the parameters' names and shapes);
        parts ``{"loss", "mlm", "sop"}`` as 0-d backend arrays (not read on the host); "loss" is the
        weighted total, "mlm" and "sop" the unweighted means over the effective batch.
    """
    k = len(micro_batches)
    if k == 0:
        raise ValueError("effective_batch_gradients needs at least one micro-batch, got none")
    if len(mlm_counts) != k:
        raise ValueError(f"mlm_counts has {len(mlm_counts)} entries, expected one per micro-batch ({k})")
    if k == 1:
        result = model.loss_and_grads(**micro_batches[0], training=training, loss_weights=(1.0, sop_weight))
        return result.grads, {"loss": result.loss, **result.parts}

    xp = model.xp
    sizes = [int(mb["sop_labels"].shape[0]) for mb in micro_batches]
    accumulated = FlatBuffer(model.params.shapes, xp, model.dtype)   # zeros, the parameters' layout
    mlm = xp.zeros((), dtype=model.dtype)
    sop = xp.zeros((), dtype=model.dtype)
    for micro_batch, (mlm_share, sop_share) in zip(micro_batches, micro_batch_weights(mlm_counts, sizes)):
        result = model.loss_and_grads(**micro_batch, training=training,
                                      loss_weights=(mlm_share, sop_weight * sop_share))
        _accumulate(accumulated, result.grads)
        mlm = mlm + mlm_share * result.parts["mlm"]
        sop = sop + sop_share * result.parts["sop"]
    return dict(accumulated.items()), {"loss": mlm + sop_weight * sop, "mlm": mlm, "sop": sop}


def effective_batch_loss(model: Model, micro_batches: list, mlm_counts: list, sop_weight: float = 1.0,
                         training: bool = False, dropout_seeds=None):
    """The loss of the effective batch made of ``micro_batches`` (a 0-d array): the forward half of
    :func:`effective_batch_gradients`, ``sum_i model.loss(micro-batch i, loss_weights=(n_i / N,
    w_sop b_i / B))`` added in index order (onto zero). Equal to ``model.loss`` of the whole batch up to
    rounding. The micro-batches are ``Backend.map_shards``' shards: one-thread BLAS each, several side
    by side on the backend's threads, so the value does not depend on the thread count. With
    ``training``, micro-batch i's dropout masks come from ``dropout_seeds[i]`` (required: a shared
    stream drawn from by concurrent shards would give masks in no fixed order)."""
    k = len(micro_batches)
    if k == 0:
        raise ValueError("effective_batch_loss needs at least one micro-batch, got none")
    if len(mlm_counts) != k:
        raise ValueError(f"mlm_counts has {len(mlm_counts)} entries, expected one per micro-batch ({k})")
    if training and (dropout_seeds is None or len(dropout_seeds) != k):
        raise ValueError(f"dropout_seeds must give one seed per micro-batch ({k}) when training, got "
                         f"{dropout_seeds!r}")
    sizes = [int(mb["input_ids"].shape[0]) for mb in micro_batches]
    weights = micro_batch_weights(mlm_counts, sizes)
    total = [model.xp.zeros((), dtype=model.dtype)]

    def shard_loss(i: int):
        mlm_share, sop_share = weights[i]
        return model.loss(**micro_batches[i], training=training, loss_weights=(mlm_share, sop_weight * sop_share),
                          dropout_seed=dropout_seeds[i] if training else None)

    def add(loss):
        total[0] = total[0] + loss

    model.backend.map_shards(shard_loss, range(k), add)
    return total[0]


def micro_batch_weights(mlm_counts: list, sizes: list) -> list:
    """``(n_i / N, b_i / B)`` for each micro-batch i: its share of the labelled MLM positions (0 for
    every micro-batch when there are none: the MLM loss is then 0) and of the examples (module
    docstring). Host floats, from host counts: the same numbers on every rank of a data-parallel run."""
    total_masks, total_examples = int(sum(mlm_counts)), int(sum(sizes))
    return [(n_masks / total_masks if total_masks else 0.0, n_examples / total_examples)
            for n_masks, n_examples in zip(mlm_counts, sizes)]


def _accumulate(accumulated: FlatBuffer, grads: dict) -> None:
    """In place, tensor by tensor: accumulated[name] += grads[name]."""
    for name, view in accumulated.items():
        view += grads[name]
