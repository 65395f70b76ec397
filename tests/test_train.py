"""Tests of the pretraining job (ref_bert/pretrain/ and its command line, ref_bert/cli/pretrain.py):
exact resume, atomic checkpoints under interruption, bad input, gradient accumulation, metrics, and that
the loss goes down.

Runs are a few steps of the tiny config with batch 4 and 32 tokens; a SentencePiece model is trained
once per module and passed with ``tokenizer=`` so that runs do not each train their own.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backends
from ref_bert import checkpoint as ckpt
from ref_bert import files
from ref_bert import cli
from ref_bert.pretrain import batches, loop, metrics, rundir, settings
from ref_bert.config import Config
from ref_bert.data import PretrainingDataset, Tokenizer, default_corpus_path
from ref_bert.model import Model
from ref_bert.pretrain import PretrainConfig, effective_batch_gradients, pretrain, thread_limit

LOSS_KEYS = ("step", "loss", "mlm", "sop", "lr", "grad_norm", "tokens")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "spiece.model"
    Tokenizer.train(default_corpus_path(), vocab_size=Config.preset("tiny").vocab_size, out_path=path)
    return str(path)


@pytest.fixture
def small(spiece, tmp_path):
    """Settings of a short run in a fresh directory; keyword arguments override them."""

    def make(name="run", **changes) -> PretrainConfig:
        base = PretrainConfig(out=str(tmp_path / name), tokenizer=spiece, steps=8, batch_size=4, seq_len=32,
                              lr=0.01, warmup=2, checkpoint_every=4, keep_checkpoints=0, progress=False,
                              plot=False, sop_weight=1.0)
        return PretrainConfig(**{**base.__dict__, **changes})

    return make


def _tensors(directory, name):
    return files.load_tensors(Path(directory) / name)[0]


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert np.array_equal(a[key], b[key]), key


def _losses(history):
    return [{k: r[k] for k in LOSS_KEYS} for r in history]


def _assert_same_run(dir_a, dir_b, step):
    """Final checkpoints bit-identical: parameters, optimiser moments, RNG and data state, logged losses."""
    ca = Path(dir_a) / "checkpoints" / rundir.checkpoint_name(step)
    cb = Path(dir_b) / "checkpoints" / rundir.checkpoint_name(step)
    _assert_same_tensors(_tensors(ca, "model.safetensors"), _tensors(cb, "model.safetensors"))
    _assert_same_tensors(_tensors(ca, "optimizer.safetensors"), _tensors(cb, "optimizer.safetensors"))
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (ca, cb))
    for key in ("step", "optimizer", "dropout_rng", "data", "run", "tokens"):
        assert sa[key] == sb[key], key
    ma, mb = (metrics.read_metrics(Path(d) / "metrics.jsonl") for d in (dir_a, dir_b))
    assert [r["step"] for r in ma] == list(range(1, step + 1))
    assert _losses(ma) == _losses(mb)


def _digest(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


# --- resume ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_bit_identical_to_a_straight_run(small, grad_accum):
    # Dropout is on (tiny preset, 0.1), so the dropout generator's state must be restored too.
    straight = pretrain(small("straight", grad_accum=grad_accum))
    assert straight.step == 8
    first = pretrain(small("resumed", grad_accum=grad_accum, until=4))
    assert first.step == 4 and first.checkpoint.name == "step-000004"
    second = pretrain(small("resumed", grad_accum=grad_accum, resume=True))
    assert second.step == 8
    _assert_same_run(straight.out_dir, second.out_dir, 8)
    # The resumed run's history spans both halves.
    assert [r["step"] for r in second.history] == list(range(1, 9))


def test_resume_keeps_the_runs_thread_count(small):
    """A resume without --threads takes the count the run recorded (a job setting, like log_every): 4 + 4
    steps at threads=2 equal 8 straight steps at threads=2."""
    straight = pretrain(small("straight", threads=2, steps=4, until=None))
    first = pretrain(small("resumed", threads=2, steps=4, until=2))
    assert json.loads((first.checkpoint / "state.json").read_text())["job"]["threads"] == 2
    second = pretrain(small("resumed", steps=4, resume=True))
    final = json.loads((second.checkpoint / "state.json").read_text())
    assert second.step == 4 and final["job"]["threads"] == 2
    _assert_same_run(straight.out_dir, second.out_dir, 4)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_pretraining_is_identical_with_one_and_two_threads(small, grad_accum):
    """float32 products from OpenBLAS differ in the last bits between 1 and 2 threads, but the loop
    computes its micro-batches as Backend.map_shards' shards (one-thread BLAS each, two side by side),
    so parameters, moments and losses are bit-identical. Planting the bug (no one-thread BLAS limit in
    map_shards) fails this test: the widened tiny model's products are large enough for OpenBLAS to split
    them over two threads (the preset's own are not)."""
    wide = dict(hidden_size=256, intermediate_size=1024, embedding_size=128)
    runs = [pretrain(small(f"threads-{t}", threads=t, grad_accum=grad_accum, batch_size=8 // grad_accum, seq_len=64,
                           steps=2, until=None, checkpoint_every=2, config_overrides=wide)) for t in (1, 2)]
    _assert_same_run(runs[0].out_dir, runs[1].out_dir, 2)


def test_unilm_objective_trains_on_mixed_masks_and_resumes_exactly(small):
    """--objective unilm: the stream's sentence pairs made into UniLM's mixed-mask batches (every kind in a
    batch of 12 over 8 steps), losses finite, and a resumed run rebuilds the same batches."""
    seen = []
    original = batches.unilm_host_batch

    def spy(pairs, seq_len, config, seed):
        out = original(pairs, seq_len, config, seed)
        seen.append(out)
        return out

    import unittest.mock
    with unittest.mock.patch.object(batches, "unilm_host_batch", spy):
        straight = pretrain(small("unilm", objective="unilm", batch_size=12))
    assert all(b["attention_mask"].shape == (12, 32, 32) for b in seen)
    causal = [bool(np.all(np.triu(m, 1)[:n, :n] == 0)) for b in seen for m, n in
              zip(b["attention_mask"], b["attention_mask"].any(axis=1).sum(axis=1))]
    assert any(causal) and not all(causal)                  # left-to-right and seq2seq-style rows, and others
    assert (np.concatenate([b["sop_labels"] for b in seen]) == -100).any()   # SOP only on bidirectional rows
    assert all(np.isfinite(r["loss"]) for r in straight.history)
    first = pretrain(small("unilm-resumed", objective="unilm", batch_size=12, until=4))
    second = pretrain(small("unilm-resumed", objective="unilm", batch_size=12, resume=True))
    assert first.step == 4 and second.step == 8
    _assert_same_run(straight.out_dir, second.out_dir, 8)


def test_resume_from_an_explicit_earlier_checkpoint(small):
    straight = pretrain(small("straight"))
    again = pretrain(small("again"))
    # Go back to step 4 of a finished run; steps 5..8 are redone and step-000008 is replaced.
    resumed = pretrain(small("again", resume=str(again.out_dir / "checkpoints" / "step-000004")))
    assert resumed.step == 8
    _assert_same_run(straight.out_dir, resumed.out_dir, 8)
    assert files.read_pointer(again.out_dir / "latest").name == "step-000008"


# --- interruption ---------------------------------------------------------------------------------------
def test_keyboard_interrupt_writes_a_checkpoint_of_the_last_step_and_resume_continues(small, capsys):
    straight = pretrain(small("straight"))

    def interrupt_at_6(step, metrics):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(small("interrupted"), on_step=interrupt_at_6)
    assert "interrupted after step 6: wrote checkpoint" in capsys.readouterr().err
    out = Path(small("interrupted").out)
    latest = files.read_pointer(out / "latest")
    # Ctrl-C between steps checkpoints the step it stopped on (checkpoint_every is 4).
    assert latest.name == "step-000006"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    # Both the checkpoint and OUT itself are model directories.
    for directory in (latest, out):
        model = ckpt.load_model(directory)
        assert model.config == Config.preset("tiny")
    _assert_same_tensors(_tensors(latest, "model.safetensors"), _tensors(out, "model.safetensors"))
    # Metrics were written up to the interrupted step ...
    assert [r["step"] for r in metrics.read_metrics(out / "metrics.jsonl")] == list(range(1, 7))
    # A process killed while appending leaves a line cut short; resuming ignores it.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 6.')
    resumed = pretrain(small("interrupted", resume=True))
    # ... and the resumed run continues from step 6 exactly as the uninterrupted run did.
    assert [r["step"] for r in resumed.history] == list(range(1, 9))
    _assert_same_run(straight.out_dir, resumed.out_dir, 8)


def test_interrupt_during_a_step_writes_no_checkpoint_of_it(small, monkeypatch):
    """A KeyboardInterrupt inside a step (a second Ctrl-C) may leave the update half done: no checkpoint."""
    out = Path(small("interrupted").out)
    real_step = loop._step

    def step(job, log, stop):
        if job.step == 5:
            raise KeyboardInterrupt
        real_step(job, log, stop)

    monkeypatch.setattr(loop, "_step", step)
    with pytest.raises(KeyboardInterrupt):
        pretrain(small("interrupted"))
    assert files.read_pointer(out / "latest").name == "step-000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]


def test_interrupt_while_writing_a_checkpoint_keeps_the_previous_one(small, monkeypatch):
    straight = pretrain(small("straight"))
    out = Path(small("interrupted").out)
    real_write = files.atomic_write_bytes

    def write(path, data):
        # Die in the middle of the step-8 checkpoint: its model file is written, its optimiser file not.
        if Path(path).name == "optimizer.safetensors" and ".step-000008." in str(path):
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", write)
    before = None

    def remember(step, metrics):
        nonlocal before
        if step == 4:
            before = _digest(out / "checkpoints" / "step-000004")

    with pytest.raises(KeyboardInterrupt):
        pretrain(small("interrupted"), on_step=remember)
    monkeypatch.undo()
    # No half-written step-8 (its temporary directory was removed), step 4 untouched and still latest.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]
    assert files.read_pointer(out / "latest").name == "step-000004"
    assert _digest(out / "checkpoints" / "step-000004") == before
    ckpt.load_model(out / "checkpoints" / "step-000004")
    # A process killed outright leaves its temporary directory; the next run removes it.
    leftover = out / "checkpoints" / ".step-000008.killed.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    resumed = pretrain(small("interrupted", resume=True))
    assert not leftover.exists()
    _assert_same_run(straight.out_dir, resumed.out_dir, 8)


# --- checkpoint layout -------------------------------------------------------------------------------
def test_checkpoint_layout_and_tokenizer_trained_into_out(tmp_path):
    # No tokenizer given: one is trained on the corpus with the config's vocab_size and saved.
    result = pretrain(out=str(tmp_path / "run"), steps=6, batch_size=4, seq_len=32, checkpoint_every=2,
                      keep_checkpoints=2, progress=False, plot=True)
    out = result.out_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert (out / "latest").read_text() == "checkpoints/step-000006\n"
    newest = out / "checkpoints" / "step-000006"
    assert sorted(p.name for p in newest.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "spiece.model", "state.json"]
    for directory in (out, newest):
        assert Tokenizer.load(directory / "spiece.model").vocab_size == 1000
        assert ckpt.load_model(directory).config == Config.preset("tiny")
    assert (out / "spiece.model").read_bytes() == (newest / "spiece.model").read_bytes()
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == 6 and state["optimizer"]["step"] == 6
    assert state["dropout_rng"]["bit_generator"] == "PCG64"
    assert set(state["data"]) == {"seed", "epoch", "position", "fingerprint"}
    assert state["run"]["steps"] == 6 and state["run"]["warmup"] == 1  # 10% of 6, rounded
    optimizer_tensors = _tensors(newest, "optimizer.safetensors")
    assert len(optimizer_tensors) == 2 * len(_tensors(newest, "model.safetensors"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.rglob(".*")] == [".lock"]  # no staging leftovers (the lock file stays)


# --- metrics ---------------------------------------------------------------------------------------
def test_metrics_file_content(small):
    cfg = small(steps=7, checkpoint_every=5, log_every=2)
    result = pretrain(cfg)
    records = metrics.read_metrics(result.out_dir / "metrics.jsonl")
    # Logged every 2 steps, plus every checkpoint step (5) and the last step (7).
    assert [r["step"] for r in records] == [2, 4, 5, 6, 7]
    assert records == result.history
    for r in records:
        assert set(r) == {"step", "loss", "mlm", "sop", "lr", "grad_norm", "tokens_per_s", "elapsed", "tokens"}
        assert all(np.isfinite(r[k]) for k in r)
        assert r["lr"] == settings.learning_rate(cfg, r["step"] - 1)
        assert r["loss"] == pytest.approx(r["mlm"] + r["sop"], rel=1e-6)
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["elapsed"] > 0
        assert 5 * 4 <= r["tokens"] / r["step"] <= 32 * 4   # real tokens of 4 examples per step
    assert [r["elapsed"] for r in records] == sorted(r["elapsed"] for r in records)
    assert result.metrics == records[-1]


def test_plot_is_skipped_with_a_note_without_matplotlib(small, monkeypatch, capsys):
    result = pretrain(small(steps=2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert metrics.write_plot(result.out_dir, result.history) is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (result.out_dir / "loss.png").exists()


def test_learning_rate_schedules():
    cfg = PretrainConfig(steps=10, warmup=4, lr=1.0)
    assert [settings.learning_rate(cfg, s) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0 * (1 - 4 / 10), 1.0 * (1 - 9 / 10)]
    cfg = PretrainConfig(steps=10, warmup=4, lr=1.0, schedule="linear")
    assert [settings.learning_rate(cfg, s) for s in (0, 2, 4, 7)] == [0.0, 0.5, 1.0, 0.5]


# --- gradient accumulation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float64_batch(spiece):
    config = Config.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = PretrainingDataset(None, spiece, batch_size=12, max_seq_length=32, seed=3, config=config)
    return config, data.next_batch()


@pytest.mark.parametrize("case", ["equal sizes", "uneven sizes", "a micro-batch without masks"])
def test_accumulated_gradient_equals_one_big_batch(float64_batch, case):
    config, batch = float64_batch
    batch = {k: v.copy() for k, v in batch.items()}
    bounds = [0, 4, 8, 12]
    if case == "uneven sizes":
        bounds = [0, 2, 7, 12]
    elif case == "a micro-batch without masks":
        batch["mlm_labels"][4:8] = -100
    # Make the mask counts of the micro-batches differ (the case where their weights matter).
    batch["mlm_labels"][0, np.flatnonzero(batch["mlm_labels"][0] != -100)[:2]] = -100
    batch["mlm_labels"][11, np.flatnonzero(batch["mlm_labels"][11] != -100)[:1]] = -100
    model = Model(config, backend="numpy", dtype="float64", seed=1)
    _result = model.loss_and_grads(**batch, training=True)
    loss, grads, parts = _result.loss, _result.grads, _result.parts
    micro = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]
    counts = [int((m["mlm_labels"] != -100).sum()) for m in micro]
    assert len(set(counts)) == 3
    acc_grads, acc_parts = effective_batch_gradients(model, micro, counts, training=True)
    assert acc_grads.keys() == grads.keys()
    # Relative to the largest gradient entry: some tensors' gradients are exactly 0 in exact arithmetic
    # (the attention key bias: softmax ignores a shift shared by all keys) and are rounding noise here.
    scale = max(np.max(np.abs(g)) for g in grads.values())
    for name in grads:
        assert np.max(np.abs(acc_grads[name] - grads[name])) <= 1e-12 * scale, name
    for key, whole in (("loss", loss), ("mlm", parts["mlm"]), ("sop", parts["sop"])):
        assert abs(float(acc_parts[key]) - float(whole)) <= 1e-12 * abs(float(whole)), key
    # The check can fail: averaging the micro-batches' combined gradients (weight 1/k for both
    # losses) is visibly wrong when the mask counts differ.
    per_micro = [model.loss_and_grads(**m, training=True).grads for m in micro]
    naive = {name: sum(g[name] for g in per_micro) / len(micro) for name in grads}
    assert max(np.max(np.abs(naive[name] - grads[name])) for name in grads) > 1e-4 * scale


def test_accumulation_in_the_training_job_matches_one_batch(small):
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    one = pretrain(small("one", batch_size=8, grad_accum=1, steps=3, dtype="float64", config_overrides=overrides))
    acc = pretrain(small("acc", batch_size=4, grad_accum=2, steps=3, dtype="float64", config_overrides=overrides))
    a, b = _tensors(one.checkpoint, "model.safetensors"), _tensors(acc.checkpoint, "model.safetensors")
    for name in a:
        assert np.max(np.abs(b[name] - a[name])) <= 1e-10 * max(np.max(np.abs(a[name])), 1e-3), name
    for ra, rb in zip(one.history, acc.history):
        for key in ("loss", "mlm", "sop", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-10), key
        assert ra["tokens"] == rb["tokens"]


# --- learning -------------------------------------------------------------------------------------
def test_loss_decreases(small):
    # 60 steps of batch 8 at lr 0.02 (LAMB, ALBERT preset), dropout on. Measured: the mean loss of
    # the first five steps is 7.59 and of the last five 6.49; required: a drop of more than 0.5.
    result = pretrain(small("learn", steps=60, batch_size=8, lr=0.02, warmup=6, checkpoint_every=60))
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 60
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.5, (first, last)
    mlm = [r["mlm"] for r in result.history]
    assert np.mean(mlm[-5:]) < np.mean(mlm[:5]) - 0.5


def _main_job_check(out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "check-main-job"), str(out)], capture_output=True,
                          text=True)


def test_the_main_job_check_passes_learning_and_fails_chance(tmp_path):
    """The README's main job (``ref-bert pretrain`` with no arguments: tiny config, 1600 steps, SOP
    weight 100) is run once, by CI's command 1, and checked there by .ci/check-main-job (MLM down by
    more than 1.0, SOP from ln 2 to below 0.6; measured for seeds 0-2: MLM 6.9 -> 5.43 / 5.51 / 5.60, SOP
    0.693 -> 0.25 / 0.21 / 0.18). Here: the job's defaults are those, and the check passes a history
    that learned and fails each way of not learning."""
    defaults = PretrainConfig()
    assert (defaults.steps, defaults.batch_size, defaults.seq_len, defaults.config, defaults.sop_weight) == \
        (1600, 32, 64, "tiny", 100.0)

    def write(name, mlm_end, sop_end, steps=1600, sop_start=float(np.log(2))):
        out = tmp_path / name
        out.mkdir()
        rows = [{"step": s, "mlm": 6.9 + (mlm_end - 6.9) * s / steps,
                 "sop": sop_start if s <= 20 else sop_start + (sop_end - sop_start) * s / steps}
                for s in range(1, steps + 1)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out

    good = _main_job_check(write("good", 5.5, 0.2))
    assert good.returncode == 0 and "main job learned: MLM 6.891 -> 5.521, SOP 0.693 -> 0.208" in good.stdout, good.stderr
    for name, kwargs, message in [("mlm", dict(mlm_end=6.0, sop_end=0.2), "MLM loss fell by 1.0 or less"),
                                  ("sop", dict(mlm_end=5.5, sop_end=0.62), "SOP loss did not fall below 0.6"),
                                  ("start", dict(mlm_end=5.5, sop_end=0.2, sop_start=0.5), "did not start at chance"),
                                  ("short", dict(mlm_end=5.5, sop_end=0.2, steps=800), "expected steps 1..1600")]:
        bad = _main_job_check(write(name, **kwargs))
        assert bad.returncode == 1 and message in bad.stderr, (name, bad.stderr)


# --- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "contains no sentences"),
    (b"   \n\n# only a comment\n", "contains no sentences"),
    (b"Just one sentence here.\n", "no document with at least two sentences"),
    (b"One sentence.\n\nAnother document, also one sentence.\n", "no document with at least two sentences"),
    (b"A first line.\nA second \xff\xfe line.\n", "not valid UTF-8"),
])
def test_bad_corpus_is_a_clear_error(small, tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        pretrain(small(corpus=str(corpus), tokenizer=None))
    assert not (tmp_path / "run").exists()   # nothing written


def test_resume_with_another_config_is_refused_and_checkpoint_intact(small):
    done = pretrain(small(steps=4, until=2))
    before = _digest(done.checkpoint)
    with pytest.raises(ValueError, match="hidden_size: checkpoint 64, this run 128"):
        pretrain(small(steps=4, resume=True, config_overrides={"hidden_size": 128}))
    with pytest.raises(ValueError, match="another model config"):
        pretrain(small(steps=4, resume=True, config="bert-base"))
    with pytest.raises(ValueError, match="lr: checkpoint 0.01, this run 0.02"):
        pretrain(small(steps=4, resume=True, lr=0.02))
    assert _digest(done.checkpoint) == before
    assert pretrain(small(steps=4, resume=True)).step == 4   # still resumable


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_truncated_checkpoint_file_is_a_clear_error_and_earlier_checkpoint_intact(small, damaged):
    straight = pretrain(small("straight"))
    out = pretrain(small("damaged", until=6)).out_dir   # checkpoints at steps 4 and 6
    earlier = out / "checkpoints" / "step-000004"
    before = _digest(earlier)
    path = out / "checkpoints" / "step-000006" / damaged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt|not valid JSON") as error:
        pretrain(small("damaged", resume=True))
    if damaged != "state.json":
        assert "step-000004" in str(error.value)   # the message points at the earlier checkpoint
    assert _digest(earlier) == before
    # The earlier checkpoint still resumes, exactly.
    resumed = pretrain(small("damaged", resume=str(earlier)))
    _assert_same_run(straight.out_dir, resumed.out_dir, 8)


def test_other_bad_settings(small):
    with pytest.raises(ValueError, match="objective='electra' is invalid"):
        pretrain(small(objective="electra"))
    with pytest.raises(ValueError, match="optimizer='sgd' is invalid"):
        pretrain(small(optimizer="sgd"))
    with pytest.raises(ValueError, match="grad_accum=0 is invalid"):
        pretrain(small(grad_accum=0))
    with pytest.raises(ValueError, match="warmup=9 is invalid"):
        pretrain(small(warmup=9))
    with pytest.raises(ValueError, match="max_seq_length=200 is invalid"):
        pretrain(small(seq_len=200))  # tiny has 128 positions
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        pretrain(small(resume=True))
    pretrain(small(steps=2))
    with pytest.raises(ValueError, match="already holds a pretraining run"):
        pretrain(small(steps=2))
    with pytest.raises(ValueError, match="nothing to resume"):
        pretrain(small(steps=2, resume=True))


def test_cli_prints_error_and_exits_2(small, tmp_path, capsys):
    corpus = tmp_path / "one.txt"
    corpus.write_text("Only one sentence.\n")
    cfg = small()
    argv = ["pretrain", "--out", cfg.out, "--threads", "0", "--corpus", str(corpus), "--steps", "2", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no document with at least two sentences" in err
    assert cli.main(argv[:-3] + ["--objective", "electra", "--tokenizer", cfg.tokenizer]) == 2
    assert "objective='electra' is invalid" in capsys.readouterr().err


def test_cli_runs_and_resumes(small, capsys):
    """The README's example: a run stopped with --until, then --resume alone (no other flag repeated)."""
    cfg = small()
    argv = ["pretrain", "--out", cfg.out, "--threads", "0", "--tokenizer", cfg.tokenizer, "--steps", "4",
            "--batch-size", "2",
            "--seq-len", "32", "--checkpoint-every", "2", "--no-progress", "--no-plot", "--set", "num_hidden_layers=1",
            "--optimizer", "adamw", "--lr", "1e-3", "--schedule", "linear", "--warmup", "1"]
    assert cli.main(argv + ["--until", "2"]) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert cli.main(["pretrain", "--out", cfg.out, "--resume", "--no-progress", "--no-plot"]) == 0
    assert "done: step 4" in capsys.readouterr().out
    model = ckpt.load_model(cfg.out)
    assert model.config.num_hidden_layers == 1
    straight = str(Path(cfg.out).parent / "straight")
    assert cli.main(argv[:2] + [straight] + argv[3:]) == 0
    _assert_same_run(straight, cfg.out, 4)
    # A flag that changes the arithmetic is refused, naming it; the checkpoint/log flags may change.
    assert cli.main(["pretrain", "--out", cfg.out, "--resume", "--lr", "0.5", "--steps", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "omit --lr" in err and "Traceback" not in err
    assert cli.main(["pretrain", "--out", cfg.out, "--resume", "--steps", "6", "--checkpoint-every", "3",
                     "--no-progress", "--no-plot"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    assert files.read_pointer(Path(cfg.out) / "latest").name == "step-000006"


def test_extending_a_finished_run_rederives_the_schedule_for_the_new_total(small):
    """8 steps, then resume with steps=12: steps 9-12 run with the rates of a 12-step schedule (the
    recorded warmup kept); steps 1-8 are those of the 8-step run; and resuming inside the extension is
    exact (8 -> 10 -> 12 equals 8 -> 12)."""
    eight = pretrain(small("a"))
    extended = pretrain(small("a", resume=True, steps=12))
    assert extended.step == 12 and extended.checkpoint.name == "step-000012"
    assert [r["step"] for r in extended.history] == list(range(1, 13))
    assert _losses(extended.history[:8]) == _losses(eight.history)
    twelve = small(steps=12)
    assert [r["lr"] for r in extended.history[8:]] == [settings.learning_rate(twelve, s) for s in range(8, 12)]
    # The rule's consequence, stated in pretrain()'s docstring: not the run of 12 from scratch.
    scratch = pretrain(small("scratch", steps=12))
    assert [r["lr"] for r in scratch.history[:8]] != [r["lr"] for r in extended.history[:8]]
    pretrain(small("b"))
    pretrain(small("b", resume=True, steps=12, until=10))
    # From Python too, resume=True alone takes the recorded settings (steps=12 now, warmup 2, batch 4, ...).
    pretrain(out=small("b").out, resume=True, progress=False, plot=False)
    _assert_same_run(small("a").out, small("b").out, 12)
    with pytest.raises(ValueError, match=r"nothing to resume .* --steps N with N > 12"):
        pretrain(out=small("a").out, resume=True)


@pytest.mark.parametrize("argv, message", [
    (["--set", "hiden_size=10"], "'hiden_size' is not a Config field; did you mean 'hidden_size'"),
    (["--corpus", "DIR"], "is a directory; expected a file"),
    (["--corpus", "SMALL", "--tokenizer", None], r"--set vocab_size=\d+"),
])
def test_cli_errors_say_how_to_fix(small, tmp_path, capsys, argv, message):
    small_corpus = tmp_path / "small.txt"
    small_corpus.write_text("A first sentence here.\nAnd a second one.\n\nAnother document.\nIts end.\n")
    cfg = small()
    base = ["pretrain", "--out", cfg.out, "--threads", "0", "--tokenizer", cfg.tokenizer, "--steps", "2",
            "--no-progress", "--no-plot"]
    if None in argv:    # drop --tokenizer: train one on the corpus
        base = base[:5] + base[7:]
        argv = [a for a in argv if a not in ("--tokenizer", None)]
    argv = [str(tmp_path) if a == "DIR" else str(small_corpus) if a == "SMALL" else a for a in argv]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not Path(cfg.out).exists()


def test_config_may_be_a_model_directory(small, tmp_path):
    model_dir = tmp_path / "model"
    ckpt.save_model(Model(Config.preset("tiny").replace(num_hidden_layers=1)), model_dir)
    result = pretrain(small(steps=2, config=str(model_dir)))
    assert ckpt.load_model(result.out_dir).config.num_hidden_layers == 1


def test_blas_thread_limit(monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]

    numpy_backend = backends.get("numpy")
    threads_before, blas_before = numpy_backend.threads, blas_threads()
    with thread_limit(3) as found:
        assert numpy_backend.threads == 3   # the backend's own loops (erf, optimiser pieces) follow BLAS
        assert found == bool(blas_before) and all(n == 3 for n in blas_threads())
    assert numpy_backend.threads == threads_before and blas_threads() == blas_before   # both restored
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "REF_BERT_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    assert settings.resolve_threads(None, "numpy") == 1
    assert settings.resolve_threads(3, "numpy") == 3 and settings.resolve_threads(0, "numpy") == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert settings.resolve_threads(None, "numpy") == 0   # the user's setting wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert backends.get("numpy").host_blas


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]


@pytest.mark.parametrize("threads, during", [(None, 1), (2, 2), (0, 3)])
def test_pretrain_from_python_sets_and_restores_the_blas_thread_count(small, monkeypatch, threads, during):
    """pretrain() applies the CLI's thread rule itself, for the run only: the same job from Python as from
    the shell."""
    from threadpoolctl import threadpool_limits

    if not _blas_threads():
        pytest.skip("threadpoolctl finds no BLAS library")
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "REF_BERT_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    numpy_backend = backends.get("numpy")
    own_before = numpy_backend.threads
    seen = []
    with threadpool_limits(limits=3, user_api="blas"):
        before = _blas_threads()
        pretrain(small(steps=2, threads=threads),
                 on_step=lambda step, m: seen.append((_blas_threads(), numpy_backend.threads)))
        after = _blas_threads()
    assert before == after == [3] * len(before)
    assert all(blas == [during] * len(before) for blas, _ in seen) and len(seen) == 2
    if threads != 0:
        assert all(own == during for _, own in seen)
    assert numpy_backend.threads == own_before


def _assert_close_run(a, b, tol=1e-9):
    """Two runs agree up to rounding: parameters, optimiser moments, logged losses."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = _tensors(a.checkpoint, name), _tensors(b.checkpoint, name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert np.max(np.abs(ta[key] - tb[key])) <= tol * max(np.max(np.abs(ta[key])), 1e-3), key
    assert [r["step"] for r in a.history] == [r["step"] for r in b.history]
    for ra, rb in zip(a.history, b.history):
        for key in ("loss", "mlm", "sop", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=tol), key


@pytest.mark.gpu
@pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a GPU")
def test_cupy_backend_matches_numpy_and_resumes_across_backends(small):
    # float64 with dropout on: weights and dropout masks are drawn on the host, so both backends see
    # the same numbers; only reduction order (and CuPy's atomic scatter-add) differ.
    settings = dict(dtype="float64", grad_accum=2)
    cpu = pretrain(small("cpu", **settings))
    gpu = pretrain(small("gpu", backend="cupy", **settings))
    _assert_close_run(cpu, gpu)
    pretrain(small("cross", until=4, **settings))                              # steps 1-4 on numpy
    cross = pretrain(small("cross", backend="cupy", resume=True, **settings))  # steps 5-8 on cupy
    _assert_close_run(cpu, cross)
