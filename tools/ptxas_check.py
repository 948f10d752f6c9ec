"""Compile every CUDA kernel (csrc/ and benchmarks/probes/) for sm_90a and report what ptxas allocated.

A kernel that spills registers to local memory runs its hot loop through L1/L2 instead of registers; the
persistent kernels are weight-streaming loops where that costs bandwidth. This check compiles each
translation unit to a cubin with setup.py's flags and ``-Xptxas -v`` (no GPU needed), prints one line per
kernel (registers, spill stores / loads, stack frame, static shared memory) and fails when a kernel spills,
unless ``KNOWN_SPILLS`` names it with the reason; an entry that no longer spills fails too (the list stays
true).

    python -m tools.ptxas_check [--arch 90a] [--jobs 2] [--from-build DIR]

``--from-build DIR``: csrc/'s reports are read from the extension build's logs (``LATENTRT_PTXAS_LOG=DIR
python setup.py build_ext``, the same flags plus ``-Xptxas -v``) instead of compiling those files again;
the sources without a log there (the probes) are compiled as usual.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "benchmarks" / "probes").glob("*.cu"))
FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", f"-I{ROOT / 'csrc'}"]

# demangled-name fragment -> why it may spill (each must still spill, or the entry goes)
KNOWN_SPILLS = {
    "latent_loop_kernel<16>": "the batch-16 instantiation of today's persistent loop: 16 rows of fp32 "
    "accumulators under the 128-register cap of 512 threads; the streamed kernel (issue #11) replaces it",
}

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
FUNCTION = re.compile(r"Function properties for (\S+)")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    """``void (anonymous namespace)::latent_loop_kernel<16>((anonymous namespace)::Args)`` ->
    ``latent_loop_kernel<16>``."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name).split("(")[0]
    return name.split("::")[-1]


def compile_report(src: Path, arch: str, nvcc: str) -> list[dict]:
    """ptxas's report of every kernel in ``src``: name, registers, spills, stack, smem."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", *FLAGS, str(src)]
        proc = subprocess.run([*cmd, "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{src.name} does not compile for sm_{arch}:\n{proc.stderr[-4000:]}")
    return parse_report(proc.stderr, src.relative_to(ROOT).as_posix())


def report(src: Path, arch: str, nvcc: str, logs: Path | None) -> list[dict]:
    """``src``'s kernels: from the build's log in ``logs`` when there is one, else compiled here."""
    log = logs / f"{src.stem}.log" if logs is not None and src.parent == ROOT / "csrc" else None
    if log is not None and log.is_file():
        return parse_report(log.read_text(), src.relative_to(ROOT).as_posix())
    return compile_report(src, arch, nvcc)


def parse_report(text: str, source: str) -> list[dict]:
    """The kernels of one ``ptxas -v`` report, then the device functions ptxas kept out of line (a spill in
    a callee is a spill in the kernel that calls it). Each "Function properties" block is attributed to the
    function it names, not to the entry compiled last."""
    kernels, functions, current, target = [], {}, None, None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"source": source, "mangled": m.group(1), "smem": 0}
            kernels.append(current)
            target = None
        elif m := FUNCTION.search(line):
            name = m.group(1)
            if current is not None and name == current["mangled"]:
                target = current
            else:
                target = functions.setdefault(name, {"source": source, "mangled": name, "smem": 0, "function": True})
        elif target is not None and (m := PROPS.search(line)):
            target["stack"], target["spill_stores"], target["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    found = kernels + list(functions.values())
    for k, name in zip(found, demangle([k["mangled"] for k in found])):
        k["name"] = short(name)
    return found


def spilled(k: dict) -> int:
    return k.get("spill_stores", 0) + k.get("spill_loads", 0)


def problems(kernels: list[dict], known: dict[str, str]) -> list[str]:
    """Kernels that spill without a reason in ``known``, and entries of ``known`` that no longer spill."""
    out = [
        f"{k['name']} ({k['source']}) spills {spilled(k)} bytes"
        for k in kernels
        if spilled(k) and not any(frag in k["name"] for frag in known)
    ]
    for frag in known:
        if not any(spilled(k) for k in kernels if frag in k["name"]):
            out.append(f"KNOWN_SPILLS names {frag!r}, which no longer spills (or no longer exists): remove it")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.ptxas_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90a")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--from-build", type=Path, default=None, help="read csrc/'s reports from this build log folder")
    args = p.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("ptxas check: nvcc not found, nothing checked")
        return 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        reports = list(pool.map(lambda s: report(s, args.arch, nvcc, args.from_build), SOURCES))
    kernels = [k for r in reports for k in r]
    print(f"ptxas summary, sm_{args.arch} ({len(kernels)} kernels in {len(SOURCES)} files):")
    print(f"  {'kernel':<40} {'source':<36} regs  spill st/ld  stack  smem")
    for k in kernels:
        known = any(frag in k["name"] for frag in KNOWN_SPILLS)
        mark = "" if not spilled(k) else (" (known)" if known else " SPILLS")
        print(
            f"  {k['name'] + (' (callee)' if k.get('function') else ''):<40} {k['source']:<36} "
            f"{'-' if k.get('function') else k.get('registers', 0):>4}  "
            f"{k.get('spill_stores', 0):>5}/{k.get('spill_loads', 0):<5} {k.get('stack', 0):>5}  {k['smem']:>5}{mark}"
        )
    found = problems(kernels, KNOWN_SPILLS)
    if found:
        print("ptxas check failed:\n  " + "\n  ".join(found))
        return 1
    print("ptxas check: no unexpected spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
