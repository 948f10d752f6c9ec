"""The byte counts behind the floors reproduce the reference points measured on an H200 (issue #3)."""

from benchmarks.floors import coconut_step_bytes, gpt2_params, recurrent_step_bytes, recurrent_step_flops
from benchmarks.suites import GPT2_124M, HUGINN_0125
from latentrt.families import parse_config

HUGINN = HUGINN_0125
COPY_BW = 4.27e12  # bytes/s, the H200 copy bandwidth of the reference table


def test_huginn_floors_match_reference_table():
    cfg = parse_config(HUGINN)
    r32 = recurrent_step_bytes(cfg, batch=1, context=70, steps=32)["total"] / COPY_BW * 1e3
    r4 = recurrent_step_bytes(cfg, batch=1, context=70, steps=4)["total"] / COPY_BW * 1e3
    # the reference table's 25.5 / 4.0 ms read the whole adapter every iteration; its input half W[:, d:] is
    # read once per token now (31 x d^2 x 2 bytes fewer at r = 32)
    assert abs(r32 - 25.1) / 25.1 < 0.01, r32
    assert abs(r4 - 3.94) / 3.94 < 0.01, r4


def test_gpt2_124m_floor():
    cfg = parse_config(dict(model_type="gpt2", n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257))
    assert abs(gpt2_params(cfg) - 124_439_808) < 1e3  # GPT-2 small's published parameter count
    ms = coconut_step_bytes(cfg, batch=1, context=70, with_head=True)["total"] / COPY_BW * 1e3
    assert abs(ms - 0.059) / 0.059 < 0.05, ms  # an answer token reads the head
    thought = coconut_step_bytes(cfg, batch=1, context=70)["total"] / COPY_BW * 1e3
    assert abs(thought - 0.0405) / 0.0405 < 0.02, thought  # a thought does not


def _meta_model(raw: dict):
    import torch

    from latentrt.families import family_of

    cfg = parse_config(raw)
    with torch.device("meta"):
        return cfg, family_of(cfg.model_type).model(cfg)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_recurrent_weight_bytes_are_the_parameters_a_token_touches():
    """Pinned against the model's own parameters at Huginn-0125's shape: per token the prelude, coda,
    final norm, head and the adapter's input half W[:, d:]; per iteration the core layers and the adapter's
    state half W[:, :d]."""
    cfg, model = _meta_model(HUGINN)
    t = model.transformer
    half = t.adapter.weight.numel() // 2
    per_token = _numel(t.prelude) + _numel(t.coda) + _numel(t.ln_f) + model.lm_head.weight.numel() + half
    per_iteration = _numel(t.core_block) + half
    for steps in (1, 4, 32):
        b = recurrent_step_bytes(cfg, batch=1, context=70, steps=steps)
        assert b["weights"] == 2 * (per_token + steps * per_iteration), steps


def test_recurrent_flops_are_two_per_weight_touched_plus_attention():
    """Pinned against the model's parameters at Huginn-0125's shape: 2 FLOPs per weight touched per sequence
    (the final norm's d aside), 4 d (context + 1) per attention call per sequence; decode is far below an
    H200's ~200 FLOP/byte at batch 1-32, so the bytes (the floor) bound it."""
    cfg, model = _meta_model(HUGINN)
    t, d = model.transformer, cfg.n_embd
    half = t.adapter.weight.numel() // 2
    per_token = _numel(t.prelude) + _numel(t.coda) + model.lm_head.weight.numel() + half
    per_iteration = _numel(t.core_block) + half
    for batch, steps in ((1, 1), (1, 32), (8, 4), (32, 32)):
        calls = cfg.n_layers_in_prelude + cfg.n_layers_in_coda + steps * cfg.n_layers_in_recurrent_block
        want = 2 * batch * (per_token + steps * per_iteration) + 4 * batch * calls * 71 * d
        assert recurrent_step_flops(cfg, batch=batch, context=70, steps=steps) == want, (batch, steps)
        intensity = want / recurrent_step_bytes(cfg, batch=batch, context=70, steps=steps)["total"]
        assert intensity < 40, (batch, steps, intensity)


def test_coconut_thought_bytes_read_no_head():
    cfg, model = _meta_model(
        dict(model_type="gpt2", n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257)
    )
    layers = _numel(model.transformer.h) + _numel(model.transformer.ln_f)
    head = model.transformer.wte.weight.numel()
    assert coconut_step_bytes(cfg, batch=1, context=70)["weights"] == 2 * layers
    assert coconut_step_bytes(cfg, batch=1, context=70, with_head=True)["weights"] == 2 * (layers + head)


def test_kv_and_activation_bytes_per_token():
    """The K/V part: every attention call of the token (prelude, coda, each iteration's core layers) reads the
    cached positions and writes its new entry, K and V of the KV heads only (GQA: 5 of 55 here); the
    activations: the state read and written per iteration, 4 rows of d around it, the fp32 logits. A
    continuous thought: its 12 layers' K/V and 4 rows of d."""
    cfg = parse_config(dict(HUGINN, num_key_value_heads=5))
    d, entry = cfg.n_embd, 2 * 5 * cfg.head_dim * 2  # K and V, bf16
    for batch, steps, context in ((1, 32, 512), (8, 4, 70), (32, 1, 0)):
        b = recurrent_step_bytes(cfg, batch=batch, context=context, steps=steps)
        calls = 2 + 2 + 4 * steps  # prelude, coda, core layers x iterations
        assert b["kv"] == batch * calls * (context + 1) * entry, (batch, steps)
        assert b["activations"] == batch * (2 * steps + 4) * d * 2 + batch * cfg.padded_vocab_size * 4
        assert b["total"] == b["weights"] + b["kv"] + b["activations"]
    gpt2 = parse_config(GPT2_124M)
    for batch, context in ((1, 70), (4, 511)):
        c = coconut_step_bytes(gpt2, batch=batch, context=context)
        assert c["kv"] == batch * 12 * (context + 1) * 2 * 768 * 2
        assert c["activations"] == batch * 4 * 768 * 2 and c["total"] == c["weights"] + c["kv"] + c["activations"]
