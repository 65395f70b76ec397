"""Run under ``mpiexec -n N python tests/_mpi_pretrain.py SPEC.json`` by tests/test_data_parallel.py.

SPEC.json is a list of jobs, run one after another in the same MPI processes (one launch, several
runs): each is ``{"settings": {...pretrain keywords...}}``, optionally with ``"fail": {"rank": r,
"step": s, "how": "kill" | "raise"}``: after step s, rank r kills itself (SIGKILL) or raises a
ValueError from ``on_step``. Each process writes nothing of its own; rank 0 writes the runs' OUT.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from ref_bert.pretrain import pretrain


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        fail = job.get("fail")

        def on_step(step, metrics, fail=fail):
            from mpi4py import MPI

            if fail and MPI.COMM_WORLD.Get_rank() == fail["rank"] and step == fail["step"]:
                if fail["how"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError(f"planted failure on rank {fail['rank']} after step {step}")

        pretrain(on_step=on_step if fail else None, **job["settings"])


if __name__ == "__main__":
    main(sys.argv[1])
