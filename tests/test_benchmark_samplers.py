"""The samplers benchmark runs and reports what it promises (checks that it runs, not the numbers)."""

from __future__ import annotations

import json

import pytest

from benchmarks.samplers import main, wilson


def test_wilson_interval():
    lo, hi = wilson(66, 100)
    assert lo == pytest.approx(0.563, abs=1e-3) and hi == pytest.approx(0.745, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_accuracy_and_speed_table(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["--quick", "--problems", "3", "--prosqa", "0", "--out", str(out)]) == 0
    runs = {r["sampler"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"sequential", "speculative", "wavefront"}
    assert runs["sequential"]["tokens_per_pass"] == 1.0 and runs["sequential"]["vs_sequential"] == 1.0
    assert runs["sequential"]["decode_vs_sequential"] == 1.0
    assert all(0 < r["prefill_share"] < 1 for r in runs.values())
    for r in runs.values():
        assert r["n"] == 3 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["tokens"] > 0
    assert "| wavefront |" in capsys.readouterr().out


def test_pass_cost_table(tmp_path):
    out = tmp_path / "p.json"
    assert main(["--pass-cost", "--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["pass_cost"]
    assert [r["W"] for r in rows] == [1, 2, 4, 8] and rows[0]["vs_W1"] == 1.0 and all(r["ms"] > 0 for r in rows)
