"""One command for every measurement: ceilings, kernel microbenchmarks, decode paths, host syncs.

    python -m benchmarks.run [--quick] [--only NAME[,NAME]] [--out DIR] [--device cuda]

Writes one JSON record per measurement (name, config, backend, device, torch version, commit, median and
spread, floor, fraction of floor) to DIR/results.json and prints markdown tables, the summary last.
On a CPU only tiny shapes run, in well under a minute: a smoke test of the harness, not numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from latentrt.loader import parse_device

from . import cli
from .suites import SUITES, Plan, error_record


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def table(records: list[dict]) -> str:
    rows = [
        "| suite | name | backend | config | median ms | floor ms | of floor | other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cfg = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("config", {}).items())
        other = r.get("error") or (f"{r['value']:.3g} {r['unit']}" if "value" in r else "")
        if "tokens_per_s" in r:
            other = f"{r['tokens_per_s']:.1f} tok/s"
        if "gb_per_s" in r:
            other = f"{r['gb_per_s']:.1f} GB/s"
        ratios = [f"{r[k]:.2f}x {k[3:]}" for k in (*YARDSTICKS, "vs_ideal") if k in r]
        other = "; ".join(x for x in (other, *ratios) if x)
        med = f"{r['median_ms']:.3f}" if "median_ms" in r else ""
        fl = f"{r['floor_ms']:.3f}" if "floor_ms" in r else ""
        frac = f"{100 * r['fraction_of_floor']:.1f}%" if "fraction_of_floor" in r else ""
        rows.append(
            f"| {r['suite']} | {r['name']} | {r.get('backend', '')} | {cfg} | {med} | {fl} | {frac} | {other} |"
        )
    return "\n".join(rows)


YARDSTICKS = {"vs_compiled": "torch-compile+cudagraph", "vs_published": "published-pattern"}


def add_ratios(records: list[dict]) -> None:
    """Each decode_recurrent row's tokens/s relative to the same run's yardsticks (issue #11):
    ``vs_compiled``, the torch.compile + CUDA graph baseline at the same batch, depth, KV mode and context;
    ``vs_published``, the published implementation's pattern at the same depth and context (batch 1: its
    per-token time, so at batch B the ratio counts B tokens per step). Above 1: faster than the yardstick."""
    rows = [r for r in records if r.get("suite") == "decode_recurrent" and "median_ms" in r]

    def key(r: dict, *fields: str) -> tuple:
        return tuple(r["config"].get(f) for f in fields)

    compiled = {key(r, "batch", "r", "kv", "context"): r for r in rows if r["name"] == YARDSTICKS["vs_compiled"]}
    published = {key(r, "r", "context"): r for r in rows if r["name"] == YARDSTICKS["vs_published"]}
    for r in rows:
        if r["name"] in YARDSTICKS.values():
            continue
        batch = r["config"].get("batch", 1)
        base = compiled.get(key(r, "batch", "r", "kv", "context"))
        if base is not None:
            r["vs_compiled"] = base["median_ms"] / r["median_ms"]
        base = published.get(key(r, "r", "context"))
        if base is not None:
            r["vs_published"] = batch * base["median_ms"] / r["median_ms"]
    add_ideal(rows)


def add_ideal(rows: list[dict]) -> None:
    """Each adaptive decode row's time against the ideal set by the iterations it ran (issue #11: within 10%
    at batch 1; at batch 8 / 32, each row exiting on its own, at least 90%): ``ideal_ms`` = the per-token
    passes + ``launch_steps`` (per token, its slowest sequence's iterations) x the per-iteration time, both
    from the same backend's fixed-depth rows at the same batch, KV mode and context (r and 4:
    per-iteration = the difference / (r - 4)). Without an r=4 row the per-token passes count as iterations
    (time at r / r): an ideal that is too low, so the ratio errs against the row. ``vs_ideal`` = ideal /
    measured (1.0: no time lost to the exit test or to rows that exited)."""

    def key(r: dict, depth: int) -> tuple:
        c = r["config"]
        return r.get("backend"), c.get("batch", 1), depth, c.get("kv"), c.get("context")

    fixed = {
        key(r, r["config"].get("r")): r for r in rows if r["name"] == "generate" and not r["config"].get("adaptive")
    }
    for r in rows:
        c = r["config"]
        if r["name"] != "generate" or not c.get("adaptive") or "launch_steps" not in c:
            continue
        deep, shallow = fixed.get(key(r, c["r"])), fixed.get(key(r, 4))
        if deep is None:
            continue
        if shallow is not None and c["r"] > 4:
            per_iteration = (deep["median_ms"] - shallow["median_ms"]) / (c["r"] - 4)
            per_token = deep["median_ms"] - c["r"] * per_iteration
        else:
            per_iteration, per_token = deep["median_ms"] / c["r"], 0.0
        r["ideal_ms"] = per_token + c["launch_steps"] * per_iteration
        r["vs_ideal"] = r["ideal_ms"] / r["median_ms"]


def _keep(records: list[dict], partial, rec: dict) -> None:
    records.append(rec)
    partial.write(json.dumps(rec, default=str) + "\n")
    partial.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    ap.add_argument("--only", default=None, help=f"comma list of suites: {','.join(SUITES)}")
    ap.add_argument("--out", type=cli.output_folder, default="bench_out", help="folder for results.json")
    ap.add_argument("--device", type=cli.device, default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any measurement failed (the CI smoke test)")
    args = ap.parse_args(argv)
    with cli.reported(ap):
        return run_flags(args, ap)


def run_flags(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """Run the suites and write the records (after the flags are parsed)."""
    device = parse_device(args.device)  # (checked by the flag's type; default: CUDA when available)
    only = args.only.split(",") if args.only else list(SUITES)
    unknown = [s for s in only if s not in SUITES]
    if unknown:
        ap.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    plan = Plan(device, args.quick)
    env = environment(device)
    if device.type != "cuda":
        print("# CPU run: tiny shapes; the numbers check the harness, they are not measurements", flush=True)
    print(
        f"# latentrt benchmarks on {env['card']} (torch {env['torch']}, commit {env['commit']}, {env['date']})",
        flush=True,
    )
    records: list[dict] = []
    copy_bw = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = (out / "results.jsonl").open("w")  # one line per record as it comes: a timed-out run keeps its data
    with torch.no_grad():
        for name in ["ceilings"] + [s for s in only if s != "ceilings"]:  # the ceilings give every floor
            t0 = time.perf_counter()
            fn = SUITES[name]
            kwargs = {} if name in ("ceilings", "host_syncs") else {"copy_bw": copy_bw}
            try:
                for rec in fn(plan, **kwargs):
                    if rec["suite"] == "ceilings" and rec["name"] == "copy_bandwidth":
                        copy_bw = rec["value"]
                    _keep(records, partial, {**rec, **env})
            except Exception as exc:  # one suite's failure is reported; the others still run
                if name == "ceilings":
                    raise
                print(f"{name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                _keep(records, partial, {**error_record(name, "suite", "", {}, exc), **env})
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    partial.close()
    add_ratios(records)
    (out / "results.json").write_text(json.dumps(records, indent=1, default=str))
    bw = {r["name"]: r["value"] for r in records if r["suite"] == "ceilings" and "value" in r}
    if "copy_bandwidth" in bw:  # the bandwidth under every floor, beside the table
        second = (
            f"; 256 MiB buffer: {bw['copy_bandwidth_256MiB'] / 1e12:.2f} TB/s" if "copy_bandwidth_256MiB" in bw else ""
        )
        print(f"# floors use copy bandwidth {bw['copy_bandwidth'] / 1e12:.3f} TB/s (best of repeats){second}")
    print(table(records))
    failed = [f"{r['suite']}/{r['name']}/{r.get('backend', '')}: {r['error']}" for r in records if "error" in r]
    if failed and args.strict:
        print("failed measurements:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
