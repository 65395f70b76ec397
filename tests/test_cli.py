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

    def fake_battery(seed, rtol, floor, verbose):
        calls.update(seed=seed, rtol=rtol, floor=floor, verbose=verbose)
        return False

    import gradcheck.battery
    monkeypatch.setattr(gradcheck.battery, "run_battery", fake_battery)
    assert main(["gradcheck", "--seed", "3", "--rtol", "1e-7"]) == 1  # a failing battery exits 1
    assert calls == dict(seed=3, rtol=1e-7, floor=1e-4, verbose=False)
