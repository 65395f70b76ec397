"""Data-parallel pretraining (ref_bert/pretrain/data_parallel.py, backends/comm.py): two MPI ranks give
the same bits as one process, resume across rank counts, fail cleanly.

The two-rank runs are real ``mpiexec -n 2`` launches (MPICH from the ``mpi`` extra, one BLAS thread per
rank); several runs share one launch (tests/_mpi_pretrain.py) to keep start-up costs down. Every
comparison is bit-for-bit (``np.array_equal`` on every parameter and optimiser moment, ``==`` on every
logged loss and gradient norm): the data-parallel sum adds the micro-batch gradients in the same order
as one process, so there is no rounding to allow for. Dropout is on (the tiny preset's 0.1), so equal
results also say that each micro-batch drew the same masks on whichever rank ran it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backends
from backends import comm as comms
from ref_bert import cli
from ref_bert.config import Config
from ref_bert.data import Tokenizer, default_corpus_path, read_corpus
from ref_bert.model import Model
from ref_bert.pretrain import pretrain, rundir
from ref_bert.pretrain.data_parallel import ShardLayout, check_split
from ref_bert.pretrain.metrics import read_metrics
from tests.test_train import _assert_same_run, _assert_same_tensors, _tensors

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "spiece.model"
    Tokenizer.train(default_corpus_path(), vocab_size=Config.preset("tiny").vocab_size, out_path=path)
    return str(path)


def settings(spiece, out, **changes) -> dict:
    """A 4-step run of the tiny config (dropout on), micro-batches of 2 examples of 32 tokens, one BLAS
    thread in every process (OpenBLAS's threaded products are not always bit-identical to its
    single-threaded ones, and the comparison is about ranks, not threads)."""
    base = dict(out=str(out), tokenizer=spiece, steps=4, batch_size=2, seq_len=32, lr=0.01, warmup=1,
                checkpoint_every=2, keep_checkpoints=0, progress=False, plot=False, sop_weight=1.0, threads=1)
    return {**base, **changes}


@pytest.fixture(scope="module")
def references(spiece, tmp_path_factory) -> dict:
    """One-process runs to compare with: ALBERT with 4-way accumulation, UniLM with 2-way."""
    root = tmp_path_factory.mktemp("references")
    return {"albert": pretrain(**settings(spiece, root / "albert", grad_accum=4)).out_dir,
            "unilm": pretrain(**settings(spiece, root / "unilm", objective="unilm", grad_accum=2)).out_dir}


def mpiexec(ranks: int, args: list, cwd) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks ARGS`` with this environment's Python first on the PATH, one thread per rank."""
    launcher = shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert launcher is not None, ("mpiexec not found: the tests need the mpi extra, installed with the test "
                                  "extra (pip install -e '.[test]' brings mpi4py and mpich)")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([launcher, "-n", str(ranks), *args], cwd=cwd, env=env, capture_output=True, text=True)


def run_jobs(jobs: list, tmp_path, ranks: int = 2) -> subprocess.CompletedProcess:
    spec = tmp_path / f"jobs-{len(list(tmp_path.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    return mpiexec(ranks, [sys.executable, str(ROOT / "tests" / "_mpi_pretrain.py"), str(spec)], tmp_path)


# --- equality -----------------------------------------------------------------------------------------
def test_two_ranks_equal_one_process_and_resume_across_rank_counts(spiece, references, tmp_path):
    """Bit-identical to one process with the same accumulation: ALBERT (4 micro-batches, 2 per rank),
    UniLM with the sharded optimiser (ZeRO 1); a one-process checkpoint resumed on 2 ranks (sharded)
    and a 2-rank checkpoint (sharded, gathered on rank 0) resumed in one process both finish exactly
    as the one-process run."""
    pretrain(**settings(spiece, tmp_path / "one-then-two", grad_accum=4, until=2))
    result = run_jobs([
        {"settings": settings(spiece, tmp_path / "albert", grad_accum=4)},
        {"settings": settings(spiece, tmp_path / "unilm", objective="unilm", grad_accum=2, shard_optimizer=True)},
        {"settings": settings(spiece, tmp_path / "one-then-two", resume=True, shard_optimizer=True)},
        {"settings": settings(spiece, tmp_path / "two-then-one", grad_accum=4, until=2, shard_optimizer=True)},
    ], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = pretrain(**settings(spiece, tmp_path / "two-then-one", resume=True))
    assert resumed.step == 4
    _assert_same_run(references["albert"], tmp_path / "albert", 4)
    _assert_same_run(references["unilm"], tmp_path / "unilm", 4)
    _assert_same_run(references["albert"], tmp_path / "one-then-two", 4)
    _assert_same_run(references["albert"], tmp_path / "two-then-one", 4)


# --- failures -----------------------------------------------------------------------------------------
def _only_checkpoint_is_step_2(out: Path, reference: Path) -> None:
    """OUT's newest (and only) checkpoint is step 2, and it is the reference run's step 2: the same
    tensors bit for bit, the same state but the clock, the same config and tokenizer files. (Not the
    same safetensors bytes: the library writes its metadata keys in an order that varies by process.)"""
    assert [p.name for p in rundir.list_checkpoints(out)] == ["step-000002"]
    assert rundir.resolve_resume(out, True).name == "step-000002"
    ours, theirs = (d / "checkpoints" / "step-000002" for d in (out, reference))
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = _tensors(ours, name), _tensors(theirs, name)
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a), name
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (ours, theirs))
    assert {**sa, "elapsed": None} == {**sb, "elapsed": None}
    for name in ("config.json", "spiece.model"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes_exactly(spiece, references, tmp_path):
    result = run_jobs([{"settings": settings(spiece, tmp_path / "killed", grad_accum=4),
                        "fail": {"rank": 1, "step": 3, "how": "kill"}}], tmp_path)
    assert result.returncode != 0 and "signal 9" in result.stdout + result.stderr, result.stderr[-3000:]
    _only_checkpoint_is_step_2(tmp_path / "killed", references["albert"])
    assert pretrain(**settings(spiece, tmp_path / "killed", resume=True)).step == 4
    _assert_same_run(references["albert"], tmp_path / "killed", 4)


def test_an_exception_on_one_rank_aborts_every_rank_with_its_message(spiece, references, tmp_path):
    result = run_jobs([{"settings": settings(spiece, tmp_path / "raised", grad_accum=4),
                        "fail": {"rank": 1, "step": 3, "how": "raise"}}], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error (rank 1 of 2): ValueError: planted failure on rank 1 after step 3" in result.stderr
    _only_checkpoint_is_step_2(tmp_path / "raised", references["albert"])


def test_a_global_batch_that_does_not_split_over_the_ranks_is_a_clear_error(spiece, tmp_path):
    result = mpiexec(2, [sys.executable, "-m", "ref_bert.cli", "pretrain", "--out", "run", "--tokenizer", spiece,
                         "--steps", "2", "--batch-size", "2", "--grad-accum", "3", "--no-progress"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("error: the global batch of batch_size x grad_accum = 2 x 3 = 6 examples does not split over 2 "
            "ranks x micro-batches of 2: grad_accum=3 must be a multiple of the number of ranks (2)") in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="grad_accum=6 must be a multiple of the number of ranks \\(4\\)"):
        check_split(6, 8, 4)
    check_split(8, 8, 4)


def test_mpi4py_missing_under_a_launcher_is_a_clear_error(spiece, tmp_path, monkeypatch, capsys):
    """Started by ``mpiexec -n 2`` (its PMI_SIZE variable) without mpi4py: exit 2 naming the extra to
    install, before anything is written (else each process would train the whole job on its own)."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # import mpi4py now raises ImportError
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(ValueError, match=r"started by an MPI launcher with 2 processes, but data-parallel "
                                         r"training needs mpi4py.*pip install \"ref-bert\[mpi\]\""):
        comms.communicator("auto", "numpy")
    code = cli.main(["pretrain", "--out", str(tmp_path / "run"), "--tokenizer", spiece, "--steps", "2",
                     "--no-progress"])
    assert code == 2 and "error: this process was started by an MPI launcher" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("PMI_SIZE")
    assert isinstance(comms.communicator("auto", "numpy"), comms.SingleProcess)   # a plain start needs no MPI


def test_communicator_choice_and_the_nccl_path_without_cupy(monkeypatch):
    """The NCCL communicator is importable without CuPy (cupy is imported only when one is made); the
    kinds that cannot work with a backend are refused by name. Running it needs GPUs (docs/performance.md)."""
    assert hasattr(comms.Nccl, "alltoall") and issubclass(comms.Nccl, comms.Communicator)
    with pytest.raises(ValueError, match="comm='nccl' needs the cupy backend"):
        comms.communicator("nccl", "numpy")
    with pytest.raises(ValueError, match="comm='ring' is invalid"):
        comms.communicator("ring", "numpy")
    assert comms.launched_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4 and comms.launched_size({}) == 1
    single = comms.SingleProcess()
    x = np.arange(6.0)
    assert single.allgather(x).shape == (1, 6) and single.any(True) and not single.any(False)
    assert single.broadcast(x) is x and single.broadcast_text("p") == "p"


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shard_layout_cuts_whole_tensors_and_round_trips(size):
    model = Model("tiny", seed=0)
    layout = ShardLayout(model.params, size, model.backend)
    names = [n for shard in layout.names for n in shard]
    assert names == list(model.params.shapes)                         # every tensor once, in order
    assert layout.starts[0] == 0 and layout.stops[-1] == model.params.size
    assert all(layout.stops[r] == layout.starts[r + 1] for r in range(size - 1))   # consecutive ranges
    rows = layout.pack(model.state_dict(), np, model.dtype)
    assert rows.shape == (size, layout.width)
    flat = np.zeros_like(model.params.flat)
    layout.unpack(rows, flat)
    assert np.array_equal(flat, model.params.flat)
    for r in range(size):
        views = layout.shard_views(rows[r], r)
        assert list(views) == layout.names[r]
        assert all(np.array_equal(views[n], model.params[n]) for n in views)


@pytest.mark.gpu
@pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a GPU")
def test_nccl_on_gpus_equals_one_process(spiece, tmp_path):
    """The NCCL communicator: one rank per GPU (two where there are two GPUs; with one GPU, one rank
    still makes every NCCL call), replicated and sharded, bit-identical to one process on one GPU."""
    ranks = min(2, backends.get("cupy").xp.cuda.runtime.getDeviceCount())
    single = pretrain(**settings(spiece, tmp_path / "single", backend="cupy", grad_accum=2))
    result = run_jobs([
        {"settings": settings(spiece, tmp_path / "nccl", backend="cupy", grad_accum=2, comm="nccl")},
        {"settings": settings(spiece, tmp_path / "sharded", backend="cupy", grad_accum=2, comm="nccl",
                              shard_optimizer=True)},
    ], tmp_path, ranks=ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(single.out_dir, tmp_path / "nccl", 4)
    _assert_same_run(single.out_dir, tmp_path / "sharded", 4)


# --- fine-tuning ----------------------------------------------------------------------------------------
def test_two_rank_finetune_equals_one_process(spiece, tmp_path):
    """``mpiexec -n 2 ref-bert finetune``: token tagging (micro-batches weighted by their labelled tokens,
    n_i / N) with dropout on, 4 micro-batches of 2 examples per step (2 per rank): the parameters, the
    optimiser moments, the data position and every logged loss and gradient norm are one process's,
    bit for bit."""
    from ref_bert.finetune import finetune

    words = [w for line in read_corpus(default_corpus_path())[0][:12] for w in line.split()]
    lines = [{"tokens": words[k:k + 5 + k % 4], "tags": ["B" if (k + j) % 3 == 0 else "O" for j in range(5 + k % 4)]}
             for k in range(0, 80, 10)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = dict(task="tokens", train=str(train), tokenizer=spiece, steps=3, batch_size=2, grad_accum=4, seq_len=16,
                  lr=0.01, checkpoint_every=3, threads=1)
    one = finetune(out=str(tmp_path / "one"), progress=False, **common)
    assert one.step == 3
    args = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    result = mpiexec(2, [sys.executable, "-m", "ref_bert.cli", "finetune", "--out", "two", "--no-progress", *args],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: step 3") == 1          # rank 0 reports
    a, b = (Path(d) / "checkpoints" / "step-000003" for d in (one.out_dir, tmp_path / "two"))
    for name in ("model.safetensors", "optimizer.safetensors"):
        _assert_same_tensors(_tensors(a, name), _tensors(b, name))
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (a, b))
    assert {**sa, "elapsed": None} == {**sb, "elapsed": None}
    keys = ("step", "loss", "grad_norm", "lr", "tokens")
    ma, mb = ([{k: r[k] for k in keys} for r in read_metrics(Path(d) / "metrics.jsonl")]
              for d in (one.out_dir, tmp_path / "two"))
    assert [r["step"] for r in ma] == [1, 2, 3] and ma == mb
