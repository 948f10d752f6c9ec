"""The benchmark commands refuse bad flags with ``PROG: error: ...`` (exit 2) before measuring anything."""

from __future__ import annotations

import argparse
import math

import pytest

from benchmarks import cli, decode_cpu, run, sampler_replay, samplers, serve


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
