"""Fault tests of the run directory and the loaders (issue 12): one writer per run directory, kill -9 at
random moments and inside publishing and pruning, a full disk, a poisoned update, resumes that never
destroy newer work, and configs that claim more than their weights hold.

Runs are a few steps of a one-layer tiny model (batch 2 x 16 tokens) with a checkpoint every step;
a SentencePiece model is trained once per module. The kill tests start the run in a child process
(tests/_kill_child.py) and SIGKILL it; everything else runs in-process.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ref_bert import checkpoint as ckpt
from ref_bert import files
from ref_bert.config import Config
from ref_bert.data import Tokenizer, default_corpus_path
from ref_bert.model import Model
from ref_bert.pretrain import pretrain, rundir
from ref_bert.pretrain.metrics import read_metrics

HERE = Path(__file__).parent
RUN = dict(steps=6, batch_size=2, seq_len=16, checkpoint_every=1, keep_checkpoints=2, progress=False, plot=False,
           threads=1, warmup=1, lr=0.01, config_overrides={"num_hidden_layers": 1})


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "spiece.model"
    Tokenizer.train(default_corpus_path(), vocab_size=Config.preset("tiny").vocab_size, out_path=path)
    return str(path)


@pytest.fixture(scope="module")
def straight(spiece, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    return pretrain(out=str(tmp_path_factory.mktemp("straight") / "run"), tokenizer=spiece, **RUN).out_dir


def _digest(directory) -> dict:
    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name   # same bytes: the writer is reproducible
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (a, b))
    for key in ("step", "optimizer", "dropout_rng", "data", "run", "tokens"):
        assert sa[key] == sb[key], key


def _losses(out) -> list:
    return [(r["step"], r["loss"], r["mlm"], r["sop"], r["grad_norm"]) for r in read_metrics(Path(out) / "metrics.jsonl")]


# --- one writer per run directory --------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_releases_the_lock(spiece, tmp_path):
    out = tmp_path / "run"
    with files.claim_run_directory(out):
        with pytest.raises(files.RunDirectoryBusy, match=rf"{out} is in use by another run \(pid {os.getpid()} on host"):
            pretrain(out=str(out), tokenizer=spiece, **RUN)
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    # A holder killed with SIGKILL: the operating system drops its flock, so the next writer gets in.
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from ref_bert import files; "
                              "held = files.claim_run_directory(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                              str(out)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
                             env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(files.RunDirectoryBusy, match=f"pid {child.pid}"):
        files.claim_run_directory(out)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    files.claim_run_directory(out).release()


def test_an_out_that_is_not_this_run_is_refused_unless_overwrite(spiece, tmp_path, straight):
    hf_dir = tmp_path / "hf"
    Model(Config.preset("tiny", num_hidden_layers=1, ffn_output_dropout=False)).save_hf(hf_dir)
    before = _digest(hf_dir)
    with pytest.raises(ValueError, match=r"is an existing directory that is not a pretraining run \(it holds "
                                         r"config.json, model.safetensors\).*--overwrite"):
        pretrain(out=str(hf_dir), tokenizer=spiece, **RUN)
    assert _digest(hf_dir) == before
    # Resuming another run's checkpoint into an existing run would write over that run.
    other = pretrain(out=str(tmp_path / "other"), tokenizer=spiece, **{**RUN, "steps": 2}).out_dir
    before = _digest(other)
    with pytest.raises(ValueError, match="holds another pretraining run"):
        pretrain(out=str(other), resume=str(straight / "checkpoints" / "step-000005"), progress=False, plot=False)
    assert _digest(other) == before
    # With overwrite the run replaces the directory's files, and OUT is a model directory of this run.
    result = pretrain(out=str(hf_dir), tokenizer=spiece, overwrite=True, **{**RUN, "steps": 1})
    assert ckpt.directory_kind(hf_dir) == ckpt.REF_BERT_DIRECTORY and result.step == 1
    # Overwriting a run leaves none of its files to be read as this run's: a stale tokenizer setting (this
    # run's tokenizer has the defaults, so it writes no tokenizer_config.json) or a stale evaluation.
    (other / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    (other / "eval.json").write_text('{"step": 2}')
    pretrain(out=str(other), tokenizer=spiece, overwrite=True, **{**RUN, "steps": 1})
    assert not (other / "tokenizer_config.json").exists() and not (other / "eval.json").exists()
    assert [p.name for p in rundir.list_checkpoints(other)] == ["step-000001"]
    # A run that stopped before its first checkpoint left only its own files (no weights, no latest): the
    # same command runs again, and nothing of the failed start (a tokenizer setting) stays.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.jsonl").write_text("")
    (failed / "spiece.model").write_bytes(Path(spiece).read_bytes())
    (failed / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    assert pretrain(out=str(failed), tokenizer=spiece, **{**RUN, "steps": 1}).step == 1
    assert not (failed / "tokenizer_config.json").exists()
    (failed / "latest").unlink()                          # not a run any more, but holds weights: refused
    files.remove_directory(failed / "checkpoints")
    with pytest.raises(ValueError, match="is an existing directory that is not a pretraining run"):
        pretrain(out=str(failed), tokenizer=spiece, **{**RUN, "steps": 1})


# --- never publish a poisoned update ----------------------------------------------------------------
def test_an_update_that_makes_the_weights_non_finite_is_never_published(spiece, tmp_path):
    """AdamW at lr 1e39 with one warmup step: step 1 runs at rate 0 (finite), step 2's update overflows
    the weights to inf while its loss (computed before the update) is finite. Before the fix step 2
    was published as the newest checkpoint and as OUT/model.safetensors, and step 3's error recommended it."""
    out = tmp_path / "run"
    with np.errstate(all="ignore"):
        with pytest.raises(ValueError, match=r"the update of step 2 made parameter '.*' non-finite .* the newest "
                                             r"checkpoint, all finite, is .*step-000001"):
            pretrain(out=str(out), tokenizer=spiece, **{**RUN, "optimizer": "adamw", "lr": 1e39, "warmup": 2})
    assert [p.name for p in rundir.list_checkpoints(out)] == ["step-000001"]
    assert files.read_pointer(out / "latest").name == "step-000001"
    ckpt.load_model(out)            # refuses non-finite weights: OUT is finite
    ckpt.load_model(out / "checkpoints" / "step-000001")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]   # step 2's loss was finite
    # A checkpoint poisoned by an older ref-bert is refused on loading (unless asked for).
    weights, _ = files.load_tensors(out / "model.safetensors")
    weights["pooler.bias"][0] = np.nan
    files.save_tensors(out / "model.safetensors", weights)
    with pytest.raises(ValueError, match=r"tensor 'pooler.bias' has 1 non-finite values"):
        ckpt.load_model(out)
    assert np.isnan(ckpt.load_model(out, allow_nonfinite=True).params["pooler.bias"][0])


# --- resume never destroys newer work ---------------------------------------------------------------
def test_resume_from_an_earlier_checkpoint_moves_the_newer_work_aside(spiece, tmp_path, straight):
    out = pretrain(out=str(tmp_path / "run"), tokenizer=spiece, **{**RUN, "keep_checkpoints": 0}).out_dir
    newer = {name: _digest(out / "checkpoints" / name) for name in ("step-000005", "step-000006")}
    full_metrics = (out / "metrics.jsonl").read_bytes()
    result = pretrain(out=str(out), resume=str(out / "checkpoints" / "step-000004"), until=5, progress=False,
                      plot=False)
    assert result.step == 5
    archive = out / "superseded" / "after-step-000004"
    assert {name: _digest(archive / "checkpoints" / name) for name in newer} == newer
    assert (archive / "metrics.jsonl").read_bytes() == full_metrics
    assert files.read_pointer(archive / "latest").name == "step-000006"
    assert [p.name for p in rundir.list_checkpoints(out)][-2:] == ["step-000004", "step-000005"]
    # The run's own line continues exactly; the archived line is itself a run that resumes.
    pretrain(out=str(out), resume=True, progress=False, plot=False)
    _assert_same_checkpoint(straight / "checkpoints" / "step-000006", out / "checkpoints" / "step-000006")
    assert _losses(out) == _losses(straight)
    with pytest.raises(ValueError, match="nothing to resume"):
        pretrain(out=str(archive), resume=True, progress=False, plot=False)


def test_resume_into_a_new_out_branches_with_the_source_runs_history(spiece, tmp_path, straight):
    before = _digest(straight)
    branch = pretrain(out=str(tmp_path / "branch"), resume=str(straight / "checkpoints" / "step-000005"),
                      progress=False, plot=False)
    assert _digest(straight) == before                       # the source run is untouched
    assert [r["step"] for r in branch.history] == list(range(1, 7))
    assert _losses(branch.out_dir) == _losses(straight)
    _assert_same_checkpoint(straight / "checkpoints" / "step-000006", branch.out_dir / "checkpoints" / "step-000006")


def test_resume_with_until_at_or_before_the_checkpoint_is_refused_and_writes_nothing(spiece, tmp_path):
    out = pretrain(out=str(tmp_path / "run"), tokenizer=spiece, **{**RUN, "until": 3}).out_dir
    before = _digest(out)
    for until in (2, 3):
        with pytest.raises(ValueError, match=rf"until={until} is invalid: checkpoint .*step-000003 is already at step 3"):
            pretrain(out=str(out), resume=True, until=until, progress=False, plot=False)
    assert _digest(out) == before


# --- publishing and pruning, interrupted ------------------------------------------------------------
class _Killed(BaseException):
    """Stands in for SIGKILL in-process: raised at a fault point, caught by nothing in ref-bert."""


def test_publish_killed_between_its_two_renames_is_recovered(tmp_path, monkeypatch):
    final = tmp_path / "step-000001"
    files.publish_directory(final, lambda d: (d / "a").write_text("old"))

    def kill(name):
        if name == "publish-between-renames":
            raise _Killed

    monkeypatch.setattr(files, "_fault_point", kill)
    with pytest.raises(_Killed):
        files.publish_directory(final, lambda d: (d / "a").write_text("new"))
    assert not final.exists()                      # the moment the old code lost the directory for good
    files.remove_staging(tmp_path)
    assert (final / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]


def test_pruning_never_leaves_a_half_deleted_checkpoint_under_its_name(tmp_path, monkeypatch):
    target = tmp_path / "step-000001"
    files.publish_directory(target, lambda d: [(d / n).write_text(n) for n in ("config.json", "model.safetensors")])

    def kill(name):
        raise _Killed

    monkeypatch.setattr(files, "_fault_point", kill)
    with pytest.raises(_Killed):
        files.remove_directory(target)
    assert not target.exists() and [p.name.endswith(".del") for p in tmp_path.iterdir()] == [True]
    assert files.remove_staging(tmp_path) and not list(tmp_path.iterdir())


def _kill_child(out: Path, spiece: str, settings: dict, *, after_step: int = 0, delay: float = 0.0,
                fault: str | None = None) -> tuple[int, list]:
    """Run tests/_kill_child.py (the run, resumed if OUT holds one) and SIGKILL it ``delay`` seconds after it
    reports ``after_step`` (or let REF_BERT_FAULT_POINT kill it). Returns the child's exit status and the
    clock times at which it reported its steps."""
    import time

    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("REF_BERT_FAULT_POINT", None)
    if fault:
        env["REF_BERT_FAULT_POINT"] = fault
    child = subprocess.Popen([sys.executable, str(HERE / "_kill_child.py"), str(out), spiece, json.dumps(settings)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    reported = []
    for line in child.stdout:
        reported.append(time.perf_counter())
        if fault is None and int(line) >= after_step:
            time.sleep(delay)   # not a limit: places the kill at a random moment of the next steps
            child.send_signal(signal.SIGKILL)
            break
    child.stdout.close()
    return child.wait(), reported


def test_kill_9_at_random_moments_and_inside_publishing_and_pruning_then_resume_is_bit_identical(
        spiece, tmp_path, straight):
    """Three SIGKILLs of the 6-step run: one inside pruning (after step 1's checkpoint is renamed away,
    before it is deleted); one at a random moment after the resumed child's first step, 0 to 0.8 times
    the step time measured on the first child (a checkpoint is written every step, so it lands in a
    step, a checkpoint write, a pointer update or pruning); one between publishing a checkpoint and
    pointing OUT/latest at it. Then resume to the end: the result must be the uninterrupted run's, bit
    for bit, with nothing lost and no leftovers."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out = tmp_path / "run"
    code, reported = _kill_child(out, spiece, RUN, fault="remove-after-rename")
    codes = [code]
    assert [p.name for p in rundir.list_checkpoints(out)] == ["step-000002", "step-000003"]   # step 1 renamed away
    step_time = reported[1] - reported[0]   # one step and its checkpoint, on this machine
    # Resumed at step 3, killed a random time after step 4: in step 5 or its checkpoint (rarely early in 6).
    codes.append(_kill_child(out, spiece, RUN, after_step=4, delay=rng.uniform(0, 0.8 * step_time))[0])
    newest = rundir.checkpoint_step(files.read_pointer(out / "latest"))
    codes.append(_kill_child(out, spiece, RUN, fault="checkpoint-before-pointer")[0])
    assert rundir.checkpoint_step(files.read_pointer(out / "latest")) == newest   # published, not yet pointed at
    assert rundir.checkpoint_step(rundir.list_checkpoints(out)[-1]) == newest + 1
    assert codes == [-signal.SIGKILL] * 3, f"random seed {seed}"
    result = pretrain(out=str(out), resume=True, progress=False, plot=False)
    assert result.step == 6
    _assert_same_checkpoint(straight / "checkpoints" / "step-000006", out / "checkpoints" / "step-000006")
    assert _losses(out) == _losses(straight)
    assert [p.name for p in rundir.list_checkpoints(out)] == ["step-000005", "step-000006"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    # The checkpoint published but not pointed at was moved aside by the resume, not overwritten.
    archived = files.read_pointer(out / "superseded" / f"after-step-{newest:06d}" / "latest")
    _assert_same_checkpoint(archived, out / "checkpoints" / archived.name)


# --- a full disk -------------------------------------------------------------------------------------
def _assert_full_disk_outcome(error, out: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message
    newest = files.read_pointer(out / "latest")
    assert f"the newest complete checkpoint is {newest}" in message
    model = ckpt.load_model(newest)
    assert files.load_tensors(newest / "optimizer.safetensors")[0].keys() == {
        f"{m}/{n}" for m in ("exp_avg", "exp_avg_sq") for n in model.params.shapes}
    rundir.load_checkpoint_state(newest)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    ckpt.load_model(out)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_full_disk_injected_is_one_line_and_the_previous_checkpoint_stays_loadable(spiece, tmp_path, monkeypatch):
    real = files.atomic_write_bytes
    writes = []

    def write(path, data):
        writes.append(path)
        if len(writes) > 12 and Path(path).name == "optimizer.safetensors":   # inside the third checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", write)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        pretrain(out=str(out), tokenizer=spiece, **RUN)
    _assert_full_disk_outcome(error, out)
    assert files.read_pointer(out / "latest").name == "step-000002"


def test_a_full_tmpfs_is_one_line_and_the_previous_checkpoint_stays_loadable(spiece, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the injected ENOSPC test covers it")
    try:
        out = mount / "run"
        with pytest.raises(ValueError) as error:
            pretrain(out=str(out), tokenizer=spiece, **{**RUN, "steps": 50, "keep_checkpoints": 0})
        _assert_full_disk_outcome(error, out)
        assert rundir.checkpoint_step(files.read_pointer(out / "latest")) >= 1
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- loading refuses what it cannot trust, before it allocates ----------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 10 ** 12, r"vocab_size=1000000000000 is invalid: expected a positive integer at most"),
    ("num_labels", 1 << 40, r"num_labels=1099511627776 is invalid: expected a positive integer at most"),
    ("intermediate_size", 1 << 18, r"tensor encoder.ffn.0.intermediate.weight has shape \(64, 128\), expected \(64, 262144\)"),
])
def test_a_config_claiming_more_than_its_weights_fails_before_any_big_allocation(tmp_path, field, value, message):
    """Before the fix, load_model built the model from config.json first: vocab_size 1e12 asked for
    terabytes, intermediate_size 2^18 for hundreds of MB. Now the sizes are bounded and checked against
    the safetensors header before anything is allocated: the peak traced allocation stays under 2 MB
    (the real weights are 0.4 MB)."""
    ckpt.save_model(Model(Config.preset("tiny", num_hidden_layers=1)), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            ckpt.load_model(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_a_hugging_face_config_claiming_more_than_its_weights_fails_before_any_big_allocation(tmp_path):
    Model(Config.preset("tiny", num_hidden_layers=1, ffn_output_dropout=False)).save_hf(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["intermediate_size"] = 1 << 18
    (tmp_path / "config.json").write_text(json.dumps(raw))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"has shape \(128, 64\), expected \(262144, 64\)"):
            Model.from_hf(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_weights_of_the_wrong_dtype_are_refused(tmp_path):
    ckpt.save_model(Model(Config.preset("tiny", num_hidden_layers=1)), tmp_path)
    weights, metadata = files.load_tensors(tmp_path / "model.safetensors")
    # An I32 header over the float bytes: the same bytes, read as integers, would load silently as garbage.
    weights["pooler.bias"] = weights["pooler.bias"].view(np.int32)
    files.save_tensors(tmp_path / "model.safetensors", weights, metadata)
    with pytest.raises(ValueError, match=r"tensor 'pooler.bias' has dtype int32; expected a floating-point weight"):
        ckpt.load_model(tmp_path)


# --- reproducible, ordinary files ---------------------------------------------------------------------
def test_files_are_reproducible_across_processes_and_follow_the_umask(tmp_path):
    """The same tensors and metadata give the same bytes in two fresh processes (with different hash
    seeds: the safetensors library's header order varied with them), and files get 0666 & ~umask."""
    script = ("import sys, numpy as np; from ref_bert import files; "
              "files.save_tensors(sys.argv[1], {'b': np.arange(3, dtype=np.float32), 'a': np.ones((2, 2))}, "
              "{'format': 'x', 'dtype': 'float32', 'step': '3', 'zeta': 'z'})")
    digests = set()
    for i, umask in enumerate(("0022", "0077")):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run(["sh", "-c", f'umask {umask} && exec "$0" -c "$1" "$2"', sys.executable, script, str(path)],
                       check=True, cwd=HERE.parent, env={**os.environ, "PYTHONHASHSEED": str(i + 1),
                                                         "PYTHONPATH": str(HERE.parent)})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        assert path.stat().st_mode & 0o777 == 0o666 & ~int(umask, 8)
    assert len(digests) == 1
    from safetensors.numpy import load_file

    assert sorted(load_file(str(tmp_path / "0.safetensors"))) == ["a", "b"]


# --- verification never says OK falsely; the command line's errors -----------------------------------------
def _golden(path: Path, model: Model):
    from ref_bert.golden import make_inputs, write_golden

    write_golden(path, model, make_inputs(model.config, 1, 4, 0), steps=0, seed=0, source="test", progress=False)
    return path


def test_verify_exit_codes_and_no_false_ok(tmp_path, capsys):
    from ref_bert import cli
    from ref_bert.golden import read_golden

    config = Config.preset("tiny", num_hidden_layers=1)
    golden = _golden(tmp_path / "golden.safetensors", Model(config, dtype="float64"))
    tensors, meta = read_golden(golden)
    raw, raw_meta = files.load_tensors(golden)

    def candidate(name, changes=None, metadata=None):
        path = tmp_path / name
        files.save_tensors(path, {**raw, **(changes or {})}, {**raw_meta, **(metadata or {})})
        return str(path)

    def verify(*extra):
        code = cli.main(["verify", "--golden", str(golden), *extra])
        return code, capsys.readouterr()

    assert verify("--candidate", candidate("same.safetensors"))[0] == 0
    # Nothing in common with --allow-missing: FAIL, exit 1 (it printed "verify: OK" before).
    renamed = {f"other/{n}": v for n, v in raw.items()}
    empty = tmp_path / "empty.safetensors"
    files.save_tensors(empty, renamed, {**raw_meta, "tensor_order": json.dumps(sorted(renamed))})
    code, out = verify("--candidate", str(empty), "--allow-missing")
    assert code == 1 and "verify: FAIL: nothing was compared" in out.out
    # NaN against NaN is a mismatch unless asked; integer ids must be integers.
    first_float = next(n for n, v in tensors.items() if v.dtype.kind == "f" and n.startswith("forward/"))
    nan_golden = tmp_path / "nan-golden.safetensors"
    files.save_tensors(nan_golden, {**raw, first_float: np.full_like(raw[first_float], np.nan)}, raw_meta)
    nan_candidate = candidate("nan.safetensors", {first_float: np.full_like(raw[first_float], np.nan)})
    golden_args = ["verify", "--golden", str(nan_golden), "--candidate", nan_candidate]
    assert cli.main(golden_args) == 1 and cli.main(golden_args + ["--equal-nan"]) == 0
    capsys.readouterr()
    ids = next(n for n, v in tensors.items() if v.dtype.kind == "i")
    code, out = verify("--candidate", candidate("float-ids.safetensors", {ids: raw[ids].astype(np.float64)}))
    assert code == 2 and f"tensor {ids} has dtype float64, but the golden file holds integers" in out.err
    assert "Traceback" not in out.err
    code, out = verify("--candidate", candidate("other-ids.safetensors", {ids: raw[ids] + 1}))
    assert code == 1 and f"first divergence at {ids}" in out.out      # different integers: a mismatch
    # Bad tolerances and malformed candidates are usage/input errors: exit 2, no traceback.
    for extra in (["--rtol", "nan"], ["--atol", "-1"], ["--rtol", "inf"]):
        code, out = verify("--candidate", str(golden), *extra)
        assert code == 2 and out.err.startswith("error: ") and "Traceback" not in out.err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(golden.read_bytes()[:100])
    code, out = verify("--candidate", str(broken))
    assert code == 2 and "broken.safetensors is corrupt" in out.err
    code, out = verify("--candidate", candidate("bad-meta.safetensors", metadata={"tensor_order": "{"}))
    assert code == 2 and "metadata tensor_order is not valid JSON" in out.err


def test_commands_report_bad_paths_as_errors_not_tracebacks(tmp_path, capsys):
    from ref_bert import cli

    for argv, message in [(["masks", "--png", str(tmp_path)], "is a directory"),
                          (["masks", "--source", "100000000"], "--source=100000000 is invalid"),
                          (["golden", "--config", "tiny", "--out", str(tmp_path)], "is a directory"),
                          (["generate", "--checkpoint", str(tmp_path), "--source-ids", "5"], "has no config.json")]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_generation_never_emits_a_token_it_forbids():
    """Vocabulary 8: [PAD], [CLS], [MASK] are never generated and [SEP] not before min_length 15, so with
    no_repeat_ngram_size=1 the four other tokens run out at step 5. Before the fix the argmax of a row
    of -inf emitted [PAD] (id 0); now it is a ValueError naming the constraints."""
    from ref_bert.generate import NEVER_GENERATED, SEP_ID, generate

    model = Model(Config.preset("tiny", vocab_size=8, num_hidden_layers=1))
    for beam_size in (1, 3):
        with pytest.raises(ValueError, match=r"at target step 5 every token is forbidden .* min_length=15, "
                                             r"no_repeat_ngram_size=1"):
            generate(model, [5, 6], max_length=12, min_length=15, no_repeat_ngram_size=1, beam_size=beam_size)
    out = generate(model, [5, 6], max_length=4, min_length=15, no_repeat_ngram_size=1)
    assert sorted(out.sequences[0]) == sorted(set(range(8)) - set(NEVER_GENERATED) - {SEP_ID})
