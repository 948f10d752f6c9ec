"""Model math against independent oracles: HF transformers' GPT-2, Coconut's multi-pass forward run on
HF GPT-2, and a functional Huginn forward written from the published description."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, tiny_coconut, tiny_recurrent, transformers_with_torch

import latentrt
from latentrt.checkpoint import save_checkpoint

transformers = transformers_with_torch()


def _hf_gpt2(tmp_path, seed=0, **cfg):
    config = transformers.GPT2Config(n_embd=48, n_head=3, n_layer=2, n_positions=64, vocab_size=70, **cfg)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-inits some biases; randomise everything so every term is checked
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("cfg", [{}, {"activation_function": "gelu", "scale_attn_by_inverse_layer_idx": True}])
def test_gpt2_logits_match_transformers(tmp_path, cfg):
    hf = _hf_gpt2(tmp_path, **cfg)
    ours = latentrt.load(tmp_path, device="cpu")
    ids = torch.randint(0, 70, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(ours.logits(ids), want) < 1e-5


def test_coconut_matches_published_multipass_on_hf(tmp_path):
    """Coconut's published forward: pass over the prefix, then one pass per latent whose input embedding
    is hidden_states[-1] (after ln_f) of the previous position; here without any cache (full recompute)."""
    hf = _hf_gpt2(tmp_path, seed=2)
    latent, start, end = 67, 65, 66
    ours = latentrt.load(tmp_path, device="cpu", latent_id=latent, start_latent_id=start, end_latent_id=end)
    ids = torch.tensor([[5, 9, 11, 3, start, latent, latent, latent, end, 20, 21]])
    embeds = hf.transformer.wte(ids).detach().clone()
    with torch.no_grad():
        for pos in (ids[0] == latent).nonzero()[:, 0].tolist():
            h = hf(inputs_embeds=embeds[:, :pos], output_hidden_states=True).hidden_states[-1]
            embeds[:, pos] = h[:, -1]
        want = hf(inputs_embeds=embeds).logits
    assert rel_err(ours.logits(ids), want) < 1e-5


def test_a_pause_trained_model_runs_its_latent_tokens_as_gpt2_runs_them(tmp_path):
    """A model trained as the pause-as-thought baseline (training.json's mode "pause") was trained with its
    ``<|latent|>`` tokens as ordinary tokens, and the published evaluation generates with the plain GPT-2: its
    logits, generate() and the serving engine equal transformers' GPT-2 on the same ids (they ran the tokens as
    continuous thoughts). A Coconut-trained model's stay thoughts."""
    import json

    from latentrt.serve.engine import Engine

    hf = _hf_gpt2(tmp_path, seed=4)
    latent, start, end = 67, 65, 66
    ids = [5, 9, 11, 3, start, latent, latent, end]
    for mode in ("pause", "coconut"):
        (tmp_path / "training.json").write_text(
            json.dumps({"trainer": "coconut", "mode": mode, "max_stage": 1, "thoughts_per_step": 2})
        )
        ours = latentrt.load(tmp_path, device="cpu", latent_id=latent, start_latent_id=start, end_latent_id=end)
        assert ours.continuous_thoughts == (mode == "coconut")
        with torch.no_grad():
            plain = hf(torch.tensor([ids])).logits
        assert (rel_err(ours.logits(torch.tensor([ids])), plain) < 1e-5) == (mode == "pause")
        out = latentrt.generate(ours, ids, max_new_tokens=5, default_stops=False)
        assert out.num_thoughts == (0 if mode == "pause" else 2)
        if mode == "pause":  # greedy with a full recompute per token, on transformers' GPT-2
            seq = list(ids)
            with torch.no_grad():
                for _ in range(5):
                    seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
            assert out.tokens == seq[len(ids) :]
        engine = Engine(ours, max_batch=2)
        served = engine.submit(ids, max_new_tokens=5, default_stops=False)
        engine.run_until_idle()
        assert served.error is None and served.tokens == out.tokens


def _functional_huginn(model, ids, r, s0):
    """Huginn's forward written directly from the state dict, without the package's modules."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    d, H = cfg.n_embd, cfg.num_attention_heads
    hd = d // H
    S = ids.shape[1]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]

    def rope(x):  # x [B,S,H,hd], rotate (x[2i], x[2i+1])
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
        return out

    def layer(x, p):
        h = rms(x, sd[p + "norm_1.weight"])
        q, k, v = (h @ sd[p + "attn.Wqkv.weight"].T).split(d, -1)
        q, k, v = (t.view(1, S, H, hd) for t in (q, k, v))
        q, k = q + sd[p + "attn.qk_bias"][0], k + sd[p + "attn.qk_bias"][1]
        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(1, S, d) @ sd[p + "attn.proj.weight"].T
        x = rms(x + y, sd[p + "norm_2.weight"])
        g, u = (rms(x, sd[p + "norm_3.weight"]) @ sd[p + "mlp.fc.weight"].T).chunk(2, -1)
        return rms(x + (F.silu(g) * u) @ sd[p + "mlp.proj.weight"].T, sd[p + "norm_4.weight"])

    x = sd["transformer.wte.weight"][ids] * math.sqrt(d)
    for i in range(cfg.n_layers_in_prelude):
        x = layer(x, f"transformer.prelude.{i}.")
    s = s0.double()
    for _ in range(r):
        s = torch.cat([s, x], -1) @ sd["transformer.adapter.weight"].T
        for j in range(cfg.n_layers_in_recurrent_block):
            s = layer(s, f"transformer.core_block.{j}.")
    s = rms(s, sd["transformer.ln_f.weight"])
    for i in range(cfg.n_layers_in_coda):
        s = layer(s, f"transformer.coda.{i}.")
    return rms(s, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("r", [1, 3, 5])
def test_recurrent_logits_match_functional_reference(r):
    model = tiny_recurrent(seed=4)
    with torch.no_grad():
        for blk in model.transformer.prelude:
            blk.attn.qk_bias.normal_(0, 0.3)
    ids = torch.tensor([[3, 9, 12, 7, 20, 5, 6]])
    s0 = torch.randn(1, 7, 32)
    want = _functional_huginn(model, ids, r, s0)
    assert rel_err(model.logits(ids, num_steps=r, init_state=s0), want) < 1e-5


def test_init_state_takes_the_forms_a_user_has_and_names_a_wrong_one():
    """model.logits(init_state=...): a tensor [B, S, d], a nested list of it, [S, d] for one prompt, or
    [B, 1, d] for every position; another shape is named; a state that the weights make non-finite names
    its sequence."""
    from latentrt.errors import InputError, NonFiniteStateError

    model = tiny_recurrent(seed=4)
    ids = torch.tensor([[3, 9, 12, 7]])
    s0 = torch.randn(1, 4, 32)
    want = model.logits(ids, num_steps=2, init_state=s0)
    assert torch.equal(model.logits(ids, num_steps=2, init_state=s0.tolist()), want)
    assert torch.equal(model.logits(ids, num_steps=2, init_state=s0[0]), want)
    one = s0[:, :1]
    assert torch.equal(
        model.logits(ids, num_steps=2, init_state=one), model.logits(ids, num_steps=2, init_state=one.expand(1, 4, 32))
    )
    for bad in (torch.randn(1, 3, 32), torch.randn(2, 4, 32), torch.randn(1, 4, 16), torch.randn(4, 32, 1, 1)):
        message = f"init_state must have shape (1, 4, 32) (or [B, 1, d]), got {tuple(bad.shape)}"
        with pytest.raises(InputError, match=re.escape(message)):
            model.logits(ids, num_steps=2, init_state=bad)
    # what is no tensor of numbers is named (an IndexError or torch's "Could not infer dtype" before: tools.fuzz)
    for bad, got in ((1.5, "()"), (torch.tensor(2.0), "()"), (torch.zeros(32), "(32,)")):
        with pytest.raises(
            InputError, match=re.escape(f"init_state must have shape (1, 4, 32) (or [B, 1, d]), got {got}")
        ):
            model.logits(ids, num_steps=2, init_state=bad)
    for bad, got in (("abc", "str"), ({"a": 1}, "dict"), ([None], "list"), (2**63, "int")):
        with pytest.raises(
            InputError, match=re.escape(f"init_state must be a tensor of shape (1, 4, 32) (or [B, 1, d]), got {got}")
        ):
            model.logits(ids, num_steps=2, init_state=bad)
    with torch.no_grad():
        model.transformer.core_block[0].mlp.proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"non-finite latent state in sequence\(s\) \[0\]"):
        model.logits(ids, num_steps=2, init_state=s0)


def test_init_state_distribution():
    model = tiny_recurrent()
    e = torch.zeros(4, 64, 32)
    s = model.initial_state(e, 1.0, torch.Generator().manual_seed(0))
    std = model.config.init_std * math.sqrt(32)
    assert abs(s.std().item() / std - 0.9866) < 0.02  # a normal cut at +-3 std has std 0.9866 std
    assert s.abs().max().item() <= 3 * std + 1e-6
    assert model.initial_state(e, 0.0).abs().max() == 0


def test_tied_save_has_no_head_key(tmp_path):
    save_checkpoint(tiny_coconut(), tmp_path, tie_key="lm_head.weight")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize(
    "drop",
    [
        dict(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1),  # HF's defaults: the masks drawn alike
        dict(embd_pdrop=1.0, attn_pdrop=0.0, resid_pdrop=0.0),  # each site alone, all dropped: where it acts
        dict(embd_pdrop=0.0, attn_pdrop=1.0, resid_pdrop=0.0),
        dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=1.0),
    ],
)
def test_gpt2_training_dropout_matches_transformers(tmp_path, drop):
    """In train mode with gradients (the Coconut trainer's forward) GPT-2 drops embeddings plus positions, the
    attention probabilities and both residual branches as HF does, drawing torch's generator in HF's order: the
    same loss from the same seed."""
    from latentrt.train.coconut import CoconutLoss

    hf = _hf_gpt2(tmp_path, **drop).train()
    ours = latentrt.load(tmp_path, device="cpu").train()
    ids = torch.randint(0, 70, (3, 17), generator=torch.Generator().manual_seed(1))
    everything = torch.ones_like(ids, dtype=torch.bool)
    torch.manual_seed(5)
    want = hf(ids, labels=ids).loss.item()
    torch.manual_seed(5)
    got = CoconutLoss(ours, None, True)(ids, everything, ids).item()
    assert abs(got - want) <= 1e-6 * want
    if max(drop.values()) < 1:  # masks drawn: another seed, another loss
        torch.manual_seed(6)
        assert CoconutLoss(ours, None, True)(ids, everything, ids).item() != got


def test_gpt2_dropout_never_acts_at_inference(tmp_path):
    """A model left in train mode generates, scores and serves as in eval mode (no gradients: no dropout), so
    every backend agrees; the dropout fields are checked probabilities."""
    from latentrt.errors import ConfigError
    from latentrt.families import parse_config
    from latentrt.serve import Engine

    _hf_gpt2(tmp_path, embd_pdrop=0.5, attn_pdrop=0.5, resid_pdrop=0.5)
    model = latentrt.load(tmp_path, device="cpu")
    ids = [[5, 9, 11, 3, 20]]
    expected = latentrt.generate(model, ids, max_new_tokens=5, return_logits=True), model.logits(ids)
    model.train()
    got = latentrt.generate(model, ids, max_new_tokens=5, return_logits=True), model.logits(ids)
    engine = Engine(model, max_batch=2)
    served = engine.submit(ids[0], max_new_tokens=5)
    engine.run_until_idle()
    assert got[0].tokens == expected[0].tokens == [served.tokens]
    assert all(torch.equal(a, b) for a, b in zip(got[0].logits, expected[0].logits))
    assert torch.equal(got[1], expected[1])
    base = dict(model_type="gpt2", n_embd=32, n_head=2, n_layer=2, n_positions=64, vocab_size=40)
    assert parse_config(base).resid_pdrop == 0.1  # HF's default where config.json has none
    for bad, match in ((1.5, "probability in"), (-0.1, "probability in"), (None, "got null"), ("0.1", "number")):
        with pytest.raises(ConfigError, match=f"attn_pdrop.*{match}"):
            parse_config(dict(base, attn_pdrop=bad))


def test_one_value_head_reaches_attention_unexpanded_as_published(monkeypatch):
    """One K/V head with qk_bias (keys per query head): the published attention gets the one value head and
    broadcasts it; the value's copies per query head (expanded) round otherwise in CPU SDPA (~1e-6 at the first
    exit check, found by tools.published_soak's states check): every core, prelude and coda call here gets one."""
    model = tiny_recurrent(num_attention_heads=4, num_key_value_heads=1, qk_bias=True)
    assert model.config.keys_per_query_head
    heads = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        heads.append((q.shape[1], k.shape[1], v.shape[1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    latentrt.generate(model, [5, 6, 7], max_new_tokens=2, num_steps=2, init_scale=0.0)
    assert heads and set(heads) == {(4, 4, 1)}


def test_coconut_heads_each_pass_over_its_own_rows_as_published():
    """The published Coconut forward computes logits per pass (the prefix, one column per thought but the last,
    then the last thought and the rest) and concatenates them: a product rounds its rows with its row count on
    the CPU, so one head over the whole prompt differed from the published first answer token's logits in the
    last bits (~5e-7, every token equal). The head runs once per pass, over that pass's rows."""
    model = tiny_coconut(seed=1)
    ids = [5, 9, 11, 6, 2, 4, 4, 4, 3, 7, 8]  # start 2, three latent 4s, end 3
    rows = []
    real = model.lm_logits
    model.lm_logits = lambda h: rows.append(h.shape[1]) or real(h)
    latentrt.generate(model, ids, max_new_tokens=1)
    first, last = ids.index(4), len(ids) - 1 - ids[::-1].index(4)
    assert rows[: last - first + 2] == [first] + [1] * (last - first) + [len(ids) - last]


def test_coconut_padding_is_never_read_as_a_thought_or_a_marker():
    """Left padding holds whatever id the caller padded with, <|latent|>'s or a marker's included: only the
    positions the attention mask keeps are checked for markers and run as thoughts (a padded row whose padding
    is the latent id was refused as a prompt opening on a thought, or ran its padding as thoughts)."""
    model = tiny_coconut(seed=1)
    start, latent, end = model.marker_ids
    row = [5, 9, start, latent, latent, end, 7]
    other = [6, 5, 9, start, latent, latent, end, 8]
    mask = torch.tensor([[False] + [True] * len(row), [True] * len(other)])
    want = model.logits(torch.tensor([[0, *row], other]), attention_mask=mask)
    for pad in (latent, start, end):
        got = model.logits(torch.tensor([[pad, *row], other]), attention_mask=mask)
        assert torch.equal(got[mask], want[mask]), pad


def test_a_non_finite_initial_state_is_refused_and_padding_is_never_blamed():
    """A NaN or inf in a user's init_state is named before any iteration; a non-finite value only where the mask
    says padding is no error (padded positions are never read), one at a kept position names its sequence."""
    from latentrt.errors import NonFiniteStateError
    from latentrt.models.recurrent import check_finite

    model = tiny_recurrent(seed=2)
    ids = torch.tensor([[5, 6, 7]])
    state = torch.zeros(1, 3, model.config.n_embd)
    state[0, 1, 4] = float("nan")
    with pytest.raises(NonFiniteStateError, match="init_state contains NaN or inf"):
        model.logits(ids, num_steps=2, init_state=state)
    x = torch.zeros(2, 3, 4)
    x[1, 0, 2] = float("inf")
    check_finite(x, torch.tensor([[True] * 3, [False, True, True]]), "latent state")
    with pytest.raises(NonFiniteStateError, match=r"non-finite latent state in sequence\(s\) \[1\]"):
        check_finite(x, torch.ones(2, 3, dtype=torch.bool), "latent state")


@pytest.mark.parametrize("name", ["recurrent", "coconut"])
def test_calling_the_model_as_a_module_names_its_entry_points(name):
    """transformers' ``model(input_ids)``: a clear error naming what runs a latentrt model, not torch's
    'missing the required forward function'."""
    model = latentrt.load(f"builtin:{name}")
    with pytest.raises(latentrt.InputError, match=r"is not called as a module: model.logits\(input_ids, \.\.\.\)"):
        model(torch.tensor([[5, 6]]))
