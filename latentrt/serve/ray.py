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
    return create_app(
        engine,
        cfg["name"],
        chat_template=cfg.get("chat_template"),
        api_key=cfg.get("api_key"),
        allowed_origins=cfg.get("allowed_origins"),
        tool_call_parser=cfg.get("tool_call_parser"),
        responses_store=cfg.get("responses_store", 0),
    )


def _absolute(path: str | None) -> str | None:
    """A file or folder given relative to the launcher's directory, for replicas that run elsewhere."""
    return None if path is None else os.path.abspath(path)


def replica_config(
    model: str = "builtin:recurrent",
    *,
    name: str | list[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    revision: str | None = None,
    weights: str | None = None,
    hf_overrides: dict | None = None,
    adapter: str | None = None,
    lora_modules: dict[str, str] | None = None,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    runtime_lora_updating: bool = False,
    generation_config: dict | None = None,
    chat_template: str | None = None,
    api_key: str | None = None,
    allowed_origins: list[str] | None = None,
    tool_call_parser: str | None = None,
    responses_store: int = 0,
    **engine_kw,
) -> dict:
    """What a replica's ``build_app`` reads (JSON): the model and its loading options, the engine's, the name
    clients send (default: ``model``), the template and the API key; a model folder, ``weights`` and
    ``chat_template`` made absolute (the replicas may run in another directory)."""
    local = os.path.isdir(model)  # (a folder, not a Hub id or builtin:NAME: the replicas need its full path)
    return {
        "model": _absolute(model) if local else model,
        "name": name or model,
        "load": {
            "device": device,
            "dtype": dtype,
            "backend": backend,
            "revision": revision,
            "weights": _absolute(weights),
            "hf_overrides": hf_overrides or {},
            "adapter": _absolute(adapter) if adapter is not None and os.path.isdir(adapter) else adapter,
            "lora_modules": {n: _absolute(p) if os.path.isdir(p) else p for n, p in (lora_modules or {}).items()},
            "max_loras": max_loras,
            "max_lora_rank": max_lora_rank,
            "generation_config": generation_config or {},
        },
        "engine": engine_kw,
        "chat_template": _absolute(chat_template),
        "api_key": api_key,
        "allowed_origins": allowed_origins,
        "tool_call_parser": tool_call_parser,
        "responses_store": responses_store,
    }


def application(
    model: str = "builtin:recurrent",
    *,
    replicas: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    **options,
):
    """A Ray Serve application of ``replicas`` servers of ``model``, each what ``latentrt serve`` with the same options
    serves (``replica_config``'s: ``name``, ``device``, ``dtype``, ``backend``, ``revision``, ``weights``,
    ``hf_overrides`` and ``generation_config`` as ``--hf-overrides`` and ``--override-generation-config``,
    ``adapter`` (merged) and ``lora_modules`` (served: name -> adapter folder or Hub id),
    ``chat_template`` (a file's path), ``api_key``, ``allowed_origins``, ``tool_call_parser``,
    ``responses_store`` (each replica its own), and the rest to each ``Engine``: max_batch, max_queue, max_len,
    kv_slots, scheduler, edge_cost, async_scheduling, max_num_steps); the resources to each replica's actor.
    Values must be JSON (they reach the replicas as JSON)."""
    from ray import serve

    cfg = replica_config(model, **options)

    @serve.deployment(name="latentrt")
    @serve.ingress(build_app)
    class LatentRTReplica:
        """One engine behind Ray's proxy (the routes are the app's)."""

    actor = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": {CONFIG_ENV: json.dumps(cfg)}},
    }
    return LatentRTReplica.options(num_replicas=replicas, ray_actor_options=actor).bind()


def check_before_starting(args) -> None:
    """What every replica would refuse, refused before Ray starts (a replica that fails to build is a Ray
    traceback after its retries): counts out of bounds, the model's folder and config with --hf-overrides (no
    weights read), --dtype, a --weights file that is not there, --override-generation-config as far as the model's
    family tells, the template file, a port in use or a host that does not resolve (Ray's proxy would fail to
    bind it)."""
    from ..chat import chat_template_file
    from ..checkpoint import read_generation_config
    from ..cli import api_key_from
    from ..cli_flags import check_counts, json_object, lora_options, model_options, responses_store, tool_call_parser
    from ..errors import InputError
    from ..loader import parse_dtype, read_model_config
    from ..options import generation_defaults
    from .app import check_origins, listening_socket
    from .engine import checked_defaults

    check_counts(args)
    api_key_from(args.api_key)
    tool_call_parser(args)
    responses_store(args)
    if args.allow_runtime_lora_updating:
        raise InputError(
            "--allow-runtime-lora-updating is not for Ray replicas: a load would reach one replica only; serve the "
            "adapters with --lora-modules"
        )
    lora_options(args)
    if args.allowed_origins is not None:
        check_origins(args.allowed_origins)
    load = model_options(args)
    folder, _, family = read_model_config(args.model, args.revision, **load["hf_overrides"])
    if args.dtype is not None:  # (the device is the replicas': a GPU node's, perhaps not this one's)
        parse_dtype(args.dtype, None)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise InputError(f"--weights {args.weights!r} is not a file")
    override = json_object(args.override_generation_config, "--override-generation-config")
    if override:
        source = folder / "generation_config.json"
        checked_defaults(family, generation_defaults(read_generation_config(folder), str(source)), override)
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
    from ..cli import api_key_from
    from ..cli_flags import (
        add_model_args,
        add_serve_args,
        engine_options,
        json_object,
        lora_options,
        model_options,
        responses_store,
        tool_call_parser,
    )
    from ..errors import LatentRTError

    ap = argparse.ArgumentParser(
        prog="python -m latentrt.serve.ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(ap, default="builtin:recurrent")
    add_serve_args(ap, log_level=False)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    ap.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica")
    ap.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too (slower to start)")
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
            name=args.served_model_name,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            **model_options(args),
            generation_config=json_object(args.override_generation_config, "--override-generation-config"),
            chat_template=args.chat_template,
            api_key=api_key_from(args.api_key),
            allowed_origins=args.allowed_origins,
            tool_call_parser=tool_call_parser(args),
            responses_store=responses_store(args),
            **lora_options(args),
            **engine_options(args),
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
