"""Measurement suites: ceilings, kernel microbenchmarks, recurrent and Coconut decode, host syncs.

Each suite yields records (dicts); run.py adds the environment fields, writes JSON and prints tables.
On a CPU only tiny shapes run (a smoke test of the harness, not a measurement that means anything).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

import latentrt
import latentrt.kernels as kernels
from latentrt.families import build_model, family_for, parse_config

from . import floors
from .published_pattern import coconut_generate, recurrent_generate
from .timing import measure, measure_graph, rotating_copies, summarize, sync

HUGINN_0125 = dict(
    model_type="huginn_raven",
    n_embd=5280,
    num_attention_heads=55,
    num_key_value_heads=55,
    intermediate_size=17920,
    vocab_size=65536,
    padding_multiple=4096,
    block_size=4096,
    n_layers_in_prelude=2,
    n_layers_in_recurrent_block=4,
    n_layers_in_coda=2,
    mean_recurrence=32,
)
GPT2_124M = dict(model_type="gpt2", n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257)
TINY_RECURRENT = dict(
    HUGINN_0125,
    n_embd=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=320,
    padding_multiple=64,
    block_size=512,
)
TINY_GPT2 = dict(GPT2_124M, n_embd=64, n_head=2, n_layer=3, n_positions=512, vocab_size=320)


@dataclass
class Plan:
    """What to run: full sweeps on a GPU, tiny and short on a CPU or with --quick."""

    device: torch.device
    quick: bool

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.gpu else torch.float32

    @property
    def recurrent_cfg(self):
        return parse_config(HUGINN_0125 if self.gpu else TINY_RECURRENT)

    @property
    def gpt2_cfg(self):
        return parse_config(
            dict(GPT2_124M if self.gpu else TINY_GPT2, latent_id=50256, start_latent_id=50255, end_latent_id=50254)
            if self.gpu
            else dict(TINY_GPT2, latent_id=319, start_latent_id=318, end_latent_id=317)
        )

    @property
    def context(self) -> int:
        return 512 if self.gpu else 64

    @property
    def batches(self) -> list[int]:
        """The full sweep's batches (--quick on a GPU times recurrent_configs' own list)."""
        return [1, 8, 32] if self.gpu else [1, 4]

    @property
    def depths(self) -> list[int]:
        return ([4, 32] if self.quick else [4, 16, 32]) if self.gpu else [4, 8]

    @property
    def tokens(self) -> int:
        return 6 if self.quick or not self.gpu else 10


def with_floor(timing: dict, floor_ms: float) -> dict:
    """A timing record plus its floor and the fraction of the floor reached (floor / median)."""
    return {**timing, "floor_ms": floor_ms, "fraction_of_floor": floor_ms / max(timing["median_ms"], 1e-9)}


def error_record(suite: str, name: str, backend: str, config: dict, exc: Exception) -> dict:
    """A measurement that failed (compile error, unlaunchable config, a backend's exception): a result of
    the run, not the end of it."""
    return {
        "suite": suite,
        "name": name,
        "backend": backend,
        "config": config,
        "error": f"{type(exc).__name__}: {str(exc)[:300]}",
    }


def timed_record(suite: str, name: str, backend: str, config: dict, timing, floor_ms: float) -> dict:
    """``timing()`` -> a timing dict: the record with its floor, or the error record if it raised (a failing
    backend is a result, not the end of the run)."""
    try:
        t = timing()
    except Exception as exc:
        return error_record(suite, name, backend, config, exc)
    return {"suite": suite, "name": name, "backend": backend, "config": config, **with_floor(t, floor_ms)}


def single_shot(ms: float, repeats: int) -> dict:
    """A timing taken once over ``repeats`` units (the published patterns are too slow to repeat), in the
    shape of measure()'s records."""
    return {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "repeats": repeats}


# ---------------------------------------------------------------------------------------------- ceilings
def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> dict:
    """Device-to-device copy of a buffer of ``nbytes`` (two sources in turn, so neither stays cached):
    bytes read + written per second, from the best of ``repeats`` copies (a busy machine only slows some)."""
    src = [torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(i + 1) for i in range(2)]
    dst = torch.empty_like(src[0])
    t = measure(lambda x: dst.copy_(x), [(s,) for s in src], device=device, repeats=repeats)
    best_ms = min(t["p10_ms"], t["median_ms"]) if repeats < 10 else t["p10_ms"]
    return {**t, "best_ms": best_ms, "value": 2 * nbytes / (best_ms / 1e3), "unit": "B/s (read+write)"}


def ceilings(plan: Plan) -> Iterator[dict]:
    """The copy bandwidth under every floor (a buffer much larger than L2: 4 GiB on a GPU, 256 MiB on a
    CPU), the same for 256 MiB on a GPU (a second column), and the matmul rate."""
    n = (4 << 30) if plan.gpu else (256 << 20)
    yield {"suite": "ceilings", "name": "copy_bandwidth", "config": {"bytes": n}, **copy_bandwidth(n, plan.device, 10)}
    if plan.gpu:
        small = copy_bandwidth(256 << 20, plan.device, 20)
        yield {"suite": "ceilings", "name": "copy_bandwidth_256MiB", "config": {"bytes": 256 << 20}, **small}
    m = 8192 if plan.gpu else 512
    a = [torch.randn(m, m, device=plan.device, dtype=plan.dtype) for _ in range(2)]
    t = measure(lambda x: x @ x, [(x,) for x in a], device=plan.device, repeats=10)
    yield {
        "suite": "ceilings",
        "name": "matmul",
        "config": {"m": m, "dtype": str(plan.dtype)},
        **t,
        "value": 2 * m**3 / (t["median_ms"] / 1e3),
        "unit": "FLOP/s",
    }


# ---------------------------------------------------------------------------------------------- micro
def micro(plan: Plan, copy_bw: float) -> Iterator[dict]:
    shapes = ["huginn", "gpt2"] if plan.gpu else ["tiny"]
    for fam_name in kernels.FAMILIES:
        fam = kernels.family(fam_name)
        for shape in shapes:
            first = fam.make_inputs(shape, plan.device, plan.dtype, seed=0)
            copies = rotating_copies(fam.bytes_moved(first), plan.device, at_least=3)
            # copies on the device (a clone per call's inputs: different addresses defeat the L2 as well as
            # new random values would, without generating gigabytes on the host: a Huginn-shaped pool is
            # ~300 MB per copy)
            clone = lambda inp: [t.clone() if torch.is_tensor(t) else t for t in inp]  # noqa: E731
            inputs = [first] + [clone(first) for _ in range(1, copies)]
            impls = {"torch-eager": fam.reference}
            if plan.gpu and not plan.quick:
                impls["torch-compile"] = torch.compile(fam.reference, dynamic=False)
            if plan.gpu and kernels.triton_available() and kernels.fused_of(fam) is not None:
                impls["triton"] = kernels.fused_of(fam)
            nbytes = fam.bytes_moved(inputs[0])
            for impl, fn in impls.items():
                try:
                    t = measure_graph(fn, inputs, device=plan.device, repeats=30 if plan.gpu else 5)
                except Exception as exc:  # a compile failure is a result, not a crash of the harness
                    yield error_record("micro", fam_name, impl, {"shape": shape}, exc)
                    continue
                floor_ms = nbytes / copy_bw * 1e3
                yield {
                    "suite": "micro",
                    "name": fam_name,
                    "backend": impl,
                    "config": {"shape": shape},
                    "gb_per_s": nbytes / (t["median_ms"] / 1e3) / 1e9,
                    **with_floor(t, floor_ms),
                }


BEST_LINEAR: dict[int, tuple[float, dict]] = {}  # rows -> (summed ms over the products, config)


def linear_configs(plan: Plan, copy_bw: float) -> Iterator[dict]:
    """The decode GEMV (latentrt/kernels/linear.py) at Huginn-0125's products for each candidate launch config:
    data for choosing the default, which is what the decode path's weight streaming rests on."""
    from latentrt.kernels import linear

    if not (plan.gpu and kernels.triton_available()):
        return
    d, ffn = 5280, 17920
    products = {"qkv": (3 * d, d, False), "wo": (d, d, False), "fc_gate": (2 * ffn, d, True), "proj": (d, ffn, False)}
    g = torch.Generator(device="cpu").manual_seed(5)
    totals: dict[tuple[int, int], float] = {}  # (rows, config index) -> ms summed over the four products
    for name, (n, k, gate) in products.items():
        copies = rotating_copies(n * k * 2, plan.device)  # together over 4x the L2: every call reads HBM
        w0 = (torch.randn(n, k, generator=g) * 0.02).to(plan.device, plan.dtype)
        ws = [w0] + [w0.clone() for _ in range(1, copies)]  # copies made on the device, not drawn on the host
        for m in (1, 8):
            x = torch.randn(m, k, generator=g).to(plan.device, plan.dtype)
            nbytes = n * k * 2 + m * (k + (n // 2 if gate else n)) * 2
            for ci, cfg in enumerate(linear.CANDIDATE_CONFIGS):
                label = "{kind}-n{BLOCK_N}k{BLOCK_K}w{num_warps}s{num_stages}".format(**cfg)
                try:
                    t = measure_graph(
                        lambda w, x=x, gate=gate, cfg=cfg: linear.fused(x, w, gate=gate, config=cfg),
                        [(w,) for w in ws],
                        device=plan.device,
                        repeats=30,
                    )
                except Exception as exc:  # an unlaunchable config is a result
                    yield error_record("linear_configs", name, label, {"m": m}, exc)
                    totals[(m, ci)] = float("inf")
                    continue
                totals[(m, ci)] = totals.get((m, ci), 0.0) + t["median_ms"]
                yield {
                    "suite": "linear_configs",
                    "name": name,
                    "backend": label,
                    "config": {"m": m, "n": n, "k": k},
                    "gb_per_s": nbytes / (t["median_ms"] / 1e3) / 1e9,
                    **with_floor(t, nbytes / copy_bw * 1e3),
                }
    for (m, ci), total in totals.items():
        if total < BEST_LINEAR.get(m, (float("inf"), None))[0]:
            BEST_LINEAR[m] = (total, linear.CANDIDATE_CONFIGS[ci])
    for m, (total, cfg) in sorted(BEST_LINEAR.items()):
        yield {
            "suite": "linear_configs",
            "name": "best",
            "backend": str(cfg),
            "config": {"m": m},
            "value": total,
            "unit": "ms for one qkv+wo+fc+proj",
        }


def decode_tuned(plan: Plan, copy_bw: float) -> Iterator[dict]:
    """Recurrent decode through the triton backend with the GEMV config that linear_configs measured
    fastest (LATENTRT_GEMV), next to the default config on the same machine."""
    import os

    if not (plan.gpu and kernels.triton_available()):
        return
    if not BEST_LINEAR:
        list(linear_configs(plan, copy_bw))
    model = shared_model(plan, "recurrent")
    el = torch.finfo(plan.dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    impl = latentrt.backends.get_backend("triton", model)
    model.backend = impl
    runs = [
        dict(batch=1, r=32, kv="shared", adaptive=False),
        dict(batch=1, r=4, kv="shared", adaptive=False),
        dict(batch=1, r=32, kv="shared", adaptive=True, early_exit=True),
        dict(batch=8, r=32, kv="shared", adaptive=False),
    ]
    for c in runs:
        ids = torch.randint(10, model.config.vocab_size, (c["batch"], plan.context), generator=gen).to(plan.device)
        kw = dict(num_steps=c["r"], kv_sharing=c["kv"], adaptive=c["adaptive"], exit_criterion="latent-diff")
        if c.get("early_exit"):
            kw["exit_threshold"] = 1e30
        best = BEST_LINEAR.get(1 if c["batch"] == 1 else 8, (0, None))[1]
        for label, cfg in (("default", None), ("tuned", best)):
            if cfg is None and label == "tuned":
                continue
            spec = None if cfg is None else "{kind},{BLOCK_N},{BLOCK_K},{num_warps},{num_stages}".format(**cfg)
            os.environ.pop("LATENTRT_GEMV", None) if spec is None else os.environ.__setitem__("LATENTRT_GEMV", spec)
            try:
                t, steps = _decode_ms(model, ids, plan.tokens, **kw)
            except Exception as exc:
                yield error_record("decode_tuned", label, "triton", c, exc)
                continue
            finally:
                os.environ.pop("LATENTRT_GEMV", None)
            mean_steps = steps["mean_steps"]
            b = floors.recurrent_step_bytes(
                model.config, batch=c["batch"], context=plan.context, steps=max(1, round(mean_steps)), element_size=el
            )
            yield {
                "suite": "decode_tuned",
                "name": label,
                "backend": f"triton {spec or 'default'}",
                "config": {**c, "mean_steps": mean_steps},
                "tokens_per_s": c["batch"] * 1000 / t["median_ms"],
                **with_floor(t, b["total"] / copy_bw * 1e3),
            }


# ---------------------------------------------------------------------------------------------- decode
def _decode_ms(model, ids, new_tokens: int, **kw) -> tuple[dict, dict]:
    """Per-token latency of ``new_tokens`` decode steps, timed between streamed tokens (the engine reads
    each token on the host, which synchronises the device). The prompt and the first decode token (which
    compiles kernels and captures the CUDA graph) are left out; the latter is reported as first_token_ms.
    Also the iterations of the timed tokens (``step_counts``)."""
    times, steps, last = [], [], None
    if "init_scale" in family_for(model).decoder.OPTIONS:
        kw = {"init_scale": 0.0, **kw}  # a deterministic initial state: the same work in every timed run
    stream = latentrt.generate(model, ids, max_new_tokens=new_tokens + 2, stream=True, **kw)
    for ev in stream:
        now = time.perf_counter()
        if last is not None:
            times.append(1000 * (now - last))
            steps.append([s for s in (ev.steps if isinstance(ev.steps, list) else [ev.steps]) if s is not None])
        last = now
    timed = slice(1, None) if len(times) > 1 else slice(None)
    return {**summarize(times[timed]), "first_token_ms": times[0]}, step_counts(steps[timed])


def step_counts(per_token: list[list[int]]) -> dict:
    """``mean_steps``: iterations per sequence and token; ``launch_steps``: per token, the iterations of its
    slowest sequence (what a batch's launch runs, each row exiting on its own), averaged over tokens."""
    flat = [s for token in per_token for s in token]
    launches = [max(token) for token in per_token if token]
    return {
        "mean_steps": sum(flat) / max(len(flat), 1),
        "launch_steps": sum(launches) / max(len(launches), 1),
    }


def _backends(
    model, stream_attentions: tuple[str, ...] = ("split", "cta"), suite: str = "decode_recurrent"
) -> Iterator[tuple[str, object]]:
    """(label, backend) for every backend that runs on the model's device; the persistent CUDA loop once per
    kernel: grid barriers by cooperative groups (``cuda``), the streamed-weight kernel (``cuda-stream``,
    csrc/stream_loop.cu / stream_thought.cu, attention split over positions; ``cuda-stream-cta``: the latent
    loop's attention one (row, head) per CTA, timed where ``stream_attentions`` has "cta"; ``cuda-stream-tensor``:
    the latent loop's weights copied as tensor-map boxes, decode_recurrent only; ``cuda-stream-mma``: its GEMVs
    on tensor cores at batch 1-4 too, decode_recurrent only), grid barriers by counters in
    global memory (``cuda-counter-barrier``); the Triton path once more without ``early_stop``
    (``triton-one-graph``: the token's whole loop one graph, never stopped early; decode_recurrent only), and
    with its weight products launched programmatically dependent (``triton-pdl``, timed under ``pdl_launches``:
    benchmarks/probes/gemv_chain.py asks first whether it pays).
    LATENTRT_BENCH_SKIP (gpu_check.sh: kernels whose smoke failed) names labels to leave out, everywhere
    (``cuda-stream``) or in one suite (``decode_coconut:cuda-stream``)."""
    yield "torch", latentrt.backends.get_backend("torch", model)
    skip = set(os.environ.get("LATENTRT_BENCH_SKIP", "").split(","))
    for name in ("triton", "cuda"):
        try:
            backend = latentrt.backends.get_backend(name, model)
        except Exception:
            continue
        if name != "cuda":
            yield name, backend
            if name == "triton" and suite == "decode_recurrent" and "triton-one-graph" not in skip:
                backend = latentrt.backends.get_backend(name, model)
                backend.early_stop = False
                yield "triton-one-graph", backend
            if name == "triton" and "triton-pdl" not in skip and f"{suite}:triton-pdl" not in skip:
                yield "triton-pdl", latentrt.backends.get_backend(name, model)  # (timed under pdl_launches)
            continue
        kernels = (  # kernel, barrier mode, attention, weight copies, GEMV units, label
            ("barrier", 0, "split", "rows", "auto", "cuda"),
            ("stream", 0, "split", "rows", "auto", "cuda-stream"),
            ("stream", 0, "split", "rows", "tensor-cores", "cuda-stream-mma"),
            ("stream", 0, "split", "tensor", "auto", "cuda-stream-tensor"),
            ("stream", 0, "cta", "rows", "auto", "cuda-stream-cta"),
            ("barrier", 1, "split", "rows", "auto", "cuda-counter-barrier"),
        )
        for kernel, mode, attention, copy, gemv, label in kernels:
            if label in skip or f"{suite}:{label}" in skip or attention not in stream_attentions:
                continue
            # the thought loop copies rows only and keeps CUDA cores to batch 4
            if (copy, gemv) != ("rows", "auto") and suite != "decode_recurrent":
                continue
            backend = latentrt.backends.get_backend(name, model)
            backend.loop_kernel, backend.barrier_mode, backend.stream_attention = kernel, mode, attention
            backend.stream_copy, backend.stream_gemv = copy, gemv
            yield label, backend


def recurrent_configs(plan: Plan) -> list[dict]:
    """(batch, r, kv, adaptive) to time, most important first (a run cut short keeps the acceptance rows).
    ``early_exit``: adaptive with a threshold every sequence meets at once, so its time against fixed depth
    shows what the iterations after an exit cost."""
    if plan.gpu and plan.quick:
        b1 = [
            dict(batch=1, r=32, kv="shared", adaptive=False),
            dict(batch=1, r=4, kv="shared", adaptive=False),
            dict(batch=1, r=32, kv="shared", adaptive=True, early_exit=True),
            dict(batch=8, r=32, kv="shared", adaptive=False),
            dict(batch=32, r=32, kv="shared", adaptive=False),  # issue #11's acceptance batches: 1, 8, 32
            dict(batch=8, r=32, kv="shared", adaptive=True),
            dict(batch=1, r=32, kv="full", adaptive=False),
            dict(batch=32, r=32, kv="shared", adaptive=True),
            # r=4 beside r=32 separates the per-token passes from the iterations: the adaptive rows' ideal
            dict(batch=8, r=4, kv="shared", adaptive=False),
            dict(batch=32, r=4, kv="shared", adaptive=False),
        ]
        return b1
    return [
        dict(batch=b, r=r, kv=kv, adaptive=a)
        for b in plan.batches
        for r in plan.depths
        for kv in ("full", "shared")
        for a in (False, True)
    ]


_MODELS: dict[str, torch.nn.Module] = {}


def shared_model(plan: Plan, kind: str):
    """One model per family for every suite of a run (a Huginn-0125-shaped model is 7 GB in bf16)."""
    if kind not in _MODELS:
        cfg = plan.recurrent_cfg if kind == "recurrent" else plan.gpt2_cfg
        _MODELS[kind] = build_model(cfg, device=plan.device, dtype=plan.dtype, seed=0)
    return _MODELS[kind]


NO_CUDNN_SDPA = "torch-no-cudnn-sdpa"


@contextmanager
def cudnn_sdpa(enabled: bool) -> Iterator[None]:
    """torch's scaled_dot_product_attention with or without its cuDNN kernels, restored afterwards."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@contextmanager
def pdl_launches(enabled: bool) -> Iterator[None]:
    """The Triton GEMVs launched programmatically dependent (``linear.fused``'s default) or not, restored
    afterwards."""
    from latentrt.kernels import linear

    before = linear.PDL_BY_DEFAULT
    linear.PDL_BY_DEFAULT = enabled
    try:
        yield
    finally:
        linear.PDL_BY_DEFAULT = before


def recurrent_decode(plan: Plan, copy_bw: float) -> Iterator[dict]:
    model = shared_model(plan, "recurrent")
    cfg = model.config
    el = torch.finfo(plan.dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    backends = list(_backends(model))
    if plan.gpu:  # is the torch path's slowness on the H200 cuDNN attention re-planning per key length?
        backends.insert(1, (NO_CUDNN_SDPA, backends[0][1]))
    compiled: set[tuple] = set()
    for c in recurrent_configs(plan):
        batch, r = c["batch"], c["r"]
        ids = torch.randint(10, cfg.vocab_size, (batch, plan.context), generator=gen).to(plan.device)
        kw = dict(num_steps=r, kv_sharing=c["kv"], adaptive=c["adaptive"], exit_criterion="latent-diff")
        if c.get("early_exit"):
            kw["exit_threshold"] = 1e30
        for backend, impl in backends:
            model.backend = impl
            try:
                with cudnn_sdpa(backend != NO_CUDNN_SDPA), pdl_launches(backend == "triton-pdl"):
                    t, steps = _decode_ms(model, ids, plan.tokens, **kw)
            except Exception as exc:  # a failing backend is a result, not the end of the run
                yield error_record("decode_recurrent", "generate", backend, c, exc)
                continue
            mean_steps = steps["mean_steps"]
            b = floors.recurrent_step_bytes(
                cfg, batch=batch, context=plan.context, steps=max(1, round(mean_steps)), element_size=el
            )
            floor_ms = b["total"] / copy_bw * 1e3
            flops = floors.recurrent_step_flops(cfg, batch=batch, context=plan.context, steps=max(1, round(mean_steps)))
            yield {
                "suite": "decode_recurrent",
                "name": "generate",
                "backend": backend,
                "config": {**c, "context": plan.context, **steps},
                "tokens_per_s": batch * 1000 / t["median_ms"],
                "flops_per_byte": flops / b["total"],  # the step's arithmetic intensity (floors.py)
                **with_floor(t, floor_ms),
            }
        # the yardstick beside the row, in the same run: torch.compile + CUDA graph of the same block at the
        # same batch, depth, context and KV mode (run.py prints each row's ratio to it)
        if plan.gpu and (batch, r, c["kv"]) not in compiled:
            compiled.add((batch, r, c["kv"]))
            yield from _compiled_baseline(plan, model, copy_bw, el, batch, r, c["kv"])
    yield from _recurrent_baselines(plan, model, copy_bw, el)


def _recurrent_baselines(plan: Plan, model, copy_bw: float, el: int) -> Iterator[dict]:
    cfg = model.config
    model.backend = latentrt.backends.get_backend("torch", model)
    ids = torch.randint(10, cfg.vocab_size, (1, plan.context), generator=torch.Generator().manual_seed(1))
    ids = ids.to(plan.device)
    for r in (
        sorted({c["r"] for c in recurrent_configs(plan)}, reverse=True) if plan.quick and plan.gpu else plan.depths
    ):
        sync(plan.device)
        t0 = time.perf_counter()
        n = 3 if plan.gpu else 2
        _, _, kv_bytes = recurrent_generate(model, ids, n + 1, r, kv="full")
        sync(plan.device)
        # the published pattern's first call includes the prefill: time decode tokens separately
        t1 = time.perf_counter()
        recurrent_generate(model, ids, 1, r, kv="full")
        sync(plan.device)
        t2 = time.perf_counter()
        per_token = 1000 * ((t1 - t0) - (t2 - t1)) / n
        floor_ms = (
            floors.recurrent_step_bytes(cfg, batch=1, context=plan.context, steps=r, element_size=el)["total"]
            / copy_bw
            * 1e3
        )
        yield {
            "suite": "decode_recurrent",
            "name": "published-pattern",
            "backend": "torch",
            "config": {"batch": 1, "r": r, "kv": "full", "adaptive": False, "context": plan.context},
            **with_floor(single_shot(per_token, n), floor_ms),
            "kv_bytes_published": kv_bytes,
        }


def _compiled_baseline(plan: Plan, model, copy_bw: float, el: int, batch: int, r: int, kv: str) -> Iterator[dict]:
    """torch.compile (one core iteration, compiled once per batch size) + a CUDA graph of the whole token, and
    the same ops eager, at fixed depth ``r`` in KV mode ``kv`` (benchmarks/compiled_baseline.py). A quick run
    compiles in the default mode; a full run with max-autotune (minutes of autotuning)."""
    from latentrt.kv_modes import parse_kv_mode

    from .compiled_baseline import StaticDecoder, compiled_step

    cfg = model.config
    config = {"batch": batch, "r": r, "kv": kv, "adaptive": False, "context": plan.context}
    mode = "default" if plan.quick else "max-autotune-no-cudagraphs"
    try:
        cache = model.new_cache(batch, plan.context + 2, parse_kv_mode(kv, r, cfg.n_layers_in_recurrent_block))
    except Exception as exc:
        yield error_record("decode_recurrent", "torch-compile+cudagraph", "torch", config, exc)
        return
    for buf in (cache.plain_k, cache.plain_v, cache.core_k, cache.core_v):
        buf.normal_()  # never time on zeros
    cache.begin(torch.ones(batch, plan.context, dtype=torch.bool, device=plan.device))
    dec = StaticDecoder(model, cache, r)
    dec.set_token(torch.full((batch,), 11, device=plan.device), plan.context)
    floor_ms = (
        floors.recurrent_step_bytes(cfg, batch=batch, context=plan.context, steps=r, element_size=el)["total"]
        / copy_bw
        * 1e3
    )
    for name, fn in (("torch-eager-static", dec.step), ("torch-compile+cudagraph", None)):
        if fn is not None and plan.quick:
            continue  # (a quick run keeps its minutes for the compiled one)
        try:
            fn = fn or compiled_step(dec, mode=mode)
            t = measure(fn, device=plan.device, repeats=10, warmup=2)
        except Exception as exc:
            yield error_record("decode_recurrent", name, "torch", config, exc)
            continue
        yield {
            "suite": "decode_recurrent",
            "name": name,
            "backend": "torch" if name == "torch-eager-static" else f"torch ({mode})",
            "config": config,
            "tokens_per_s": batch * 1000 / t["median_ms"],
            **with_floor(t, floor_ms),
        }


def coconut_decode(plan: Plan, copy_bw: float) -> Iterator[dict]:
    model = shared_model(plan, "gpt2")
    cfg = model.config
    el = torch.finfo(plan.dtype).bits // 8
    k = 6
    gen = torch.Generator().manual_seed(2)
    for batch in ([1] if plan.quick else [1, 32]) if plan.gpu else [1, 4]:
        q = torch.randint(10, 300, (batch, 60), generator=gen).to(plan.device)
        base = torch.cat([q, torch.full((batch, 1), cfg.start_latent_id, device=plan.device)], 1)

        def with_thoughts(n: int, base: torch.Tensor = base) -> torch.Tensor:
            B = base.shape[0]
            latents = torch.full((B, n), cfg.latent_id, device=plan.device)
            return torch.cat([base, latents, torch.full((B, 1), cfg.end_latent_id, device=plan.device)], 1)

        thoughts = with_thoughts(k)

        def prompt_ms(ids):
            def run():  # the prompt as the Coconut decoder runs it: thoughts through the backend's column runner
                cache, b = model.new_cache(*ids.shape), model.backend
                mask = torch.ones_like(ids, dtype=torch.bool)
                return model.run_prompt(ids, mask, cache, feedback=b.feedback, columns=partial(b.column_runner, cache))

            return measure(run, device=plan.device, repeats=5 if plan.gpu else 3, warmup=1)["median_ms"]

        thought_floor = floors.coconut_step_bytes(cfg, batch=batch, context=62, element_size=el)  # no head
        answer_floor = floors.coconut_step_bytes(cfg, batch=batch, context=62, element_size=el, with_head=True)
        floor_ms = thought_floor["total"] / copy_bw * 1e3
        answer_floor_ms = answer_floor["total"] / copy_bw * 1e3
        # marginal cost of a thought: k2 - k thoughts more (the one-off eager pass and graph capture of a
        # prompt cancel out in the difference)
        k2 = 30 if plan.gpu else 10
        for backend, impl in _backends(model, ("split",), "decode_coconut"):  # the thought loop has one attention
            model.backend = impl

            def per_thought(thoughts: torch.Tensor = thoughts, k2: int = k2) -> dict:
                return single_shot((prompt_ms(with_thoughts(k2)) - prompt_ms(thoughts)) / (k2 - k), 1)

            config = {"batch": batch, "k": k, "k2": k2}
            # answer tokens: single-position passes through the backend's column runner, plus the head
            answer = lambda thoughts=thoughts: _decode_ms(model, thoughts, plan.tokens)[0]  # noqa: E731
            with pdl_launches(backend == "triton-pdl"):
                rows = [
                    timed_record("decode_coconut", "thought", backend, config, per_thought, floor_ms),
                    timed_record("decode_coconut", "answer_token", backend, config, answer, answer_floor_ms),
                ]
            yield from rows
        model.backend = latentrt.backends.get_backend("torch", model)
        if batch == 1:
            n = 3
            sync(plan.device)
            t0 = time.perf_counter()
            coconut_generate(model, thoughts, n)
            sync(plan.device)
            total = 1000 * (time.perf_counter() - t0)
            per_pass = total / (k + n)  # one full pass per thought and per answer token
            yield {
                "suite": "decode_coconut",
                "name": "published-pattern",
                "backend": "torch",
                "config": {"batch": 1, "k": k},
                **with_floor(single_shot(per_pass, 1), floor_ms),
            }


# ---------------------------------------------------------------------------------------------- host syncs
SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::item",
)


def host_syncs(plan: Plan) -> Iterator[dict]:
    """Device->host synchronisations per generated token, counted from the torch profiler. On a GPU the
    CUDA runtime's synchronize calls are counted; on a CPU the ops that read a value back to Python
    (item / is_nonzero / _local_scalar_dense), a proxy that misses .tolist()."""
    from torch.profiler import ProfilerActivity, profile

    model = shared_model(plan, "recurrent")
    cfg = model.config
    ids = torch.randint(10, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3)).to(plan.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.gpu else [])
    for backend, impl in _backends(model):
        model.backend = impl
        for adaptive in (False, True):
            kw = dict(num_steps=8, adaptive=adaptive, exit_criterion="latent-diff", init_scale=0.0)
            latentrt.generate(model, ids, max_new_tokens=2, **kw)  # warm-up
            counted = [nm for nm in SYNC_EVENTS if (nm.startswith("cuda") if plan.gpu else nm.startswith("aten"))]
            counts = {}
            for n in (2, 8):  # per decode token: the difference, so prefill and graph capture cancel
                with profile(activities=activities) as prof:
                    latentrt.generate(model, ids, max_new_tokens=n, **kw)
                # the recorded events' names as kineto keeps them: ``prof.events()`` would build torch's event
                # objects first (8 s for the 90,000 CPU events of a tiny 8-token run; 0.15 s this way; the same
                # names, less the profiler's own record-function markers)
                names = [e.name() for e in prof.profiler.kineto_results.events()]
                counts[n] = sum(names.count(nm) for nm in counted)
            n, count = 6, counts[8] - counts[2]
            yield {
                "suite": "host_syncs",
                "name": "generate",
                "backend": backend,
                "config": {"adaptive": adaptive, "r": 8, "tokens": n},
                "value": count / n,
                "unit": "syncs per token" if plan.gpu else "host reads per token (CPU proxy)",
            }


SUITES = {
    "ceilings": ceilings,
    "micro": micro,
    "decode_recurrent": recurrent_decode,
    "decode_coconut": coconut_decode,
    "host_syncs": host_syncs,
    "linear_configs": linear_configs,
    "decode_tuned": decode_tuned,
}
