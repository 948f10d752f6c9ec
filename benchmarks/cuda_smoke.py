"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck) in gpu_check.sh: the persistent
latent loop (three exit criteria) and the Coconut thought loop, with both grid barriers; the streamed-weight
loop (csrc/stream_loop.cu) at batch 2 (CUDA-core GEMVs) and 8 (tensor cores) and the streamed thought loop
(csrc/stream_thought.cu: thoughts and answer tokens) at batch 1 and 4.

    python -m benchmarks.cuda_smoke [--only barrier,stream,stream-thoughts]
"""

import argparse
from collections.abc import Iterator

import torch

import latentrt
from latentrt import cuda_ext
from latentrt.backends import get_backend
from latentrt.families import build_model, parse_config

from .suites import TINY_GPT2, TINY_RECURRENT


def _each_barrier(model) -> Iterator[int]:
    """Point the model at the cuda backend once per grid-barrier implementation."""
    for mode in (0, 1):
        model.backend = get_backend("cuda", model)
        model.backend.barrier_mode = mode
        yield mode


def persistent_loop() -> None:
    cfg = parse_config(dict(TINY_RECURRENT, num_attention_heads=4, vocab_size=64, block_size=64, mean_recurrence=4))
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    for _ in _each_barrier(model):
        for crit in ("none", "latent-diff", "kl"):
            kw = dict(max_new_tokens=3, num_steps=4, kv_sharing="ring-2", adaptive=True, exit_criterion=crit)
            latentrt.generate(model, [[3, 4, 5], [6, 7]], **kw)


def streamed_loop(copy: str | None = None, gemv: str | None = None) -> None:
    """The streamed kernel: every row running to r_max (none), rows exiting at different iterations
    (latent-diff; KL with the coda and lm_head streamed at its checks), a batch on the tensor-core path, and
    one row at 56 positions (its attention in 4 splits, merged); each launch must return (a hang is the
    likely bug). The attention, the input and the weight copies are the backend's defaults, or
    LATENTRT_STREAM_ATTENTION's, LATENTRT_STREAM_INPUT's, LATENTRT_STREAM_COPY's and LATENTRT_STREAM_GEMV's;
    ``copy`` sets the weight copies (family ``stream-tensor``: the tensor-map boxes), ``gemv`` what multiplies
    them (family ``stream-mma``: tensor cores at batch 1 and 2 too)."""
    cfg = parse_config(dict(TINY_RECURRENT, num_attention_heads=4, vocab_size=64, block_size=64, mean_recurrence=4))
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    from latentrt.backends.cuda import PersistentTokenRunner

    model.backend = get_backend("cuda", model)
    model.backend.loop_kernel = "stream"
    if copy is not None:
        model.backend.stream_copy = copy
    if gemv is not None:
        model.backend.stream_gemv = gemv
    kernels, real = [], PersistentTokenRunner.recurrence
    PersistentTokenRunner.recurrence = lambda self, *a: kernels.append(self.kernel) or real(self, *a)
    try:
        _streamed_batches(model, kernels)
    finally:
        PersistentTokenRunner.recurrence = real


def _streamed_batches(model, kernels: list) -> None:
    for batch, length in ((2, 3), (8, 3), (1, 56)):
        prompts = [[3 + (i + j) % 50 for j in range(length - i % 2)] for i in range(batch)]
        for crit in ("none", "latent-diff", "kl"):
            kw = dict(max_new_tokens=3, num_steps=4, kv_sharing="ring-2", adaptive=True, exit_criterion=crit)
            kernels.clear()
            latentrt.generate(model, prompts, **kw)
            torch.cuda.synchronize()
            if set(kernels) != {"stream"}:  # the plan refused the options: a smoke of another path proves nothing
                raise SystemExit(f"the streamed loop did not run (batch {batch}, {crit}): launches {kernels}")
        b = model.backend
        what = f"{b.stream_attention} attention, {b.stream_input} input, {b.stream_copy} copies, {b.stream_gemv} gemv"
        print(f"streamed loop ({what}) batch {batch} ok", flush=True)


def streamed_thoughts() -> None:
    """The streamed thought loop (csrc/stream_thought.cu) at batch 1 and 4, its thoughts and its answer tokens
    (the layers and the LM head in one launch: eager, captured, then replayed): every launch must return."""
    markers = dict(latent_id=63, start_latent_id=62, end_latent_id=61)
    cfg = parse_config(dict(TINY_GPT2, n_layer=2, n_positions=64, vocab_size=64, **markers))
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    model.backend = get_backend("cuda", model)
    model.backend.loop_kernel = "stream"
    for batch in (1, 4):
        prompts = [[3 + i, 4, 62, 63, 63, 63, 61] for i in range(batch)]
        latentrt.generate(model, prompts, max_new_tokens=4)
        torch.cuda.synchronize()
        print(f"streamed thoughts and answer tokens batch {batch} ok", flush=True)


def thought_loop() -> None:
    markers = dict(latent_id=63, start_latent_id=62, end_latent_id=61)
    cfg = parse_config(dict(TINY_GPT2, n_layer=2, n_positions=64, vocab_size=64, **markers))
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    for _ in _each_barrier(model):
        latentrt.generate(model, [[3, 4, 62, 63, 63, 63, 61], [5, 6, 62, 63, 63, 63, 61]], max_new_tokens=2)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_smoke", description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default=None,
        help="kernel families, comma-separated: barrier, stream, stream-tensor, stream-mma, stream-thoughts "
        "(default: all)",
    )
    args = p.parse_args()
    families = ("barrier", "stream", "stream-tensor", "stream-mma", "stream-thoughts")
    only = set(families if args.only is None else args.only.split(","))
    if only - set(families):
        p.error(f"unknown kernel family {sorted(only - set(families))}; choose from {list(families)}")
    ok, why = cuda_ext.available()
    if not ok:
        raise SystemExit(f"cuda extension unavailable: {why}")
    # prefill attention through torch's math/flash kernels, not cuDNN's: racecheck reports hazards inside
    # cuDNN's SDPA kernels (asynchronous-copy pipelines it cannot follow), which would bury ours
    torch.backends.cuda.enable_cudnn_sdp(False)
    if "barrier" in only:
        persistent_loop()
        thought_loop()
    streamed = {
        "stream": streamed_loop,
        "stream-tensor": lambda: streamed_loop(copy="tensor"),
        "stream-mma": lambda: streamed_loop(gemv="tensor-cores"),
        "stream-thoughts": streamed_thoughts,
    }
    for name, run in streamed.items():
        if name not in only:
            continue
        try:
            run()
        except Exception:
            from latentrt.backends.cuda import stream_watchdog_report

            print(stream_watchdog_report() or f"{name} failed; its watchdog did not trip", flush=True)
            raise
    torch.cuda.synchronize()
    print("cuda smoke ok")


if __name__ == "__main__":
    main()
