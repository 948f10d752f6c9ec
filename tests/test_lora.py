"""LoRA adapters (latentrt/lora.py): PEFT's numbers and files both ways, merged inference on every backend,
LoRA fine-tuning through the trainers and the command, and clear errors for adapters latentrt cannot run."""

import json
import os

import peft  # the oracle (latentrt[dev]), as transformers is
import pytest
import torch
import transformers
from conftest import rel_err, tiny_coconut, tiny_recurrent
from safetensors.torch import load_file, save_file
from test_train_command import RECORDS, TEMPLATE

import latentrt
from latentrt import lora
from latentrt.backends import get_backend
from latentrt.checkpoint import save_checkpoint
from latentrt.cli import main
from latentrt.errors import CheckpointError, InputError
from latentrt.train.common import TrainOptions
from latentrt.train.recurrent import train_recurrent

IDS = torch.tensor([[5, 9, 11, 3, 7, 20, 21, 2], [1, 2, 3, 4, 5, 6, 7, 8]])


def _logits(model) -> torch.Tensor:
    """The model's logits of IDS (a recurrent model's from one seeded initial state)."""
    return model.logits(IDS, seed=0) if model.family == "recurrent" else model.logits(IDS)


def _random_updates(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Every lora_B drawn (PEFT and add_lora start it at zero: an adapter that does nothing hides every bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def hf_gpt2(tmp_path):
    config = transformers.GPT2Config(n_embd=48, n_head=3, n_layer=2, n_positions=64, vocab_size=70)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    return hf, tmp_path / "gpt2"


@pytest.mark.parametrize(
    "options",
    [
        dict(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc", "c_proj"]),
        dict(r=3, lora_alpha=5, target_modules=r".*\.attn\.c_(attn|proj)", use_rslora=True),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc"],
            rank_pattern={"h.1.mlp.c_fc": 2},
            alpha_pattern={"c_attn": 3},
        ),
    ],
)
def test_a_peft_adapter_loads_merged_to_peft_numbers(hf_gpt2, tmp_path, options):
    """PEFT's own adapter (its file layout, its scaling rules: rsLoRA, per-layer ranks and alphas) on transformers'
    GPT-2, merged at load: the logits equal PEFT's unmerged forward (fp32), and the model folder loaded as
    ``adapter`` alone names its base."""
    hf, folder = hf_gpt2
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(fan_in_fan_out=True, **options)).eval()
    _random_updates(peft_model, 1)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model(IDS).logits
    with pytest.warns(UserWarning, match="eos_token_id"):
        ours = latentrt.load(folder, device="cpu", adapter=tmp_path / "adapter")
    assert rel_err(_logits(ours), want) < 1e-5
    assert ours.adapter == str(tmp_path / "adapter") and ours.lora is None
    with pytest.warns(UserWarning, match="eos_token_id"):
        plain = latentrt.load(folder, device="cpu")
    assert rel_err(_logits(plain), want) > 1e-3  # (the adapter changed the numbers)


def test_an_adapter_trained_here_loads_in_peft(hf_gpt2, tmp_path):
    """``add_lora`` + ``save_adapter`` on GPT-2: PEFT reads the folder onto transformers' GPT-2 and computes the
    wrapped model's logits exactly (the same sum in the same order); ``merge_lora`` folds it in (one rounding)."""
    _, folder = hf_gpt2
    with pytest.warns(UserWarning, match="eos_token_id"):
        ours = latentrt.load(folder, device="cpu")
    lora.add_lora(ours, rank=3, alpha=5, rslora=True, seed=1)
    _random_updates(ours, 2)
    wrapped = _logits(ours)
    lora.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_proj", "c_fc"] and config["fan_in_fan_out"] is True
    assert config["use_rslora"] is True and config["r"] == 3
    assert config["base_model_name_or_path"] == str(folder.resolve())
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(peft_model(IDS).logits, wrapped)
        peft_model.merge_and_unload()
    lora.merge_lora(ours)
    assert rel_err(_logits(ours), wrapped) < 1e-5 and not lora.lora_layers(ours)


def test_the_wrapped_model_starts_as_the_model_and_merges_to_its_forward(recurrent_model):
    """B starts at zero (PEFT's init): the wrapped model's logits are the model's, bit for bit; with B drawn the
    merged model (any backend's weights) computes the wrapped one's logits within fp32 rounding."""
    before = _logits(recurrent_model)
    lora.add_lora(recurrent_model, rank=4, seed=0)
    assert {n.rsplit(".", 1)[-1] for n in lora.lora_layers(recurrent_model)} == {"Wqkv", "proj", "fc"}
    assert len(lora.lora_layers(recurrent_model)) == 4 * 4  # 4 layers (prelude, core x2, coda): Wqkv, 2 proj, fc
    trainable = [n for n, p in recurrent_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert torch.equal(_logits(recurrent_model), before)
    _random_updates(recurrent_model, 3)
    wrapped = _logits(recurrent_model)
    assert rel_err(wrapped, before) > 1e-3
    lora.merge_lora(recurrent_model)
    assert rel_err(_logits(recurrent_model), wrapped) < 1e-5


def test_a_is_drawn_as_peft_draws_it(recurrent_model):
    """kaiming_uniform_(a=sqrt(5)): uniform in +-1/sqrt(fan_in), from torch's generator or ``seed``'s."""
    for seed in (None, 3):
        model = lora.add_lora(tiny_recurrent(), rank=8, seed=seed)
        for wrapped in lora.lora_layers(model).values():
            a, bound = wrapped.lora_A.weight, 1 / wrapped.lora_A.weight.shape[1] ** 0.5
            assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound and a.std() > 0.4 * bound, seed
            assert not wrapped.lora_B.weight.any()


def test_a_bf16_merge_rounds_once(recurrent_model):
    model = tiny_recurrent().to(torch.bfloat16)
    lora.add_lora(model, rank=4, seed=0)
    _random_updates(model, 10, scale=0.01)
    want = {n: (w.base_layer.weight.float() + w.delta()).to(torch.bfloat16) for n, w in lora.lora_layers(model).items()}
    lora.merge_lora(model)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in want.items())


def test_add_lora_draws_its_adapters_from_its_seed(recurrent_model):
    a = lora.add_lora(tiny_recurrent(), rank=2, seed=5)
    b = lora.add_lora(tiny_recurrent(), rank=2, seed=5)
    c = lora.add_lora(tiny_recurrent(), rank=2, seed=6)
    sa, sb, sc = (lora.adapter_tensors(m) for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_unmerged_adapters_run_on_the_torch_backend_and_merging_gives_the_chosen_one_back(recurrent_model):
    """The fused backends read the weights themselves: with adapters unmerged ``auto`` is the torch backend
    (saying why) and naming another is an error; merging chooses the backend asked for before again (anew)."""
    triton = get_backend("triton", recurrent_model)
    recurrent_model.backend = triton
    lora.add_lora(recurrent_model, rank=2)
    assert recurrent_model.backend.name == "torch" and "LoRA" in recurrent_model.backend.reason
    with pytest.raises(InputError, match="merge them first"):
        get_backend("triton", recurrent_model)
    with pytest.raises(InputError, match="unknown backend"):
        get_backend("nope", recurrent_model)
    lora.merge_lora(recurrent_model)
    assert recurrent_model.backend.name == "triton" and recurrent_model.backend is not triton


@pytest.mark.triton
def test_a_merged_adapter_runs_on_the_triton_backend_as_on_the_torch_one(recurrent_dir, tmp_path):
    model = latentrt.load(recurrent_dir, device="cpu")
    lora.add_lora(model, rank=4, seed=0)
    _random_updates(model, 4)
    lora.save_adapter(model, tmp_path / "adapter")
    options = dict(num_steps=4, max_new_tokens=6, seed=0)
    wrapped = latentrt.generate(model, [[5, 6, 7, 8]], **options)
    runs = {}
    for backend in ("torch", "triton"):
        merged = latentrt.load(tmp_path / "adapter", device="cpu", backend=backend)  # (its base: recurrent_dir)
        assert merged.backend.name == backend
        runs[backend] = latentrt.generate(merged, [[5, 6, 7, 8]], **options)
    assert runs["torch"].tokens == runs["triton"].tokens == wrapped.tokens


def test_a_model_with_unmerged_adapters_is_not_saved_as_a_model(recurrent_model, tmp_path):
    lora.add_lora(recurrent_model, rank=2)
    with pytest.raises(InputError, match="save_adapter"):
        recurrent_model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    lora.merge_lora(recurrent_model)
    recurrent_model.save_pretrained(tmp_path / "m")
    assert torch.equal(_logits(latentrt.load(tmp_path / "m", device="cpu")), _logits(recurrent_model))


def test_targets_follow_peft_rules_and_bad_ones_are_clear_errors(recurrent_model, coconut_model):
    assert set(lora.target_layers(recurrent_model, ["adapter"])) == {"transformer.adapter"}
    assert set(lora.target_layers(recurrent_model, r"transformer\.core_block\.0\..*Wqkv")) == {
        "transformer.core_block.0.attn.Wqkv"
    }
    assert len(lora.target_layers(coconut_model)) == 2 * 4
    with pytest.raises(InputError, match="match no layer"):  # a list entry ends a name after a dot: not c_proj
        lora.target_layers(coconut_model, ["proj"])
    with pytest.raises(InputError, match="match no layer"):  # a str is a pattern for the whole name
        lora.target_layers(recurrent_model, "Wqkv")
    with pytest.raises(InputError, match=r"match no layer .*its linear layers: Wqkv, proj, fc, adapter"):
        lora.add_lora(recurrent_model, targets=["q_proj"])
    with pytest.raises(InputError, match=r"transformer.wte \(Embedding\) is not a linear layer"):
        lora.add_lora(recurrent_model, targets=["wte"])
    with pytest.raises(InputError, match="tied to the token embedding"):
        lora.add_lora(recurrent_model, targets=["lm_head"])
    for bad, message in [
        (dict(rank=0), "rank must be"),
        (dict(alpha=float("nan")), "alpha must be"),
        (dict(dropout=1.0), "dropout must be"),
        (dict(targets=[]), "targets must be"),
        (dict(seed=-1), "seed must be"),
    ]:
        with pytest.raises(InputError, match=message):
            lora.add_lora(recurrent_model, **bad)
    assert recurrent_model.lora is None and all(p.requires_grad for p in recurrent_model.parameters())
    lora.add_lora(recurrent_model, rank=2)
    with pytest.raises(InputError, match="already has LoRA adapters"):
        lora.add_lora(recurrent_model)
    with pytest.raises(InputError, match="no LoRA adapter to merge"):
        lora.merge_lora(tiny_recurrent())


def test_dropout_acts_while_training_only(recurrent_model):
    lora.add_lora(recurrent_model, rank=4, dropout=0.5, seed=0)
    _random_updates(recurrent_model, 5)
    recurrent_model.train()
    layer = recurrent_model.transformer.core_block[0].attn.Wqkv
    x = torch.randn(3, 5, 32)
    with torch.no_grad():  # inference never drops, whatever the mode (as the models' own dropout)
        assert torch.equal(layer(x), layer(x))
    torch.manual_seed(0)
    dropped = layer(x)
    assert not torch.equal(dropped, layer(x)) and not torch.equal(dropped.detach(), layer(x).detach())


def _adapter_folder(tmp_path, model=None, **config_changes):
    model = model or tiny_recurrent()
    lora.add_lora(model, rank=2, seed=0)
    _random_updates(model, 6)
    folder = tmp_path / "bad"
    lora.save_adapter(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
        (dict(use_dora=True), "use_dora=True is a PEFT feature"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save="),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(r=0), "rank must be"),
    ],
)
def test_adapter_configs_latentrt_cannot_run_are_refused_by_name(tmp_path, recurrent_dir, change, message):
    folder = _adapter_folder(tmp_path, **change)
    with pytest.raises(CheckpointError, match=message):
        latentrt.load(recurrent_dir, device="cpu", adapter=folder)


def _rewrite_weights(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_adapter_weights_that_do_not_fit_the_model_are_refused_before_any_weight_changes(tmp_path, recurrent_dir):
    key = "base_model.model.transformer.coda.0.attn.Wqkv.lora_"

    def pair(layer, n_in, n_out):
        p = f"base_model.model.{layer}.lora_"
        return {p + "A.weight": torch.zeros(2, n_in), p + "B.weight": torch.zeros(n_out, 2)}

    cases = [
        (lambda t: t.pop(key + "B.weight"), "has lora_A but not its pair"),
        (lambda t: t.update({key + "B.weight": torch.zeros(96, 3)}), "has rank 2, lora_B 3"),
        (lambda t: t.update({"base_model.model.transformer.wte.lora_embedding_A": torch.zeros(2, 2)}), "is not a LoRA"),
        (lambda t: t.update(pair("transformer.ln_f", 32, 32)), r"'transformer.ln_f' is not a linear layer \(RMSNorm\)"),
        (lambda t: t.update(pair("x.y", 32, 32)), "'x.y' is no layer of this model"),
        (lambda t: t.update({key + "A.weight": torch.zeros(2, 16)}), "is 32 -> 96 here, the adapter's 16 -> 96"),
        (lambda t: t.update({key + "B.weight": torch.zeros(95, 2)}), "is 32 -> 96 here, the adapter's 32 -> 95"),
        (lambda t: t.update({"transformer.x.lora_A.weight": torch.zeros(2, 2)}), "is not a LoRA A or B weight"),
        (lambda t: t.update(pair("lm_head", 32, 40)), "tied to the token embedding"),
    ]
    clean = latentrt.load(recurrent_dir, device="cpu").state_dict()
    for i, (edit, message) in enumerate(cases):
        folder = _adapter_folder(tmp_path / str(i))
        _rewrite_weights(folder, edit)
        with pytest.raises(CheckpointError, match=message):
            latentrt.load(recurrent_dir, device="cpu", adapter=folder)
    model = latentrt.load(recurrent_dir, device="cpu")  # merge_adapter checks every layer before changing one
    adapter = lora.read_adapter(folder)
    with pytest.raises(CheckpointError, match="tied"):
        lora.merge_adapter(model, adapter)
    assert all(torch.equal(v, clean[k]) for k, v in model.state_dict().items())
    folder = _adapter_folder(tmp_path / "bin")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="a pickle: latentrt reads safetensors only"):
        latentrt.load(recurrent_dir, device="cpu", adapter=folder)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        latentrt.load(recurrent_dir, device="cpu", adapter=recurrent_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        latentrt.load(recurrent_dir, device="cpu", adapter=tmp_path / "missing")


def test_a_peft_adapter_of_the_base_model_class_loads(hf_gpt2, tmp_path):
    """PEFT on transformers' GPT2Model (no LM head) names the layers without ``transformer.``: they are the
    same layers."""
    hf, folder = hf_gpt2
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).eval()
    _random_updates(peft_model, 11)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model(IDS).logits
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k.replace("model.transformer.", "model."): v for k, v in tensors.items()}, str(path))
    assert all(".h.0." not in k or "model.h.0." in k for k in load_file(str(path)))
    with pytest.warns(UserWarning, match="eos_token_id"):
        ours = latentrt.load(folder, device="cpu", adapter=tmp_path / "adapter")
    assert rel_err(_logits(ours), want) < 1e-5


def test_an_adapter_folder_loads_its_base_model_or_says_which_to_give(tmp_path, recurrent_dir, monkeypatch):
    model = latentrt.load(recurrent_dir, device="cpu")
    lora.add_lora(model, rank=2, seed=0)
    _random_updates(model, 7)
    lora.save_adapter(model, tmp_path / "a")
    lora.merge_lora(model)
    assert torch.equal(_logits(latentrt.load(tmp_path / "a", device="cpu")), _logits(model))
    with pytest.raises(InputError, match="is a LoRA adapter folder, and adapter="):
        latentrt.load(tmp_path / "a", device="cpu", adapter=tmp_path / "a")
    # a model whose weights are not its folder's (another file, an adapter merged) is no adapter's base by name
    merged = latentrt.load(recurrent_dir, device="cpu", adapter=tmp_path / "a")
    lora.add_lora(merged, rank=2)
    lora.save_adapter(merged, tmp_path / "b")
    with pytest.raises(CheckpointError, match="names no base model"):
        latentrt.load(tmp_path / "b", device="cpu")
    builtin = lora.add_lora(latentrt.load("builtin:recurrent", device="cpu"), rank=2)
    assert lora.adapter_config(builtin)["base_model_name_or_path"] == "builtin:recurrent"
    monkeypatch.chdir(recurrent_dir.parent)  # a folder given relative: the adapter names it absolute
    relative = lora.add_lora(latentrt.load(recurrent_dir.name, device="cpu"), rank=2)
    assert lora.adapter_config(relative)["base_model_name_or_path"] == str(recurrent_dir.resolve())
    # a model folder that also holds adapter files is the model (its own weights), not the adapter
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (recurrent_dir / name).write_bytes((tmp_path / "a" / name).read_bytes())
    assert torch.equal(_logits(latentrt.load(recurrent_dir, device="cpu")), _logits(relative))


def test_a_lora_fine_tune_trains_the_adapters_only_and_resumes_bit_for_bit(tmp_path):
    """train_recurrent on a wrapped model: the base weights do not move, the checkpoint is the adapter (PEFT's
    files, with the trainer state), loading it gives the merged model, and a run stopped after a save and
    resumed from it ends with the uninterrupted run's adapter bit for bit."""
    folder = tmp_path / "model"
    save_checkpoint(tiny_recurrent(seed=3), folder, tie_key="lm_head.weight")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))

    def wrapped(seed=0):
        return lora.add_lora(latentrt.load(folder, device="cpu"), rank=4, seed=seed)

    def opts(out):
        return TrainOptions(steps=6, batch_size=2, lr=1e-2, out=str(out), save_every=3, progress=False)

    base = latentrt.load(folder, device="cpu").state_dict()
    whole = wrapped()
    train_recurrent(whole, whole.tokenizer, RECORDS, opts(tmp_path / "whole"))
    assert all(w.lora_B.weight.abs().max() > 0 for w in lora.lora_layers(whole).values())  # (trained)
    for name, p in whole.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    assert sorted(os.listdir(tmp_path / "whole")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.pt",
        "training.json",
    ]

    class Stop(Exception):
        pass

    def stop(entry):
        if entry["step"] == 4:  # (after step 3's save)
            raise Stop

    partial = wrapped()
    with pytest.raises(Stop):
        train_recurrent(partial, partial.tokenizer, RECORDS, opts(tmp_path / "mid"), on_step=stop)
    resumed = wrapped(seed=1)  # (another draw: the checkpoint's adapter replaces it)
    train_recurrent(resumed, resumed.tokenizer, RECORDS, opts(tmp_path / "mid"), resume=str(tmp_path / "mid"))
    want, got = lora.adapter_tensors(whole), lora.adapter_tensors(resumed)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    merged = latentrt.load(tmp_path / "whole", device="cpu")
    lora.merge_lora(whole)
    assert torch.equal(_logits(merged), _logits(whole))


def test_a_template_a_lora_run_trained_with_is_the_loaded_models(recurrent_dir, tmp_path):
    """A run given its own chat template keeps it in the adapter's folder (as a whole-model run keeps it in its
    checkpoint), and the model loaded with that adapter chats with it."""
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE.replace(" ?", " ,"))
    model = lora.add_lora(latentrt.load(recurrent_dir, device="cpu"), rank=2)
    opts = TrainOptions(steps=1, batch_size=2, out=str(tmp_path / "a"), progress=False)
    train_recurrent(model, model.tokenizer, RECORDS, opts, chat_template=str(template))
    loaded = latentrt.load(tmp_path / "a", device="cpu")
    messages = [{"role": "user", "content": "is Tom a dog"}]
    base = latentrt.load(recurrent_dir, device="cpu")
    want = latentrt.apply_chat_template(base, messages, template=str(template))
    assert latentrt.apply_chat_template(loaded, messages) == want
    with pytest.raises(InputError, match="no chat template"):  # (the base model has none)
        latentrt.apply_chat_template(base, messages)


def test_the_command_trains_lora_adapters_and_their_checkpoint_generates(tmp_path, capsys):
    folder = tmp_path / "model"
    save_checkpoint(tiny_recurrent(seed=3), folder, tie_key="lm_head.weight")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    out = tmp_path / "tuned"
    args = ["train", str(folder), str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "2"]
    assert main([*args, "--lora-rank", "4", "--lora-alpha", "8", "--lora-target", "Wqkv", "--seed", "3"]) == 0
    capsys.readouterr()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["Wqkv"])
    assert json.loads((out / "training.json").read_text())["options"]["lr"] == 2e-4  # (LoRA's default rate)
    model = latentrt.load(folder, device="cpu")
    lora.add_lora(model, rank=4, alpha=8, targets=["Wqkv"], seed=3)
    opts = TrainOptions.huginn_published(steps=2, batch_size=2, lr=2e-4, seed=3, progress=False)
    train_recurrent(model, model.tokenizer, RECORDS, opts)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved.keys() == lora.adapter_tensors(model).keys()
    assert all(torch.equal(saved[k], v) for k, v in lora.adapter_tensors(model).items())
    assert main(["generate", str(out), "is Tom a cat", "--max-new-tokens", "3", "--seed", "0"]) == 0
    by_folder, by_flag = capsys.readouterr().out, None
    assert (
        main(["generate", str(folder), "--adapter", str(out), "is Tom a cat", "--max-new-tokens", "3", "--seed", "0"])
        == 0
    )
    by_flag = capsys.readouterr().out
    assert by_folder == by_flag and by_folder.strip()
    assert main(["info", str(out)]) == 0
    assert f"LoRA adapter merged: {out}" in capsys.readouterr().out
    for bad, message in [
        (["--lora-alpha", "3"], "--lora-alpha applies to LoRA runs: give --lora-rank too"),
        (["--lora-rank", "0"], "--lora-rank must be an integer >= 1"),
        (["--lora-rank", "2", "--lora-target", "wte"], "is not a linear layer"),
        (["--lora-rank", "2", "--lora-target", "Wqkv", "--resume", str(out)], "has rank 4, this model's adapter 2"),
        (["--lora-rank", "4", "--resume", str(out)], "wraps other layers than this model's adapters (missing"),
        (["--resume", str(out), "--overwrite"], "holds a LoRA adapter, and this run does not"),
    ]:
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err


def test_coconut_lora_needs_the_markers_in_the_model(coconut_dir, tmp_path):
    from latentrt.train.coconut import add_latent_markers

    model = latentrt.load(coconut_dir, device="cpu")
    lora.add_lora(model, rank=2)
    assert add_latent_markers(model, model.tokenizer) is False  # (it has them: nothing to grow)
    gpt2 = tiny_coconut(latent_id=None, start_latent_id=None, end_latent_id=None)
    lora.add_lora(gpt2, rank=2)
    with pytest.raises(InputError, match="needs a model that has Coconut's latent markers"):
        add_latent_markers(gpt2, gpt2.tokenizer)


def test_a_coconut_lora_fine_tune_trains_the_adapters_through_the_curriculum(tmp_path):
    """train_coconut on a wrapped Coconut model (markers in place): thoughts carry the adapters' gradients, the
    base weights do not move, and the checkpoint loads as its base folder with the adapter merged."""
    from test_train import TOK, _gpt2

    from latentrt.train.coconut import Curriculum, train_coconut
    from latentrt.train.data import generate_dataset

    model = _gpt2(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)  # (its tokenizer has the markers)
    model.tokenizer = TOK
    save_checkpoint(model, tmp_path / "base", tie_key="lm_head.weight")
    model = latentrt.load(tmp_path / "base", device="cpu")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=2, seed=0)
    opts = TrainOptions(steps=4, batch_size=2, lr=1e-2, out=str(tmp_path / "a"), progress=False)
    train_coconut(model, model.tokenizer, generate_dataset(4, (2,)), opts, Curriculum("coconut", max_stage=1))
    for name, p in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    assert all(w.lora_B.weight.abs().max() > 0 for w in lora.lora_layers(model).values())
    loaded = latentrt.load(tmp_path / "a", device="cpu")
    lora.merge_lora(model)
    ids = torch.tensor([TOK.encode("every wumpus is a yumpus").ids])
    assert torch.equal(loaded.logits(ids), model.logits(ids))


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_unmerged_adapters_serve_and_generate_as_merged_ones(family):
    """The torch backend runs the wrapped layers everywhere the model runs: continuous batching (the engine's
    packed passes, Coconut's thoughts) gives generate()'s results alone, and the merged model's tokens."""
    from test_serve_engine import coconut_requests, generate_alone, recurrent_requests

    from latentrt.serve import Engine

    model = tiny_recurrent(seed=3) if family == "recurrent" else tiny_coconut(seed=2)
    lora.add_lora(model, rank=4, seed=0)
    _random_updates(model, 8, scale=0.05)
    requests = recurrent_requests(6, seed=7) if family == "recurrent" else coconut_requests(6)
    results = Engine(model, max_batch=3).generate(
        [p for p, _ in requests], [latentrt.GenerateOptions.build(None, **kw) for _, kw in requests]
    )
    wrapped = [generate_alone(model, prompt, **kw) for prompt, kw in requests]
    assert results == wrapped
    lora.merge_lora(model)
    merged = [generate_alone(model, prompt, **kw) for prompt, kw in requests]
    assert [r.tokens for r in merged] == [r.tokens for r in wrapped]


def test_the_save_command_bakes_an_adapter_in(tmp_path, recurrent_dir, capsys):
    """``latentrt save MODEL OUT --adapter DIR``: PEFT's merge_and_unload as a command; the folder keeps the
    adapter's own chat template."""
    model = lora.add_lora(latentrt.load(recurrent_dir, device="cpu"), rank=2, seed=0)
    _random_updates(model, 9)
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    opts = TrainOptions(steps=1, batch_size=2, out=str(tmp_path / "a"), progress=False)
    train_recurrent(model, model.tokenizer, RECORDS, opts, chat_template=str(template))
    assert main(["save", str(recurrent_dir), str(tmp_path / "m"), "--adapter", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    saved = latentrt.load(tmp_path / "m", device="cpu")
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == TEMPLATE
    assert torch.equal(_logits(saved), _logits(latentrt.load(recurrent_dir, device="cpu", adapter=tmp_path / "a")))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rank_pattern={"Wqkv": 0}), r"rank_pattern\['Wqkv'\] must be an integer >= 1"),
        (dict(alpha_pattern={"(": 2}), r"alpha_pattern: '\(' is not a regular expression"),
        (dict(alpha_pattern=[1]), "alpha_pattern must be an object"),
        (dict(use_rslora="yes"), "rslora must be True or False"),
        (dict(lora_alpha="16"), "alpha must be a finite number"),
    ],
)
def test_adapter_config_values_are_checked(tmp_path, recurrent_dir, change, message):
    with pytest.raises(CheckpointError, match=message):
        latentrt.load(recurrent_dir, device="cpu", adapter=_adapter_folder(tmp_path, **change))


def test_the_readmes_count_of_a_huginn_0125_lora_fine_tune():
    """Rank-8 adapters on every block's attention and MLP of Huginn-0125 (built on the meta device: no memory):
    6,144,000 trainable parameters, 98 MB of fp32 weights, gradients and AdamW moments (README: LoRA adapters)."""
    from benchmarks.suites import HUGINN_0125
    from latentrt.families import build_model, parse_config

    with torch.device("meta"):
        model = build_model(parse_config(HUGINN_0125))
    lora.add_lora(model, rank=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 6_144_000 and round(16 * trainable / 1e6) == 98
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) > 3.5e9


@pytest.mark.gpu
def test_a_merged_adapter_on_the_gpus_fused_backend_gives_the_torch_backends_tokens(tmp_path):
    """On a GPU, a model loaded with an adapter merged runs the Triton backend (auto's there) as any model: in fp32
    its tokens equal the torch backend's of the same load."""
    backend = "triton"
    model = lora.add_lora(latentrt.load("builtin:recurrent", device="cpu"), rank=4, seed=0)
    _random_updates(model, 12, scale=0.02)
    lora.save_adapter(model, tmp_path / "adapter")
    dtype = "float32"
    options = dict(num_steps=8, max_new_tokens=8, init_scale=0.0)
    prompt = "Alex is a wumpus. Every wumpus is a zumpus. Is Alex a zumpus or rompus?"
    runs = {}
    for name in ("torch", backend):
        loaded = latentrt.load(tmp_path / "adapter", device="cuda", dtype=dtype, backend=name)
        runs[name] = latentrt.generate(loaded, prompt, **options).tokens
    assert runs[backend] == runs["torch"]


@pytest.mark.gpu
def test_a_lora_fine_tune_on_the_gpu_in_bf16_trains_the_fp32_adapters(tmp_path):
    """bf16 weights under bf16 autocast (the GPU's recipe): the adapters stay fp32, move, and the checkpoint
    loads merged on the GPU."""
    model = lora.add_lora(latentrt.load("builtin:recurrent", device="cuda"), rank=4, seed=0)
    assert all(w.lora_A.weight.dtype == torch.float32 for w in lora.lora_layers(model).values())
    opts = TrainOptions(steps=3, batch_size=2, lr=1e-2, out=str(tmp_path / "a"), progress=False)
    log = train_recurrent(model, model.tokenizer, RECORDS, opts, chat_template=_template_file(tmp_path))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert all(w.lora_B.weight.abs().max() > 0 for w in lora.lora_layers(model).values())
    loaded = latentrt.load(tmp_path / "a", device="cuda")
    assert loaded.dtype == torch.bfloat16 and loaded.adapter == str(tmp_path / "a")


def _template_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    return str(path)
