"""A step's shards on the backend's threads (``Backend.map_shards``): results independent of the thread count.

OpenBLAS splits one float32 product differently on one and two threads, so a whole-batch gradient
computed with 2-thread BLAS differs in its last bits from the 1-thread one (the first test shows it on
the very config the others use, so that they can fail). Computing the batch as micro-batches (shards),
each with one-thread BLAS, several side by side, and summing them in index order makes the parameters
identical to the byte (``tobytes``: signed zeros included) with 1 and 2 threads.
"""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import backends
from ref_bert import Config, Model
from ref_bert.examples import make_batch
from ref_bert.optim import Lamb
from ref_bert.pretrain.accumulation import effective_batch_loss
from ref_bert.pretrain.data_parallel import DataParallel

# Large enough that OpenBLAS runs its products on two threads when it may (hidden 256, FFN 1024, 8 x 128
# tokens), small enough for a second a run.
CONFIG = Config.preset("tiny", hidden_size=256, intermediate_size=1024, embedding_size=128, num_attention_heads=4,
                       num_hidden_layers=2, vocab_size=3000)


def _blas_threads() -> int:
    return max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


@pytest.fixture
def threads():
    """Run a block with ``t`` threads for BLAS and the NumPy backend's own pool; restored afterwards."""
    backend = backends.get("numpy")
    before = backend.threads

    def use(t):
        backend.set_threads(t)
        return threadpool_limits(t, user_api="blas")

    yield use
    backend.set_threads(before)


def _batch(seed=0):
    batch = make_batch(CONFIG, 8, 128, seed, recipe="counted")
    batch.pop("position_ids")
    micro = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    return batch, micro, [int((m["mlm_labels"] != -100).sum()) for m in micro]


def _sharded_training(t, threads, steps=2):
    """Two LAMB steps of the pretraining loop's gradient (two micro-batches, dropout on) at ``t`` threads."""
    _, micro, counts = _batch()
    with threads(t):
        model = Model(CONFIG, dtype="float32", seed=0)
        optimizer = Lamb.from_preset("albert", model.state_dict())
        parallel = DataParallel(backends.comm.SingleProcess(), model)
        losses = []
        for step in range(steps):
            grads, parts = parallel.gradients(model, micro, [0, 1], counts, [4, 4], 1.0, 7, step)
            losses.append(float(parts["loss"]))
            optimizer.step(grads)
    return {k: v.tobytes() for k, v in model.state_dict().items()}, losses


def test_whole_batch_gradient_depends_on_the_blas_thread_count(threads):
    """The premise: on this config one pass over the whole batch with 2-thread BLAS differs from 1-thread
    (if it did not, the tests below could not fail). Dropout seed fixed, so only BLAS differs."""
    batch, _, _ = _batch()
    grads = {}
    for t in (1, 2):
        with threads(t):
            grads[t] = Model(CONFIG, dtype="float32", seed=0).loss_and_grads(
                **batch, training=True, dropout_seed=[3]).grads
    differing = [k for k in grads[1] if grads[1][k].tobytes() != grads[2][k].tobytes()]
    if not differing and _blas_threads_available() < 2:
        pytest.skip("BLAS cannot use two threads here (one core), so the thread count cannot change a product")
    assert differing, "1- and 2-thread BLAS gave identical whole-batch gradients; the premise does not hold here"


def _blas_threads_available() -> int:
    with threadpool_limits(2, user_api="blas"):
        return _blas_threads()


def test_sharded_training_is_identical_with_one_and_two_threads(threads):
    """Parameters after two LAMB steps, byte for byte, and the logged losses, equal with 1 and 2 threads.
    Planting the bug (Backend.map_shards without its one-thread BLAS limit) fails this test and the next."""
    params_1, losses_1 = _sharded_training(1, threads)
    params_2, losses_2 = _sharded_training(2, threads)
    assert losses_1 == losses_2
    assert [k for k in params_1 if params_1[k] != params_2[k]] == []


def test_map_shards_runs_each_shard_with_one_blas_thread_and_combines_in_order(threads):
    backend = backends.get("numpy")
    seen, combined = [], []

    def shard(i):
        seen.append(_blas_threads())
        return i * 10

    with threads(2):
        outer = _blas_threads()
        backend.map_shards(shard, range(5), combined.append)
        assert _blas_threads() == outer    # the limit is lifted afterwards
    assert combined == [0, 10, 20, 30, 40]
    assert seen == [1] * 5


def test_sum_in_order_adds_onto_zero_in_index_order():
    """The first micro-batch's arrays hold the sum, as ``0 + g0 + g1 + ...`` to the bit: -0.0 + 0.0 is
    +0.0, so a gradient of -0.0 everywhere must come back +0.0 (an in-place sum that skipped the
    zero would keep the sign), and the order of the sum must be the index order."""
    model = Model("tiny", dtype="float64", seed=0)
    parallel = DataParallel(backends.comm.SingleProcess(), model)
    name = next(iter(model.params.shapes))
    shape = model.params.shapes[name]
    big = np.full(shape, 1e16)
    parts = {0: -np.zeros(shape), 1: big, 2: np.ones(shape), 3: -big}

    def micro_batch(i):
        grads = {n: np.zeros(s) for n, s in model.params.shapes.items()}
        grads[name] = parts[i].copy()
        return grads, np.array([float(i)])

    grads, terms = parallel.sum_in_order(model, [0, 1, 2, 3], micro_batch)
    expected = ((np.zeros(shape) + parts[0]) + parts[1] + parts[2]) + parts[3]   # 1e16 + 1 rounds to 1e16
    assert grads[name].tobytes() == expected.tobytes() == np.zeros(shape).tobytes()
    single, _ = parallel.sum_in_order(model, [0], micro_batch)
    assert single[name].tobytes() == np.zeros(shape).tobytes()   # +0.0, not the -0.0 it was given
    assert terms.tolist() == [6.0]


def test_effective_batch_loss_equals_the_whole_batch_loss(threads):
    """float64: the sharded eval loss against one pass over the batch. The two differ only in the order
    of a few hundred additions of terms of size ~10, so 1e-12 relative (about 5000 ulps of room) holds
    with a wide margin; measured ~1e-15."""
    batch, micro, counts = _batch(seed=1)
    model = Model(CONFIG, dtype="float64", seed=0)
    whole = float(model.loss(**batch))
    with threads(2):
        sharded = float(effective_batch_loss(model, micro, counts))
    assert sharded == pytest.approx(whole, rel=1e-12)
    # With the SOP term weighted by 3 both ways.
    assert float(effective_batch_loss(model, micro, counts, sop_weight=3.0)) == pytest.approx(
        float(model.loss(**batch, loss_weights=(1.0, 3.0))), rel=1e-12)


def test_effective_batch_loss_rejects_bad_arguments():
    _, micro, counts = _batch()
    model = Model(CONFIG, dtype="float32", seed=0)
    with pytest.raises(ValueError, match="^effective_batch_loss needs at least one micro-batch, got none$"):
        effective_batch_loss(model, [], [])
    with pytest.raises(ValueError, match="mlm_counts has 1 entries"):
        effective_batch_loss(model, micro, counts[:1])
    with pytest.raises(ValueError, match="dropout_seeds must give one seed per micro-batch"):
        effective_batch_loss(model, micro, counts, training=True)
    with pytest.raises(ValueError, match=r"one seed per micro-batch \(2\) when training, got \[7\]"):
        effective_batch_loss(model, micro, counts, training=True, dropout_seeds=[7])


def test_effective_batch_loss_weights_unequal_shards_and_draws_each_ones_masks():
    """Micro-batches of 3 and 5 examples of 128 tokens (so the examples' shares 3/8 and 5/8 come from the
    batch axis), in training mode with one dropout seed each, float32: equal to the byte to the same
    ``model.loss`` calls made one after another and added onto a float32 zero in index order, the
    definition in ref_bert/pretrain/accumulation.py (both with one-thread BLAS, so no rounding may
    differ). The dropout is real: the same micro-batches in eval mode give another loss."""
    batch, _, _ = _batch(seed=2)
    micro = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    counts = [int((m["mlm_labels"] != -100).sum()) for m in micro]
    model = Model(CONFIG, dtype="float32", seed=0)
    seeds = [11, 12]
    got = effective_batch_loss(model, micro, counts, sop_weight=2.0, training=True, dropout_seeds=seeds)
    expected = np.zeros((), dtype=np.float32)
    with threadpool_limits(1, user_api="blas"):
        for m, n, seed in zip(micro, counts, seeds):
            expected = expected + model.loss(**m, training=True, dropout_seed=seed,
                                             loss_weights=(n / sum(counts), 2.0 * len(m["input_ids"]) / 8))
    assert got.dtype == np.float32 and got.shape == ()
    assert got.tobytes() == expected.tobytes()
    evaluated = effective_batch_loss(model, micro, counts, sop_weight=2.0)
    assert abs(float(evaluated) - float(got)) > 1e-3
