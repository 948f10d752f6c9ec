"""Builds the optional CUDA extension (latentrt._cuda, from csrc/) when nvcc is present and either a GPU
is visible or LATENTRT_FORCE_CUDA=1; a pure-Python install otherwise.

The extension is plain pybind11 + nvcc: it takes raw device pointers and the stream from torch tensors
on the Python side, so it does not depend on how torch itself was built.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
CPP_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))


def _source_digest() -> str:
    """latentrt/cuda_sources.py's digest of csrc/, compiled into the extension (loaded as a file: nothing of
    latentrt is importable while it is being built)."""
    spec = importlib.util.spec_from_file_location("_latentrt_cuda_sources", ROOT / "latentrt" / "cuda_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(ROOT / "csrc")


def _gpu_visible() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _want_cuda() -> bool:
    if os.environ.get("LATENTRT_NO_CUDA") == "1" or not CU_SOURCES:
        return False
    if not shutil.which("nvcc"):
        return False
    return os.environ.get("LATENTRT_FORCE_CUDA") == "1" or _gpu_visible()


def _cuda_home(nvcc: str) -> Path:
    """The toolkit root: $CUDA_HOME / $CUDA_PATH, nvcc's grandparent, /usr/local/cuda or /usr/local/cuda-*."""
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        str(Path(nvcc).resolve().parent.parent),
        "/usr/local/cuda",
        *sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))[::-1],
    ]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    raise RuntimeError("cannot find the CUDA toolkit (set CUDA_HOME)")


def _cudart_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if any((home / sub).glob("libcudart.so*")):
            return home / sub
    raise RuntimeError(f"no libcudart.so under {home}")


class NvccBuildExt(build_ext):
    """Compile .cu files with nvcc (sm_90a + PTX fallback by default), the binding with the host compiler.
    LATENTRT_CUDA_ARCHS=90a,...: the SASS targets; LATENTRT_CUDA_PTX=0: no PTX fallback (the same sources through
    the same front end again, for another virtual arch: it checks nothing the first target does not).
    LATENTRT_PTXAS_LOG=DIR: ptxas's register / spill report of each .cu file goes to DIR/<name>.log (CI's
    ``python -m tools.ptxas_check --from-build DIR`` reads it instead of compiling everything again)."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        nvcc = shutil.which("nvcc")
        archs = os.environ.get("LATENTRT_CUDA_ARCHS", "90a")
        build_temp = Path(self.build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)
        objects, commands, logs = [], [], []
        ptxas_log = os.environ.get("LATENTRT_PTXAS_LOG")
        if ptxas_log:
            Path(ptxas_log).mkdir(parents=True, exist_ok=True)
        cuda_home = _cuda_home(nvcc)
        includes = [pybind11.get_include(), str(ROOT / "csrc"), str(cuda_home / "include")]
        import sysconfig

        includes.append(sysconfig.get_paths()["include"])
        inc_flags = [f"-I{p}" for p in includes]
        digest = f'-DLATENTRT_SOURCE_DIGEST="{_source_digest()}"'  # latentrt._cuda.source_digest
        for src in ext.sources:
            obj = build_temp / (Path(src).stem + ".o")
            if src.endswith(".cu"):
                gencode = []
                for a in archs.split(","):
                    gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
                if os.environ.get("LATENTRT_CUDA_PTX", "1") != "0":  # the PTX fallback (CI: 0, see .ci/run)
                    base = archs.split(",")[0].rstrip("a")
                    gencode += [f"-gencode=arch=compute_{base},code=compute_{base}"]
                cmd = [
                    nvcc,
                    "-c",
                    src,
                    "-o",
                    str(obj),
                    "-O3",
                    "-std=c++17",
                    "--use_fast_math",
                    "--threads=0",  # the gencode targets in parallel
                    "-Xcompiler",
                    "-fPIC",
                    "-lineinfo",
                    *gencode,
                    *inc_flags,
                ]
                if ptxas_log:
                    cmd += ["-Xptxas", "-v"]
                logs.append(Path(ptxas_log) / f"{Path(src).stem}.log" if ptxas_log else None)
            else:
                cmd = [
                    os.environ.get("CXX", "c++"),
                    "-c",
                    src,
                    "-o",
                    str(obj),
                    "-O2",
                    "-std=c++17",
                    "-fPIC",
                    digest,
                    *inc_flags,
                ]
                logs.append(None)
            commands.append(cmd)
            objects.append(str(obj))
        # the translation units are independent: compile them side by side (the loop kernel dominates)
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            for cmd in commands:
                print(" ".join(cmd), file=sys.stderr)
            list(pool.map(_run, commands, logs))
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        libdir = _cudart_dir(cuda_home)
        # linked beside, then renamed into place: a process importing latentrt._cuda meanwhile (CI runs the tests
        # while this builds) sees the old library or the whole new one, never a half-written file
        partial = out.with_name(out.name + ".partial")
        subprocess.check_call(
            [
                os.environ.get("CXX", "c++"),
                "-shared",
                *objects,
                "-o",
                str(partial),
                f"-L{libdir}",
                "-lcudart",
                f"-Wl,-rpath,{libdir}",
            ]
        )
        os.replace(partial, out)


def _run(cmd: list[str], log: Path | None) -> None:
    """Run a compile command; with ``log``, its stderr (ptxas's report) goes there, and is shown on failure."""
    if log is None:
        subprocess.check_call(cmd)
        return
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stderr=f)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text())
        raise subprocess.CalledProcessError(proc.returncode, cmd)


ext_modules, cmdclass = [], {}
if _want_cuda():
    ext_modules = [Extension("latentrt._cuda", sources=CU_SOURCES + CPP_SOURCES)]
    cmdclass = {"build_ext": NvccBuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
