"""Loading: published layouts, round trips, and a clear error for every malformed checkpoint."""

import collections
import json
import re
import warnings
import weakref

import numpy as np
import pytest
import torch
from conftest import CodeRunningPickle, rel_err, tiny_coconut, tiny_recurrent
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import latentrt
from latentrt.checkpoint import StoredTensor, save_checkpoint
from latentrt.errors import CheckpointError, ConfigError
from latentrt.families import build_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shard", [None, 20_000, 1_000])  # (1_000: most tensors alone are larger)
def test_recurrent_round_trip(tmp_path, tie, shard):
    model = tiny_recurrent(seed=3, tie_embeddings=tie)
    save_checkpoint(model, tmp_path, max_shard_bytes=shard, tie_key="lm_head.weight" if tie else None)
    if shard:
        files = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files  # no empty shard
        assert all(name.endswith(f"-of-{len(files):05d}.safetensors") for name in files)
    loaded = latentrt.load(tmp_path, device="cpu")
    assert loaded.config == model.config
    want = model.logits(IDS, num_steps=3, init_scale=0.0)
    assert rel_err(loaded.logits(IDS, num_steps=3, init_scale=0.0), want) < 1e-6
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie


def test_coconut_round_trip_and_tokenizer(coconut_dir):
    model = latentrt.load(coconut_dir, device="cpu")
    assert model.config.latent_id == model.tokenizer.token_to_id("<|latent|>")
    ref = tiny_coconut()
    ids = torch.tensor([[5, 6, 2, 4, 4, 3, 7]])
    assert rel_err(model.logits(ids), ref.logits(ids)) < 1e-6


def test_the_files_rope_table_is_used_as_published(tmp_path, recurrent_model):
    """The published model reads its RoPE table (``freqs_cis``) from the checkpoint, so a bf16 file's table is
    rounded to bf16 there; latentrt ignored it and computed its own fp32 table (on such a file its logits were
    far from the published model's: 0.8 at 20 positions, found with the published code). It uses the file's
    values now, and a table of another shape is an error; a saved folder carries the table (the published
    loader left a missing one uninitialised: garbage) under the published names (``n_heads``)."""
    from latentrt.kernels.reference import rope_tables

    save_checkpoint(recurrent_model, tmp_path, tie_key="lm_head.weight")
    sd = load_file(tmp_path / "model.safetensors")
    hd, T = recurrent_model.config.head_dim, recurrent_model.config.block_size
    cos, sin = rope_tables(hd, T, recurrent_model.config.rope_base)
    assert torch.equal(sd["freqs_cis"], torch.stack([cos[None, :, None], sin[None, :, None]], dim=4))
    assert set(recurrent_model.file_buffers()) == set(recurrent_model.FILE_BUFFERS)
    assert json.loads((tmp_path / "config.json").read_text())["n_heads"] == recurrent_model.config.num_attention_heads
    exact = latentrt.load(tmp_path, device="cpu")
    sd["freqs_cis"] = sd["freqs_cis"].to(torch.bfloat16)  # as a bf16 checkpoint holds it
    save_file(sd, tmp_path / "model.safetensors")
    rounded = latentrt.load(tmp_path, device="cpu")
    assert torch.equal(rounded.rope_cos, cos.to(torch.bfloat16).float())
    assert torch.equal(rounded.rope_sin, sin.to(torch.bfloat16).float())
    ids = torch.tensor([list(range(3, 30))])
    assert not torch.equal(
        rounded.logits(ids, num_steps=2, init_scale=0.0), exact.logits(ids, num_steps=2, init_scale=0.0)
    )
    again = tmp_path / "again"
    save_checkpoint(rounded, again, tie_key="lm_head.weight")  # the table goes on with the model
    assert torch.equal(load_file(again / "model.safetensors")["freqs_cis"], sd["freqs_cis"].float())
    sd["freqs_cis"] = torch.randn(1, T, 1, hd, 2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'freqs_cis' has shape \(1, 96, 1, 16, 2\), the config implies"):
        latentrt.load(tmp_path, device="cpu")
    for shape in ((2, T, 1, hd // 2, 2), (1, T, 2, hd // 2, 2), (1, 0, 1, hd // 2, 2)):  # batch, head, no position
        sd["freqs_cis"] = torch.zeros(shape)
        save_file(sd, tmp_path / "model.safetensors")
        with pytest.raises(CheckpointError, match=f"'freqs_cis' has shape {re.escape(str(shape))}"):
            latentrt.load(tmp_path, device="cpu")


def test_bf16_load(recurrent_dir):
    m = latentrt.load(recurrent_dir, device="cpu", dtype="bf16")
    assert m.dtype == torch.bfloat16
    out = m.logits(IDS, num_steps=2, init_scale=0.0)
    assert out.dtype == torch.float32
    ref = latentrt.load(recurrent_dir, device="cpu").logits(IDS, num_steps=2, init_scale=0.0)
    assert rel_err(out, ref) < 5e-2


def test_a_loaded_model_is_in_eval_mode(recurrent_dir, coconut_dir):
    """As HF's from_pretrained: no module of a loaded model is in training mode (a trainer sets it)."""
    for folder in (recurrent_dir, coconut_dir):
        model = latentrt.load(folder, device="cpu")
        assert not any(m.training for m in model.modules())


def _edit_weights(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors")


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(recurrent_dir):
    _edit_weights(recurrent_dir, lambda sd: sd.pop("transformer.core_block.1.mlp.fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*core_block\.1\.mlp\.fc\.weight"):
        latentrt.load(recurrent_dir, device="cpu")


def test_misshaped_tensor(recurrent_dir):
    _edit_weights(recurrent_dir, lambda sd: sd.update({"transformer.adapter.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=r"adapter\.weight.*\(32, 32\).*\(32, 64\)"):
        latentrt.load(recurrent_dir, device="cpu")


def test_unexpected_tensor(recurrent_dir):
    _edit_weights(recurrent_dir, lambda sd: sd.update({"transformer.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected.*transformer.extra.weight"):
        latentrt.load(recurrent_dir, device="cpu")


def test_untied_head_missing(tmp_path):
    save_checkpoint(tiny_recurrent(tie_embeddings=False), tmp_path)
    _edit_weights(tmp_path, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        latentrt.load(tmp_path, device="cpu")


def test_unknown_model_type(recurrent_dir):
    _edit_config(recurrent_dir, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        latentrt.load(recurrent_dir, device="cpu")
    _edit_config(recurrent_dir, lambda c: c.update(model_type=["huginn_raven"]))
    with pytest.raises(ConfigError, match=r"unknown model_type \['huginn_raven'\]"):
        latentrt.load(recurrent_dir, device="cpu")


def test_config_json_that_is_no_family_config(recurrent_dir):
    """config.json without a model_type, or not a JSON object, and an override of model_type: named."""
    _edit_config(recurrent_dir, lambda c: c.pop("model_type"))
    with pytest.raises(ConfigError, match=r"config.json has no 'model_type' field \(expected one of \["):
        latentrt.load(recurrent_dir, device="cpu")
    (recurrent_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json must hold a JSON object, got list"):
        latentrt.load(recurrent_dir, device="cpu")


def test_model_type_cannot_be_overridden(recurrent_dir):
    with pytest.raises(ConfigError, match="unknown config field 'model_type' for model_type 'huginn_raven'"):
        latentrt.load(recurrent_dir, device="cpu", model_type="gpt2")


@pytest.mark.parametrize("field", ["n_embd", "n_layers_in_recurrent_block", "vocab_size"])
def test_config_missing_field(recurrent_dir, field):
    _edit_config(recurrent_dir, lambda c: c.pop(field))
    with pytest.raises(ConfigError, match=f"missing required field.*{field}"):
        latentrt.load(recurrent_dir, device="cpu")


def test_config_required_field_null(recurrent_dir):
    _edit_config(recurrent_dir, lambda c: c.update(n_embd=None))
    with pytest.raises(ConfigError, match=r"config.json is missing required field\(s\) \['n_embd'\]"):
        latentrt.load(recurrent_dir, device="cpu")


def test_config_bad_values(recurrent_dir):
    _edit_config(recurrent_dir, lambda c: c.update(injection_type="add"))
    with pytest.raises(ConfigError, match="injection_type"):
        latentrt.load(recurrent_dir, device="cpu")
    _edit_config(recurrent_dir, lambda c: c.update(injection_type="linear", n_embd="big"))
    with pytest.raises(ConfigError, match="n_embd.*integer"):
        latentrt.load(recurrent_dir, device="cpu")
    # a bool is no number (Python's True == 1), a fractional float no integer; an integral float is one
    for field, value, message in [
        ("n_embd", True, "field 'n_embd' must be an integer, got True"),
        ("n_embd", 32.5, "field 'n_embd' must be an integer, got 32.5"),
        ("rope_base", False, "field 'rope_base' must be a number, got False"),
    ]:
        _edit_config(recurrent_dir, lambda c, edit={"n_embd": 32, field: value}: c.update(edit))
        with pytest.raises(ConfigError, match=re.escape(message)):
            latentrt.load(recurrent_dir, device="cpu")
    _edit_config(recurrent_dir, lambda c: c.update(n_embd=32.0, rope_base=50000.0))
    assert latentrt.load(recurrent_dir, device="cpu").config.n_embd == 32


def test_published_fields_that_would_change_the_computation(recurrent_dir):
    """Fields latentrt ignores but the published model reads: neutral values (what save_pretrained writes)
    load; test-time noise or another initial-state std is an error, not a silently different model."""
    import math

    d = json.loads((recurrent_dir / "config.json").read_text())["n_embd"]
    std = math.sqrt(2 / (5 * d))
    _edit_config(recurrent_dir, lambda c: c.update(test_time_noise=0, init_values={"std": std, "embed_scale": 8.0}))
    latentrt.load(recurrent_dir, device="cpu")
    for noise in (0.5, 1):
        _edit_config(recurrent_dir, lambda c: c.update(test_time_noise=noise))  # noqa: B023
        with pytest.raises(ConfigError, match=f"test_time_noise={noise} .*not implemented"):
            latentrt.load(recurrent_dir, device="cpu")
    _edit_config(recurrent_dir, lambda c: c.update(test_time_noise=0, init_values={"std": 2 * std}))
    with pytest.raises(ConfigError, match="init_values.std=.* differs from the published"):
        latentrt.load(recurrent_dir, device="cpu")


def test_unknown_override_and_file_field(recurrent_dir):
    with pytest.raises(ConfigError, match="unknown config field 'mean_recurence'"):
        latentrt.load(recurrent_dir, device="cpu", mean_recurence=4)
    _edit_config(recurrent_dir, lambda c: c.update(some_new_field=1))
    with pytest.warns(UserWarning, match="some_new_field"):
        latentrt.load(recurrent_dir, device="cpu")
    m = latentrt.load(recurrent_dir, device="cpu", mean_recurrence=7)
    assert m.config.mean_recurrence == 7
    # vLLM's hf_overrides dict: the same overrides, beside the keywords (a field given both ways is an error)
    m = latentrt.load(recurrent_dir, device="cpu", hf_overrides={"mean_recurrence": 6}, n_heads=2)
    assert (m.config.mean_recurrence, m.config.num_attention_heads) == (6, 2)
    with pytest.raises(ConfigError, match=r"config field\(s\) \['mean_recurrence'\] given both in hf_overrides"):
        latentrt.load(recurrent_dir, device="cpu", hf_overrides={"mean_recurrence": 6}, mean_recurrence=5)
    with pytest.raises(ConfigError, match="hf_overrides must be a dict of config.json fields, got '{\"mean"):
        latentrt.load(recurrent_dir, device="cpu", hf_overrides='{"mean_recurrence": 6}')
    with pytest.raises(ConfigError, match="unknown config field 'mean_recurence'"):
        latentrt.load(recurrent_dir, device="cpu", hf_overrides={"mean_recurence": 6})
    # overrides: a published alias names its field; a numpy scalar is the number it holds
    m = latentrt.load(recurrent_dir, device="cpu", n_heads=2, mean_recurrence=np.int64(5))
    assert (m.config.num_attention_heads, m.config.mean_recurrence) == (2, 5)


@pytest.mark.parametrize("make", [tiny_recurrent, tiny_coconut], ids=["recurrent", "coconut"])
def test_published_and_hf_fields_load_without_a_warning(tmp_path, make):
    """Fields the published files carry that do not change the computation (the family's IGNORED, HF's
    boilerplate) load silently; only a field neither knows is named."""
    save_checkpoint(make(), tmp_path, tie_key="lm_head.weight")
    family = {"huginn_raven": ("architecture_class_name", "RavenForCausalLM"), "gpt2": ("summary_type", "cls_index")}
    extra = dict([family[json.loads((tmp_path / "config.json").read_text())["model_type"]]])
    _edit_config(tmp_path, lambda c: c.update(extra, transformers_version="4.44.0", architectures=["X"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latentrt.load(tmp_path, device="cpu")


def test_n_heads_alias_and_rope_default(recurrent_dir):
    assert "num_attention_heads" not in json.loads((recurrent_dir / "config.json").read_text())  # saved: n_heads
    _edit_config(recurrent_dir, lambda c: (c.update(num_attention_heads=c.pop("n_heads")), c.pop("rope_base")))
    m = latentrt.load(recurrent_dir, device="cpu")
    assert m.config.num_attention_heads == 2 and m.config.rope_base == 50000.0


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        latentrt.load(tmp_path / "nope")
    for bad in (None, 5, "", "  "):  # a TypeError from pathlib; '' read as '.' ("'.' has no config.json")
        with pytest.raises(CheckpointError, match="a model is a folder path, builtin:NAME or a Hub id"):
            latentrt.load(bad)
    with pytest.raises(CheckpointError, match="no config.json"):
        latentrt.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        latentrt.load(tmp_path)


class Allocations(TorchDispatchMode):
    """Bytes of the tensors allocated (``empty*``, dtype conversions) under it, by dtype, off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (
            isinstance(out, torch.Tensor)
            and out.device.type != "meta"
            and (name.startswith("empty") or name == "_to_copy")
        ):
            self.bytes[out.dtype] += out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("shard", [None, 20_000])
def test_loading_allocates_each_weight_once_and_reads_one_tensor_at_a_time(tmp_path, monkeypatch, shard):
    """A bf16 load allocates the bf16 weights and nothing else (before, it allocated the model in fp32 first:
    twice the memory ``check_fits`` counts), and reads the checkpoint one tensor at a time, each gone before
    the next is read (before, the whole state dict sat in host memory beside the model)."""
    model = tiny_recurrent(seed=3, tie_embeddings=False)
    save_checkpoint(model, tmp_path, max_shard_bytes=shard)
    alive, real_read = [], StoredTensor.read

    def read(self):
        assert all(ref() is None for ref in alive), "a checkpoint tensor outlived its copy into the model"
        t = real_read(self)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(StoredTensor, "read", read)
    with Allocations() as allocated:
        loaded = latentrt.load(tmp_path, device="cpu", dtype=torch.bfloat16)
    weights = sum(p.numel() * 2 for p in loaded.parameters())
    read = len(loaded.state_dict()) + len(loaded.FILE_BUFFERS)  # (+ freqs_cis, the published RoPE table)
    assert len(alive) == read and dict(+allocated.bytes) == {torch.bfloat16: weights}
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("family", ["recurrent", "gpt2"])
def test_building_a_bf16_model_allocates_bf16_weights_only(family):
    """build_model (the built-in and random-init models) allocated every weight in fp32 before casting:
    a peak of 1.5x the bf16 bytes ``check_fits`` counts. Untied here, so the bytes are exactly the weights'
    (a tied head is allocated, then replaced by the tie)."""
    from conftest import gpt2_config, recurrent_config

    untied = dict(tie_embeddings=False) if family == "recurrent" else dict(tie_word_embeddings=False)
    cfg = (recurrent_config if family == "recurrent" else gpt2_config)(**untied)
    with Allocations() as allocated:
        model = build_model(cfg, dtype=torch.bfloat16, seed=4)
    assert dict(+allocated.bytes) == {torch.bfloat16: sum(p.numel() * 2 for p in model.parameters())}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_corrupt_safetensors(recurrent_dir):
    (recurrent_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        latentrt.load(recurrent_dir, device="cpu")


def test_coconut_wrapper_checkpoint(tmp_path, coconut_dir):
    ref = latentrt.load(coconut_dir, device="cpu")
    wrapper = {"base_causallm." + k: v for k, v in ref.state_dict().items()}
    wrapper["embedding.weight"] = ref.transformer.wte.weight.detach().clone()
    torch.save(wrapper, tmp_path / "checkpoint_5")
    m = latentrt.load(coconut_dir, device="cpu", weights=tmp_path / "checkpoint_5")
    ids = torch.tensor([[5, 2, 4, 3, 6]])
    assert rel_err(m.logits(ids), ref.logits(ids)) < 1e-7
    with pytest.raises(CheckpointError, match="does not exist"):
        latentrt.load(coconut_dir, weights=tmp_path / "missing.pt")
    # the prefixes training wraps around the keys: DDP's, torch.compile's, both
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "base_causallm.module."):
        torch.save({prefix + k: v for k, v in ref.state_dict().items()}, tmp_path / "wrapped.pt")
        m = latentrt.load(coconut_dir, device="cpu", weights=tmp_path / "wrapped.pt")
        assert rel_err(m.logits(ids), ref.logits(ids)) < 1e-7, prefix
    # HF's GPT-2 files: keys without ``transformer.``, the attention's causal-mask buffers stored beside them
    n = ref.config.n_positions
    hf = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(ref.config.n_layer):
        hf[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        hf[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    m = latentrt.load(coconut_dir, device="cpu", weights=tmp_path / "pytorch_model.bin")
    assert rel_err(m.logits(ids), ref.logits(ids)) < 1e-7


def test_coconut_markers_from_overrides(coconut_dir):
    (coconut_dir / "tokenizer.json").unlink()
    _edit_config(coconut_dir, lambda c: [c.pop(k) for k in ("latent_id", "start_latent_id", "end_latent_id")])
    m = latentrt.load(coconut_dir, device="cpu")
    assert m.config.latent_id is None
    m = latentrt.load(coconut_dir, device="cpu", latent_id=4, start_latent_id=2, end_latent_id=3)
    assert m.marker_ids == (2, 4, 3)
    with pytest.raises(ConfigError, match="only some latent markers"):
        latentrt.load(coconut_dir, device="cpu", latent_id=4)
    # one token for two markers: an error at load (it was a 'nested start-latent marker' at every generate)
    with pytest.raises(ConfigError, match=r"the latent markers must be three different tokens, got \{'latent_id': 2"):
        latentrt.load(coconut_dir, device="cpu", latent_id=2, start_latent_id=2, end_latent_id=3)


def test_vocabulary_padding_as_published(tmp_path, recwarn):
    """The published config pads the vocabulary to nothing: padded_vocab_size is the file's field or
    vocab_size; padding_multiple is read and ignored (a checkpoint with 97 rows and multiple 4096 loads)."""
    model = tiny_recurrent(vocab_size=97, padding_multiple=4096)
    assert model.config.padded_vocab_size == 97 and model.transformer.wte.weight.shape[0] == 97
    save_checkpoint(model, tmp_path, tie_key="lm_head.weight")
    assert json.loads((tmp_path / "config.json").read_text())["padded_vocab_size"] == 97
    loaded = latentrt.load(tmp_path, device="cpu")
    assert loaded.config.padded_vocab_size == 97 and not [w for w in recwarn if "unknown" in str(w.message)]
    _edit_config(tmp_path, lambda c: c.update(padded_vocab_size=128))  # a file that pads: rows must match
    with pytest.raises(CheckpointError, match=r"wte\.weight.*\(97, 32\).*\(128, 32\)"):
        latentrt.load(tmp_path, device="cpu")
    _edit_config(tmp_path, lambda c: c.update(padded_vocab_size=50))
    with pytest.raises(ConfigError, match="padded_vocab_size=50 is smaller than vocab_size=97"):
        latentrt.load(tmp_path, device="cpu")


def test_a_folder_of_torch_weights_names_them_and_loads_through_weights(recurrent_dir):
    """HF's older format (pytorch_model.bin, no safetensors): the error names the file and the weights=
    route (weights_only: no code runs), which loads it."""
    import safetensors.torch

    ref = latentrt.load(recurrent_dir, device="cpu")
    torch.save(safetensors.torch.load_file(recurrent_dir / "model.safetensors"), recurrent_dir / "pytorch_model.bin")
    (recurrent_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"it holds \['pytorch_model.bin'\]: a single torch state dict loads as"):
        latentrt.load(recurrent_dir)
    model = latentrt.load(recurrent_dir, weights=recurrent_dir / "pytorch_model.bin", device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model.logits(ids, init_scale=0.0), ref.logits(ids, init_scale=0.0))
    # a training script's checkpoint: the state dict under one of the usual keys, beside plain data
    sd = torch.load(recurrent_dir / "pytorch_model.bin", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        torch.save({key: sd, "step": 7, "note": "epoch 1"}, recurrent_dir / "trained.pt")
        model = latentrt.load(recurrent_dir, weights=recurrent_dir / "trained.pt", device="cpu")
        assert torch.equal(model.logits(ids, init_scale=0.0), ref.logits(ids, init_scale=0.0)), key


def test_a_torch_weights_file_never_runs_its_code_and_says_why_it_is_refused(tmp_path, recurrent_dir):
    """weights= a torch file holding more than tensors (a pickle that would run code) or no torch file at all:
    a one-line error with the unpickler's reason, nothing run, and no advice to load it with
    weights_only=False (torch's own message gives that advice)."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"wte.weight": torch.zeros(2), "payload": CodeRunningPickle(marker)}, evil)
    garbage = tmp_path / "notes.bin"
    garbage.write_text("not a torch file\n")
    for path, reason in ((evil, "(?i:unsupported global)"), (garbage, "")):
        with pytest.raises(
            CheckpointError, match=f"cannot read {re.escape(str(path))} as a torch state dict: .*{reason}"
        ) as got:
            latentrt.load(recurrent_dir, weights=path, device="cpu")
        message = str(got.value)
        assert "\n" not in message and "weights_only` set to `False`" not in message, message
        assert message.endswith(
            "(torch files are read with weights_only=True: tensors and plain data only, so no code in them runs)"
        )
    assert not marker.exists()


def test_every_malformed_weights_layout_is_a_clear_error(tmp_path, recurrent_dir):
    """The layouts the loader reads, each broken the way a copy or a hand edit breaks it: a file where the
    folder should be, a sharded index naming a missing shard or a tensor no shard holds, a torch file that is
    not a state dict of tensors, an integer weight; and a save over a file."""
    with pytest.raises(CheckpointError, match="is not a folder"):
        latentrt.load(recurrent_dir / "config.json")
    sharded = tmp_path / "sharded"
    save_checkpoint(tiny_recurrent(seed=3), sharded, max_shard_bytes=20_000)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    latentrt.load(sharded, device="cpu")  # (intact first)
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"]["transformer.extra.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensors \['transformer.extra.weight'\] are listed in the index"):
        latentrt.load(sharded, device="cpu")
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard file\(s\) \['{shard}'\] named in .* are missing"):
        latentrt.load(sharded, device="cpu")
    bad_bin = tmp_path / "weights.bin"
    torch.save({"step": 3, "weight": torch.zeros(2)}, bad_bin)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        latentrt.load(recurrent_dir, weights=bad_bin, device="cpu")
    sd = load_file(recurrent_dir / "model.safetensors")
    key = next(k for k in sd if "norm" in k)
    sd[key] = sd[key].to(torch.int32)
    save_file(sd, recurrent_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{key}' has dtype torch.int32, expected floating point"):
        latentrt.load(recurrent_dir, device="cpu")  # (named as a torch file's is)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        save_checkpoint(tiny_recurrent(), a_file)
    assert a_file.read_text() == "x"  # (untouched)


@pytest.mark.parametrize(
    "family, edit, message",
    [
        ("rec", dict(n_embd=0), "config field 'n_embd' must be positive, got 0"),
        ("rec", dict(mean_recurrence=-1), "config field 'mean_recurrence' must be positive, got -1"),
        ("rec", dict(n_layers_in_coda=-1), "config field 'n_layers_in_coda' must be >= 0, got -1"),
        ("rec", dict(n_heads=3), "n_embd=.* is not divisible by num_attention_heads=3"),
        ("rec", dict(num_key_value_heads=4, n_heads=6, n_embd=48), "num_attention_heads=6 is not a multiple of"),
        ("rec", dict(n_heads=16, n_embd=48), "head_dim=3 must be even for rotary embeddings"),
        ("rec", dict(state_init="ones"), "state_init='ones' is not supported"),
        ("rec", dict(tie_embeddings="yes"), "field 'tie_embeddings' must be true or false, got 'yes'"),
        ("rec", dict(state_init=5), "field 'state_init' must be a string, got 5"),
        ("coc", dict(n_layer=0), "config field 'n_layer' must be positive, got 0"),
        ("coc", dict(n_inner=-4), "n_inner must be positive, got -4"),
        ("coc", dict(n_head=5), "n_embd=.* is not divisible by n_head=5"),
        ("coc", dict(activation_function="swish"), "activation_function='swish' is not supported"),
        ("coc", dict(layer_norm_epsilon=0), "layer_norm_epsilon must be a finite number > 0, got 0"),
        ("coc", dict(n_inner=0), "n_inner must be positive, got 0"),
        ("rec", dict(mean_backprop_depth=-1), "config field 'mean_backprop_depth' must be >= 0, got -1"),
        ("rec", dict(rope_base=1), "rope_base must be a finite number > 1, got 1"),
        ("coc", dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon must be a finite number > 0, got inf"),
        # an integer past a float's range (JSON holds any): infinite, not an OverflowError inside torch (tools.fuzz)
        ("rec", dict(rope_base=10**400), "rope_base must be a finite number > 1, got inf"),
        ("coc", dict(layer_norm_epsilon=10**400), "layer_norm_epsilon must be a finite number > 0, got inf"),
        ("coc", dict(resid_pdrop=1.5), r"resid_pdrop must be a probability in \[0, 1\], got 1.5"),
        ("coc", dict(attn_pdrop=-0.1), r"attn_pdrop must be a probability in \[0, 1\], got -0.1"),
    ],
)
def test_every_invalid_config_value_is_a_clear_error(recurrent_dir, coconut_dir, family, edit, message):
    """Each value a config.json may hold that the model cannot be built with: a ConfigError naming the field
    and the value, before any weight is read."""
    folder = recurrent_dir if family == "rec" else coconut_dir
    _edit_config(folder, lambda c: c.update(edit))
    with pytest.raises(ConfigError, match=message):
        latentrt.load(folder, device="cpu")


def test_the_padded_vocabulary_may_equal_the_vocabulary_but_not_fall_short(recurrent_dir):
    vocab = json.loads((recurrent_dir / "config.json").read_text())["vocab_size"]
    _edit_config(recurrent_dir, lambda c: c.update(padded_vocab_size=vocab - 1))
    with pytest.raises(ConfigError, match=f"padded_vocab_size={vocab - 1} is smaller than vocab_size={vocab}"):
        latentrt.load(recurrent_dir, device="cpu")


def test_an_integral_float_in_config_is_read_as_an_integer(recurrent_dir):
    """A config written by a tool that stores every number as a float (64.0): the integer it means."""
    n_embd = json.loads((recurrent_dir / "config.json").read_text())["n_embd"]
    _edit_config(recurrent_dir, lambda c: c.update(n_embd=float(n_embd)))
    model = latentrt.load(recurrent_dir, device="cpu")
    assert model.config.n_embd == n_embd and type(model.config.n_embd) is int


def test_a_latent_marker_id_outside_the_vocabulary_is_named(coconut_dir):
    """Coconut's marker ids given as overrides (or in config.json) must be token ids of the model."""
    vocab = json.loads((coconut_dir / "config.json").read_text())["vocab_size"]
    with pytest.raises(ConfigError, match=f"latent_id={vocab} is outside the vocabulary \\(size {vocab}\\)"):
        latentrt.load(coconut_dir, device="cpu", latent_id=vocab)


# ------------------------------------------------------------------------------------- save_pretrained
QUESTION = "Stella is a rempus. Fae is a worpus. Every worpus is a timpus. Is Fae a rempus or worpus?"


@pytest.mark.parametrize("name", ["recurrent", "coconut"])
def test_save_pretrained_loads_back_to_the_same_numbers_and_keeps_the_folders_companions(tmp_path, name):
    """A loaded model saved and loaded again gives the same logits and tokens: its load-time overrides are in
    config.json, and the chat template, generation defaults and training.json (a Coconut model's thought
    count) come with it."""
    overrides = {"mean_recurrence": 5} if name == "recurrent" else {}
    model = latentrt.load(f"builtin:{name}", device="cpu", hf_overrides=overrides)
    # a model saved from a saved folder keeps the companions too
    model.save_pretrained(tmp_path / "first")
    (tmp_path / "first" / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    (tmp_path / "first" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    model = latentrt.load(tmp_path / "first", device="cpu")
    out = model.save_pretrained(tmp_path / "second")
    assert out == tmp_path / "second"
    files = {p.name for p in out.iterdir()}
    assert files == {n for n in (p.name for p in (tmp_path / "first").iterdir())}, files
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json", "chat_template.jinja"} <= files
    again = latentrt.load(out, device="cpu")
    assert again.config == model.config and again.generation_defaults == {"max_new_tokens": 5}
    if name == "recurrent":
        assert again.config.mean_recurrence == 5
    _same_state(again, model)
    a, b = latentrt.generate(model, QUESTION), latentrt.generate(again, QUESTION)
    assert a.tokens == b.tokens and a.steps == b.steps and a.num_thoughts == b.num_thoughts
    assert len(a.tokens) == 5 and (name == "recurrent" or a.num_thoughts == 3)


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_save_pretrained_shards_keeps_the_dtype_and_ties_the_head(tmp_path):
    model = latentrt.load("builtin:recurrent", device="cpu", dtype="bf16")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 5 and not (tmp_path / "model.safetensors").exists()
    assert all(p.stat().st_size < 100_000 + 70_000 for p in shards)  # (a tensor larger than a shard is alone)
    stored = {k: v for p in shards for k, v in load_file(p).items()}
    assert "lm_head.weight" not in stored  # (and the published RoPE table as the file had it)
    assert {v.dtype for k, v in stored.items() if k != "freqs_cis"} == {torch.bfloat16}
    again = latentrt.load(tmp_path, device="cpu", dtype="bf16")
    _same_state(again, model)
    assert again.lm_head.weight is again.transformer.wte.weight
    # saved again as one file, over the shards (a checkpoint's files: no overwrite needed, no stale shard left)
    model.save_pretrained(tmp_path, max_shard_size=None)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize(
    "size, want",
    [(1000, 1000), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1.5MB", 1_500_000), (" 100 kb ", 100_000), ("7B", 7)],
)
def test_max_shard_size_reads_as_transformers_does(size, want):
    from latentrt.checkpoint import shard_bytes

    assert shard_bytes(size) == want


@pytest.mark.parametrize("folder", [None, "", " ", 3, b"out"])
def test_save_pretrained_takes_a_folder_path(folder):
    model = latentrt.load("builtin:recurrent", device="cpu")
    with pytest.raises(latentrt.InputError, match="save_pretrained takes a folder path, got"):
        model.save_pretrained(folder)


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "5", "5 GBs", "GB", "0MB", "-1GB", [5]])
def test_a_bad_max_shard_size_is_named(tmp_path, size):
    model = latentrt.load("builtin:recurrent", device="cpu")
    with pytest.raises(latentrt.InputError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_save_pretrained_refuses_to_replace_a_folder_of_other_files_unless_told(tmp_path):
    model = latentrt.load("builtin:recurrent", device="cpu")
    folder = tmp_path / "work"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds files that are not a checkpoint's \(data/, notes.txt\)"):
        model.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "config.json").read_text() == "{}"
    for i in range(6):
        (folder / f"n{i}.txt").write_text("")
    with pytest.raises(CheckpointError, match=r"\(data/, n0.txt, n1.txt, n2.txt, n3.txt and 3 more\)"):
        model.save_pretrained(folder)
    model.save_pretrained(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"]
    )
    _same_state(latentrt.load(folder, device="cpu"), model)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        model.save_pretrained(tmp_path / "a_file")
    # into the folder it was loaded from (read while the new one is written)
    loaded = latentrt.load(folder, device="cpu")
    loaded.save_pretrained(folder)
    _same_state(latentrt.load(folder, device="cpu"), model)


def test_save_pretrained_leaves_out_a_training_json_that_describes_other_weights(tmp_path):
    """Weights read from another file (``load(weights=...)``) are not the folder's: its training.json does not
    describe them and stays behind (the saved model warns, as the published checkpoint loaded so does)."""
    ref = latentrt.load("builtin:coconut", device="cpu")
    torch.save({"base_causallm." + k: v for k, v in ref.state_dict().items()}, tmp_path / "checkpoint_3")
    model = latentrt.load("builtin:coconut", device="cpu", weights=tmp_path / "checkpoint_3")
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "training.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()
    again = latentrt.load(tmp_path / "out", device="cpu")
    _same_state(again, ref)
    with pytest.warns(UserWarning, match="no training.json"):
        assert latentrt.generate(again, QUESTION).num_thoughts == 0


@pytest.mark.parametrize("point", ["begin", "written", "synced", "previous-moved", "new-moved"])
def test_a_crash_in_save_pretrained_leaves_a_complete_checkpoint(tmp_path, monkeypatch, point):
    from latentrt import checkpoint

    old = latentrt.load("builtin:recurrent", device="cpu")
    old.save_pretrained(tmp_path / "ckpt")
    new = latentrt.load("builtin:recurrent", device="cpu", mean_recurrence=3)
    monkeypatch.setattr(checkpoint, "CRASH_AT", point)
    with pytest.raises(checkpoint.SimulatedCrash):
        new.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(checkpoint, "CRASH_AT", None)
    if point == "previous-moved":  # the old folder moved aside, the new one not yet in place: load says where
        with pytest.raises(CheckpointError, match=r"an interrupted save left '.*\.ckpt\.previous'"):
            latentrt.load(tmp_path / "ckpt", device="cpu")
        checkpoint.recover_folder(tmp_path / "ckpt")  # (what the next save does first)
    back = latentrt.load(tmp_path / "ckpt", device="cpu")
    assert back.config.mean_recurrence == (3 if point == "new-moved" else old.config.mean_recurrence)
    _same_state(back, old)


def test_a_saved_coconut_model_loads_in_transformers_to_the_same_logits(tmp_path):
    """A GPT-2 family folder written by save_pretrained is also transformers' GPT-2 (the oracle here): without
    latent positions, GPT2LMHeadModel gives the same logits."""
    from conftest import transformers_with_torch

    transformers = transformers_with_torch()
    model = latentrt.load("builtin:coconut", device="cpu")
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its config has no bos_token_id: transformers warns of GPT-2's default)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(model.logits(ids)[..., : want.shape[-1]], want) < 1e-6


def test_a_save_keeps_the_loaded_files_other_config_fields_in_its_spelling(tmp_path):
    """Fields latentrt does not model (transformers' architectures and auto_map, the published config's own)
    stay as the file had them, an aliased field keeps the file's spelling (no second spelling beside it),
    load-time overrides and the weights' dtype are written over them, and the saved folder loads without a
    warning the original did not give."""
    source = tmp_path / "published"
    save_checkpoint(tiny_recurrent(seed=2), source, tie_key="lm_head.weight")
    raw = json.loads((source / "config.json").read_text())
    heads = raw.pop("n_heads", None) or raw.pop("num_attention_heads")
    extra = {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig"},
        "num_attention_heads": heads,  # (the field's own name, not the published n_heads)
        "torch_dtype": "float32",
        "name": "tiny",
    }
    (source / "config.json").write_text(json.dumps({**raw, **extra}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = latentrt.load(source, device="cpu", dtype="bf16", mean_recurrence=3)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: saved[k] for k in extra} == {**extra, "torch_dtype": "bfloat16"}
    assert "n_heads" not in saved and saved["mean_recurrence"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = latentrt.load(tmp_path / "out", device="cpu", dtype="bf16")
    assert again.config == model.config
    # a model built in memory (no file) writes its own fields only, under their published names
    save_checkpoint(tiny_recurrent(seed=2), tmp_path / "built", tie_key="lm_head.weight")
    built = json.loads((tmp_path / "built" / "config.json").read_text())
    assert "n_heads" in built and "architectures" not in built and "torch_dtype" not in built


def test_a_large_integer_where_a_number_goes_is_read_as_a_float():
    """A float field given as an integer torch cannot take (rope_base=10**30 as load()'s override; tools.fuzz
    found an OverflowError) is read as its float: the model loads and runs."""
    model = latentrt.load("builtin:recurrent", rope_base=10**30)
    assert model.config.rope_base == 1e30 and isinstance(model.config.rope_base, float)
    assert latentrt.generate(model, "Alex is", max_new_tokens=1, num_steps=2).tokens
