"""The CPU decode benchmark times decoded tokens only (the prefill and the first token left out), both KV modes
at each context (checks that it runs and what it times, not the numbers)."""

from __future__ import annotations

import types

import pytest

from benchmarks import decode_cpu


def test_ms_per_token_is_the_median_gap_after_the_first_token(monkeypatch):
    clock = [0.0]
    calls = []

    def generate(model, ids, **kw):  # a stream whose first token comes after a long prefill
        calls.append((ids.shape, kw))
        for gap in (0.5, 0.2, 0.01, 0.02):
            clock[0] += gap
            yield gap

    monkeypatch.setattr(decode_cpu.latentrt, "generate", generate)
    monkeypatch.setattr(decode_cpu, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    # after the first token's 500 ms, gaps of 200, 10 and 20 ms: their median
    assert decode_cpu.ms_per_token("model", 12, 3, num_steps=3) == pytest.approx(20.0)
    ((shape, kw),) = calls
    assert tuple(shape) == (1, 12) and kw == dict(max_new_tokens=3, stream=True, init_scale=0.0, num_steps=3)


def test_both_kv_modes_at_each_context(monkeypatch, capsys):
    calls, real = [], decode_cpu.ms_per_token

    def ms_per_token(model, context, new_tokens, **kw):
        calls.append((model.config.block_size, context, new_tokens, kw))
        return real(model, context, new_tokens, **kw)

    monkeypatch.setattr(decode_cpu, "ms_per_token", ms_per_token)
    monkeypatch.setattr("sys.argv", ["decode_cpu", "--contexts", "4", "12", "--tokens", "3", "--steps", "2"])
    decode_cpu.main()
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(int(c), kv.strip()) for c, kv, _ in rows] == [(4, "full"), (12, "full"), (4, "shared"), (12, "shared")]
    assert all(float(ms) > 0 for _, _, ms in rows)
    # one model, its context the longest prompt and its new tokens
    assert calls == [(16, c, 3, dict(num_steps=2, kv_sharing=kv)) for kv in ("full", "shared") for c in (4, 12)]
