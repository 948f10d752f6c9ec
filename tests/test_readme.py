"""Every code block of the README runs: python blocks in order in one namespace, shell commands one by one.

The install and test commands of the first block are what .ci/run runs (checked here); a command documented
as long (training all four built-in models) runs here in its quick form, named in QUICK.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, flags=re.S)
CI = (ROOT / ".ci" / "run").read_text()
# documented command -> what this test runs (the same command, made short)
QUICK = {
    "python -m latentrt.train.builtin --seed 0 --out retrained": (
        "python -m latentrt.train.builtin --seed 0 --out retrained --only recurrent --steps 2"
    ),
}


def _commands(block: str) -> list[str]:
    lines = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.extend(part.strip() for part in line.split("&&"))
    return lines


def test_the_first_lines_are_the_two_commands_a_newcomer_types():
    kind, first = BLOCKS[0]
    assert README.startswith("# latentrt\n\n```bash\n") and kind == "bash"
    commands = _commands(first)
    assert commands[-1] == "python -m pytest" and any(c.startswith("latentrt generate builtin:") for c in commands)
    for install in (c for c in commands if c.startswith("pip install")):  # CI installs the same way
        assert install.replace("pip install", "python -m pip install -q") in CI, install
    assert "python -m pytest" in CI


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    ran = 0
    for kind, code in BLOCKS:
        if kind == "python":
            exec(compile(code, "README.md", "exec"), namespace)
            ran += 1
    assert ran >= 2


SHELL = [c for kind, code in BLOCKS[1:] if kind == "bash" for c in _commands(code)]
SHELL += [c for c in _commands(BLOCKS[0][1]) if c.startswith("latentrt ")]


@pytest.mark.parametrize("command", SHELL)
def test_shell_commands_run(command, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "readme"  # one folder: later commands use earlier outputs
    work.mkdir(exist_ok=True)
    argv = shlex.split(QUICK.get(command, command))
    if argv[0] == "latentrt":
        argv = [sys.executable, "-m", "latentrt.cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    else:
        pytest.fail(f"the README documents a command this test does not know how to run: {command}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs them
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"{command}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
