"""Compile every Triton kernel launch for a GPU target on a machine without a GPU.

The CPU tests run the kernels through Triton's interpreter, which accepts code the real compiler rejects
(and never allocates registers or shared memory). This check records the launches that real workloads
make under the interpreter (kernel, argument dtypes and alignment, integer values, constexprs, launch
options) at tiny and at full Huginn-0125 / GPT-2 shapes, then compiles each distinct one for the target
(sm_90 by default) through Triton's own compiler with a stand-in driver, and reports the shared memory and
registers each needs. It fails on a compile error or on shared memory above the target's limit.

    python -m tools.compile_check [--arch 90] [--full] [--execute] [--launchers]

``--full`` adds the full-shape launches (builds a 3-layer Huginn-width model on the CPU: ~4 GB bf16).

The workloads are recorded without running the kernels' bodies: the Triton backend's launches follow from
shapes and options, not from values (a token's launches are what its CUDA graph captures), so the garbage
the skipped kernels leave changes none of them. ``--execute`` runs them through the interpreter as well: on
2026-12-05 both ways recorded the same 141 launches at tiny shapes, in 100 s executed and 5 s not (CI's
machine). A kernel (a ``*_kernel`` jit function of latentrt.kernels) that no workload launches fails the check.

Every compiled kernel lands in Triton's cache (``TRITON_CACHE_DIR``) under the key a GPU's JIT computes for
the same launch with the same Triton wheel: a cache made here with the GPU machine's Python and Triton, carried
to it, spares it those compiles (benchmarks/gpu_check.sh counts what it still adds). ``--launchers`` also
builds each kernel's host launcher and Triton's CUDA utility module (C, compiled by the host compiler on a
GPU at a kernel's first launch) against a stub driver library, into the same cache. Triton's cache entries
name their files by absolute path: ``--slim-cache DIR`` keeps only what a launch reads (each kernel's cubin and
metadata, the host modules) for carrying, and ``--relocate-cache DIR`` (gpu_check.sh, on the GPU) points the
entries at where the cache now lies.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # bytes of shared memory per block (opt-in maximum)


# ------------------------------------------------------------------------------------------ recording
def _spec(value):
    """What the compiler sees of an argument: a tensor's dtype and 16-byte alignment, a scalar's value."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if value is None or isinstance(value, bool | int | float | str):
        return ("value", value)
    return ("value", getattr(value, "value", repr(value)))


def record(full: bool, out: Path, execute: bool = False) -> None:
    """Run the workloads under TRITON_INTERPRET=1 and pickle one spec per distinct launch; ``execute``: run
    the kernels too (otherwise skipped: their outputs are left as allocated)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from triton.runtime import interpreter

    launches: dict = {}
    executing = [execute]  # (a list: the recording closure reads it, the full shapes turn it off)
    if not executing[0]:
        _ignore_non_finite()  # the skipped kernels leave garbage, which must not stop the workloads
    real_run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        key = (
            self.fn.__module__,
            self.fn.__name__,
            tuple(_spec(a) for a in args),
            tuple(sorted((k, _spec(v)) for k, v in kwargs.items())),
        )
        launches[key] = True
        if executing[0]:
            return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    interpreter.InterpretedFunction.run = recording_run
    from latentrt import kernels

    for dtype in (torch.float32, torch.bfloat16):
        for name in kernels.FAMILIES:
            fam = kernels.family(name)
            kernels.fused_of(fam)(*fam.make_inputs("tiny", "cpu", dtype))
        _workloads("tiny", dtype)
    _linear_candidates()
    if full:
        if executing[0]:  # full shapes: never executed (hours under the interpreter)
            executing[0] = False
            _ignore_non_finite()
        for name in kernels.FAMILIES:
            fam = kernels.family(name)
            for shape in ("huginn", "gpt2"):
                kernels.fused_of(fam)(*fam.make_inputs(shape, "cpu", torch.bfloat16))
        _workloads("full", torch.bfloat16)
    out.write_bytes(pickle.dumps(list(launches)))


def _linear_candidates() -> None:
    """Every candidate GEMV launch config (the constexprs, hence registers, do not depend on N and K), and the
    default configs' programmatic dependent launches."""
    import torch

    from latentrt.kernels import linear

    for cfg in linear.CANDIDATE_CONFIGS:
        for m in (1, 8):
            for gate in (False, True):
                x, w = torch.randn(m, 64).bfloat16(), torch.randn(64, 64).bfloat16()
                linear.fused(x, w, gate=gate, config=cfg)
    for m in (1, 8):  # programmatic dependent launches (benchmarks/probes/gemv_chain.py) at the default configs
        for gate in (False, True):
            x, w = torch.randn(m, 64).bfloat16(), torch.randn(128, 64).bfloat16()
            linear.fused(x, w, gate=gate, pdl=True, config=linear.ONE_ROW_CONFIG if m == 1 else None)
            linear.fused(x, w, gate=gate, pdl=True, config=linear.FEW_ROWS_CONFIG)


def _workloads(size: str, dtype) -> None:
    """generate() through the triton backend: recurrent (every KV mode x exit criterion) and Coconut."""
    import latentrt
    from latentrt.backends import get_backend
    from latentrt.families import build_model, parse_config

    if size == "tiny":
        rec = dict(n_embd=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=320)
        rec.update(padding_multiple=64, block_size=128, n_layers_in_prelude=1, n_layers_in_recurrent_block=2)
        gpt = dict(n_embd=64, n_head=2, n_layer=2, n_positions=128, vocab_size=320)
    else:  # widths of Huginn-0125 / GPT-2 124M with fewer layers
        rec = dict(n_embd=5280, num_attention_heads=55, num_key_value_heads=55, intermediate_size=17920)
        rec.update(vocab_size=65536, padding_multiple=4096, block_size=128, n_layers_in_prelude=1)
        rec.update(n_layers_in_recurrent_block=1)
        gpt = dict(n_embd=768, n_head=12, n_layer=1, n_positions=128, vocab_size=50257)
    rec.update(model_type="huginn_raven", n_layers_in_coda=1, mean_recurrence=4)
    gpt.update(model_type="gpt2", latent_id=gpt["vocab_size"] - 1)
    gpt.update(start_latent_id=gpt["vocab_size"] - 2, end_latent_id=gpt["vocab_size"] - 3)
    model = build_model(parse_config(rec), dtype=dtype, seed=0)
    model.backend = get_backend("triton", model)
    batches = [[[5, 6, 7, 8], [9, 10]]] if size == "tiny" else [[[5, 6, 7, 8]], [[5, 6, 7, 8]] * 8]
    for prompts in batches:
        _recurrent_runs(model, prompts, size)
    _attempt(lambda: _served(model, batches[-1]))
    del model
    model = build_model(parse_config(gpt), dtype=dtype, seed=0)
    model.backend = get_backend("triton", model)
    s, lat, e = gpt["start_latent_id"], gpt["latent_id"], gpt["end_latent_id"]
    ids = [[5, 6, 7, s, lat, lat, e], [8, 9, s, lat, lat, e]]
    _attempt(lambda: latentrt.generate(model, ids, max_new_tokens=2))
    if size != "tiny":
        _attempt(lambda: latentrt.generate(model, [[5, 6, 7, s, lat, lat, e]], max_new_tokens=2))


def _recurrent_runs(model, prompts, size: str) -> None:
    import latentrt

    tiny = size == "tiny"  # full shapes: the benchmarks' KV mode and criteria only
    kv_modes = ("full", "shared", "ring-2", "skip", "always-last") if tiny else ("shared",)
    criteria = ("none", "latent-diff", "kl", "entropy-diff", "argmax-stability") if tiny else ("none", "kl")
    # every KV mode once, then each criterion once in one mode: on 2026-12-05 the whole product of the two recorded
    # the same 141 launches as this, in 2.2x the time (208 s against 94 s on CI's machine, under the interpreter)
    criteria_mode = "ring-2" if tiny else "shared"
    runs = [(kv, criteria[0]) for kv in kv_modes] + [(criteria_mode, crit) for crit in criteria[1:]]
    for kv, crit in runs:
        kw = dict(max_new_tokens=2, num_steps=3, kv_sharing=kv, init_scale=0.0)
        if crit != "none":
            kw.update(adaptive=True, exit_criterion=crit)
        _attempt(lambda kw=kw: latentrt.generate(model, prompts, **kw))


def _served(model, prompts) -> None:
    """The server's steps on the Triton backend: the pool's decode attention (plain and looped layers)."""
    from latentrt.serve import Engine

    engine = Engine(model, max_batch=len(prompts) + 1, max_len=64, kv_slots=16)
    for p in prompts:
        engine.submit(p, max_new_tokens=2, num_steps=3, kv_sharing="ring-2", init_scale=0.0)
    engine.run_until_idle()


def _ignore_non_finite() -> None:
    from latentrt import engine
    from latentrt.models import recurrent

    engine.Generation._raise_if_nonfinite = lambda self, flags, token: None
    recurrent.check_finite = lambda *a, **k: None


def _attempt(fn) -> None:
    """Run a workload; with kernels skipped values are garbage and host checks may stop it after the launches
    of interest were recorded."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recording keeps what ran before the stop
        print(f"  workload stopped early: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ the cache
# what a launch reads of a cached kernel (triton.compiler.CompiledKernel: its metadata and its binary; the host
# modules are single files); the IRs of the compile's other stages are for people
CACHE_KEEP = (".json", ".cubin", ".so")


def relocate_cache(folder: Path) -> int:
    """Point every entry of the Triton cache in ``folder`` at the entry's files where they now lie (an entry's
    group file lists them by absolute path, which a carried cache changes), leaving out files that are gone;
    the number of entries rewritten."""
    import json

    groups = sorted(Path(folder).resolve().glob("*/__grp__*"))
    for group in groups:
        children = json.loads(group.read_text()).get("child_paths") or {}
        here = {name: str(group.parent / Path(path).name) for name, path in children.items()}
        kept = {name: path for name, path in here.items() if Path(path).is_file()}
        group.write_text(json.dumps({"child_paths": kept}))
    return len(groups)


def slim_cache(folder: Path) -> int:
    """Remove what no launch reads from the Triton cache in ``folder`` (``CACHE_KEEP``), and relocate it; the
    bytes it keeps."""
    for path in Path(folder).glob("*/*"):
        if path.is_file() and not path.name.startswith("__grp__") and path.suffix not in CACHE_KEEP:
            path.unlink()
    relocate_cache(folder)
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ compiling
class _StandInDriver:
    """What JITFunction.warmup asks of a driver, for a target named on the command line."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    @property
    def utils(self):
        """Triton's CUDA utility module (built against the stand-in libcuda.so.1 for host launchers: Triton 3.8's
        launcher takes its ``launch`` from the active driver; 3.6's builds its own)."""
        from triton.backends.nvidia.driver import CudaUtils

        if getattr(self, "_utils", None) is None:
            self._utils = CudaUtils()
        return self._utils


def _materialise(spec):
    import torch

    kind = spec[0]
    if kind == "tensor":
        t = torch.empty(64, dtype=getattr(torch, spec[1]))
        return t if spec[2] else t[1:]  # keep the recorded 16-byte (mis)alignment
    return spec[1]


def stub_driver(folder: Path) -> Path:
    """Write into ``folder`` a stand-in ``libcuda.so.1`` for Triton's host modules to link against on a machine
    without a driver, and return ``folder``: every function Triton's cuda.h declares (its names after the
    header's versioning macros, from the preprocessed header), each returning 0. A module linked against it
    names libcuda.so.1 as needed, as one built on the GPU does, so there the real driver provides the
    functions."""
    import re

    from triton.backends.nvidia.driver import include_dirs

    header = next(Path(d) / "cuda.h" for d in include_dirs if (Path(d) / "cuda.h").is_file())
    cc = os.environ.get("CC", "cc")
    text = subprocess.run([cc, "-E", "-P", str(header)], capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"\b(cu[A-Z]\w*)\s*\(", text)))
    (folder / "stub.c").write_text("".join(f"int {name}(void) {{ return 0; }}\n" for name in names))
    out = folder / "libcuda.so.1"
    cmd = [cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(folder / "stub.c")]
    subprocess.run(cmd, check=True)
    return folder


def compile_all(records: Path, arch: int, launchers: bool = False) -> int:
    """Compile every recorded launch (``launchers``: and its host launcher); print a table; return the number
    of failures."""
    import importlib

    from triton.runtime.driver import driver

    if launchers:
        from triton.backends.nvidia.driver import CudaLauncher, CudaUtils

        CudaUtils()  # Triton's CUDA utility module, built once per machine (then loaded with the stand-in)
    driver.set_active(_StandInDriver(arch))
    launches = pickle.loads(records.read_bytes())
    failures = 0
    print(f"{'kernel':34s} {'args':>5s} {'warps':>5s} {'smem B':>8s} {'regs':>9s}  status")
    for module, name, args, kwargs in sorted(launches, key=lambda k: (k[0], k[1])):
        fn = getattr(importlib.import_module(module), name)
        kw = {k: _materialise(v) for k, v in kwargs}
        try:
            kernel = fn.warmup(*[_materialise(a) for a in args], grid=(1,), **kw)
            if launchers:  # the host launcher a GPU builds at the kernel's first launch
                CudaLauncher(kernel.src, kernel.metadata)
            smem = kernel.metadata.shared
            n_regs = _registers(kernel, arch)
            limit = SMEM_LIMIT.get(arch, 232448)
            status = "ok" if smem <= limit else f"FAIL shared memory {smem} > {limit}"
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then counted
            smem, n_regs, status = 0, 0, f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        failures += status != "ok"
        if status != "ok" or "+" in str(n_regs):
            status += f" {dict((k, v[1]) for k, v in kwargs)}"
        print(
            f"{module.split('.')[-1] + '.' + name:34s} {len(args):5d} {kw.get('num_warps', 4)!s:>5s} "
            f"{smem:8d} {n_regs!s:>9s}  {status}"
        )
    for module, name in _never_launched(launches):
        print(f"{module.split('.')[-1] + '.' + name:34s} FAIL never launched by the workloads: nothing compiled it")
        failures += 1
    print(f"{len(launches)} launches compiled for sm_{arch}, {failures} failed")
    return failures


def _never_launched(launches) -> list[tuple[str, str]]:
    """The kernels (``*_kernel`` jit functions of latentrt.kernels' modules; the others are helpers they call)
    that no recorded launch ran."""
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface  # (a JITFunction, or under the interpreter its stand-in)

    import latentrt.kernels

    launched = {(module, name) for module, name, *_ in launches}
    kernels = []
    for info in pkgutil.iter_modules(latentrt.kernels.__path__):
        module = importlib.import_module(f"latentrt.kernels.{info.name}")
        for name, value in vars(module).items():
            if (
                isinstance(value, KernelInterface)
                and name.endswith("_kernel")
                and value.fn.__module__ == module.__name__
            ):
                kernels.append((module.__name__, name))
    return [k for k in kernels if k not in launched]


def _registers(kernel, arch: int):
    """Registers per thread from ptxas' report of the kernel's PTX (None when ptxas is not found)."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas

    if "ptx" not in kernel.asm:  # a hit in a slimmed cache (slim_cache): no PTX kept
        return None
    try:
        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001
        return None
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        res = subprocess.run(
            [
                ptxas,
                "-v",
                f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                str(ptx),
                "-o",
                str(Path(tmp) / "k.o"),
            ],
            capture_output=True,
            text=True,
        )
    m = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    if not m:
        return None
    return f"{m.group(1)}" + (f"+{spill.group(1)}B" if spill and int(spill.group(1)) else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    ap.add_argument("--full", action="store_true", help="also full Huginn-0125 / GPT-2 shapes (~4 GB of RAM)")
    ap.add_argument("--execute", action="store_true", help="run the kernels while recording (slower, same launches)")
    ap.add_argument(
        "--launchers", action="store_true", help="also build the kernels' host launchers into Triton's cache"
    )
    ap.add_argument("--slim-cache", type=Path, default=None, help="keep what launches read of this Triton cache")
    ap.add_argument("--relocate-cache", type=Path, default=None, help="point a carried Triton cache at its place")
    ap.add_argument("--record-to", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile-from", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.slim_cache:
        print(f"{args.slim_cache}: {slim_cache(args.slim_cache) / 1e6:.1f} MB kept")
        return 0
    if args.relocate_cache:
        print(f"{args.relocate_cache}: {relocate_cache(args.relocate_cache)} entries relocated")
        return 0
    if args.record_to:
        record(args.full, Path(args.record_to), execute=args.execute)
        return 0
    if args.compile_from:
        return 1 if compile_all(Path(args.compile_from), args.arch, args.launchers) else 0
    # two processes: triton.jit decides at import time whether kernels are interpreted
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.pkl"
        me = [sys.executable, "-m", "tools.compile_check", "--arch", str(args.arch)]
        interp = dict(os.environ, TRITON_INTERPRET="1", LATENTRT_GPU_CONFIGS="1")  # the GPU's launch configs
        flags = ["--full"] * args.full + ["--execute"] * args.execute
        subprocess.run(me + ["--record-to", str(path), *flags], env=interp, check=True)
        compiled = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if args.launchers:  # linked against the stub, and loaded with it (Triton loads each module it builds)
            stub = str(stub_driver(Path(tmp)))
            library_path = [stub, *filter(None, [compiled.get("LD_LIBRARY_PATH")])]
            compiled.update(TRITON_LIBCUDA_PATH=stub, LD_LIBRARY_PATH=os.pathsep.join(library_path))
        compile_flags = ["--launchers"] * args.launchers
        return subprocess.run(me + ["--compile-from", str(path), *compile_flags], env=compiled).returncode


if __name__ == "__main__":
    sys.exit(main())
