"""tools/fuzz.py: bad input through the API, the command line, the server and run-batch gets a clear error; the tool
runs each check without a finding on the current code and reports each kind of failure it exists to find."""

from __future__ import annotations

import time

import pytest

import latentrt
from tools import fuzz

pytest.importorskip("fastapi")


@pytest.mark.parametrize("model", ["builtin:recurrent", "builtin:coconut"])
def test_every_check_runs_without_a_finding(model, capsys):
    assert fuzz.main(["--model", model, "--cases", "12", "--seed", "5", "--show-accepted"]) == 0
    out = capsys.readouterr().out
    assert "12 cases in" in out and "(api 3, cli 3, http 3, batch 3): 0 finding(s)" in out, out
    outcomes = out.split("outcomes: ", 1)[1].splitlines()[0]
    for check in ("api ", "cli exit", "http ", "batch exit"):
        assert check in outcomes, outcomes


def test_the_backend_reaches_every_check(monkeypatch, capsys):
    """--backend loads the in-process model on it and passes it to every command (a case may draw its own)."""
    import latentrt.cli

    argvs = []
    monkeypatch.setattr(latentrt.cli, "main", lambda argv: argvs.append(argv) or 0)
    assert fuzz.main(["--cases", "4", "--checks", "cli,batch", "--backend", "torch", "--seed", "2"]) == 0
    assert len(argvs) == 4 and all("--backend" in a for a in argvs)
    assert all(a[a.index("--backend") + 1] == "torch" for a in argvs if a.count("--backend") == 1)
    assert fuzz.Fuzz("builtin:recurrent", ["api"], "torch").model.backend.name == "torch"


def test_the_draws_mix_valid_requests_with_odd_values():
    model = latentrt.load("builtin:recurrent")
    rng = fuzz.random.Random(0)
    names = sorted(latentrt.GenerateOptions.__dataclass_fields__)
    drawn = [fuzz.draw_options(rng, model, names) for _ in range(200)]
    counts = [len(odd) for _, odd in drawn]
    assert set(counts) == {0, 1, 2} and counts.count(1) > counts.count(0)
    for kw, odd in drawn:
        assert all(kw[name] in fuzz.ODD_VALUES or kw[name] != kw[name] for name in odd)  # (NaN is not itself)
    prompts = [fuzz.draw_prompt(rng, model) for _ in range(300)]
    odd = [any(p is b for b in fuzz.BAD_PROMPTS) for p in prompts]
    assert 60 < sum(odd) < 140  # (a third)
    assert any(isinstance(p, list) for p, o in zip(prompts, odd) if not o)  # the soak's ids


def test_an_unexpected_exception_from_the_api_is_a_finding(monkeypatch, capsys):
    def broken(model, prompt, **kw):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(fuzz.latentrt, "generate", broken)
    assert fuzz.main(["--cases", "12", "--checks", "api", "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert "FINDING [api] seed" in out and "IndexError: tuple index out of range" in out, out

    def refuses(model, prompt, **kw):  # an InputError is a clear error: no finding
        raise latentrt.InputError("no")

    monkeypatch.setattr(fuzz.latentrt, "generate", refuses)
    assert fuzz.main(["--cases", "12", "--checks", "api", "--seed", "0"]) == 0


def test_a_command_exiting_1_or_an_error_without_its_prefix_is_a_finding(monkeypatch, capsys):
    import latentrt.cli

    monkeypatch.setattr(latentrt.cli, "main", lambda argv: 1)  # the CLI's "unexpected failure" exit
    assert fuzz.main(["--cases", "2", "--checks", "cli,batch", "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert "FINDING [cli] seed 0: latentrt " in out and "FINDING [batch] seed 1: run-batch of" in out, out
    assert "exit 1" in out

    def bare_error(argv):
        print("Traceback (most recent call last): ...", file=fuzz.sys.stderr)
        return 2

    monkeypatch.setattr(latentrt.cli, "main", bare_error)
    assert fuzz.main(["--cases", "1", "--checks", "cli", "--seed", "0"]) == 1
    assert "exit 2: Traceback" in capsys.readouterr().out


def test_a_server_error_or_a_refusal_without_a_message_is_a_finding(monkeypatch, capsys):
    import latentrt.serve.app as app

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app, "parse_completion", crash)
    assert fuzz.main(["--cases", "8", "--checks", "http", "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert "FINDING [http] seed" in out and "POST /v1/completions" in out and "\n    500: " in out, out

    class Bare:  # a 4xx whose body names no problem
        status_code, text = 400, "{}"

        def json(self):
            return {}

    monkeypatch.undo()
    monkeypatch.setattr(fuzz.Fuzz, "post", lambda self, route, data: Bare())
    assert fuzz.main(["--cases", "1", "--checks", "http", "--seed", "0"]) == 1
    assert "400 without an error message" in capsys.readouterr().out


def test_a_case_running_past_its_limit_is_a_finding_and_the_run_goes_on(monkeypatch, capsys):
    monkeypatch.setattr(fuzz.latentrt, "generate", lambda model, prompt, **kw: time.sleep(5))
    t0 = time.monotonic()
    assert fuzz.main(["--cases", "3", "--checks", "api", "--seed", "1", "--case-seconds", "0.2"]) == 1
    assert time.monotonic() - t0 < 4  # (each case cut at 0.2 s)
    out = capsys.readouterr().out
    assert "still running after 0.2 s" in out and "3 cases in" in out, out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checks", "api,nope"], "--checks takes api,cli,http,batch"),
        (["--cases", "0"], "--cases must be >= 1"),
        (["--case-seconds", "0"], "--case-seconds must be > 0"),
    ],
)
def test_bad_flags_are_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        fuzz.main(flags)
    assert message in capsys.readouterr().err
