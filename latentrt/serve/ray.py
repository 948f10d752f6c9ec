"""Scale-out: replicas of the latentrt server under Ray Serve (the ``ray`` extra).

Each replica is a Ray actor holding its own model and ``Engine`` and serving the same FastAPI app as
``latentrt serve`` (app.py: the OpenAI routes, /health, /metrics); Ray's HTTP proxy spreads requests over
the replicas. A replica builds its app when it starts, from the configuration ``application`` gives it
(through an environment variable of the replica's runtime env: nothing is pickled but plain JSON).

    python -m latentrt.serve.ray builtin:recurrent --replicas 2 --port 8000

or, from Python, ``serve.run(latentrt.serve.ray.application("builtin:recurrent", replicas=2))``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

CONFIG_ENV = "LATENTRT_RAY_REPLICA"


def build_app():
    """The FastAPI app of one replica, from its configuration (runs inside the replica)."""
    from .app import create_app, load_engine

    cfg = json.loads(os.environ[CONFIG_ENV])
    engine = load_engine(cfg["model"], **cfg["load"], **cfg["engine"])
    return create_app(engine, cfg["name"], chat_template=cfg.get("chat_template"), api_key=cfg.get("api_key"))


def application(
    model: str = "builtin:recurrent",
    *,
    replicas: int = 2,
    name: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    revision: str | None = None,
    chat_template: str | None = None,
    api_key: str | None = None,
    **engine_kw,
):
    """A Ray Serve application of ``replicas`` servers of ``model``; ``engine_kw`` go to each ``Engine``
    (max_batch, max_queue, max_len, kv_slots, scheduler, edge_cost, async_scheduling), the resources to each
    replica's actor; ``chat_template`` (a file's path) and ``api_key`` as ``latentrt serve``'s."""
    from ray import serve

    cfg = {
        "model": model,
        "name": name or model,
        "load": {"device": device, "dtype": dtype, "backend": backend, "revision": revision},
        "engine": engine_kw,
        "chat_template": None if chat_template is None else os.path.abspath(chat_template),
        "api_key": api_key,
    }

    @serve.deployment(name="latentrt")
    @serve.ingress(build_app)
    class LatentRTReplica:
        """One engine behind Ray's proxy (the routes are the app's)."""

    options = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": {CONFIG_ENV: json.dumps(cfg)}},
    }
    return LatentRTReplica.options(num_replicas=replicas, ray_actor_options=options).bind()


def check_before_starting(args) -> None:
    """What every replica would refuse, refused before Ray starts (a replica that fails to build is a Ray
    traceback after its retries): counts out of bounds, the model's folder and config (no weights read),
    the template file, a port in use or a host that does not resolve (Ray's proxy would fail to bind it)."""
    from ..chat import chat_template_file
    from ..cli import api_key_from
    from ..cli_flags import check_counts
    from ..loader import read_model_config
    from .app import listening_socket

    check_counts(args)
    api_key_from(args.api_key)
    folder, _, _ = read_model_config(args.model)
    if args.chat_template is not None:
        chat_template_file(args.chat_template, folder)
    listening_socket(args.host, args.port).close()  # free now: Ray's proxy takes it a few seconds later


def stop_on_signals(stop: threading.Event) -> None:
    """A first SIGINT or SIGTERM sets ``stop`` (the main thread, waiting on it, then drains the replicas); a
    second one raises KeyboardInterrupt in the main thread (``main`` then stops Ray at once)."""

    def handler(*_) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    from ..backends import CHOICES
    from ..cli import api_key_from
    from ..errors import LatentRTError
    from .engine import SCHEDULERS

    ap = argparse.ArgumentParser(
        prog="python -m latentrt.serve.ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", nargs="?", default="builtin:recurrent")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    ap.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--scheduler", default="depth", choices=SCHEDULERS)
    ap.add_argument("--backend", default="auto", choices=CHOICES)
    ap.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too (slower to start)")
    ap.add_argument("--chat-template", default=None, metavar="FILE", help="a jinja chat template (as latentrt serve)")
    ap.add_argument("--api-key", default=None, help="as latentrt serve (default: $LATENTRT_API_KEY)")
    args = ap.parse_args(argv)
    try:
        check_before_starting(args)
    except LatentRTError as exc:
        print(f"latentrt: error: {exc}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    # Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to this process: the replicas drain and Ray
    # stops (serve.shutdown, ~5 s). Set before Ray starts, so one during the start is no traceback, and again
    # after ray.init, which sets a SIGTERM handler of its own (a plain sys.exit: no drain, Ray left running).
    # (SIGTERM to the whole group also kills Serve's controller, and serve.shutdown then waits its 30 s.)
    # A second one, during the drain or the start, stops Ray at once: ray.shutdown ends the processes ray.init
    # started (the replicas among them), so nothing is left running, and their requests are cut short.
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        ray.init(include_dashboard=args.dashboard)
        stop_on_signals(stop)
        serve.start(http_options={"host": args.host, "port": args.port})
        app = application(
            args.model,
            replicas=args.replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            backend=args.backend,
            max_batch=args.max_batch,
            scheduler=args.scheduler,
            chat_template=args.chat_template,
            api_key=api_key_from(args.api_key),
        )
        serve.run(app, route_prefix="/")
        if not stop.is_set():
            print(f"latentrt: {args.replicas} replicas of {args.model} on http://{args.host}:{args.port}", flush=True)
        stop.wait()
        serve.shutdown()
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a third while Ray stops: no traceback either
            signal.signal(sig, signal.SIG_IGN)
        ray.shutdown()
        print("latentrt: forced exit (Ray stopped without draining the replicas)", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
