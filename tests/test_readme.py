"""Every code block of README.md runs as written.

The Python blocks run one after another, each in a fresh namespace, in a temporary working directory.
The shell blocks after the first run one after another in one temporary directory (later blocks use
what earlier ones wrote, as a reader following the README would), with the ``ref-bert`` and ``python``
of this environment first on the PATH. The first shell block holds the two set-up commands (make a
virtual environment, install, run the main job or the tests): CI runs exactly those, read from the
README by .ci/readme-commands (.ci/run), so here they are only checked to be that block.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2), README[:m.start()].count("\n") + 1)
          for m in re.finditer(r"```(\w+)\n(.*?)```", README, re.S)]
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]
SHELL = [(code, line) for lang, code, line in BLOCKS if lang == "bash"]


def test_the_first_shell_block_is_the_two_setup_commands_ci_runs():
    commands = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme-commands")], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    assert len(commands) == 2 and all(c in SHELL[0][0] for c in commands)
    assert "ref-bert pretrain" in commands[0] and commands[1].endswith("python -m pytest -q")


@pytest.mark.parametrize("code,line", PYTHON, ids=[f"python@{line}" for _, line in PYTHON])
def test_python_block_runs(code, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_shell_blocks_run_in_order(tmp_path):
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT))
    for code, line in SHELL[1:]:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"README.md:{line} failed:\n{code}\n--- stderr:\n{result.stderr[-3000:]}"
