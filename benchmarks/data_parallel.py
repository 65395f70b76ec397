"""Data-parallel pretraining: time per step, communication per step, memory per rank.

    mpiexec -n 2 python -m benchmarks.data_parallel --grad-accum 2 --steps 20            # 2 ranks
    python -m benchmarks.data_parallel --grad-accum 2 --steps 20                         # 1 process, same batch
    mpiexec -n 2 python -m benchmarks.data_parallel --config albert-base --vocab-size 1000 --batch-size 2 \
        --seq-len 32 --grad-accum 2 --steps 6 --shard-optimizer                          # ZeRO-1 memory
    mpiexec -n 2 python -m benchmarks.data_parallel --backend cupy --config albert-base  # GPUs (NCCL)

Runs ``ref_bert.pretrain.pretrain`` (one BLAS thread per process, the job's default) into a temporary
directory and prints one JSON line from rank 0:

    step_s            median wall time of a step over the steps after the first two, slowest rank
    examples_per_s    global batch / step_s
    received_bytes_per_step   bytes each rank receives from the others in one step (mean over ranks
                      and steps after the first two), counted at the communicator: allgather
                      (N - 1) x its input, alltoall (N - 1)/N of it, broadcast and gather what arrives
    optimizer_state_bytes     the optimiser moments each rank holds (m and v of its tensors)
    peak_rss_mib_steps        each rank's peak resident set (Linux VmHWM) after step steps - 1, before
                      the final checkpoint (which, sharded, gathers the whole optimiser state on rank 0)
    peak_rss_mib      the same after the run, the final checkpoint included
A data-parallel run's results do not depend on N (tests/test_data_parallel.py); only these do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np

import backends
import backends.comm
from ref_bert.model import Model
from ref_bert.pretrain import pretrain
from ref_bert.pretrain.data_parallel import ShardLayout, peak_resident_mib
from ref_bert.pretrain.settings import resolve_model_config


class CountingCommunicator(backends.comm.Communicator):
    """A communicator that forwards to another and counts the bytes this rank receives from others."""

    def __init__(self, inner):
        self.inner, self.rank, self.size, self.name = inner, inner.rank, inner.size, inner.name
        self.received = 0

    def allgather(self, x):
        self.received += (self.size - 1) * x.nbytes
        return self.inner.allgather(x)

    def alltoall(self, x):
        self.received += (self.size - 1) * x.nbytes // self.size
        return self.inner.alltoall(x)

    def gather(self, x, root=0):
        self.received += (self.size - 1) * x.nbytes if self.rank == root else 0
        return self.inner.gather(x, root)

    def broadcast(self, x, root=0):
        self.received += x.nbytes if self.rank != root else 0
        return self.inner.broadcast(x, root)

    def any(self, flag):
        return self.inner.any(flag)

    def broadcast_text(self, text, root=0):
        return self.inner.broadcast_text(text, root)

    def barrier(self):
        self.inner.barrier()

    def abort(self, code):
        self.inner.abort(code)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_parallel", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shard-optimizer", action="store_true")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the config's vocab_size (to use a tokenizer trained for another size)")
    args = parser.parse_args(argv)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    comm = CountingCommunicator(backends.comm.communicator("auto", args.backend))
    step_times, received, clock = [], [], [time.perf_counter(), 0]
    peak_before_checkpoint = [float("nan")]

    def on_step(step, metrics):
        if step == args.steps - 1:   # the high-water mark of the training steps, before the final checkpoint
            peak_before_checkpoint[0] = peak_resident_mib() or float("nan")
        now = time.perf_counter()
        step_times.append(now - clock[0])
        received.append(comm.received - clock[1])
        clock[0], clock[1] = now, comm.received

    with tempfile.TemporaryDirectory() as scratch:
        out = comm.broadcast_text(scratch)   # rank 0's directory: one run directory for the job
        clock[0], clock[1] = time.perf_counter(), comm.received
        pretrain(out=f"{out}/run", config=args.config, config_overrides=overrides, tokenizer=args.tokenizer,
                 backend=args.backend,
                 steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                 shard_optimizer=args.shard_optimizer, checkpoint_every=args.steps, log_every=args.steps,
                 progress=False, plot=False, comm=comm, on_step=on_step)
        comm.barrier()
    model = Model(resolve_model_config(args.config, overrides), backend=args.backend, seed=0)
    layout = ShardLayout(model.params, comm.size, model.backend)
    own = (layout.stops[comm.rank] - layout.starts[comm.rank]) if args.shard_optimizer else model.params.size
    timed = slice(2, None) if len(step_times) > 2 else slice(None)
    mine = np.array([statistics.median(step_times[timed]), float(np.mean(received[timed])),
                     2 * own * model.dtype.itemsize, peak_before_checkpoint[0], peak_resident_mib() or float("nan")])
    rows = backends.get("numpy").to_host(comm.inner.allgather(model.xp.asarray(mine)) if comm.size > 1 else mine[None])
    if comm.rank == 0:
        step_s = float(rows[:, 0].max())
        print(json.dumps({
            "ranks": comm.size, "comm": comm.name, "config": args.config, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "grad_accum": args.grad_accum,
            "global_batch": args.batch_size * args.grad_accum,
            "shard_optimizer": args.shard_optimizer, "steps": args.steps, "step_s": round(step_s, 4),
            "examples_per_s": round(args.batch_size * args.grad_accum / step_s, 1),
            "parameters": model.params.size, "received_bytes_per_step": int(rows[:, 1].mean()),
            "optimizer_state_bytes": [int(v) for v in rows[:, 2]],
            "peak_rss_mib_steps": [round(float(v), 1) for v in rows[:, 3]],
            "peak_rss_mib": [round(float(v), 1) for v in rows[:, 4]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
