"""Fuzz tests (hypothesis) of the loaders, the public API and the command line (issue 12).

The invariant everywhere: a correct result, or a ``ValueError`` whose message names the problem (the
file, the argument or the field); never another exception type, a NaN from finite inputs, a hang, or a
changed input file. "Correct" is checked against an independent reader where there is one (the
safetensors library for our safetensors reader; NumPy for the comparisons of ``verify``).

Examples per test are few (40-80) to keep the suite fast; the CI profile (tests/conftest.py) derandomizes
them, ``HYPOTHESIS_PROFILE=dev`` tries ten times as many, new ones each run.
``--hypothesis-show-statistics`` prints how many each test tried.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ref_bert import checkpoint as ckpt
from ref_bert import cli, files
from ref_bert.config import Config
from ref_bert.model import Model
from ref_bert.pretrain import rundir
from ref_bert.pretrain.metrics import read_metrics
from ref_bert.verify import compare

from .conftest import examples

def fuzz(n: int):
    """``n`` examples (scaled by the hypothesis profile: derandomized in CI, 10x and random under "dev")."""
    return settings(max_examples=examples(n), deadline=None, suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])

# Any JSON value, small: what a hostile or broken file can put where a field is expected.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
# A value of the wrong JSON type for any field.
WRONG = st.sampled_from([[], {}, "x", "", True, False, None, [1], {"a": 1}, -1, 0, 1e300, 0.5])
# JSON numbers that Python's json reads and writes, NaN and infinities included.
NUMBERS = st.integers(-(2 ** 40), 2 ** 40) | st.floats() | st.booleans()


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expect_value_error(call, *names):
    """``call()``'s result, or None after a ValueError that mentions one of ``names``."""
    try:
        return call()
    except ValueError as e:
        assert any(str(n) in str(e) for n in names), f"message names none of {names}: {e}"
        return None


# --- safetensors --------------------------------------------------------------------------------------
_TENSORS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.array([3, -1], dtype=np.int64)}


def _file_bytes(header, data: bytes, length=None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def _valid_header():
    header = json.loads(b"".join(files.safetensors_chunks(_TENSORS, {"k": "v"})[1:2]))
    data = b"".join(files.safetensors_chunks(_TENSORS)[2:])
    return header, data


@st.composite
def damaged_safetensors(draw):
    header, data = _valid_header()
    kind = draw(st.sampled_from(["field", "entry", "whole", "length", "bytes", "data"]))
    length = None
    if kind == "field":
        name = draw(st.sampled_from(["w", "ids"]))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][key] = draw(JSON | st.sampled_from(["F16", "BF16", "I32", "U8", "BOOL", "F64"])
                                 | st.lists(st.integers(-3, 2 ** 62), max_size=3))
    elif kind == "entry":
        header[draw(st.sampled_from(["w", "ids", "__metadata__", "x"]))] = draw(JSON)
    elif kind == "whole":
        header = draw(JSON)
    elif kind == "length":
        length = draw(st.integers(0, 2 ** 64 - 1))
    elif kind == "bytes":
        header = draw(st.binary(max_size=40))
    else:
        data = draw(st.binary(max_size=80))
    return _file_bytes(header, data, length)


@fuzz(80)
@given(blob=damaged_safetensors())
def test_fuzz_safetensors_reader(tmp_path, blob):
    from safetensors import safe_open

    path = tmp_path / "t.safetensors"
    path.write_bytes(blob)
    result = _expect_value_error(lambda: files.load_tensors(path), path)
    assert path.read_bytes() == blob
    if result is None:
        return
    tensors, _ = result
    entries, _, _ = files.read_safetensors_header(path)
    # Accepted: the safetensors library reads the same arrays (BF16, which NumPy lacks, we widen).
    if not any(dtype == "BF16" for dtype, _, _ in entries.values()):
        with safe_open(str(path), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(tensors)
            for name in tensors:
                assert np.array_equal(f.get_tensor(name), tensors[name], equal_nan=True), name
    for name, (dtype, shape, _) in entries.items():
        assert tensors[name].shape == shape


# --- config.json (ref-bert's and Hugging Face's) ------------------------------------------------------
TINY = Config.preset("tiny", num_hidden_layers=1, ffn_output_dropout=False)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = Model(TINY, seed=1)
    ckpt.save_model(model, root / "ours")
    model.save_hf(root / "hf")
    return root


@st.composite
def damaged_config(draw, valid: dict):
    kind = draw(st.sampled_from(["field", "field", "field", "field", "extra", "whole", "bytes"]))
    if kind == "whole":
        return json.dumps(draw(JSON)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=30))
    config = dict(valid)
    if kind == "extra":
        config[draw(st.text(max_size=8))] = draw(JSON)
    else:   # one to three fields of the wrong type or out of range
        for key in draw(st.lists(st.sampled_from(sorted(valid)), min_size=1, max_size=3, unique=True)):
            config[key] = draw(st.one_of(WRONG, WRONG, WRONG, JSON, NUMBERS, st.integers(0, 2 ** 25)))
    return json.dumps(config).encode()


def _fuzz_config(tmp_path, model_dirs, kind: str, blob: bytes):
    directory = tmp_path / kind
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(model_dirs / kind, directory)
    (directory / "config.json").write_bytes(blob)
    before = _digest(directory)
    model = _expect_value_error(lambda: ckpt.load_any(directory)[0], directory, "Config.", "config.json")
    assert _digest(directory) == before
    if model is not None:   # accepted: every parameter came from the file, so the forward pass is finite
        reference = Model.from_hf(model_dirs / "hf") if kind == "hf" else ckpt.load_model(model_dirs / "ours")
        for name in reference.params.shapes:
            assert np.array_equal(model.params[name], reference.params[name]), name
        out = model.forward(np.array([[2, 5, 7, 3]]))
        assert np.isfinite(out.last_hidden_state).all()


@fuzz(60)
@given(data=st.data())
def test_fuzz_ref_bert_config_json(tmp_path, model_dirs, data):
    valid = json.loads((model_dirs / "ours" / "config.json").read_text())
    _fuzz_config(tmp_path, model_dirs, "ours", data.draw(damaged_config(valid)))


@fuzz(80)
@given(data=st.data())
def test_fuzz_hugging_face_config_json(tmp_path, model_dirs, data):
    valid = json.loads((model_dirs / "hf" / "config.json").read_text())
    _fuzz_config(tmp_path, model_dirs, "hf", data.draw(damaged_config(valid)))


@fuzz(40)
@given(index=JSON | st.fixed_dictionaries({"weight_map": JSON | st.dictionaries(
    st.text(max_size=4), st.sampled_from(["model.safetensors", "missing.safetensors", "sub", "..", "a/b"]) | JSON,
    max_size=3)}))
def test_fuzz_shard_index(tmp_path, model_dirs, index):
    directory = tmp_path / "sharded"
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(model_dirs / "hf", directory)
    (directory / "model.safetensors").rename(directory / "shard.safetensors")
    (directory / "sub").mkdir()
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    from ref_bert.hf import read_hf_tensors

    result = _expect_value_error(lambda: read_hf_tensors(directory), directory)
    assert result is None or result == {}   # no index here names the real shard, so nothing is read


# --- training state files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from ref_bert.data import Tokenizer, default_corpus_path
    from ref_bert.pretrain import pretrain

    root = tmp_path_factory.mktemp("run")
    Tokenizer.train(default_corpus_path(), vocab_size=1000, out_path=root / "spiece.model")
    return pretrain(out=str(root / "run"), tokenizer=str(root / "spiece.model"), steps=2, batch_size=2, seq_len=16,
                    checkpoint_every=1, progress=False, plot=False, threads=1,
                    config_overrides={"num_hidden_layers": 1}).out_dir


@fuzz(30)
@given(data=st.data())
def test_fuzz_checkpoint_state_json(tmp_path, run_dir, data):
    """state.json with a field replaced by any JSON value, or garbage: load_checkpoint_state and the
    resume preparation (settings, model config, optimiser, RNG and data position) accept it or raise a
    ValueError; when they accept it the restored state is what the file says."""
    from ref_bert.pretrain import loop

    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    if checkpoint.parent.parent.exists():
        shutil.rmtree(checkpoint.parent.parent)
    shutil.copytree(run_dir / "checkpoints", checkpoint.parent)
    shutil.copy(run_dir / "metrics.jsonl", checkpoint.parent.parent / "metrics.jsonl")
    state = json.loads((checkpoint / "state.json").read_text())
    kind = data.draw(st.sampled_from(["top", "top", "nested", "whole"]))
    if kind == "whole":
        blob = json.dumps(data.draw(JSON)).encode()
    else:
        key = data.draw(st.sampled_from(sorted(state)))
        if kind == "nested" and isinstance(state[key], dict) and state[key]:
            state[key][data.draw(st.sampled_from(sorted(state[key])))] = data.draw(JSON | NUMBERS)
        else:
            state[key] = data.draw(JSON | NUMBERS)
        blob = json.dumps(state).encode()
    (checkpoint / "state.json").write_bytes(blob)
    before = _digest(checkpoint.parent.parent)

    def resume():
        loaded = rundir.load_checkpoint_state(checkpoint)
        from ref_bert.pretrain import PretrainConfig

        cfg = rundir.recorded_settings(PretrainConfig(out=str(tmp_path / "new"), resume=str(checkpoint)),
                                       {"out", "resume"}, checkpoint, loaded)
        from ref_bert.pretrain.settings import validate

        validate(cfg)
        return loop.prepare(cfg, checkpoint, loaded)

    job = _expect_value_error(resume, checkpoint, "is invalid", "state", "expected")
    assert _digest(checkpoint.parent.parent) == before
    if job is not None:
        assert job.step == state["step"] and job.optimizer.step_count == state["optimizer"]["step"]


@fuzz(50)
@given(lines=st.lists(JSON.map(json.dumps) | st.text(max_size=12), max_size=4), newline=st.booleans())
def test_fuzz_metrics_lines(tmp_path, lines, newline):
    path = tmp_path / "metrics.jsonl"
    blob = ("\n".join(lines) + ("\n" if newline else "")).encode()
    path.write_bytes(blob)
    records = _expect_value_error(lambda: read_metrics(path), path)
    assert path.read_bytes() == blob
    if records is not None:
        assert all(isinstance(r, dict) and isinstance(r["step"], int) and r["step"] >= 1 for r in records)


# --- the public API -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return Model(TINY, seed=2)


# Ids-like arrays of every shape and several dtypes (uint8 wraps the negative values), and float arrays.
ARRAYS = st.tuples(hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
                              elements=st.integers(-3, 1100)),
                   st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.bool_])).map(
    lambda pair: pair[0].astype(pair[1])) | hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=4))


@fuzz(80)
@given(ids=ARRAYS, types=st.none() | ARRAYS, mask=st.none() | ARRAYS, training=st.sampled_from([False, True, 1, "no"]),
       dropout_seed=st.none() | st.integers(-2, 5) | st.floats(0, 2) | st.lists(st.integers(0, 3), max_size=2),
       masked=st.booleans())
def test_fuzz_model_forward(model, ids, types, mask, training, dropout_seed, masked):
    if masked:
        ids = np.ma.masked_array(ids)
    out = _expect_value_error(lambda: model.forward(ids, types, mask, training=training, dropout_seed=dropout_seed),
                              "input_ids", "token_type_ids", "attention_mask", "training", "dropout_seed")
    if masked:   # a masked array's mask would be ignored: always refused
        assert out is None
    if out is not None:
        assert out.last_hidden_state.shape == (*ids.shape, TINY.hidden_size)
        assert np.isfinite(out.last_hidden_state).all() and np.isfinite(out.mlm_logits).all()


@fuzz(50)
@given(changes=st.dictionaries(st.sampled_from(sorted(f for f in TINY.to_dict())), JSON | NUMBERS, max_size=2),
       dtype=st.sampled_from(["float32", "float64", "float16", "int32", None, 3, ["float32"]]),
       seed=st.integers(-2, 3) | st.floats(0, 2) | st.booleans() | st.none(),
       loss_weights=st.tuples(NUMBERS, NUMBERS) | JSON)
def test_fuzz_config_model_and_loss(changes, dtype, seed, loss_weights):
    def build():
        config = Config.preset("tiny", num_hidden_layers=1).replace(**changes)
        assume(sum(np.prod(s) for s in __import__("ref_bert.params", fromlist=["x"]).parameter_shapes(config).values())
               < 2_000_000)   # a valid but big config: correct, just slow to build here
        m = Model(config, dtype=dtype, seed=seed)
        ids = np.array([[2, 5, 6, 3]]) % config.vocab_size
        return m.loss(ids, mlm_labels=np.array([[-100, 5 % config.vocab_size, -100, -100]]),
                      sop_labels=np.array([1]), loss_weights=loss_weights)

    loss = _expect_value_error(build, "Config.", "dtype", "seed", "loss_weights")
    if loss is not None:
        assert np.isfinite(loss)


@fuzz(40)
@given(source=st.lists(st.integers(-2, 1100), max_size=4) | JSON,
       kwargs=st.fixed_dictionaries({}, optional={
           "beam_size": st.integers(-1, 4) | NUMBERS, "max_length": st.integers(-1, 8) | st.none() | NUMBERS,
           "min_length": st.integers(-1, 9) | NUMBERS, "no_repeat_ngram_size": st.integers(-1, 3) | NUMBERS,
           "length_penalty_alpha": NUMBERS}))
def test_fuzz_generate(model, source, kwargs):
    from ref_bert.generate import NEVER_GENERATED, generate

    kwargs.setdefault("max_length", 4)
    out = _expect_value_error(lambda: generate(model, source, **kwargs), "source", "beam_size", "max_length",
                              "min_length", "no_repeat_ngram_size", "length_penalty_alpha", "forbidden")
    if out is not None:
        assert np.isfinite(out.scores).all()
        for sequence in out.sequences:
            assert not set(sequence) & set(NEVER_GENERATED)
            assert all(0 <= t < TINY.vocab_size for t in sequence)


FLOATS = hnp.arrays(np.float64, st.integers(1, 4), elements=st.floats(-1e3, 1e3) | st.sampled_from(
    [math.nan, math.inf, -math.inf, 0.0]))


@fuzz(80)
@given(ref=FLOATS, noise=st.floats(-1.0, 1.0), cand_nan=st.booleans(), equal_nan=st.booleans(),
       rtol=st.floats(0, 1e-3) | NUMBERS, ints=st.booleans(), missing=st.booleans())
def test_fuzz_verify_compare(ref, noise, cand_nan, equal_nan, rtol, ints, missing):
    """``compare`` agrees with a direct NumPy statement of its rule; it is OK only when something was
    compared, never for NaN against NaN unless ``equal_nan``, and equal infinities are equal."""
    reference = OrderedDict(x=ref)
    cand = ref + noise * np.isfinite(ref)
    if cand_nan:
        cand = np.where(np.isnan(ref), np.nan, cand)
    if ints:
        reference["forward/ids"] = np.array([1, 2, 3])
    candidate = {} if missing else {"x": cand, "forward/ids": np.array([1, 2, 3.0])}
    report = _expect_value_error(lambda: compare(reference, candidate, rtol, 0.0, allow_missing=True,
                                                 equal_nan=equal_nan), "rtol")
    if report is None:
        assert not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and math.isfinite(rtol) and rtol >= 0)
        return
    if missing:
        assert not report.ok and report.compared == 0
        return
    finite = np.abs(ref[np.isfinite(ref)])
    scale = finite.max() if finite.size else 0.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(cand - ref)
    diff[np.isinf(ref) & (cand == ref)] = 0
    if equal_nan:
        diff[np.isnan(ref) & np.isnan(cand)] = 0
    expected_ok = bool(not np.isnan(diff).any() and diff.max() <= rtol * scale) and not ints
    assert report.ok == expected_ok
    if ints:   # a float candidate where the reference has integers is a failure, whatever its values
        assert not report.rows[-1].ok


# --- the command line ---------------------------------------------------------------------------------
def _run_cli(argv, capsys) -> int:
    try:
        code = cli.main(argv)
    except SystemExit as e:    # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 1, 2), (argv, code, err)
    if code == 2:
        assert "error:" in err
    return code


ARG = st.sampled_from(["0", "1", "3", "-1", "x", "", "1e9", "nan", "600", "2 3"]) | st.text(max_size=4)


@fuzz(40)
@given(command=st.sampled_from(["masks", "generate", "verify"]), options=st.lists(st.tuples(st.sampled_from([
    "--source", "--target", "--pad", "--kind", "--png", "--source-ids", "--beam-size", "--max-length", "--min-length",
    "--no-repeat-ngram-size", "--length-penalty", "--rtol", "--atol", "--golden", "--candidate", "--hf",
    "--checkpoint"]), ARG | st.sampled_from(["DIR", "FILE", "GOLDEN", "PNG"])), max_size=4))
def test_fuzz_cli(tmp_path, model_dirs, capsys, command, options):
    from ref_bert.golden import make_inputs, write_golden

    golden = tmp_path / "golden.safetensors"
    if not golden.exists():
        write_golden(golden, Model(TINY, dtype="float64"), make_inputs(TINY, 1, 4, 0), steps=0, seed=0, source="x",
                     progress=False)
    before = {p: _digest(p) for p in (golden, model_dirs)}
    paths = {"DIR": str(model_dirs / "ours"), "FILE": str(model_dirs / "ours" / "config.json"),
             "GOLDEN": str(golden), "PNG": str(tmp_path / "m.png")}
    argv = [command]
    if command == "generate":
        argv += ["--checkpoint", str(model_dirs / "ours"), "--max-length", "3"]
    for flag, value in options:
        argv += [flag, paths.get(value, value)]
    _run_cli(argv, capsys)
    assert {p: _digest(p) for p in before} == before
