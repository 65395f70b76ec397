"""The ``ref-bert`` dispatcher: every registered command builds its parser and answers --help, with one
vocabulary of flags; every command opens every kind of model directory."""
import argparse
import re

import numpy as np
import pytest

from ref_bert.cli import COMMANDS, DTYPE_RULE, build_parser, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_gradcheck_command_runs_the_battery(monkeypatch, capsys):
    calls = {}

    def fake_battery(seed, rtol, floor, verbose, progress):
        calls.update(seed=seed, rtol=rtol, floor=floor, verbose=verbose, progress=progress)
        return False

    import gradcheck.battery
    monkeypatch.setattr(gradcheck.battery, "run_battery", fake_battery)
    assert main(["gradcheck", "--seed", "3", "--rtol", "1e-7", "--no-progress"]) == 1  # a failing battery exits 1
    assert calls == dict(seed=3, rtol=1e-7, floor=1e-4, verbose=False, progress=False)


def _planted_battery_error(monkeypatch):
    import gradcheck.battery

    def failing(**kwargs):
        raise ValueError("planted: --rtol must be positive")

    monkeypatch.setattr(gradcheck.battery, "run_battery", failing)


# one usage error per command, each raised as a ValueError somewhere below the command line
USAGE_ERRORS = {
    "gradcheck": (["gradcheck"], "planted: --rtol must be positive"),
    "masks": (["masks", "--source", "-1"], "--source=-1 is invalid"),
    "generate": (["generate", "--checkpoint", "{tmp}/missing", "--source-ids", "5"], "is not a directory"),
    "golden": (["golden", "--config", "tiny", "--batch-size", "0", "--out", "{tmp}/g.safetensors"], "need batch >= 1"),
    "verify": (["verify", "--golden", "{tmp}/missing.safetensors", "--candidate", "{tmp}/missing.safetensors"],
               "does not exist"),
    "pretrain": (["pretrain", "--out", "{tmp}/run", "--steps", "-1", "--no-progress"], "steps=-1 is invalid"),
    "bench": (["bench", "--steps", "0"], "--steps must be >= 1"),
    "finetune": (["finetune", "--task", "ner", "--out", "{tmp}/ft", "--no-progress"], "task='ner' is invalid"),
}


def test_every_command_has_a_usage_error_case():
    assert set(USAGE_ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(USAGE_ERRORS))
def test_a_value_error_is_reported_once_as_error_and_exit_2(command, tmp_path, capsys, monkeypatch):
    """main() turns a ValueError from any command into one "error: <message>" line on stderr and exit
    status 2: no traceback, nothing on stdout."""
    _planted_battery_error(monkeypatch)
    argv, message = USAGE_ERRORS[command]
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert captured.err.count("error: ") == 1 and "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "g.safetensors").exists()


def test_backend_unavailable_is_reported_as_error_and_exit_2(capsys, monkeypatch):
    import backends
    import gradcheck.battery

    def unavailable(**kwargs):
        raise backends.BackendUnavailable("planted: no GPU here")

    monkeypatch.setattr(gradcheck.battery, "run_battery", unavailable)
    assert main(["gradcheck"]) == 2
    err = capsys.readouterr().err
    assert err == "error: planted: no GPU here\n"


def test_other_exceptions_are_not_swallowed(monkeypatch):
    import gradcheck.battery

    def broken(**kwargs):
        raise RuntimeError("a bug, not a usage error")

    monkeypatch.setattr(gradcheck.battery, "run_battery", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["gradcheck"])


@pytest.mark.parametrize("module, command", [("ref_bert.cli", "ref-bert"), ("gradcheck", "gradcheck"),
                                             ("benchmarks", "bench")])
def test_python_dash_m_entry_points(module, command):
    """``python -m ref_bert.cli``, ``python -m gradcheck`` and ``python -m benchmarks`` reach the same parser."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert command in result.stdout
    if module != "ref_bert.cli":
        bad = subprocess.run([sys.executable, "-m", module, "--no-such-flag"], capture_output=True, text=True)
        assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


# --- one vocabulary of flags, every default shown, --version -----------------------------------------
RETIRED_FLAGS = ("--batch", "--seq", "--blas-threads")
# pretrain's flags are renamed to the same vocabulary in its own change; it joins these checks then
VOCABULARY_CHECKED = sorted(set(COMMANDS) - {"pretrain"})


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def _options(sub):
    return [a for a in sub._actions if a.option_strings and a.help is not argparse.SUPPRESS]


@pytest.mark.parametrize("command", VOCABULARY_CHECKED)
def test_one_vocabulary_of_flags(command):
    flags = {s for a in _subparsers()[command]._actions for s in a.option_strings}
    assert not flags & set(RETIRED_FLAGS), f"{command} still has {sorted(flags & set(RETIRED_FLAGS))}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_default_is_shown_in_help(command):
    sub = _subparsers()[command]
    formatter = sub.formatter_class(prog=sub.prog)
    for action in _options(sub):
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action)
        numbers = [float(t) for t in re.findall(r"(?<![\w.])[-+]?\d*\.?\d+(?:e[-+]?\d+)?", text)]
        for value in (default if isinstance(default, (list, tuple)) else [default]):
            shown = value in numbers if isinstance(value, (int, float)) else str(value) in text
            assert shown, f"{command} {action.option_strings[0]}: default {value!r} not shown in {text!r}"


@pytest.mark.parametrize("command", VOCABULARY_CHECKED)
def test_dtype_help_states_the_one_rule(command):
    for action in _options(_subparsers()[command]):
        if "--dtype" in action.option_strings:
            assert DTYPE_RULE in action.help


def test_the_vocabulary_is_used_where_it_applies():
    subs = _subparsers()
    flags = {name: {s for a in sub._actions for s in a.option_strings} for name, sub in subs.items()}
    for command in ("golden", "verify", "bench"):
        assert {"--batch-size", "--seq-len", "--no-progress"} <= flags[command], command
    assert "--threads" in flags["bench"] and "--no-progress" in flags["gradcheck"]
    for command in ("golden", "bench"):
        config = next(a for a in subs[command]._actions if "--config" in a.option_strings)
        assert config.metavar == "PRESET|FILE|DIR"


def test_version(capsys):
    from ref_bert import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"ref-bert {__version__}\n"


def test_config_preset_file_or_directory(tmp_path):
    from ref_bert import Config, Model
    from ref_bert.checkpoint import save_model
    from ref_bert.cli import resolve_config

    tiny = Config.preset("tiny")
    (tmp_path / "tiny.json").write_text(tiny.to_json())
    save_model(Model(tiny, dtype="float32"), tmp_path / "ours")
    hf_expressible = tiny.replace(ffn_output_dropout=False)   # HF ALBERT has no FFN-output dropout
    Model(hf_expressible, dtype="float32").save_hf(tmp_path / "theirs")
    for value, expected in (("tiny", tiny), (tmp_path / "tiny.json", tiny), (tmp_path / "ours", tiny),
                            (tmp_path / "theirs", hf_expressible)):
        config, _ = resolve_config(str(value))
        assert config == expected, value   # every field (the name is not compared)
    assert "Hugging Face" in resolve_config(str(tmp_path / "theirs"))[1]
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_config(str(tmp_path / "missing"))


# --- every kind of model directory -------------------------------------------------------------------
def _directories(tmp_path, dtype="float64"):
    """The same tiny decoding model saved as a ref-bert directory and by save_hf."""
    from ref_bert.checkpoint import save_model
    from tests.test_generate import decoding_model

    model = decoding_model(seed=5, dtype=dtype, ffn_output_dropout=False)   # a config HF expresses fully
    save_model(model, tmp_path / "ours")
    model.save_hf(tmp_path / "hf")
    return model, {"ours": tmp_path / "ours", "hf": tmp_path / "hf"}


KIND_LINE = {"ours": "found a ref-bert model directory", "hf": "found a Hugging Face model directory"}


def test_generate_on_every_kind_of_directory(tmp_path, capsys):
    _, dirs = _directories(tmp_path)
    outputs = {}
    for name, path in dirs.items():
        assert main(["generate", "--checkpoint", str(path), "--source-ids", "5 17 9", "--max-length", "6",
                     "--dtype", "float64", "--scores"]) == 0
        captured = capsys.readouterr()
        assert captured.err.startswith(f"generate: {KIND_LINE[name]}"), captured.err
        outputs[name] = captured.out
    assert outputs["ours"] == outputs["hf"]


def test_golden_on_every_kind_of_directory(tmp_path, capsys):
    from ref_bert import golden

    _, dirs = _directories(tmp_path)
    files = {}
    for name, path in dirs.items():
        files[name] = tmp_path / f"{name}.golden.safetensors"
        assert main(["golden", "--hf", str(path), "--out", str(files[name]), "--seq-len", "8", "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert captured.err == f"golden: {KIND_LINE[name]}" + captured.err[len(f"golden: {KIND_LINE[name]}"):]
        assert len(captured.err.splitlines()) == 1, captured.err
    ours, _ = golden.read_golden(files["ours"])
    theirs, _ = golden.read_golden(files["hf"])
    assert list(ours) == list(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_golden_announces_a_large_file(tmp_path, capsys, monkeypatch):
    import os

    from ref_bert.cli import golden as golden_cli

    out = tmp_path / "g.safetensors"
    monkeypatch.setattr(golden_cli, "LARGE_FILE_BYTES", 0)
    assert main(["golden", "--config", "tiny", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    match = re.fullmatch(r"golden: about (\d+) MB will be written to (.+)\n", err)
    assert match and match.group(2) == str(out), err
    assert abs(int(match.group(1)) - os.path.getsize(out) / 1e6) < 1
    monkeypatch.setattr(golden_cli, "LARGE_FILE_BYTES", 100 * 2**20)   # the tiny file is below the real limit
    assert main(["golden", "--config", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_golden_size_for_bert_base_is_announced():
    """The notice's arithmetic, on bert-base's parameter count: parameters, gradients and the parameters
    after the steps alone are 3 x 110M float64 values, ~2.6 GB."""
    import io

    from ref_bert.cli import golden as golden_cli

    buffer = io.StringIO()
    golden_cli.announce_size("bert.golden.safetensors", 3 * 110_000_000 * 8, out=buffer)
    assert buffer.getvalue() == "golden: about 2640 MB will be written to bert.golden.safetensors\n"


def test_progress_bars_go_to_stderr(tmp_path, capsys):
    assert main(["golden", "--config", "tiny", "--out", str(tmp_path / "g.safetensors"), "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "golden" in captured.err and "stage" in captured.err
    assert "stage" not in captured.out


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_verify_on_every_kind_of_directory_quietly(kind, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _, dirs = _directories(tmp_path, dtype="float32")
    assert main(["verify", "--hf", str(dirs[kind]), "--seq-len", "8", "--no-progress"]) == 0
    captured = capsys.readouterr()
    # one line naming the kind found, and nothing of transformers' own (its "Loading weights" bar, its logs)
    assert captured.err.splitlines() == [captured.err.splitlines()[0]], captured.err
    assert KIND_LINE[kind] in captured.err
    assert "Loading" not in captured.err and "it/s" not in captured.err
    assert "verify: OK" in captured.out.splitlines()[-1]
    if kind == "ours":
        assert "comparing it with transformers through save_hf" in captured.out
