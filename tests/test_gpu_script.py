"""benchmarks/gpu_check.sh, the one script a lent GPU runs, on this machine: its branches are shell code that
only a lent GPU's 15 minutes would otherwise find wrong. Stand-ins take the place of nvidia-smi, python3 and
compute-sanitizer (each records how it was called, with the environment the script exported), so the
script's fallbacks run in about a second, whatever this machine has built."""

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent

# python3 as the script calls it with no probe, no build, no tests and no benchmarks: a smoke passes where its
# "family:input:attention" (the streamed loop's two fallback settings) is listed in STANDIN_PASS, and any other
# call is an error the test sees (a new python3 call in the script needs its stand-in here)
STANDIN_PYTHON = """#!/bin/sh
echo "python3 $* | input=${LATENTRT_STREAM_INPUT:-} attention=${LATENTRT_STREAM_ATTENTION:-}" >> "$STANDIN_CALLS"
case "$*" in
  "-m benchmarks.cuda_smoke --only "*)
    key="$4:${LATENTRT_STREAM_INPUT:-}:${LATENTRT_STREAM_ATTENTION:-}"
    case " $STANDIN_PASS " in *" $key "*) echo "cuda smoke ok"; exit 0 ;; esac
    echo "stand-in smoke $key failed"; exit 1 ;;
  *"print(sys.version"*) echo "3.12.0 stand-in" ;;
  *"import latentrt._cuda"*) exit 0 ;;
  *"cuda_ext.built()"*)
    [ "$STANDIN_BUILT" = 1 ] && { echo built; exit 0; }
    echo "the CUDA extension is stale: stand-in"; exit 1 ;;
  "setup.py -q build_ext "*) exit 0 ;;
  "-m tools.compile_check --relocate-cache "*) exit 0 ;;
  *"import pytest_timeout"*) exit 1 ;;
  *) echo "unexpected python3 call: $*" >&2; exit 97 ;;
esac
"""
STANDIN_SANITIZER = """#!/bin/sh
echo "compute-sanitizer $* | input=${LATENTRT_STREAM_INPUT:-} skip=${LATENTRT_BENCH_SKIP:-}" >> "$STANDIN_CALLS"
echo "========= ERROR SUMMARY: 0 errors"
"""


def _run_script(tmp_path, passing: str, **env_over: str):
    """Run gpu_check.sh with the stand-ins, smokes ``passing`` passing, ``env_over`` set (or unset where
    None); (main.log, the calls, the packed logs' names)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in [
        ("nvidia-smi", '#!/bin/sh\necho "stand-in nvidia-smi"\n'),
        ("python3", STANDIN_PYTHON),
        ("compute-sanitizer", STANDIN_SANITIZER),
    ]:
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", OUT=str(out), STANDIN_CALLS=str(calls))
    env.update(GPU_PROBE="0", GPU_BUILD="0", GPU_TESTS="none", GPU_BENCH="none", GPU_CHECK_BUDGET="120")
    env.update(STANDIN_PASS=passing)
    for name in ("LATENTRT_STREAM_INPUT", "LATENTRT_STREAM_ATTENTION", "LATENTRT_BENCH_SKIP", "GPU_SANITIZE"):
        env.pop(name, None)
    env.pop("TRITON_CACHE_DIR", None)
    for name, value in env_over.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "unbound variable" not in r.stderr and "syntax error" not in r.stderr, r.stderr[-2000:]
    assert "unexpected python3 call" not in r.stderr, r.stderr[-2000:]
    log = (out / "main.log").read_text()
    assert "gpu tests: skipped (GPU_TESTS=none)" in log and log.rstrip().endswith("done")
    # what the device tool brings back (at most 8 files): main.log and one archive of every other log
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["logs.tar.gz", "main.log"]
    with tarfile.open(out / "logs.tar.gz") as archive:
        packed = archive.getnames()
    return log, calls.read_text().splitlines(), packed


def _smokes(calls):
    """(family, input, attention) of each smoke, in order; the sanitizer runs' lines."""
    smokes = [
        (m[1], m[2], m[3])
        for line in calls
        if (m := re.match(r"python3 -m benchmarks.cuda_smoke --only (\S+) \| input=(\S*) attention=(\S*)", line))
    ]
    return smokes, [line for line in calls if line.startswith("compute-sanitizer")]


def test_every_smoke_failing_drops_the_streamed_loops_and_sanitizes_the_barrier_kernels(tmp_path):
    """A broken GPU: the streamed loop is retried with its input from L2, then also with per-CTA attention,
    then dropped with its thought loop; the variants that need it never run; the sanitizer gets the barrier
    kernels only, with the dropped rows skipped."""
    log, calls, packed = _run_script(tmp_path, passing="")
    smokes, sanitized = _smokes(calls)
    assert smokes == [
        ("barrier", "", ""),
        ("stream", "", ""),
        ("stream", "l2", ""),
        ("stream", "l2", "cta"),
        ("stream-thoughts", "", ""),
    ], calls
    names = [line.split()[1] for line in log.splitlines() if line.startswith("smoke ")]
    assert names == ["barrier", "stream", "stream_l2", "stream_cta", "stream-thoughts"], log
    assert "./smoke_stream_cta.log" in packed, packed
    skip = "cuda-stream,cuda-stream-cta,decode_coconut:cuda-stream"
    assert sanitized == [
        f"compute-sanitizer --tool {tool} --error-exitcode 9 python3 -m benchmarks.cuda_smoke --only barrier "
        f"| input= skip={skip}"
        for tool in ("memcheck", "racecheck")
    ], calls


def test_the_first_passing_fallback_is_how_every_later_stage_runs(tmp_path):
    """The streamed loop failing as built and passing with its input from L2: every later smoke and the
    sanitizer run with LATENTRT_STREAM_INPUT=l2; the tensor-map and mma variants are tried (a failure drops
    that variant's rows alone), and the sanitizer gets every family whose smoke passed."""
    passing = "barrier:: stream:l2: stream-thoughts:l2: stream-tensor:l2:"
    log, calls, _ = _run_script(tmp_path, passing=passing)
    smokes, sanitized = _smokes(calls)
    assert smokes == [
        ("barrier", "", ""),
        ("stream", "", ""),
        ("stream", "l2", ""),
        ("stream-thoughts", "l2", ""),
        ("stream-tensor", "l2", ""),
        ("stream-mma", "l2", ""),
    ], calls
    assert "later stages use LATENTRT_STREAM_INPUT=l2" in log
    only = "barrier,stream,stream-thoughts,stream-tensor"
    assert sanitized == [
        f"compute-sanitizer --tool {tool} --error-exitcode 9 python3 -m benchmarks.cuda_smoke --only {only} "
        "| input=l2 skip=cuda-stream-mma"
        for tool in ("memcheck", "racecheck")
    ], calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the smoke itself (gpu_check.sh)")
def test_the_smoke_says_why_it_cannot_run_without_a_gpu(monkeypatch, capsys):
    """benchmarks/cuda_smoke.py as the stand-in above takes its place: on a machine without CUDA it exits
    non-zero naming why; an unknown family is a usage error."""
    from benchmarks import cuda_smoke

    monkeypatch.setattr("sys.argv", ["cuda_smoke", "--only", "stream"])
    with pytest.raises(SystemExit, match="cuda extension unavailable: "):
        cuda_smoke.main()
    monkeypatch.setattr("sys.argv", ["cuda_smoke", "--only", "stream,warp"])
    with pytest.raises(SystemExit) as exit_:
        cuda_smoke.main()
    assert exit_.value.code == 2 and "unknown kernel family ['warp']" in capsys.readouterr().err


@pytest.mark.parametrize(("budget", "asked", "limit"), [(470, 200, 200), (100, 200, 90), (100, 50, 50), (25, 200, 1)])
def test_the_late_stages_are_limited_by_the_budget_left(budget, asked, limit):
    """gpu_check.sh's ``within S``: a stage's limit is S, or the budget left less 10 s once that is shorter
    (the serve stage's runs end inside the call instead of dying with it), and 1, not 0, once under 20 s are
    left (``timeout 0`` would mean no limit at all)."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    left = re.search(r"^left\(\) \{.*\}$", script, re.M).group(0)  # one line
    within = re.search(r"^within\(\) \{\n.*?\n\}$", script, re.M | re.S).group(0)
    functions = f"{left}\n{within}"
    shell = f"start=$(date +%s)\nGPU_CHECK_BUDGET={budget}\n{functions}\nwithin {asked}\n"
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout.split()
    assert abs(int(out[0]) - limit) <= 1, out


@pytest.mark.parametrize("matches", [True, False])
def test_a_carried_extension_of_this_tree_skips_the_build(tmp_path, matches):
    """GPU_BUILD unset (auto): the build runs only where the extension here does not carry this tree's csrc/
    digest (cuda_ext.built(), stood in); a Triton cache named is relocated first, and the log counts its
    entries carried and added."""
    cache = tmp_path / "triton_cache"
    for key in ("a", "b"):
        (cache / key).mkdir(parents=True)
    log, calls, _ = _run_script(
        tmp_path,
        passing="barrier::",
        GPU_BUILD=None,
        STANDIN_BUILT="1" if matches else "0",
        TRITON_CACHE_DIR=str(cache),
    )
    built = [c for c in calls if "setup.py" in c]
    if matches:
        assert "build skipped: the extension here was built from this tree's csrc/" in log and not built, log
    else:
        assert "carried extension not used: the CUDA extension is stale: stand-in" in log, log
        assert "build the CUDA extension" in log and len(built) == 1, calls
    assert "triton cache: 2 entries carried, 0 added on this machine" in log, log
    assert calls[0] == f"python3 -m tools.compile_check --relocate-cache {cache} | input= attention=", calls
