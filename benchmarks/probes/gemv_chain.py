"""Probe (#11): where the Triton path's batch-1 iteration loses to the HBM floor, and whether a programmatic
dependent launch (PDL) wins it back.

The Triton path reached 68% of the floor at batch 1, r=32 on an H200 (RESULTS.md, 2026-12-04); an iteration is
~40 launches, 17 of them the weight products that move almost every byte. This times those products alone at
Huginn-0125's widths (the adapter's W[:, :d], then 4 layers' qkv, o, fc with gate and up fused, proj: 3.3 GB
bf16), in CUDA graphs, beside the copy bandwidth of a 4 GiB buffer measured in the same run:

- ``chain``: the 17 launches in order, each reading the previous one's output (as the loop does), r times;
- ``chain+pdl``: the same launched programmatically dependent (``linear.fused(pdl=True)``: a kernel starts while
  the previous one ends, streams its weights into L2, then waits for the previous kernel's writes);
- ``one``: one launch over as many bytes (a single weight of ~312k rows): the kernel's streaming rate without
  gaps or tails;
- ``cublas``: the chain by ``F.linear`` (what torch gives).

``one`` against the copy: the kernel's own ceiling; ``chain`` against ``one``: what the launch gaps and tails cost;
``chain+pdl`` against ``chain``: what PDL wins back (if it does, the decode path's products take it:
``LATENTRT_PDL=1``). ``chain`` and ``chain+pdl`` must give the same output bit for bit (same arithmetic; a
difference is a missing wait). Prints one JSON line per measurement, then a table.

    python -m benchmarks.probes.gemv_chain [--batch 1,8] [--iters 4] [--repeats 10] [--shape huginn|gpt2|tiny]

``--shape gpt2``: a continuous thought's 48 products at GPT-2 124M (170 MB, a 0.04 ms floor at 4.3 TB/s; the
Triton thought is 84 launches, these 48 among them, against the 0.1 ms goal). ``--shape tiny`` runs anywhere
(the CPU under ``TRITON_INTERPRET=1``: the probe's own test; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from latentrt.kernels import SHAPES, linear

from ..suites import copy_bandwidth
from ..timing import measure_graph


def core_products(shape: str, device, dtype, seed: int = 0) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, weight [N, K], gate) of one core iteration's products, in order: the adapter's state half, then
    per layer qkv, o, fc (gate and up rows together), proj; at GPT-2's shape a continuous thought's (48)."""
    d, heads, head_dim, ffn, _ = SHAPES[shape]
    g = torch.Generator(device).manual_seed(seed)  # (drawn on the device: 3.3 GB on the CPU take ~20 s)

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)

    if shape == "gpt2":  # a continuous thought: 12 layers of c_attn, attn.c_proj, c_fc (GELU), mlp.c_proj
        kinds = (("qkv", 3 * d, d), ("o", d, d), ("fc", ffn, d), ("proj", d, ffn))
        return [(f"{name}{layer}", weight(n, k), False) for layer in range(12) for name, n, k in kinds]
    adapter = weight(d, 2 * d)[:, :d]  # (a column slice: the loop reads W[:, :d] per iteration)
    out = [("adapter", adapter, False)]
    for layer in range(4):
        out += [
            (f"qkv{layer}", weight(3 * heads * head_dim, d), False),
            (f"o{layer}", weight(d, heads * head_dim), False),
            (f"fc{layer}", weight(2 * ffn, d), True),
            (f"proj{layer}", weight(d, ffn), False),
        ]
    return out


def weight_bytes(products) -> int:
    return sum(w.shape[0] * w.shape[1] * w.element_size() for _, w, _ in products)


def chain(products, x0: torch.Tensor, iters: int, product) -> torch.Tensor:
    """``iters`` passes over the products, each input the previous output's first columns (the values do not
    matter, the order of the launches does): a row-strided view, as the loop's products read their inputs."""
    x = x0
    for _ in range(iters):
        for _, w, gate in products:
            x = product(x[:, : w.shape[1]], w, gate)
    return x


def triton_product(pdl: bool):
    return lambda x, w, gate: linear.fused(x, w, gate=gate, pdl=pdl)


def cublas_product(x, w, gate):
    y = F.linear(x, w)
    if gate:
        g, u = y.chunk(2, -1)
        return F.silu(g) * u
    return y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probes.gemv_chain", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--iters", type=int, default=4, help="core iterations (thoughts) per graph replay")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--shape", default="huginn", choices=["huginn", "gpt2", "tiny"])
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and args.shape != "tiny":
        print("gemv_chain: needs a CUDA GPU (or --shape tiny)")
        return 0
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16
    products = core_products(args.shape, device, dtype)
    nbytes = weight_bytes(products)
    rows = []

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        rows.append(rec)

    copy_bw = copy_bandwidth((4 << 30) if gpu else (64 << 20), device, 10)["value"]
    emit({"probe": "gemv_chain", "name": "copy_bandwidth", "value": copy_bw, "unit": "B/s"})
    if gpu:
        print(f"# {torch.cuda.get_device_name(device)}, weights {nbytes / 1e9:.2f} GB an iteration", flush=True)
    d = SHAPES[args.shape][0]
    for batch in (int(b) for b in args.batch.split(",")):
        x0 = torch.randn(batch, d, device=device).to(dtype)
        outputs = {}
        variants = {
            "chain": triton_product(False),
            "chain+pdl": triton_product(True),
            "cublas": cublas_product,
        }
        for name, product in variants.items():
            outputs[name] = chain(products, x0, 1, product)
            run = lambda p=product, x=x0: chain(products, x, args.iters, p)  # noqa: E731
            t = measure_graph(run, device=device, inner=1, repeats=args.repeats)
            ms = t["median_ms"] / args.iters
            emit(_record(name, batch, ms, nbytes, copy_bw, t.get("graph")))
        one = torch.empty(nbytes // (d * products[0][1].element_size()), d, device=device, dtype=dtype).normal_()
        run = lambda x=x0, w=one: linear.fused(x, w)  # noqa: E731
        t = measure_graph(run, device=device, inner=args.iters, repeats=args.repeats)
        emit(_record("one", batch, t["median_ms"], one.numel() * one.element_size(), copy_bw, t.get("graph")))
        del one
        same = torch.equal(outputs["chain"], outputs["chain+pdl"])
        emit({"probe": "gemv_chain", "name": "pdl_bit_equal", "batch": batch, "value": same})
        if not same:
            print("gemv_chain: FAIL chain+pdl differs from chain (a missing wait)", flush=True)
    print("| batch | variant | ms an iteration | TB/s | % of copy |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(f"| {r['batch']} | {r['name']} | {r['ms']:.4f} | {r['tbps']:.3f} | {100 * r['of_copy']:.1f}% |")
    return 0 if all(r["value"] for r in rows if r["name"] == "pdl_bit_equal") else 1


def _record(name: str, batch: int, ms: float, nbytes: int, copy_bw: float, graph) -> dict:
    bw = nbytes / (ms / 1e3)
    return {"probe": "gemv_chain", "name": name, "batch": batch, "ms": ms, "bytes": nbytes, "tbps": bw / 1e12,
            "of_copy": bw / copy_bw, "graph": graph}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
