"""Scale-out: the README's Ray Serve command (two CPU replicas of a built-in model) serves the same OpenAI
routes through Ray's proxy, each answer equal to generate() alone, both replicas serving."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import latentrt
from latentrt.checkpoint import BUILTIN_DIR

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
RAY_COMMAND = next(
    c
    for c in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    if "latentrt.serve.ray" in c
).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_ray_command_serves_two_replicas(tmp_path):
    port = free_port()
    argv = shlex.split(RAY_COMMAND.replace("--port 8000", f"--port {port}"))
    assert argv[:3] == ["python", "-m", "latentrt.serve.ray"] and "--replicas" in argv
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    shutil.copytree(BUILTIN_DIR / "recurrent", tmp_path / "m")  # a folder given relative to the launcher's cwd
    argv = [sys.executable, *argv[1:], "--num-cpus", "0.5", "--backend", "torch", "--max-batch", "4"]
    argv = [a.replace("builtin:recurrent", "m") for a in argv]
    argv += ["--chat-template", "t.jinja", "--api-key", "k3y"]  # (relative: the replicas get its absolute path)
    argv += ["--served-model-name", "tiny", "--override-generation-config", '{"num_steps": 3}']  # serve's flags
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    log = open(tmp_path / "ray.log", "w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        pids, deadline = set(), time.time() + 150
        while len(pids) < 2 and time.time() < deadline:  # the proxy spreads requests over both replicas
            assert proc.poll() is None, (tmp_path / "ray.log").read_text()[-3000:]
            try:
                r = httpx.get(url + "/health", timeout=30)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert len(pids) == 2, (tmp_path / "ray.log").read_text()[-3000:]
        model = latentrt.load("builtin:recurrent", backend="torch")
        questions = ["Tom is a wumpus . Every wumpus is a yumpus . Is Tom a yumpus or dumpus ?"] * 3 + [
            "Sally is a lempus . Is Sally a lempus or zumpus ?"
        ] * 3
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert httpx.post(url + "/v1/completions", json={"prompt": "Tom", "max_tokens": 1}).status_code == 401
        assert [m.id for m in client.models.list()] == ["tiny"]
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": questions[0]}], max_tokens=4, temperature=0
        )
        ids = model.tokenizer.encode(questions[0] + " ", add_special_tokens=False).ids
        assert chat.choices[0].message.content == latentrt.generate(model, ids, max_new_tokens=4, num_steps=3).text

        def ask(i):
            return client.completions.create(
                model="tiny",
                prompt=questions[i],
                max_tokens=12,
                temperature=0,
                seed=i,
                extra_body={"adaptive": True},
            )

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        for i, a in enumerate(answers):
            alone = latentrt.generate(model, questions[i], max_new_tokens=12, seed=i, adaptive=True, num_steps=3)
            assert a.choices[0].latentrt == {"token_ids": alone.tokens, "steps": alone.steps}
            assert a.choices[0].text == alone.text
        # Ctrl-C in its terminal (SIGINT to the process group): the replicas drain, Ray stops, exit 0
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, (tmp_path / "ray.log").read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        log.close()


def test_the_launcher_refuses_what_every_replica_would_before_starting_ray(tmp_path, capsys, monkeypatch):
    """A bad model, count or template file: ``latentrt: error: ...`` and exit 2 at once, not a Ray traceback
    after each replica's retries (``ray.init`` must not be reached)."""
    from latentrt.serve.ray import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        (["builtin:nope"], "no built-in model 'nope'"),
        ([str(tmp_path)], "has no config.json"),
        (["--replicas", "0"], "--replicas must be >= 1, got 0"),
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
        (["--port", "70000"], "--port must be in [1, 65535], got 70000"),
        (["--chat-template", str(tmp_path / "none.jinja")], "cannot read the chat template"),
        (["--port", str(busy.getsockname()[1])], f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}"),
        # latentrt serve's flags, checked as far as they can be without the weights
        (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
        (["--weights", str(tmp_path / "none.safetensors")], "is not a file"),
        (["--hf-overrides", "[1]"], "--hf-overrides must be a JSON object, got list"),
        (["--hf-overrides", '{"mean_recurrence": "x"}'], "mean_recurrence"),
        (["--override-generation-config", "{"], "--override-generation-config must be a JSON object"),
        (["--override-generation-config", '{"temprature": 0.5}'], "did you mean 'temperature'"),
        (["--override-generation-config", '{"num_thoughts": 2}'], "num_thoughts does not apply"),
        (["--override-generation-config", '{"hooks": 1}'], "cannot be server defaults"),
        (["--dtype", "float8"], "dtype"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("latentrt: error:") and message in err, (argv, err)
    busy.close()


@pytest.mark.parametrize("second", ["during the drain", "during the start"])
def test_a_second_ctrl_c_stops_ray_at_once_in_one_line(monkeypatch, capsys, second):
    """The launcher's first Ctrl-C drains the replicas (serve.shutdown); a second, while they drain or while Ray
    starts, stops Ray at once (ray.shutdown: the processes ray.init started end with it, none is left) and
    exits 130 with one line, no traceback. Ray itself is stood in for: what is checked is the launcher's
    handling of the signals (the README test runs the real drain)."""
    import threading

    from ray import serve

    from latentrt.serve import ray as launcher

    calls = []

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)

    def slow(name):  # a Ray call taking its time, interrupted by the signal a handler turns into an exception
        def call(*args, **kwargs):
            calls.append(name)
            if second == "during the start" and name == "serve.run":
                ctrl_c()
                ctrl_c()
            elif second == "during the drain" and name == "serve.shutdown":
                ctrl_c()
            for _ in range(100):
                time.sleep(0.05)
            pytest.fail(f"{name} was not interrupted")

        return call

    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("ray.init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(launcher, "application", lambda *a, **kw: "app")
    if second == "during the start":
        monkeypatch.setattr(serve, "run", slow("serve.run"))
    else:
        monkeypatch.setattr(serve, "run", lambda app, **kw: calls.append("serve.run"))
        threading.Timer(0.3, ctrl_c).start()  # the first, while the launcher waits
    monkeypatch.setattr(serve, "shutdown", slow("serve.shutdown"))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert launcher.main(["builtin:recurrent", "--port", str(free_port())]) == 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    ended = (
        ["serve.run", "ray.shutdown"]
        if second == "during the start"
        else ["serve.run", "serve.shutdown", "ray.shutdown"]
    )
    assert calls == ["ray.init", "serve.start", *ended], calls
    err = capsys.readouterr().err
    assert err == "latentrt: forced exit (Ray stopped without draining the replicas)\n", err


def test_every_replica_builds_the_app_the_launcher_configured(tmp_path, monkeypatch):
    """The replica's configuration round-trips through JSON to ``load_engine`` and ``create_app`` as ``latentrt serve``
    passes them: loading options (revision, weights, overrides, dtype, backend, device), engine options, the served
    name, the template, the API key, the origins, the tool-call parser and the store, the merged and the served LoRA
    adapters; a folder, weights, adapter folders and a template given relative to the launcher's directory reach the
    replicas absolute, a Hub id or builtin:NAME unchanged."""
    import json

    from latentrt.serve import app as serve_app
    from latentrt.serve import ray as serve_ray

    for folder in ("m", "a", "sql"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = serve_ray.replica_config(
        "m",
        name="tiny",
        device="cpu",
        dtype="float32",
        backend="torch",
        revision="r1",
        weights="w.safetensors",
        hf_overrides={"mean_recurrence": 4},
        adapter="a",
        lora_modules={"sql": "sql", "hub": "owner/adapter"},
        generation_config={"num_steps": 3},
        chat_template="t.jinja",
        api_key="k3y",
        allowed_origins=["https://app.example"],
        tool_call_parser="hermes",
        responses_store=5,
        max_batch=4,
        scheduler="token",
    )
    seen = {}
    monkeypatch.setattr(serve_app, "load_engine", lambda model, **kw: seen.update(model=model, load=kw) or "engine")
    monkeypatch.setattr(
        serve_app, "create_app", lambda engine, name, **kw: seen.update(engine=engine, name=name, app=kw) or "app"
    )
    monkeypatch.setenv(serve_ray.CONFIG_ENV, json.dumps(cfg))
    assert serve_ray.build_app() == "app"
    assert seen == {
        "model": str(tmp_path / "m"),
        "load": dict(
            device="cpu",
            dtype="float32",
            backend="torch",
            revision="r1",
            weights=str(tmp_path / "w.safetensors"),
            hf_overrides={"mean_recurrence": 4},
            adapter=str(tmp_path / "a"),
            lora_modules={"sql": str(tmp_path / "sql"), "hub": "owner/adapter"},
            max_loras=None,
            max_lora_rank=None,
            generation_config={"num_steps": 3},
            max_batch=4,
            scheduler="token",
        ),
        "engine": "engine",
        "name": "tiny",
        "app": dict(
            chat_template=str(tmp_path / "t.jinja"),
            api_key="k3y",
            allowed_origins=["https://app.example"],
            tool_call_parser="hermes",
            responses_store=5,
        ),
    }
    for model in ("builtin:recurrent", "tomg-group-umd/huginn-0125"):
        plain = serve_ray.replica_config(model)
        assert plain["model"] == plain["name"] == model
        assert plain["load"]["weights"] is plain["chat_template"] is plain["api_key"] is None
    # the Ray Serve application is built without a cluster (its replicas start on serve.run): the count, each
    # replica's resources and its configuration in its runtime env (Ray's bound deployment, read back)
    bound = serve_ray.application("m", replicas=3, num_cpus=0.5, num_gpus=1, name="tiny", max_batch=4)._bound_deployment
    assert bound.num_replicas == 3
    actor = bound.ray_actor_options
    assert (actor["num_cpus"], actor["num_gpus"]) == (0.5, 1)
    assert json.loads(actor["runtime_env"]["env_vars"][serve_ray.CONFIG_ENV]) == serve_ray.replica_config(
        "m", name="tiny", max_batch=4
    )
