"""The byte counts behind the floors reproduce the reference points measured on an H200 (issue #3)."""

from benchmarks.floors import coconut_step_bytes, gpt2_params, recurrent_step_bytes
from benchmarks.suites import HUGINN_0125
from latentrt.families import parse_config

HUGINN = HUGINN_0125
COPY_BW = 4.27e12  # bytes/s, the H200 copy bandwidth of the reference table


def test_huginn_floors_match_reference_table():
    cfg = parse_config(HUGINN)
    r32 = recurrent_step_bytes(cfg, batch=1, context=70, steps=32)["total"] / COPY_BW * 1e3
    r4 = recurrent_step_bytes(cfg, batch=1, context=70, steps=4)["total"] / COPY_BW * 1e3
    assert abs(r32 - 25.5) / 25.5 < 0.03, r32
    assert abs(r4 - 4.0) / 4.0 < 0.05, r4


def test_gpt2_124m_floor():
    cfg = parse_config(dict(model_type="gpt2", n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257))
    assert abs(gpt2_params(cfg) - 124_439_808) < 1e3  # GPT-2 small's published parameter count
    ms = coconut_step_bytes(cfg, batch=1, context=70)["total"] / COPY_BW * 1e3
    assert abs(ms - 0.059) / 0.059 < 0.05, ms
