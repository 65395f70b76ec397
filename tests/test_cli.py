"""The ``ref-bert`` dispatcher: every registered command builds its parser and answers --help."""
import pytest

from ref_bert.cli import COMMANDS, build_parser, main


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
