"""tools/ptxas_check.py reads ptxas's report and fails on spills it was not told about (no nvcc needed)."""

from __future__ import annotations

import shutil

import pytest

from tools.ptxas_check import parse_report, problems, report

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


CALLEE = "_ZN13latentrt_ring10watch_tripEPKNS_5WatchEiiiiii"
RUN = "_ZN45_INTERNAL_x3runILi1EEEvRKNS0_4ArgsE"
STREAM = "_ZN47_GLOBAL__N__9937fa9c_14_stream_loop_cu_45bbea7f18stream_loop_kernelILi1EEEvNS_4ArgsE"
# as ptxas prints it: the entry's own properties, then those of functions it kept out of line
WITH_CALLEES = f"""\
ptxas info    : Compiling entry function '{STREAM}' for 'sm_90a'
ptxas info    : Function properties for {STREAM}
    40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 2 barriers, 40 bytes cumulative stack size, 4224 bytes smem
ptxas info    : Compile time = 9350.984 ms
ptxas info    : Function properties for {CALLEE}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for {RUN}
    0 bytes stack frame, 12 bytes spill stores, 64 bytes spill loads
"""


def test_a_callee_spill_is_reported_under_its_own_name_not_hidden_in_the_entry():
    """A spill in a function ptxas kept out of line fails the check under that function's name, and a
    callee's clean properties printed after the entry's do not overwrite the entry's."""
    entry, *callees = parse_report(WITH_CALLEES, "csrc/stream_loop.cu")
    assert entry["name"] == "stream_loop_kernel<1>" and (entry["stack"], entry["registers"]) == (40, 168)
    assert [c.get("function") for c in callees] == [True, True] and callees[0]["name"] == "watch_trip"
    assert problems([entry, *callees], {}) == [f"{callees[1]['name']} (csrc/stream_loop.cu) spills 76 bytes"]
    clean = parse_report(WITH_CALLEES.replace("12 bytes spill stores, 64", "0 bytes spill stores, 0"), "x.cu")
    assert problems(clean, {}) == []


def test_reports_come_from_the_build_logs_when_given(tmp_path):
    """--from-build: csrc/'s reports are read from the build's ptxas logs, nothing compiled (nvcc None)."""
    from tools.ptxas_check import ROOT

    (tmp_path / "stream_loop.log").write_text(WITH_CALLEES)
    kernels = report(ROOT / "csrc" / "stream_loop.cu", "90a", None, tmp_path)
    assert kernels[0]["name"] == "stream_loop_kernel<1>" and kernels[0]["source"] == "csrc/stream_loop.cu"


def test_probes_are_compiled_even_with_build_logs(tmp_path, monkeypatch):
    """The extension's build compiles csrc/ only: a probe is compiled here, whatever log shares its name."""
    from tools import ptxas_check

    compiled = []
    monkeypatch.setattr(ptxas_check, "compile_report", lambda src, arch, nvcc: compiled.append(src.name) or [])
    (tmp_path / "stream_probe.log").write_text(WITH_CALLEES)
    assert report(ptxas_check.ROOT / "benchmarks" / "probes" / "stream_probe.cu", "90a", "nvcc", tmp_path) == []
    assert compiled == ["stream_probe.cu"]


def test_the_command_fails_on_an_unknown_spill_and_says_when_nvcc_is_missing(monkeypatch, capsys):
    from tools import ptxas_check

    monkeypatch.setattr(ptxas_check, "SOURCES", [ptxas_check.ROOT / "csrc" / "stream_loop.cu"])
    monkeypatch.setattr(ptxas_check, "report", lambda *a: parse_report(WITH_CALLEES, "csrc/stream_loop.cu"))
    which = shutil.which  # (c++filt stays the real one)
    monkeypatch.setattr(ptxas_check.shutil, "which", lambda name: "nvcc" if name == "nvcc" else which(name))
    assert ptxas_check.main([]) == 1
    out = capsys.readouterr().out
    assert "ptxas check failed" in out and "spills 76 bytes" in out and " SPILLS" in out
    monkeypatch.setattr(ptxas_check, "report", lambda *a: parse_report(REPORT, "csrc/x.cu"))
    assert ptxas_check.main([]) == 0 and "no unexpected spills" in capsys.readouterr().out
    monkeypatch.setattr(ptxas_check.shutil, "which", lambda name: None if name == "nvcc" else which(name))
    assert ptxas_check.main([]) == 0 and "nvcc not found, nothing checked" in capsys.readouterr().out
