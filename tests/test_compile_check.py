"""tools.compile_check's host side: the kernels it must find launched (the compiling itself runs in CI)."""

import pytest

from tools.compile_check import _never_launched

pytestmark = pytest.mark.triton  # (the kernels are found among the Triton functions)

KERNEL = ("latentrt.kernels.linear", "_linear_kernel")


def _launch(module: str, name: str) -> tuple:
    return (module, name, (), ())  # (module, kernel, argument specs, keyword specs)


def test_a_kernel_no_workload_launched_is_reported_and_helpers_are_not_kernels():
    missing = _never_launched([])
    assert KERNEL in missing and ("latentrt.kernels.decode_attention", "_decode_attention_kernel") in missing
    assert all(name.endswith("_kernel") for _, name in missing)  # helpers (_dot_rows, ...) are never launched
    assert ("latentrt.kernels.linear", "_dot_rows") not in missing
    launched = [_launch(*k) for k in missing]
    assert _never_launched(launched) == []
    assert _never_launched([k for k in launched if k[:2] != KERNEL]) == [KERNEL]


KERNEL_SCRIPT = """
import sys

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

from tools.compile_check import _StandInDriver


@triton.jit
def _scale_kernel(x, y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n) * 2, mask=offs < n)


driver.set_active(_StandInDriver(90))
x = torch.empty(64)
kernel = _scale_kernel.warmup(x, x, 64, BLOCK=64, grid=(1,))
if sys.argv[1:] == ["--launcher"]:
    from triton.backends.nvidia.driver import CudaLauncher

    CudaLauncher(kernel.src, kernel.metadata)
"""


def _state(folder):
    """Every file of a cache with its bytes (a compile rewrites its entry's group and stage files; a hit
    writes nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _compile_into(script, cache, *args, **env_over):
    """Compile the script's kernel for sm_90 (no GPU: compile_check's stand-in driver) with ``cache`` as
    Triton's cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=str(Path(__file__).parent.parent), **env_over)
    subprocess.run([sys.executable, str(script), *args], env=env, check=True, capture_output=True)


def test_a_carried_cache_is_hit_where_it_now_lies_once_relocated(tmp_path):
    """Triton's cache entries name their files by absolute path: a cache moved elsewhere misses (the kernel is
    compiled anew) until ``relocate_cache`` points it at its place; slimmed to what a launch reads, it still
    hits (gpu_check.sh relocates a carried cache before anything compiles)."""
    import shutil

    from tools.compile_check import slim_cache

    script = tmp_path / "scale.py"
    script.write_text(KERNEL_SCRIPT)
    made = tmp_path / "made"
    _compile_into(script, made)
    moved = tmp_path / "moved"
    shutil.copytree(made, moved)
    shutil.rmtree(made)  # (the paths its entries name are gone)
    before = _state(moved)
    _compile_into(script, moved)
    assert _state(moved) != before  # not relocated: a miss, the entry written again
    shutil.rmtree(moved)
    _compile_into(script, made)
    carried = tmp_path / "carried"
    shutil.copytree(made, carried)
    shutil.rmtree(made)
    assert slim_cache(carried) > 0
    suffixes = {p.suffix for p in carried.rglob("*") if p.is_file() and not p.name.startswith("__grp__")}
    assert suffixes == {".json", ".cubin"}, suffixes
    before = _state(carried)
    _compile_into(script, carried)
    assert _state(carried) == before  # relocated and slimmed: a hit, nothing written


def test_a_kernels_host_launcher_is_built_against_the_stand_in_driver(tmp_path):
    """``--launchers``: the launcher a GPU would build at the kernel's first launch lands in the cache, linked
    against the stand-in libcuda.so.1 (every function of Triton's cuda.h), so it names the driver it needs."""
    import os
    import subprocess

    from tools.compile_check import stub_driver

    (tmp_path / "stub").mkdir()
    stub = stub_driver(tmp_path / "stub")
    assert (stub / "libcuda.so.1").is_file()
    script = tmp_path / "scale.py"
    script.write_text(KERNEL_SCRIPT)
    library_path = os.pathsep.join(filter(None, [str(stub), os.environ.get("LD_LIBRARY_PATH")]))
    cache = tmp_path / "cache"
    _compile_into(script, cache, "--launcher", TRITON_LIBCUDA_PATH=str(stub), LD_LIBRARY_PATH=library_path)
    # (Triton 3.6, the GPU machine's, builds a launcher per kernel; 3.8 launches every kernel through its CUDA
    # utility module, which its launcher takes from the active driver: the stand-in's ``utils``)
    launchers = list(cache.glob("*/__triton_launcher*.so")) or list(cache.glob("*/cuda_utils*.so"))
    assert len(launchers) == 1, sorted(cache.rglob("*"))
    dynamic = subprocess.run(["readelf", "-d", str(launchers[0])], capture_output=True, text=True, check=True)
    assert "Shared library: [libcuda.so.1]" in dynamic.stdout, dynamic.stdout  # needs the driver by soname


def test_relocation_drops_files_that_are_gone_and_counts_its_entries(tmp_path):
    """An entry's group file, rewritten: each file it lists now named where the entry lies, a listed file that
    is no longer there (slimmed away) left out; the count is the entries rewritten."""
    import json

    from tools.compile_check import relocate_cache

    for key in ("a1", "b2"):
        (tmp_path / key).mkdir()
        (tmp_path / key / "k.cubin").write_bytes(b"\0")
        listed = {"k.cubin": f"/elsewhere/{key}/k.cubin", "k.ptx": f"/elsewhere/{key}/k.ptx"}  # k.ptx: gone
        (tmp_path / key / "__grp__k.json").write_text(json.dumps({"child_paths": listed}))
    assert relocate_cache(tmp_path) == 2
    for key in ("a1", "b2"):
        group = json.loads((tmp_path / key / "__grp__k.json").read_text())
        assert group == {"child_paths": {"k.cubin": str((tmp_path / key / "k.cubin").resolve())}}


def test_recorded_tensor_arguments_keep_their_alignment():
    """A launch recorded with a tensor off a 16-byte boundary compiles the kernel's unaligned variant (Triton
    specialises on it): the stand-in tensor keeps the recorded alignment."""
    from tools.compile_check import _materialise

    assert _materialise(("tensor", "float32", True)).data_ptr() % 16 == 0
    assert _materialise(("tensor", "float32", False)).data_ptr() % 16 != 0
    assert _materialise(("value", 7)) == 7
