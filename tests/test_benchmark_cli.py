"""The benchmark commands refuse bad flags with ``PROG: error: ...`` (exit 2) before measuring anything."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from benchmarks import cli, decode_cpu, eager_ops, run, sampler_replay, samplers, serve


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--requests", "0"], "argument --requests: must be an integer >= 1, got 0"),
        (["--rate", "0"], "argument --rate: must be a number > 0"),
        (["--rate", "nan"], "argument --rate: must be a number > 0"),
        (["--max-batch", "0"], "argument --max-batch: must be an integer >= 1"),
        (["--num-steps", "0"], "argument --num-steps: must be an integer >= 1"),  # it said kv_slots
        (["--threshold", "-1"], "argument --threshold: must be a finite number >= 0"),
        (["--criterion", "bogus"], "argument --criterion: invalid choice: 'bogus'"),
        (["--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
        (["--device", "tpu"], "argument --device: device 'tpu' is not a device torch knows"),
        (["--out", "/nonexistent-folder/records.json"], "argument --out: the folder of"),
        (["--model", "/nonexistent-model"], "checkpoint folder '/nonexistent-model' does not exist"),
    ],
)
def test_serve_benchmark_refuses_bad_flags(argv, message, capsys):
    assert f"python -m benchmarks.serve: error: {message}" in refused(serve.main, ["--quick", *argv], capsys)


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (samplers.main, ["--problems", "0"], "argument --problems: must be an integer >= 1"),
        (samplers.main, ["--prosqa", "-1"], "argument --prosqa: must be an integer >= 0"),  # it sliced [:-1]
        (samplers.main, ["--model", "/nonexistent-model"], "checkpoint folder '/nonexistent-model' does not exist"),
        (sampler_replay.main, ["--problems", "0"], "argument --problems: must be an integer >= 1"),
        (sampler_replay.main, ["--model", "/nonexistent-model"], "checkpoint folder '/nonexistent-model'"),
        (run.main, ["--device", "cuda:99"], "argument --device: device 'cuda:99'"),
        (run.main, ["--out", __file__, "--only", "ceilings"], "exists and is not a folder"),
    ],
)
def test_other_benchmarks_refuse_bad_flags(main, argv, message, capsys):
    assert message in refused(main, ["--quick", *argv], capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--requests", "0"], "argument --requests: must be an integer >= 1, got 0"),  # it printed an empty table
        (["--max-batch", "0"], "argument --max-batch: must be an integer >= 1, got 0"),  # a traceback, as below
        (["--num-steps", "0"], "argument --num-steps: must be an integer >= 1, got 0"),
        (["--group-capture-at", "0"], "argument --group-capture-at: must be an integer >= 1, got 0"),
        (["--exit-threshold", "nan"], "argument --exit-threshold: must be a finite number >= 0"),
        (["--exit-criterion", "bogus"], "argument --exit-criterion: invalid choice: 'bogus'"),
        (["--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
        (["--schedulers", "token,fifo"], "unknown schedulers ['fifo']; choose from ['depth', 'token', 'static']"),
        (["--model", "/nonexistent-model"], "checkpoint folder '/nonexistent-model' does not exist"),
    ],
)
def test_eager_ops_refuses_bad_flags(argv, message, capsys):
    assert f"python -m benchmarks.eager_ops: error: {message}" in refused(eager_ops.main, argv, capsys)


def test_decode_cpu_refuses_a_zero_context(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["decode_cpu", "--contexts", "0"])
    assert "argument --contexts: must be an integer >= 1, got 0" in refused(lambda _: decode_cpu.main(), [], capsys)


def test_flag_types(tmp_path):
    assert cli.at_least(1)("3") == 3
    assert cli.rate("inf") == math.inf and cli.rate("2.5") == 2.5
    assert cli.non_negative("0") == 0.0
    assert cli.output_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")  # made later
    assert cli.output_file(str(tmp_path / "records.json")) == str(tmp_path / "records.json")
    (tmp_path / "plain").write_text("")
    for parse, text in [
        (cli.at_least(1), "1.5"),
        (cli.rate, "-inf"),
        (cli.non_negative, "inf"),
        (cli.output_file, str(tmp_path)),  # a folder
        (cli.output_folder, str(tmp_path / "plain" / "below")),  # under a file
        (cli.device, "cuda:99"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_output_flags_refuse_what_cannot_be_written(tmp_path, monkeypatch):
    """A read-only output file or folder (tests run as root here, which may write anywhere: os.access stands
    in for the permissions) is refused naming the permissions, before anything is measured."""
    (tmp_path / "kept.json").write_text("")
    (tmp_path / "ro").mkdir()
    read_only = {tmp_path / "kept.json", tmp_path / "ro"}
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) not in read_only)
    assert cli.output_file(str(tmp_path / "new.json")) == str(tmp_path / "new.json")
    for parse, text in [
        (cli.output_file, str(tmp_path / "kept.json")),  # the file itself is read-only
        (cli.output_file, str(tmp_path / "ro" / "new.json")),
        (cli.output_folder, str(tmp_path / "ro" / "new" / "deeper")),  # its nearest existing folder is
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match="cannot be written here"):
            parse(text)


def test_the_harness_runs_the_suites_asked_for_with_the_ceilings_floor_and_keeps_going(tmp_path, monkeypatch, capsys):
    """benchmarks.run with stand-in suites: the ceilings run first whatever --only says (their copy bandwidth
    reaches every other suite's floors, host_syncs takes none), the suites asked for run in their order, a
    suite that raises is an error record and the run goes on (exit 1 under --strict only), every record lands
    in results.jsonl as it comes and in results.json with its ratios, the bandwidth is printed beside the
    table; an unknown suite is refused; a failing ceilings suite ends the run (no floor without it)."""
    seen = []

    def ceilings(plan):
        yield {"suite": "ceilings", "name": "copy_bandwidth", "value": 2e12, "unit": "B/s"}
        yield {"suite": "ceilings", "name": "copy_bandwidth_256MiB", "value": 3e12, "unit": "B/s"}

    def decode(plan, copy_bw):
        seen.append(("decode_recurrent", copy_bw))
        cfg = dict(batch=1, r=32, kv="shared", context=64)
        for name, ms in (("torch-compile+cudagraph", 8.0), ("generate", 4.0)):
            yield {"suite": "decode_recurrent", "name": name, "backend": "torch", "config": cfg, "median_ms": ms}

    def syncs(plan):
        seen.append(("host_syncs", None))
        yield {"suite": "host_syncs", "name": "per_token", "value": 1, "unit": "syncs"}

    def broken(plan, copy_bw):
        seen.append(("micro", copy_bw))
        raise RuntimeError("boom")
        yield

    suites = {"ceilings": ceilings, "micro": broken, "decode_recurrent": decode, "host_syncs": syncs}
    monkeypatch.setattr(run, "SUITES", suites)
    argv = ["--only", "host_syncs,micro,decode_recurrent", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert run.main(argv) == 0
    assert seen == [("host_syncs", None), ("micro", 2e12), ("decode_recurrent", 2e12)]
    records = json.loads((tmp_path / "o" / "results.json").read_text())
    streamed = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    names = [(r["suite"], r["name"]) for r in records]
    assert (
        names
        == [(r["suite"], r["name"]) for r in streamed]
        == [
            ("ceilings", "copy_bandwidth"),
            ("ceilings", "copy_bandwidth_256MiB"),
            ("host_syncs", "per_token"),
            ("micro", "suite"),
            ("decode_recurrent", "torch-compile+cudagraph"),
            ("decode_recurrent", "generate"),
        ]
    )
    assert records[3]["error"] == "RuntimeError: boom" and records[-1]["vs_compiled"] == 2.0
    out = capsys.readouterr().out
    assert "# CPU run: tiny shapes" in out and "2.00x compiled" in out
    assert "# floors use copy bandwidth 2.000 TB/s (best of repeats); 256 MiB buffer: 3.00 TB/s" in out
    assert run.main([*argv, "--strict"]) == 1 and "micro/suite/: RuntimeError: boom" in capsys.readouterr().err
    assert run.main([*argv[2:], "--only", "decode_recurrent", "--strict"]) == 0  # nothing failed
    with pytest.raises(SystemExit) as exit_:
        run.main(["--only", "decode,micro", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "unknown suite(s) ['decode']" in capsys.readouterr().err

    def no_ceiling(plan):
        raise RuntimeError("no copy bandwidth")
        yield

    monkeypatch.setitem(suites, "ceilings", no_ceiling)
    with pytest.raises(RuntimeError, match="no copy bandwidth"):
        run.main(argv)
