"""``latentrt train`` (latentrt/train/command.py): the CLI runs train_recurrent with the recipe's options and
the flags given, on JSON or JSON Lines data, and writes a checkpoint that keeps the model's chat template
and generation defaults."""

import json

import pytest
import torch
from conftest import tiny_recurrent

import latentrt
from latentrt.checkpoint import save_checkpoint
from latentrt.cli import main
from latentrt.train.common import TrainOptions
from latentrt.train.recurrent import train_recurrent

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} .{% endgeneration %}"
    "{% else %}{{ m['content'] }} ?{% endif %} {% endfor %}"
)
RECORDS = [
    {"messages": [{"role": "user", "content": "is Tom a cat"}, {"role": "assistant", "content": "yes Tom is a cat"}]},
    {"messages": [{"role": "user", "content": "is Ann a dog"}, {"role": "assistant", "content": "no"}]},
    {"text": "every cat is a cat ."},
    {"question": "is Alex a bird ?", "steps": [], "answer": "Alex is a bird ."},
]


@pytest.fixture
def huginn_like(tmp_path):
    """A model folder with a chat template (a generation block) and generation defaults, as Huginn-0125's."""
    folder = tmp_path / "model"
    save_checkpoint(tiny_recurrent(seed=3), folder, tie_key="lm_head.weight")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "."}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [10, 11], "max_new_tokens": 5}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return folder, data


def test_a_run_refused_after_its_log_is_checked_leaves_no_log_file(huginn_like, tmp_path, capsys):
    """``--log FILE`` is checked before training (a path that cannot be written is an error at once) without
    creating it: a run refused later (here its --resume folder is missing) leaves no empty log behind."""
    folder, data = huginn_like
    log = tmp_path / "log.jsonl"
    args = ["train", str(folder), str(data), "--out", str(tmp_path / "o"), "--max-steps", "1", "--log", str(log)]
    assert main([*args, "--resume", str(tmp_path / "missing")]) == 2
    assert "latentrt: error:" in capsys.readouterr().err and not log.exists()
    assert main([*args[:-1], str(tmp_path / "no-such-folder" / "log.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "latentrt: error: --log " in err and "no-such-folder" in err and "cannot be written" in err, err


def test_the_command_trains_as_the_api_does_and_keeps_the_models_files(huginn_like, tmp_path, capsys):
    folder, data = huginn_like
    out = tmp_path / "tuned"
    args = ["train", str(folder), str(data), "--out", str(out), "--max-steps", "3", "--batch-size", "2"]
    log = tmp_path / "log.jsonl"
    assert main([*args, "--micro-batch-size", "1", "--lr", "1e-3", "--seed", "4", "--log", str(log)]) == 0
    printed = capsys.readouterr().out
    model = latentrt.load(folder, device="cpu")
    opts = TrainOptions.huginn_published(steps=3, batch_size=2, micro_batch_size=1, lr=1e-3, seed=4, progress=False)
    want = train_recurrent(model, model.tokenizer, RECORDS, opts)
    assert (
        printed == f"steps 1-3: loss {want[0]['loss']:.4f} -> {want[-1]['loss']:.4f}\ncheckpoint: {out} (latentrt "
        f"generate {out} PROMPT)\n"
    )
    assert [json.loads(line) for line in log.read_text().splitlines()] == want  # --log: each step's entry
    tuned = latentrt.load(out, device="cpu")
    source = latentrt.load(folder, device="cpu")
    for (name, want), got in zip(model.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(got, want), name
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), source.parameters()))
    for name in ("tokenizer_config.json", "generation_config.json"):  # kept, as save_pretrained keeps them
        assert (out / name).read_text() == (folder / name).read_text()
    assert tuned.generation_defaults == {"max_new_tokens": 5} and tuned.eos_token_id == [10, 11]
    messages = [{"role": "user", "content": "is Tom a dog"}]
    assert latentrt.apply_chat_template(tuned, messages) == latentrt.apply_chat_template(source, messages)
    options = json.loads((out / "training.json").read_text())["options"]
    assert options["schedule"] == "wsd" and options["micro_batch_size"] == 1 and options["lr"] == 1e-3


def test_question_answer_records_train_as_the_published_fine_tuning_script_makes_them(huginn_like, tmp_path, capsys):
    """{question, answer} records (the Hub's GSM8k, the published fine-tuning script's default data): the
    script's conversation through the model's template (its answers in the 'Huginn' role, which Huginn-0125's
    template marks), each cut to --max-seq-length + 1 tokens with a warning, as the API trains them."""
    folder, _ = huginn_like
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE.replace("'assistant'", "'Huginn'"), "eos_token": "."})
    )
    gsm = [
        {"question": "is Tom a cat ?", "answer": "yes Tom is a cat . " * 3},
        {"question": "is Ann a dog", "answer": "no"},
    ]
    (tmp_path / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in gsm))
    out = tmp_path / "tuned"
    args = [
        "train",
        str(folder),
        str(tmp_path / "gsm.jsonl"),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
    ]
    assert main([*args, "--max-seq-length", "20"]) == 0
    assert "1 of 2 records are longer than max_seq_length + 1 = 21 tokens and are cut" in capsys.readouterr().err
    model = latentrt.load(folder, device="cpu")
    opts = TrainOptions.huginn_published(steps=2, batch_size=2, max_seq_length=20, progress=False)
    with pytest.warns(UserWarning, match="1 of 2 records are longer"):
        train_recurrent(model, model.tokenizer, gsm, opts)
    tuned = latentrt.load(out, device="cpu")
    for (name, want), got in zip(model.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(got, want), name
    assert json.loads((out / "training.json").read_text())["options"]["max_seq_length"] == 20
    assert main([*args, "--overwrite", "--max-seq-length", "0"]) == 0  # 0: not cut
    assert "cut" not in capsys.readouterr().err
    assert json.loads((out / "training.json").read_text())["options"]["max_seq_length"] is None


def test_defaults_a_template_file_and_the_scratch_recipe(huginn_like, tmp_path):
    folder, _ = huginn_like
    (tmp_path / "data.json").write_text(json.dumps(RECORDS * 20))  # 80 records: 3 steps of 32 by default
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE.replace(" ?", " ? ?"))
    out = tmp_path / "tuned"
    args = ["train", str(folder), str(tmp_path / "data.json"), "--out", str(out), "--chat-template", str(template)]
    assert main([*args, "--recipe", "scratch", "--batch-size", "32", "--micro-batch-size", "16"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["step"] == 3 and info["options"]["schedule"] == "cosine" and info["options"]["lr"] == 1e-3
    assert (out / "chat_template.jinja").read_text() == template.read_text()  # the run's template is the model's
    tuned = latentrt.load(out, device="cpu")
    messages = [{"role": "user", "content": "is Tom a dog"}]
    question = tuned.tokenizer.token_to_id("?")
    assert latentrt.apply_chat_template(tuned, messages)[-2:] == [question, question]


def test_coconut_trains_through_its_curriculum_as_the_api_does(coconut_dir, tmp_path, capsys):
    """A Coconut model: train_coconut with the published Coconut optimiser by default and the curriculum
    the flags give; the checkpoint appends the trained thoughts by default."""
    from latentrt.train.coconut import Curriculum, train_coconut

    qa = [RECORDS[3], {"question": "is Tom a cat ?", "steps": ["Tom is a cat ."], "answer": "Tom is a cat ."}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    out = tmp_path / "tuned"
    args = ["train", str(coconut_dir), str(tmp_path / "qa.json"), "--out", str(out), "--max-stage", "1"]
    assert main([*args, "--thoughts-per-step", "2", "--max-steps", "3", "--batch-size", "2"]) == 0
    model = latentrt.load(coconut_dir, device="cpu")
    opts = TrainOptions.coconut_published(steps=3, batch_size=2, progress=False)
    train_coconut(model, model.tokenizer, qa, opts, Curriculum("coconut", max_stage=1, thoughts_per_step=2))
    tuned = latentrt.load(out, device="cpu")
    for (name, want), got in zip(model.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(got, want), name
    info = json.loads((out / "training.json").read_text())
    assert (info["mode"], info["max_stage"], info["thoughts_per_step"]) == ("coconut", 1, 2)
    assert info["options"]["lr"] == 1e-4 and info["options"]["weight_decay"] == 0.01
    assert latentrt.generate(tuned, "is Tom a cat ?", max_new_tokens=2).num_thoughts == 2
    # a curriculum counts steps per stage: the summary names the stages (it said 'steps 1-1')
    assert "3 steps (stage 0 step 1 to stage 2 step 1): loss " in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:the curriculum skips the first 1 epoch")  # (a plain model: said)
def test_the_published_runs_options_as_flags_equal_the_api(coconut_dir, tmp_path):
    """run.py's options the curriculum takes (``--start-epoch``: its resume, ``--no-reset-optimizer``,
    ``--uniform-prob``, the ``nothoughts`` method) reach train_coconut as the API gives them."""
    from latentrt.train.coconut import Curriculum, train_coconut

    qa = [RECORDS[3], {"question": "is Tom a cat ?", "steps": ["Tom is a cat ."], "answer": "Tom is a cat ."}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    for mode in ("coconut", "nothoughts"):
        out = tmp_path / mode
        args = ["train", str(coconut_dir), str(tmp_path / "qa.json"), "--out", str(out), "--curriculum", mode]
        flags = ["--max-stage", "1", "--epochs", "4", "--start-epoch", "1", "--no-reset-optimizer"]
        assert main([*args, *flags, "--uniform-prob", "0.5", "--batch-size", "1"]) == 0
        model = latentrt.load(coconut_dir, device="cpu")
        cur = Curriculum(mode, max_stage=1, epochs=4, start_epoch=1, reset_optimizer=False, uniform_prob=0.5)
        log = train_coconut(
            model, model.tokenizer, qa, TrainOptions.coconut_published(batch_size=1, progress=False), cur
        )
        assert [e["epoch"] for e in log] == [2, 2, 3, 3, 4, 4]
        tuned = latentrt.load(out, device="cpu")
        for (name, want), got in zip(model.state_dict().items(), tuned.state_dict().values()):
            assert torch.equal(got, want), (mode, name)
        info = json.loads((out / "training.json").read_text())
        assert info["mode"] == mode and info["curriculum"]["start_epoch"] == 1
        assert info["curriculum"]["reset_optimizer"] is False and info["curriculum"]["uniform_prob"] == 0.5


def test_the_flags_reach_the_trainers(huginn_like, coconut_dir, tmp_path, capsys, monkeypatch):
    """What each flag hands the trainer (the trainers replaced by recorders: the runs above check the training):
    --resume, --loss-on and --checkpoint-activations; the default step count, one pass over the records in
    batches of --batch-size per process (WORLD_SIZE processes under torchrun), per curriculum stage for Coconut;
    a published curriculum in the --curriculum mode; only the main process prints the report; a trainer's error
    names the flags."""
    import latentrt.train.coconut as coconut
    import latentrt.train.distributed as distributed
    import latentrt.train.recurrent as recurrent

    calls = []

    def recorder(model, tok, records, opts, *rest, **kw):
        calls.append(dict(kw, opts=opts, rest=rest, n=len(records)))
        return [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]

    monkeypatch.setattr(recurrent, "train_recurrent", recorder)
    monkeypatch.setattr(coconut, "train_coconut", recorder)
    folder, data = huginn_like
    out = ["--out", str(tmp_path / "o")]
    assert main(["train", str(folder), str(data), *out]) == 0
    assert capsys.readouterr().out.startswith("steps 1-2: loss 2.0000 -> 1.5000\ncheckpoint: ")
    assert main(["train", str(folder), str(data), *out, "--loss-on", "all", "--checkpoint-activations",
                 "--resume", "ckpt", "--batch-size", "2"]) == 0  # fmt: skip
    default, given = calls[-2:]
    assert (default["resume"], default["loss_on"], default["opts"].checkpoint_activations) == (None, "assistant", False)
    assert (given["resume"], given["loss_on"], given["opts"].checkpoint_activations) == ("ckpt", "all", True)
    assert (default["opts"].steps, given["opts"].steps) == (1, 2)  # 4 records: one batch of 32, two of 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(folder), str(data), *out, "--batch-size", "1", "--micro-batch-size", "1"]) == 0
    assert calls[-1]["opts"].steps == 2  # two processes take a record each per step
    monkeypatch.delenv("WORLD_SIZE")
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "is Tom a cat ?", "steps": ["Tom is a cat ."], "answer": "yes ."}] * 3))
    assert (
        main(["train", str(coconut_dir), str(qa), *out, "--max-stage", "1", "--batch-size", "2", "--resume", "c"]) == 0
    )
    got = calls[-1]
    stages = len(coconut.Curriculum("coconut", max_stage=1).stages())
    assert got["opts"].steps == stages * 2 and got["resume"] == "c"  # per stage, two batches of 2 over 3 records
    assert main(["train", str(coconut_dir), str(qa), *out, "--published-curriculum", "prosqa",
                 "--curriculum", "nothoughts"]) == 0  # fmt: skip
    cur = calls[-1]["rest"][0]
    assert (cur.mode, cur.max_stage, cur.epochs) == ("nothoughts", 6, 50)
    capsys.readouterr()
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert main(["train", str(folder), str(data), *out]) == 0
    assert capsys.readouterr().out == ""
    shutdowns = []  # the process group is destroyed after a run, failed or not
    monkeypatch.setattr(distributed, "shutdown", lambda: shutdowns.append(1))
    assert main(["train", str(folder), str(data), *out]) == 0

    def failing(*args, **kw):
        raise latentrt.InputError("seed must be sown")

    monkeypatch.setattr(recurrent, "train_recurrent", failing)
    assert main(["train", str(folder), str(data), *out]) == 2 and len(shutdowns) == 2
    assert "latentrt: error: --seed must be sown" in capsys.readouterr().err  # named as the flag


def test_a_run_whose_optimizer_state_cannot_fit_is_refused_before_training(huginn_like, tmp_path, capsys, monkeypatch):
    """Gradients and AdamW's two moments (3 x the weights) are checked against the free memory before the
    first step: a clear error naming both figures, not an allocation failure (or the OOM killer) mid-run."""
    import latentrt.memory

    folder, data = huginn_like
    model = latentrt.load(folder, device="cpu")
    need = 3 * sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    monkeypatch.setattr(latentrt.memory, "available_bytes", lambda device: need - 1)
    assert main(["train", str(folder), str(data), "--out", str(tmp_path / "o"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "training's gradients and AdamW's two moments" in err and "GB available on cpu" in err, err
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(latentrt.memory, "available_bytes", lambda device: need)
    assert main(["train", str(folder), str(data), "--out", str(tmp_path / "o"), "--max-steps", "1"]) == 0


def test_bad_input_is_a_clear_error(huginn_like, tmp_path, capsys, coconut_dir):
    folder, data = huginn_like
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "gsm.json").write_text(json.dumps([{"question": "is Tom a cat ?", "answer": "yes"}]))
    (tmp_path / "none.json").write_text(json.dumps([{"messages": RECORDS[0]["messages"][:1]}]))
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "is Tom a cat ?", "steps": ["Tom is a cat ."], "answer": "yes"}]))
    out = str(tmp_path / "out")
    untokenized = tmp_path / "bare"
    save_checkpoint(tiny_recurrent(seed=3), untokenized, tie_key="lm_head.weight")
    (untokenized / "tokenizer.json").unlink()
    cases = [
        ([str(coconut_dir), str(data)], "record 0: Coconut trains on question-answer records ({question, steps, "),
        ([str(coconut_dir), str(data), "--loss-on", "all"], "--loss-on applies to recurrent-depth (huginn_raven)"),
        ([str(folder), str(data), "--max-stage", "2"], "--max-stage applies to Coconut (gpt2) models only"),
        ([str(coconut_dir), str(qa), "--checkpoint-activations"], "--checkpoint-activations applies to recurrent"),
        ([str(coconut_dir), str(data), "--published-curriculum", "gsm", "--epochs", "3"], "drop --epochs"),
        ([str(coconut_dir), str(qa), "--published-curriculum", "gsm", "--no-reset-optimizer"], "drop --no-reset-opt"),
        ([str(folder), str(data), "--no-reset-optimizer"], "--no-reset-optimizer applies to Coconut (gpt2) models"),
        ([str(coconut_dir), str(qa), "--max-seq-length", "64"], "--max-seq-length applies to recurrent-depth"),
        ([str(folder), str(data), "--max-seq-length", "-1"], "--max-seq-length must be an integer >= 1, got -1"),
        ([str(folder), str(tmp_path / "gsm.json")], "record 0 has no token under the loss (its answer is the "),
        ([str(coconut_dir), str(tmp_path / "gsm.json")], "its records are {question, steps, answer} (Coconut's"),
        ([str(coconut_dir), str(qa), "--start-epoch", "1"], "--start-epoch=1 skips epochs of the published epoch"),
        ([str(coconut_dir), str(qa), "--uniform-prob", "2"], "--uniform-prob must be a probability in [0, 1], got 2"),
        ([str(coconut_dir), str(qa), "--curriculum", "cot", "--uniform-prob", "0.3"], "--uniform-prob acts only where"),
        ([str(coconut_dir), str(data), "--max-stage", "-1"], "--max-stage must be an integer >= 0"),
        # the options' checks name the flags (they named the Python options: "seed must be ...")
        ([str(coconut_dir), str(data), "--seed", "-1"], "--seed must be an integer in [0, 2**63 - 1], got -1"),
        ([str(folder), str(data), "--save-every", "-2"], "--save-every must be an integer >= 0"),
        ([str(folder), str(data), "--lr", "inf"], "--lr must be a finite number, got inf"),
        ([str(coconut_dir), str(qa), "--max-steps", "2"], "--max-steps=2 is fewer than the curriculum's"),
        ([str(folder), str(data), "--log", str(tmp_path / "no" / "log.jsonl")], "--log"),
        ([str(folder), str(tmp_path / "bad.jsonl")], "bad.jsonl, line 2: not valid JSON"),
        ([str(folder), str(tmp_path / "empty.json")], "holds no records"),
        ([str(folder), str(tmp_path / "none.json")], "record 0 has no token under the loss"),
        ([str(folder), str(data), "--max-steps", "0"], "--max-steps must be >= 1"),
        ([str(folder), str(data), "--published-curriculum", "gsm"], "--published-curriculum applies to Coconut (gpt2)"),
        ([str(coconut_dir), str(qa), "--published-curriculum", "gsm", "--max-stage", "2"], "drop --max-stage"),
        ([str(untokenized), str(data)], "training needs a model with a tokenizer.json"),
        (
            [str(folder), str(data), "--batch-size", "4", "--micro-batch-size", "3"],
            "--micro-batch-size must divide --batch",
        ),
    ]
    for args, message in cases:
        assert main(["train", *args, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentrt: error: ") and message in err, (args, err)
        assert "Traceback" not in err and "---" not in err, err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("a file")
    assert main(["train", str(folder), str(data), "--out", out, "--max-steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_precision_is_the_published_scripts_unless_given(coconut_dir, huginn_like, tmp_path, monkeypatch):
    """The published recipes train in the weights' own dtype, no autocast (Huginn's script: bf16 weights, its
    "bf16-true"; Coconut's run.py: fp32, its "bf16: False"); latentrt's scratch recipe runs bf16 autocast on a
    GPU; ``--autocast`` / ``--no-autocast`` choose. On a GPU ``latentrt train`` and ``latentrt eval`` load a
    Coconut model in fp32 (they loaded bf16, load's GPU default, and trained it in bf16 autocast); --dtype
    wins."""
    import argparse

    import latentrt.train.coconut as coconut
    import latentrt.train.recurrent as recurrent
    from latentrt.cli import published_dtype

    assert not TrainOptions.coconut_published().autocast and not TrainOptions.huginn_published().autocast
    assert TrainOptions().autocast
    with pytest.raises(latentrt.InputError, match="autocast must be True or False, got 'yes'"):
        TrainOptions(autocast="yes").validate()
    enabled = []
    for module in (coconut, recurrent):
        real = module.autocast
        monkeypatch.setattr(module, "autocast", lambda device, on, real=real: enabled.append(on) or real(device, on))
    folder, data = huginn_like
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "is Tom a cat ?", "steps": ["Tom is a cat ."], "answer": "Tom is a cat ."}]))
    runs = [
        ([str(folder), str(data)], False),
        ([str(folder), str(data), "--recipe", "scratch"], True),
        ([str(folder), str(data), "--autocast"], True),
        ([str(coconut_dir), str(qa), "--max-stage", "0"], False),
        ([str(coconut_dir), str(qa), "--max-stage", "0", "--recipe", "scratch", "--no-autocast"], False),
    ]
    for i, (args, on) in enumerate(runs):
        enabled.clear()
        assert main(["train", *args, "--out", str(tmp_path / f"o{i}"), "--max-steps", "2", "--batch-size", "2"]) == 0
        assert enabled and set(enabled) == {on}, (args, enabled)
    monkeypatch.setattr("latentrt.loader.parse_device", lambda device: torch.device("cuda"))
    given = dict(device=None, revision=None, hf_overrides=None, dtype=None)
    dtypes = [published_dtype(argparse.Namespace(**given, model=str(m))) for m in (coconut_dir, folder)]
    assert dtypes == ["float32", None]  # (None: load's GPU default, bf16)
    assert published_dtype(argparse.Namespace(**{**given, "dtype": "bf16"}, model=str(coconut_dir))) == "bf16"
    # latentrt eval loads as run.py evaluates (it loaded bf16 there)
    loaded = []

    def record(args):
        loaded.append(args.dtype)
        raise latentrt.InputError("stop here")

    monkeypatch.setattr("latentrt.cli._load", record)
    for extra in ([], ["--dtype", "bfloat16"]):
        assert main(["eval", str(coconut_dir), str(qa), *extra]) == 2
    assert main(["eval", str(folder), str(qa)]) == 2
    assert loaded == ["float32", "bfloat16", None]


def test_a_published_curriculum_resumes_at_an_epoch(coconut_dir, tmp_path):
    """``--start-epoch`` goes with ``--published-curriculum`` (its run.py's ``resume``, a setting apart from the
    curriculum: a preempted run continued from its checkpoint_N, loaded with --weights): the published
    curriculum from that epoch on, as the API's; past its last epoch it is the curriculum's own error."""
    import argparse
    from dataclasses import replace

    from latentrt.train.coconut import Curriculum
    from latentrt.train.command import curriculum_from_args

    names = ("published_curriculum", "curriculum", "max_stage", "thoughts_per_step", "epochs", "epochs_per_stage")
    given = dict.fromkeys(names + ("reset_optimizer", "uniform_prob"), None)
    args = argparse.Namespace(**{**given, "published_curriculum": "prosqa", "start_epoch": 45})
    assert curriculum_from_args(args) == replace(Curriculum.published("prosqa"), start_epoch=45)
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "is Tom a cat ?", "steps": ["Tom is a cat ."], "answer": "yes"}]))
    flags = ["--published-curriculum", "prosqa", "--batch-size", "1"]
    assert main(["train", str(coconut_dir), str(qa), "--out", str(tmp_path / "o"), *flags, "--start-epoch", "49"]) == 0
    info = json.loads((tmp_path / "o" / "training.json").read_text())
    assert info["curriculum"]["start_epoch"] == 49 and info["stage"] == 7  # (epoch 49 // 5, past max_stage 6)
    assert main(["train", str(coconut_dir), str(qa), "--out", str(tmp_path / "p"), *flags, "--start-epoch", "50"]) == 2
