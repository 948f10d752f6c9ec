"""Every code block of the README runs: python blocks in order in one namespace, shell commands one by one.

The install and test commands of the first block are what .ci/run runs (checked here); a command documented
as long (training all four built-in models) runs here in its quick form, named in QUICK.
"""

import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
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


SERVER_URL = "http://127.0.0.1:8000"  # the serving section's blocks talk to the server it starts


def _is_client(code: str) -> bool:
    return SERVER_URL in code


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    ran = 0
    for kind, code in BLOCKS:
        if kind == "python" and not _is_client(code):
            exec(compile(code, "README.md", "exec"), namespace)
            ran += 1
    assert ran >= 2


SHELL = [c for kind, code in BLOCKS[1:] if kind == "bash" for c in _commands(code)]
SHELL += [c for c in _commands(BLOCKS[0][1]) if c.startswith("latentrt ")]
SERVE = [c for c in SHELL if c.startswith("latentrt serve ")]
RAY = [c for c in SHELL if c.startswith("python -m latentrt.serve.ray ")]  # run by tests/test_serve_ray.py
CURL = [c for c in SHELL if c.startswith("curl ")]
SHELL = [c for c in SHELL if c not in SERVE + RAY + CURL]


def test_serving_blocks_run(tmp_path):
    """The README's server command starts; its curl command and Python client block get answers from it."""
    import httpx

    assert len(SERVE) == 1 and CURL and RAY
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "latentrt.cli", *shlex.split(SERVE[0])[1:]]
    argv = [a if a != "8000" else str(port) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.3)
        for command in CURL:
            res = subprocess.run(
                shlex.split(command.replace(SERVER_URL, url)), capture_output=True, text=True, timeout=120
            )
            assert res.returncode == 0 and '"choices"' in res.stdout, (command, res.stdout, res.stderr)
        clients = [code for kind, code in BLOCKS if kind == "python" and _is_client(code)]
        assert clients
        for code in clients:
            exec(compile(code.replace(SERVER_URL, url), "README.md", "exec"), {})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_latentrt_console_script_runs_the_cli():
    """The README's commands are typed as ``latentrt ...``: the installed script (pyproject's entry point) runs
    the CLI that test_shell_commands_run calls in-process."""
    import shutil

    script = shutil.which("latentrt")
    if script is None:
        pytest.skip("latentrt is not installed as a command here (pip install -e . installs it)")
    res = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--adaptive" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("command", SHELL)
def test_shell_commands_run(command, tmp_path_factory, monkeypatch, capsys):
    """Each documented command exits 0: ``latentrt ...`` through the CLI's main() in this process (what the
    console script calls; a process each cost CI ~2.5 s of imports apiece; the serving and Ray tests and
    test_cli run the CLI as a process), ``python ...`` as a process."""
    work = tmp_path_factory.getbasetemp() / "readme"  # one folder: later commands use earlier outputs
    work.mkdir(exist_ok=True)
    stdin, command = None, QUICK.get(command, command)
    if " | " in command:  # echo TEXT | latentrt ...: TEXT on the command's standard input
        feed, command = command.split(" | ", 1)
        assert shlex.split(feed)[0] == "echo", command
        stdin = " ".join(shlex.split(feed)[1:]) + "\n"
    argv = shlex.split(command)
    if argv[0] == "latentrt":
        from latentrt.cli import main

        monkeypatch.chdir(work)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code = main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, f"{command}\n{out.out[-1500:]}\n{out.err[-3000:]}"
        return
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    else:
        pytest.fail(f"the README documents a command this test does not know how to run: {command}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs them
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=600, env=env, input=stdin)
    assert res.returncode == 0, f"{command}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
