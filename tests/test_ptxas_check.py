"""tools/ptxas_check.py reads ptxas's report and fails on spills it was not told about (no nvcc needed)."""

from __future__ import annotations

import shutil

import pytest

from tools.ptxas_check import parse_report, problems

pytestmark = pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) demangles the names")

LOOP = "_ZN50_GLOBAL__N__d1753830_17_recurrent_loop_cu_a92d0a3118latent_loop_kernelILi16EEEvNS_4ArgsE"
FILL = "_ZN44_GLOBAL__N__2d63e1ab_15_stream_probe_cu_main4fillEP13__nv_bfloat16mmf"
REPORT = f"""\
ptxas info    : Compiling entry function '{LOOP}' for 'sm_90a'
ptxas info    : Function properties for {LOOP}
    104 bytes stack frame, 204 bytes spill stores, 576 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 104 bytes cumulative stack size, 8400 bytes smem
ptxas info    : Compiling entry function '{FILL}' for 'sm_90a'
ptxas info    : Function properties for {FILL}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 0 barriers
"""


def test_report_is_parsed_per_kernel():
    loop, fill = parse_report(REPORT, "csrc/x.cu")
    assert loop["name"] == "latent_loop_kernel<16>" and fill["name"] == "fill"
    got = tuple(loop[k] for k in ("registers", "spill_stores", "spill_loads", "stack", "smem"))
    assert got == (128, 204, 576, 104, 8400)
    assert (fill["registers"], fill["spill_stores"], fill["smem"]) == (14, 0, 0)


def test_spills_fail_unless_known_and_known_entries_stay_true():
    kernels = parse_report(REPORT, "csrc/x.cu")
    assert problems(kernels, {}) == ["latent_loop_kernel<16> (csrc/x.cu) spills 780 bytes"]
    assert problems(kernels, {"latent_loop_kernel<16>": "why"}) == []
    assert "no longer spills" in problems(kernels, {"latent_loop_kernel<16>": "why", "fill": "why"})[0]
