"""Scale-out: two CPU replicas of a built-in model under Ray Serve, the same OpenAI routes through Ray's
proxy, each answer equal to generate() alone, both replicas serving."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import latentrt

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_behind_rays_proxy():
    from latentrt.serve.ray import application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            application("builtin:recurrent", replicas=2, num_cpus=0.5, backend="torch", max_batch=4), route_prefix="/"
        )
        url = f"http://127.0.0.1:{port}"
        pids = set()
        deadline = time.time() + 60
        while len(pids) < 2 and time.time() < deadline:  # the proxy spreads requests over both replicas
            r = httpx.get(url + "/health", timeout=30)
            assert r.status_code == 200
            pids.add(r.json()["pid"])
        assert len(pids) == 2
        model = latentrt.load("builtin:recurrent", backend="torch")
        questions = ["Tom is a wumpus . Every wumpus is a yumpus . Is Tom a yumpus or dumpus ?"] * 3 + [
            "Sally is a lempus . Is Sally a lempus or zumpus ?"
        ] * 3
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(i):
            return client.completions.create(
                model="builtin:recurrent",
                prompt=questions[i],
                max_tokens=12,
                temperature=0,
                seed=i,
                extra_body={"adaptive": True},
            )

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        for i, a in enumerate(answers):
            alone = latentrt.generate(model, questions[i], max_new_tokens=12, seed=i, adaptive=True)
            assert a.choices[0].latentrt == {"token_ids": alone.tokens, "steps": alone.steps}
            assert a.choices[0].text == alone.text
    finally:
        serve.shutdown()
        ray.shutdown()
