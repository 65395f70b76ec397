"""Data parallelism: N processes train one model on disjoint shares of every global batch, with the
same numbers, to the last bit, as one process accumulating the same micro-batches.

The collectives go through a :class:`backends.comm.Communicator` (one process: the identity; MPI on
CPUs; NCCL on GPUs), so the loop has one code path. docs/reference.md §10 gives the facts it rests on.

The global batch of a step is ``k = grad_accum`` micro-batches of ``b = batch_size`` examples, numbered
i = 0 .. k-1 in the data stream's order. With N ranks (k must be a multiple of N):

    share      rank r computes micro-batches r, r + N, r + 2N, ... (round robin: k / N of them);
               every rank reads the whole stream on the host (cheap next to the model), so the data
               position is the same on every rank and a checkpoint needs only one
    weights    micro-batch i's loss weights (n_i / n, w_sop b_i / B) come from the host-side counts
               of the whole global batch (accumulation.py), so every rank knows all of them
    dropout    micro-batch i draws its masks from default_rng([seed, DROPOUT_KEY, step, i]): a
               function of the example's place in the global batch, not of the rank that runs it
    gradient   the parameters are cut into N shards of whole tensors (:class:`ShardLayout`). After
               each of its micro-batches, rank r sends shard j of that micro-batch's gradient to rank j
               (all-to-all); round t delivers micro-batches tN .. tN + N - 1 in order, so rank j adds
               shard j of micro-batch 0, 1, 2, ..., k - 1 onto zeros in index order: exactly the
               additions one process makes accumulating them (accumulation.py). The sum's order
               depends on k, never on N, which is what makes N ranks bit-identical to one.
    update     replicated (default): the summed shards are all-gathered, every rank holds the whole
               gradient and the whole optimiser state and makes the same update;
               sharded (ZeRO stage 1, ``shard_optimizer``): rank j keeps the moments of shard j's
               tensors only and updates those; the parameters are then all-gathered. Shards are whole
               tensors, so LAMB's per-tensor norms (||w||, ||u||) are computed on the owner exactly as
               unsharded; the global gradient norm for clipping is the square root of the per-piece
               sums of squares (``Backend.pieces``) gathered from all ranks and added in the
               parameters' order, as ``optim.global_grad_norm`` adds them.
    losses     each rank's weighted per-micro-batch losses are all-gathered and added in index order.

Communication per step and rank, for P parameters of s bytes: the all-to-all sends (N - 1)/N of each
of its k/N micro-batch gradients ((k/N)(N - 1)/N P s bytes), the all-gather receives (N - 1)/N P s
bytes (gradient shards, or parameters when sharded); for k = N that is ring all-reduce's 2 (N - 1)/N
P s. The per-micro-batch all-to-all trades volume for exactness when k > N.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import sys
from typing import Optional

from backends.comm import Communicator

from ..model import Model
from ..optim import global_grad_norm, make_optimizer
from ..optim.norms import sum_of_squares
from ..params import FlatBuffer
from .accumulation import micro_batch_weights

__all__ = ["DataParallel", "ShardLayout", "DROPOUT_KEY", "dropout_seed", "check_split", "peak_resident_mib",
           "every_rank_ends_on_error"]

# Dropout seeds [seed, DROPOUT_KEY, step, micro-batch index]: their own SeedSequence key, so that they
# never coincide with the weights' default_rng(seed), the model's own dropout stream
# default_rng([seed, 1]) or the data's generators (batches.DATA_STREAM_KEY).
DROPOUT_KEY = 0xD209


def dropout_seed(seed: int, step: int, index: int) -> list:
    """The dropout seed of micro-batch ``index`` of the step after ``step`` updates."""
    return [int(seed), DROPOUT_KEY, int(step), int(index)]


@contextlib.contextmanager
def every_rank_ends_on_error(comm: Communicator):
    """An exception on one rank ends every rank of a data-parallel job (MPI_Abort; exit status 2 for a
    ValueError, 130 for Ctrl-C), rather than leaving the others waiting in a collective forever."""
    try:
        yield
    except BaseException as e:
        if comm.size > 1:
            print(f"error (rank {comm.rank} of {comm.size}): {type(e).__name__}: {e}", file=sys.stderr)
            comm.abort(2 if isinstance(e, ValueError) else 130 if isinstance(e, KeyboardInterrupt) else 1)
        raise


def check_split(grad_accum: int, batch_size: int, size: int) -> None:
    """ValueError unless the global batch splits into whole micro-batches, the same number per rank."""
    if grad_accum % size:
        raise ValueError(
            f"the global batch of batch_size x grad_accum = {batch_size} x {grad_accum} = "
            f"{batch_size * grad_accum} examples does not split over {size} ranks x micro-batches of "
            f"{batch_size}: grad_accum={grad_accum} must be a multiple of the number of ranks ({size}), "
            f"e.g. --grad-accum {size * max(1, round(grad_accum / size))}")


class ShardLayout:
    """The flat parameter buffer cut into ``size`` shards of whole, consecutive tensors.

    Tensor t (starting at flat offset o_t of P) goes to shard min(size - 1, floor(o_t size / P)).
    ``starts[r]:stops[r]`` is shard r's range in the flat buffer, ``names[r]`` its tensors; ``width``
    the longest shard, the row length of the padded (size, width) arrays the collectives move.
    ``pieces[r]`` is how many ``Backend.pieces`` shard r's tensors make (for the gradient norm).
    """

    def __init__(self, params: FlatBuffer, size: int, backend):
        total = params.size
        self.size = size
        self.names = [[] for _ in range(size)]
        self.starts, self.stops = [0] * size, [0] * size
        self.offsets = {}
        self.pieces = [0] * size
        offset = 0
        for name, shape in params.shapes.items():
            n = math.prod(shape)
            shard = min(size - 1, offset * size // total)
            if not self.names[shard]:
                self.starts[shard] = offset
            self.names[shard].append(name)
            self.offsets[name] = (shard, offset - self.starts[shard], n)
            self.stops[shard] = offset + n
            self.pieces[shard] += len(backend.pieces(params[name]))
            offset += n
        for r in range(size):   # an empty shard is the empty range at its successor's start
            if not self.names[r]:
                self.starts[r] = self.stops[r] = self.stops[r - 1] if r else 0
        self.width = max(1, max(b - a for a, b in zip(self.starts, self.stops)))
        self.total = total
        self.shapes = params.shapes

    def pack(self, tensors: dict, xp, dtype):
        """(size, width): row r holds shard r's tensors of ``tensors`` (name -> array), zero-padded."""
        rows = xp.zeros((self.size, self.width), dtype=dtype)
        for name, (shard, start, n) in self.offsets.items():
            rows[shard, start:start + n] = tensors[name].reshape(-1)
        return rows

    def pack_shard(self, tensors: dict, shard: int, xp, dtype):
        """(width,): shard ``shard``'s tensors of ``tensors`` (which may hold only those), zero-padded."""
        row = xp.zeros(self.width, dtype=dtype)
        for name in self.names[shard]:
            _, start, n = self.offsets[name]
            row[start:start + n] = tensors[name].reshape(-1)
        return row

    def unpack(self, rows, out_flat) -> None:
        """Write the (size, width) rows' shards into the flat buffer ``out_flat`` (P,)."""
        for r in range(self.size):
            out_flat[self.starts[r]:self.stops[r]] = rows[r, :self.stops[r] - self.starts[r]]

    def shard_views(self, row, shard: int) -> dict:
        """name -> view into ``row`` (width,) for shard ``shard``'s tensors, shaped like the parameters."""
        views = {}
        for name in self.names[shard]:
            _, start, n = self.offsets[name]
            views[name] = row[start:start + n].reshape(self.shapes[name])
        return views


class DataParallel:
    """The collective side of a training step for one rank (module docstring).

    ``comm``: the communicator; ``model``: this rank's model (every rank builds the same one and
    rank 0's parameters are broadcast); ``shard_optimizer``: ZeRO stage 1.
    """

    def __init__(self, comm: Communicator, model: Model, shard_optimizer: bool = False):
        self.comm = comm
        self.sharded = bool(shard_optimizer)
        self.layout = ShardLayout(model.params, comm.size, model.backend)
        if self.sharded and not all(self.layout.names):
            raise ValueError(f"shard_optimizer needs at least one parameter tensor per rank; the model has "
                             f"{len(model.params.shapes)} tensors for {comm.size} ranks")
        self.shapes = model.params.shapes

    @property
    def rank(self) -> int:
        return self.comm.rank

    def own_micro_batches(self, grad_accum: int, batch_size: int) -> list:
        """The global indices of this rank's micro-batches: rank, rank + N, rank + 2N, ... Every rank
        must get as many (else the collectives would wait forever): checked here, where the split is
        made, as well as before the run starts."""
        check_split(grad_accum, batch_size, self.comm.size)
        return list(range(self.comm.rank, grad_accum, self.comm.size))

    def make_optimizer(self, name: str, model: Model, lr: float):
        """The optimiser: over every parameter (replicated), or over this rank's shard's tensors."""
        if not self.sharded:
            return make_optimizer(name, model.state_dict(), lr)
        return make_optimizer(name, {n: model.params[n] for n in self.layout.names[self.rank]}, lr)

    def broadcast_parameters(self, model: Model) -> None:
        """Rank 0's parameters onto every rank (the same seed makes them equal already; this makes sure)."""
        self.comm.broadcast(model.params.flat, root=0)

    def gradients(self, model: Model, micro_batches: list, indices: list, mlm_counts: list, sizes: list,
                  sop_weight: float, seed: int, step: int):
        """This rank's micro-batches' gradients, reduced over the global batch in index order.

        Returns ``(grads, parts)``: grads name -> array, every parameter (replicated) or this rank's
        shard's tensors (sharded); parts ``{"loss", "mlm", "sop"}`` 0-d arrays of the global batch,
        equal on every rank (accumulation.py's definitions).
        """
        xp = model.xp
        weights = micro_batch_weights(mlm_counts, sizes)
        by_index = dict(zip(indices, micro_batches))

        def micro_batch(i: int):
            mlm_share, sop_share = weights[i]
            result = model.loss_and_grads(**by_index[i], training=True,
                                          loss_weights=(mlm_share, sop_weight * sop_share),
                                          dropout_seed=dropout_seed(seed, step, i))
            return result.grads, xp.stack([mlm_share * result.parts["mlm"], sop_share * result.parts["sop"]])

        grads, (mlm, sop) = self.sum_in_order(model, indices, micro_batch)
        return grads, {"loss": mlm + sop_weight * sop, "mlm": mlm, "sop": sop}

    def sum_in_order(self, model: Model, indices: list, micro_batch, independent: bool = True):
        """The sum over the global batch's micro-batches 0 .. k-1, in index order, of each one's gradient
        and loss terms, whatever the number of ranks: the exactness scheme of the module docstring for
        any objective (pretraining's :meth:`gradients`, ``ref-bert finetune``'s step).

        ``indices``: this rank's micro-batches (:meth:`own_micro_batches`); ``micro_batch(i)`` computes
        micro-batch i on this rank: ``(grads, terms)``, its weighted gradient (name -> array, arrays of
        its own: the first one's become the sum's) and a 1-D array of its weighted loss terms. Returns
        ``(grads, terms)``: the summed gradient (every parameter, or this rank's shard's tensors when
        sharded) and the summed terms, the same on every rank.

        Threads: with ``independent`` (each micro-batch draws its own dropout masks, from its own seed)
        the micro-batches are the shards of ``Backend.map_shards``: each computed with one-thread BLAS,
        several side by side on the backend's threads, so the sum is the same bit for bit whatever the
        thread count. Otherwise (masks drawn in turn from the model's one stream) they run one after
        another, with BLAS as configured.
        """
        xp, dtype, comm, layout = model.xp, model.dtype, self.comm, self.layout
        def run(fn, items, combine):   # map_shards, or (one shared generator) one after another, BLAS as set
            if independent:
                return model.backend.map_shards(fn, items, combine)
            for result in map(fn, items):
                combine(result)
        if comm.size == 1 and not self.sharded:
            # One process: the same additions onto zeros in index order, without packing gradients into
            # rows for collectives that would only copy them. The first micro-batch's arrays hold the
            # sum: ``g += 0`` is ``0 + g`` to the bit (it turns -0.0 into +0.0, as adding onto zeros does),
            # so no zero-filled buffer is needed beside the micro-batches' own.
            total = {}

            def add(result):
                grads, terms = result
                if not total:
                    for view in grads.values():
                        view += 0
                    total["grads"], total["terms"] = grads, xp.zeros(terms.shape[0], dtype=dtype) + terms
                    return
                for name, view in total["grads"].items():
                    view += grads[name]
                total["terms"] = total["terms"] + terms

            run(micro_batch, indices, add)
            return total["grads"], total["terms"]
        shard = xp.zeros(layout.width, dtype=dtype)   # this rank's shard of the summed gradient
        own_terms = []

        def exchange(result):   # on the calling thread, in index order: the collectives' order
            grads, terms = result
            received = comm.alltoall(layout.pack(grads, xp, dtype))   # row j: micro-batch i - rank + j
            for row in received:
                shard[...] += row
            own_terms.append(terms)

        run(micro_batch, indices, exchange)
        width = own_terms[0].shape[0]
        # (N, k/N, m) -> (k, m) in index order: micro-batch t N + j is rank j's t-th
        gathered = comm.allgather(xp.stack(own_terms).reshape(-1)).reshape(comm.size, len(indices), width)
        total = xp.zeros(width, dtype=dtype)
        for row in gathered.transpose(1, 0, 2).reshape(-1, width):
            total = total + row
        if self.sharded:
            return layout.shard_views(shard, self.rank), total
        full = FlatBuffer(self.shapes, xp, dtype)
        layout.unpack(comm.allgather(shard), full.flat)
        return dict(full.items()), total

    def grad_norm(self, grads: dict, model: Model):
        """The global gradient norm, a 0-d array equal on every rank (and to ``global_grad_norm`` of the
        whole gradient, bit for bit)."""
        if not self.sharded:
            return global_grad_norm(grads.values(), model.xp)
        xp, backend, layout = model.xp, model.backend, self.layout
        own = [piece for name in layout.names[self.rank] for (piece,) in backend.pieces(grads[name])]
        sums = xp.zeros(max(layout.pieces), dtype=model.dtype)
        if own:
            sums[:len(own)] = xp.stack(backend.parallel_map(sum_of_squares, own))
        rows = self.comm.allgather(sums)
        ordered = [rows[r, j] for r in range(self.comm.size) for j in range(layout.pieces[r])]
        return xp.sqrt(functools.reduce(operator.add, ordered))

    def update(self, optimizer, grads: dict, lr: float, grad_norm, model: Model) -> None:
        """The optimiser step; sharded, then the updated parameters all-gathered onto every rank."""
        if not self.sharded:
            optimizer.step(grads, lr=lr)
            return
        optimizer.step(grads, lr=lr, grad_norm=grad_norm)
        rows = self.comm.allgather(self.layout.pack_shard(model.params, self.rank, model.xp, model.dtype))
        self.layout.unpack(rows, model.params.flat)

    def checkpoint_optimizer(self, optimizer, model: Model):
        """What rank 0 saves for ``optimizer``: itself (replicated), or, sharded, the whole state
        gathered on rank 0 (every rank must call this; ranks other than 0 get None)."""
        if not self.sharded:
            return optimizer
        xp, dtype, layout = model.xp, model.dtype, self.layout
        own = optimizer.state_dict()
        gathered = []
        for moments in (optimizer.exp_avg, optimizer.exp_avg_sq):   # one at a time: rank 0 holds one (N, width)
            rows = self.comm.gather(layout.pack_shard(moments, self.rank, xp, dtype), root=0)
            if self.rank == 0:
                whole = FlatBuffer(self.shapes, xp, dtype)
                layout.unpack(rows, whole.flat)
                gathered.append(whole)
            del rows
        if self.rank != 0:
            return None
        exp_avg, exp_avg_sq = gathered
        tensors = {}
        for name in self.shapes:
            tensors[f"exp_avg/{name}"] = exp_avg[name]
            tensors[f"exp_avg_sq/{name}"] = exp_avg_sq[name]
        return _GatheredOptimizerState({"step": own["step"], "tensors": tensors, "hyper": own["hyper"]})

    def restorable(self, optimizer):
        """What a checkpoint's (whole) optimiser state is loaded into: ``optimizer`` itself
        (replicated), or, sharded, an adapter that hands it this rank's tensors only."""
        return optimizer if not self.sharded else _ShardOfState(optimizer, self.layout.names[self.rank])


class _ShardOfState:
    """``load_state_dict`` of a sharded optimiser from a whole state: the shard's tensors only."""

    def __init__(self, optimizer, names: list):
        self.optimizer = optimizer
        self.keys = {f"{kind}/{name}" for name in names for kind in ("exp_avg", "exp_avg_sq")}

    def load_state_dict(self, state) -> None:
        tensors = state.get("tensors") if isinstance(state, dict) else None
        if isinstance(tensors, dict):
            state = {**state, "tensors": {k: v for k, v in tensors.items() if k in self.keys}}
        self.optimizer.load_state_dict(state)


class _GatheredOptimizerState:
    """A sharded optimiser's whole state, gathered for rank 0's checkpoint (``state_dict()`` only)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def peak_resident_mib() -> Optional[float]:
    """This process's peak resident set (Linux VmHWM) in MiB, None where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

