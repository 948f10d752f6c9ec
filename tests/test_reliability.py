"""Reliability and security: safe and atomic checkpoints, batch = single under randomness, bounded configs and
requests, a clear error for every bad input."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import WORDS, CodeRunningPickle, tiny_coconut, tiny_recurrent
from safetensors.torch import save_file

import latentrt
import latentrt.checkpoint as checkpoint
import latentrt.kernels as kernels
from latentrt.backends import get_backend
from latentrt.checkpoint import save_checkpoint
from latentrt.errors import CheckpointError, ConfigError, InputError
from latentrt.families import build_model, parse_config
from latentrt.train.coconut import Curriculum, train_coconut
from latentrt.train.common import TrainOptions
from latentrt.train.data import build_tokenizer, generate_dataset
from latentrt.train.recurrent import train_recurrent

TOK = build_tokenizer()
RECORDS = generate_dataset(8, (1, 2), seed=1)
HERE = Path(__file__).parent


def _recurrent():
    from _fault_train import CONFIG

    return build_model(parse_config(CONFIG), seed=0)


def _gpt2():
    ids = {k: TOK.token_to_id(t) for k, t in (("latent_id", "<|latent|>"), ("start_latent_id", "<|start-latent|>"))}
    ids["end_latent_id"] = TOK.token_to_id("<|end-latent|>")
    cfg = dict(model_type="gpt2", n_embd=32, n_head=2, n_layer=2, n_positions=256, vocab_size=TOK.get_vocab_size())
    return build_model(parse_config(dict(cfg, **ids)), seed=0)


def _same_weights(a, b) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def _crash_on(monkeypatch, point: str, occurrence: int) -> None:
    """The ``occurrence``-th time a save reaches ``point``, stop as a kill there would (nothing tidied)."""
    seen = {"n": 0}
    real = checkpoint._step

    def step(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == occurrence:
                raise checkpoint.SimulatedCrash(name)
        real(name)

    monkeypatch.setattr(checkpoint, "_step", step)


# ------------------------------------------------------------------------------ resuming, safely and exactly
def test_resume_never_runs_code_from_the_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=2, batch_size=2, progress=False, out=str(out)))
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "step": 2, "payload": CodeRunningPickle(marker)}, out / "trainer_state.pt")
    with pytest.raises(
        CheckpointError, match=r"as a plain trainer state: (?i:unsupported global).*no code in them runs"
    ):
        train_recurrent(
            _recurrent(), TOK, RECORDS, TrainOptions(steps=3, batch_size=2, progress=False), resume=str(out)
        )
    assert not marker.exists()


def test_resume_names_a_folder_that_is_no_trainer_checkpoint(tmp_path):
    """resume= a model folder without a trainer state (save_checkpoint's), or with a plain file of another
    shape: each named before anything trains."""
    out = tmp_path / "ckpt"
    train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=2, batch_size=2, progress=False, out=str(out)))
    resume = lambda: train_recurrent(  # noqa: E731
        _recurrent(), TOK, RECORDS, TrainOptions(steps=3, batch_size=2, progress=False), resume=str(out)
    )
    torch.save({"step": 2, "weights": torch.zeros(2)}, out / "trainer_state.pt")  # plain data, no format
    with pytest.raises(CheckpointError, match="trainer_state.pt is not a latentrt trainer state"):
        resume()
    (out / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="has no trainer_state.pt: not a training checkpoint to resume from"):
        resume()


SAVE_STEPS = ["begin", "config-written", "weights-written", "written", "synced", "previous-moved", "new-moved", "done"]


@pytest.mark.parametrize("point", SAVE_STEPS)
def test_a_crash_anywhere_in_a_save_resumes_to_the_same_weights(tmp_path, monkeypatch, point):
    """Saving every 2 of 6 steps, a crash at ``point`` of the second save leaves a complete checkpoint (the
    first or the second); resuming from it ends with the uninterrupted run's weights, bit for bit."""
    opts = dict(steps=6, batch_size=2, progress=False, warmup=2)
    straight = _recurrent()
    train_recurrent(straight, TOK, RECORDS, TrainOptions(**opts))
    out = tmp_path / "ckpt"
    _crash_on(monkeypatch, point, occurrence=2)
    with pytest.raises(checkpoint.SimulatedCrash):
        train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(**opts, out=str(out), save_every=2))
    monkeypatch.undo()
    if point == "previous-moved":  # the folder is aside, the new one not in yet: loading it says where it is
        with pytest.raises(CheckpointError, match=r"does not exist .*an interrupted save left '.*\.ckpt\.previous'"):
            latentrt.load(out)
    resumed = _recurrent()
    train_recurrent(resumed, TOK, RECORDS, TrainOptions(**opts, out=str(out), save_every=2), resume=str(out))
    _same_weights(straight, resumed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "an interrupted save left files behind"
    assert json.loads((out / "training.json").read_text())["step"] == 6


def test_weights_and_trainer_state_from_different_saves_are_refused(tmp_path):
    out = tmp_path / "ckpt"
    train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=2, batch_size=2, progress=False, out=str(out)))
    older = (out / "trainer_state.pt").read_bytes()
    train_recurrent(
        _recurrent(), TOK, RECORDS, TrainOptions(steps=4, batch_size=2, progress=False, out=str(out), overwrite=True)
    )
    (out / "trainer_state.pt").write_bytes(older)
    with pytest.raises(CheckpointError, match="different saves"):
        train_recurrent(
            _recurrent(), TOK, RECORDS, TrainOptions(steps=5, batch_size=2, progress=False), resume=str(out)
        )


def test_resuming_with_another_model_or_optimiser_grouping_says_so(tmp_path):
    """Resuming another family's (or shape's) checkpoint, or with another recipe's parameter groups, is a
    CheckpointError in a line (it was torch's list of every tensor, or its optimizer ValueError)."""
    out = tmp_path / "ckpt"
    opts = dict(steps=2, batch_size=2, progress=False)
    train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(**opts, out=str(out)))
    with pytest.raises(
        CheckpointError,
        match=r"holds another model's weights \(\d+ of the model's tensors missing, "
        r"e\.g\. 'transformer\.wpe\.weight'; \d+ tensors it does not have",
    ):
        train_coconut(_gpt2(), TOK, RECORDS, TrainOptions(**dict(opts, steps=4)), Curriculum("cot"), resume=str(out))
    from _fault_train import CONFIG

    wider = build_model(parse_config(dict(CONFIG, intermediate_size=2 * CONFIG["intermediate_size"])), seed=0)
    with pytest.raises(CheckpointError, match=r"\d+ of another shape, e\.g\. '.*mlp.*': \[\d+, \d+\] saved"):
        train_recurrent(wider, TOK, RECORDS, TrainOptions(**dict(opts, steps=3)), resume=str(out))
    with pytest.raises(CheckpointError, match=r"optimizer state does not fit .* saved with decay_everything=False"):
        regrouped = TrainOptions(**dict(opts, steps=3), decay_everything=True)
        train_recurrent(_recurrent(), TOK, RECORDS, regrouped, resume=str(out))


@pytest.mark.parametrize(
    "cur",
    [
        Curriculum("coconut", max_stage=1),  # 3 stages, 2 steps each
        Curriculum("coconut", max_stage=1, epochs=3, epochs_per_stage=1),  # the published schedule: epochs
    ],
)
def test_coconut_resume_is_exact(tmp_path, monkeypatch, cur):
    opts = dict(steps=6, batch_size=2, progress=False, warmup=1)
    straight = _gpt2()
    train_coconut(straight, TOK, RECORDS, TrainOptions(**opts), cur)
    out = tmp_path / "ckpt"
    _crash_on(monkeypatch, "synced", occurrence=2)  # mid-stage 1 (saves after steps 1 (every), 2 (stage end), ...)
    with pytest.raises(checkpoint.SimulatedCrash):
        train_coconut(_gpt2(), TOK, RECORDS, TrainOptions(**opts, out=str(out), save_every=1), cur)
    monkeypatch.undo()
    resumed = _gpt2()
    train_coconut(resumed, TOK, RECORDS, TrainOptions(**opts, out=str(out), save_every=1), cur, resume=str(out))
    _same_weights(straight, resumed)


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """A training process killed with SIGKILL several times (seeded moments, many mid-save: it saves after
    every step) always resumes, and finishes with the uninterrupted run's weights."""
    from _fault_train import run

    out = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    rng = random.Random(1234)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_fault_train.py"), str(out)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert proc.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = subprocess.run(
        [sys.executable, str(HERE / "_fault_train.py"), str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0 and "done" in res.stdout, res.stderr[-2000:]
    finished = latentrt.load(out, device="cpu")
    _same_weights(run(None), finished)


# ------------------------------------------------------------------------------ output folders
def test_output_folder_rules(tmp_path):
    opts = dict(batch_size=2, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "generation_config.json").write_text('{"eos_token_id": 5}')
    (busy / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    start = time.perf_counter()
    with pytest.raises(InputError, match="already holds files"):
        train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=10**6, out=str(busy), **opts))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=10**6, out=str(a_file), **opts))
    with pytest.raises(InputError, match="cannot be written: a save writes beside it"):  # (root writes anywhere)
        train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=10**6, out=str(a_file / "run"), **opts))
    assert time.perf_counter() - start < 5, "the output folder must be checked before training"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file"]  # the write probe left nothing
    from latentrt.train.checkpoints import check_output_folder

    if Path("/proc/self").is_dir():  # a folder that exists but takes no new one, even from root: the write probe
        with pytest.raises(InputError, match="out='/proc/latentrt-run' cannot be written: a save writes beside it"):
            check_output_folder("/proc/latentrt-run", None, False)
    check_output_folder(str(busy), str(busy), False)  # resuming the run in it
    with pytest.raises(InputError, match="already holds files"):  # resuming another run into it
        check_output_folder(str(busy), str(tmp_path / "file"), False)
    train_recurrent(_recurrent(), TOK, RECORDS, TrainOptions(steps=1, out=str(busy), overwrite=True, **opts))
    left = sorted(p.name for p in busy.iterdir())
    assert left == ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "training.json"]
    info = json.loads((busy / "training.json").read_text())
    assert info["world_size"] == 1 and info["command"] and info["options"]["out"] == str(busy)


def test_builtin_trainer_writes_a_new_folder_unless_told(tmp_path, monkeypatch, capsys):
    """It writes into --out (the package's own folder only with --overwrite-builtin); a bad flag is an error
    naming it before anything is trained or written (a --steps of 0 was the default's 1,500 steps)."""
    from latentrt.checkpoint import BUILTIN_DIR
    from latentrt.train import builtin

    shipped = (BUILTIN_DIR / "recurrent" / "model.safetensors").read_bytes()
    monkeypatch.setattr(builtin, "generate_dataset", lambda n, d, seed: generate_dataset(32, d, seed=seed))
    builtin.main(["--only", "recurrent", "--steps", "2", "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "recurrent" / "model.safetensors").is_file()
    info = json.loads((tmp_path / "mine" / "recurrent" / "training.json").read_text())
    assert f"--out {tmp_path / 'mine'}" in info["command"]
    capsys.readouterr()
    bad = {
        ("--out", str(BUILTIN_DIR)): "--out is the package's built-in folder: pass --overwrite-builtin",
        ("--steps", "0"): "--steps must be an integer >= 1, got 0",
        ("--threads", "0"): "--threads must be an integer >= 1, got 0",
        ("--seed", "-1"): r"--seed must be an integer in \[0, 2\*\*63 - 1\], got -1",
        ("--only", "coconut", "--steps", "4"): "--steps 4 is fewer than the Coconut curriculum's 5 stages",
    }
    for flags, message in bad.items():
        argv = ["--only", "recurrent", "--steps", "2", "--out", str(tmp_path / "bad"), *flags]
        assert builtin.main(argv) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(f"latentrt: error: {message}.*\n", err), err
    assert (BUILTIN_DIR / "recurrent" / "model.safetensors").read_bytes() == shipped
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------ batch = single
PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [20, 21, 22, 23]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_equals_single_with_sampling_and_random_initial_states(backend):
    """Sequence i of a batch with seed s equals the sequence alone with seed s + i (latentrt/sampling.py)."""
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    model = tiny_recurrent(seed=5)
    model.backend = get_backend(backend, model)
    kw = dict(max_new_tokens=3, num_steps=5, temperature=1.3, top_k=12, seed=100, adaptive=True)
    kw.update(exit_criterion="latent-diff", exit_threshold=0.3, return_logits=True)  # init_scale 1.0 (random)
    batch = latentrt.generate(model, PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        alone = latentrt.generate(model, p, **dict(kw, seed=100 + i))
        assert batch.tokens[i] == alone.tokens and batch.steps[i] == alone.steps
        assert torch.allclose(batch.logits[i], alone.logits, atol=1e-5)
    assert len({tuple(t) for t in batch.tokens}) > 1


@pytest.mark.parametrize("init_scale", [1.0, 0.0])
def test_a_padded_prompt_run_position_by_position_in_continuous_mode_starts_as_alone(init_scale):
    """``adaptive_prefill`` with ``continuous``: a left-padded prompt's first real position draws its own initial
    state, as alone (it took its padding's final state and drew nothing, so its generator and every later
    sample went otherwise: a soak found it, tools/soak.py); the unpadded row was right."""
    model = tiny_recurrent(seed=5)
    kw = dict(max_new_tokens=4, num_steps=5, adaptive_prefill=True, continuous=True, init_scale=init_scale)
    kw.update(temperature=1.3, seed=100, return_logits=True)
    batch = latentrt.generate(model, PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        alone = latentrt.generate(model, p, **dict(kw, seed=100 + i))
        assert (batch.tokens[i], batch.steps[i], batch.prefill_steps[i]) == (
            alone.tokens,
            alone.steps,
            alone.prefill_steps,
        )
        assert torch.allclose(batch.logits[i], alone.logits, atol=1e-5)


def test_coconut_batch_equals_single_with_sampling():
    model = tiny_coconut(seed=4)
    prompts = [[5, 6, 7, 2, 4, 4, 3, 9], [8, 2, 4, 3], [5, 6, 7, 8, 9, 10, 2, 4, 4, 4, 3]]
    kw = dict(max_new_tokens=5, temperature=1.0, seed=7)
    batch = latentrt.generate(model, prompts, **kw)
    for i, p in enumerate(prompts):
        assert batch.tokens[i] == latentrt.generate(model, p, **dict(kw, seed=7 + i)).tokens


# ------------------------------------------------------------------------------ bounded configs and requests
def test_sizes_that_cannot_fit_are_named_before_allocating(recurrent_dir):
    for field, value in (("vocab_size", 10**9), ("n_layers_in_recurrent_block", 10**6), ("n_embd", 2**20)):
        with pytest.raises(ConfigError, match=r"the weights .* need [\d.]+ GB, more than the [\d.]+ GB available"):
            over = {field: value, "padded_vocab_size": value} if field == "vocab_size" else {field: value}
            latentrt.load(recurrent_dir, device="cpu", **over)
    with pytest.raises(ConfigError, match=r"^the weights need [\d.]+ GB, more than the [\d.]+ GB available"):
        build_model(parse_config(dict(json.loads((recurrent_dir / "config.json").read_text()), n_embd=2**20)))
    model = latentrt.load(recurrent_dir, device="cpu", block_size=10**8)  # RoPE tables grow on demand
    assert model.rope_cos.shape[0] < 10**5
    with pytest.raises(InputError, match=r"the KV cache .* need [\d.]+ GB, more than the [\d.]+ GB available on cpu$"):
        latentrt.generate(model, [5, 6], num_steps=10**7, max_new_tokens=4)
    # too many prompts at once: the error says what to do instead
    too_many = r"\(400000 sequences x 10 positions, .* available on cpu; give fewer prompts a call, or latentrt.serve"
    with pytest.raises(InputError, match=too_many):
        latentrt.generate(model, [[5, 6]] * 400_000, num_steps=4000, max_new_tokens=8)


def test_generation_config_eos_list_stops_on_every_id(tmp_path):
    save_checkpoint(tiny_recurrent(seed=5), tmp_path, tie_key="lm_head.weight")  # it answers 38 37 15 31 ...
    kw = dict(max_new_tokens=6, num_steps=3, init_scale=0.0)
    free = latentrt.generate(latentrt.load(tmp_path, device="cpu"), [5, 6, 7], default_stops=False, **kw).tokens
    for eos, cut in (([free[1], free[3]], 2), ([free[3], 999], 4)):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = latentrt.load(tmp_path, device="cpu")
        said = [str(w.message) for w in caught if "eos_token_id" in str(w.message)]
        outside = "generation_config.json: eos_token_id 999 is not in the vocabulary (ids 0 to 39)"
        assert len(said) == (999 in eos) and all(outside in m for m in said)
        assert latentrt.generate(model, [5, 6, 7], **kw).tokens == free[:cut]
    for bad in (
        "[1, 2",
        '"text"',
        "[1]",
        '{"eos_token_id": [1, "x"]}',
        '{"eos_token_id": true}',
        '{"eos_token_id": []}',
    ):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(ConfigError, match="generation_config.json"):
            latentrt.load(tmp_path, device="cpu")


def test_an_eos_outside_the_vocabulary_is_said_at_load_and_ends_nothing(tmp_path):
    """An eos id the model cannot produce (HF loads such configs: a tiny GPT-2 keeps GPT2Config's 50256) is
    said once at load, from config.json or generation_config.json, and left out of the default stops: an id
    past int64 failed every generate() with an OverflowError; a negative one was a stop no token can be."""
    save_checkpoint(tiny_recurrent(seed=5), tmp_path, tie_key="lm_head.weight")
    kw = dict(max_new_tokens=6, num_steps=3, init_scale=0.0)
    free = latentrt.generate(latentrt.load(tmp_path, device="cpu"), [5, 6, 7], default_stops=False, **kw).tokens
    config = json.loads((tmp_path / "config.json").read_text())
    for eos in (10**30, -1, 40):
        (tmp_path / "config.json").write_text(json.dumps(dict(config, eos_token_id=eos)))
        with pytest.warns(
            UserWarning, match=rf"config.json: eos_token_id {eos} is not in the vocabulary \(ids 0 to 39\)"
        ):
            model = latentrt.load(tmp_path, device="cpu")
        assert latentrt.generate(model, [5, 6, 7], **kw).tokens == free
    with pytest.warns(UserWarning) as said:  # the warning points at the caller's load(), not at latentrt
        latentrt.load(tmp_path, device="cpu")
    assert [w.filename for w in said] == [__file__]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[2], 10**20]}))
    with pytest.warns(UserWarning, match=r"generation_config.json: eos_token_id 100000000000000000000 is not in"):
        model = latentrt.load(tmp_path, device="cpu")
    assert latentrt.generate(model, [5, 6, 7], **kw).tokens == free[:3]


def test_generation_config_sampling_defaults_fill_the_unset_options(tmp_path, monkeypatch):
    """A checkpoint's generation_config.json sampling fields, read as the published Huginn sampler reads
    them (do_sample gates temperature / top_k / top_p / min_p; repetition_penalty always), are generate()'s
    defaults: a call that sets none of them samples as if it had passed them; one given as a keyword (or set
    on a GenerateOptions) wins; without do_sample only the penalty applies; a bad value is a ConfigError."""
    from latentrt.options import GenerateOptions
    from latentrt.records import as_records

    save_checkpoint(tiny_recurrent(seed=5), tmp_path, tie_key="lm_head.weight")
    kw = dict(max_new_tokens=10, num_steps=3, init_scale=0.0, default_stops=False, seed=7)
    plain = latentrt.load(tmp_path, device="cpu")
    assert plain.generation_defaults == {}
    cfg = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 1.0, "repetition_penalty": 1.3}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    model = latentrt.load(tmp_path, device="cpu")
    assert model.generation_defaults == {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.3}
    given = dict(temperature=0.7, top_k=5, repetition_penalty=1.3)
    sampled = latentrt.generate(model, [5, 6, 7], **kw).tokens
    assert sampled == latentrt.generate(plain, [5, 6, 7], **kw, **given).tokens
    assert sampled != latentrt.generate(plain, [5, 6, 7], **kw).tokens  # the defaults change the answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint's top_k under the caller's greedy: not the caller's doing
        greedy = latentrt.generate(model, [5, 6, 7], temperature=0, **kw).tokens  # a keyword wins
    assert greedy == latentrt.generate(plain, [5, 6, 7], temperature=0, repetition_penalty=1.3, **kw).tokens
    opts = GenerateOptions(top_k=2)  # set on an options object: it wins too
    assert (
        latentrt.generate(model, [5, 6, 7], opts, **kw).tokens
        == latentrt.generate(plain, [5, 6, 7], **kw, **dict(given, top_k=2)).tokens
    )
    import latentrt.evaluate as evaluation  # scoring stays greedy: what its generate() call ran

    ran = []
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: ran.append(latentrt.generate(*a, **k)) or ran[-1])
    recs = as_records([dict(question=" ".join(WORDS[i : i + 4]), steps=[], answer=WORDS[i]) for i in range(3)])
    evaluation.evaluate(model, recs, num_steps=3, init_scale=0.0, progress=False, max_new_tokens=6)
    prompts = [model.tokenizer.encode(r.question).ids for r in recs]
    greedy = latentrt.generate(plain, prompts, num_steps=3, init_scale=0.0, max_new_tokens=6, repetition_penalty=1.3)
    assert ran[0].tokens == greedy.tokens
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(cfg, do_sample=False)))
    assert latentrt.load(tmp_path, device="cpu").generation_defaults == {"repetition_penalty": 1.3}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": None}))
    assert latentrt.load(tmp_path, device="cpu").generation_defaults == {"temperature": 1.0}  # as `if temperature:`
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "max_length": 3}))
    short = latentrt.load(tmp_path, device="cpu")  # HF's and vLLM's default length; max_length is not read
    assert short.generation_defaults == {"max_new_tokens": 5}
    assert len(latentrt.generate(short, [5, 6, 7], num_steps=3, default_stops=False).tokens) == 5
    assert len(latentrt.generate(short, [5, 6, 7], num_steps=3, default_stops=False, max_new_tokens=7).tokens) == 7
    bad_files = [({"do_sample": True, "top_p": 2}, "top_p"), ({"repetition_penalty": -1}, "repetition")]
    bad_files += [({"max_new_tokens": 0}, "max_new_tokens")]
    for bad, field in bad_files + [({"do_sample": "yes"}, "do_sample")]:
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=f"generation_config.json: {field}"):
            latentrt.load(tmp_path, device="cpu")
    # what HF's generate would apply but no default reads is named, not ignored silently (neutral values: quiet)
    unread = {"no_repeat_ngram_size": 3, "min_new_tokens": 2, "num_beams": 1, "stop_strings": [], "typical_p": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(cfg, **unread)))
    with pytest.warns(UserWarning, match=r"not read as defaults: min_new_tokens=2, no_repeat_ngram_size=3 \(HF's"):
        assert latentrt.load(tmp_path, device="cpu").generation_defaults == model.generation_defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(cfg, num_beams=1, stop_strings=None)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latentrt.load(tmp_path, device="cpu")


# ------------------------------------------------------------------------------ bad input, clear errors
def test_bad_generate_arguments():
    model = tiny_recurrent()
    cases = [
        (dict(seed=2**64), "seed"),
        (dict(seed=-1), "seed"),
        (dict(stop=1.5), "stop entries"),
        (dict(hooks=3), "hooks must be a callable"),
        (dict(init_scale=float("inf")), "init_scale"),
        (dict(init_scale=float("nan")), "init_scale"),
        (dict(top_p=True), "top_p"),
        (dict(continuous="yes"), "continuous must be True or False"),
        (dict(adaptive="yes"), "adaptive must be True or False"),
        (dict(check_criterion_every_n_steps=0), "check_criterion_every_n_steps"),
        # the backends count iterations in 32 bits: a larger count is refused, not wrapped (found by tools.fuzz)
        (dict(num_steps=2**31), r"num_steps must be an integer in \[1, 2\*\*31 - 1\], got 2147483648"),
        (
            dict(check_criterion_every_n_steps=2**40, adaptive=True),
            r"check_criterion_every_n_steps must be an integer in \[1, 2\*\*31 - 1\]",
        ),
        # an int past a float's range is that infinity (math.isfinite and torch raised OverflowError: tools.fuzz)
        (dict(temperature=10**400), "temperature must be a finite number >= 0, got inf"),
        (dict(repetition_penalty=-(10**400)), "repetition_penalty must be a finite number, got -inf"),
        (
            dict(adaptive=True, exit_threshold=10**400),
            "exit_threshold must be a finite number, got inf",
        ),  # (float | None)
        # bools taken as truthy before (tools.fuzz): strict="abc" was strict, return_logits=1.5 returned logits
        (dict(strict="abc"), "strict must be True or False, got 'abc'"),
        (dict(return_logits=1.5), "return_logits must be True or False, got 1.5"),
        (dict(min_steps=-1, adaptive=True), "min_steps must be an integer >= 0, got -1"),
        (dict(do_not_exit_in_prefill=1), "do_not_exit_in_prefill must be True or False"),
        (dict(adaptive_prefill="no"), "adaptive_prefill must be True or False"),
        (dict(init_scale=-0.5), "init_scale must be a finite number >= 0"),
        (dict(max_new_token=3), "did you mean 'max_new_tokens'"),
        # transformers' generate() keywords: what to give instead
        (dict(do_sample=True), r"'do_sample': latentrt samples when temperature > 0 \(do_sample=False is"),
        (dict(max_length=9, num_beams=1), r"'max_length': give max_new_tokens .*; 'num_beams': latentrt has no beam"),
        (dict(num_return_sequences=2), r"'num_return_sequences': give the prompt n times in a batch, with seed=s"),
        (dict(output_hidden_states=True), r"'output_hidden_states': hooks=\[...\] see every latent state"),
        (dict(stopping_criteria=[print]), r"'stopping_criteria': stop=\[ids, 'strings'\] ends sequences"),
        (dict(prefix_allowed_tokens_fn=print), r"'prefix_allowed_tokens_fn': logits_processors=\[...\] see each"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(InputError, match=msg):
            latentrt.generate(model, [5, 6], **kwargs)
    with pytest.raises(InputError, match="out of range"):
        latentrt.generate(model, [5, 2**63])
    with pytest.raises(InputError, match="not valid Unicode"):
        latentrt.generate(model, "every \ud800 cat")
    # a large int is the float it stands for (temperature=10**30 divided a tensor: "int too big to convert")
    huge = latentrt.generate(model, [5, 6], max_new_tokens=3, temperature=10**30, seed=1, init_scale=10**3)
    assert (
        huge.tokens
        == latentrt.generate(model, [5, 6], max_new_tokens=3, temperature=1e30, seed=1, init_scale=1e3).tokens
    )
    with pytest.raises(InputError, match="init_scale must be a finite number >= 0, got 1000"):
        model.logits(torch.tensor([[5, 6]]), init_scale=10**400)
    tiny_t = latentrt.generate(model, [5, 6], max_new_tokens=3, temperature=1e-45, seed=1, init_scale=0.0)
    assert tiny_t.tokens == latentrt.generate(model, [5, 6], max_new_tokens=3, init_scale=0.0).tokens
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(InputError, match="attention_mask shape"):
        model.logits(ids, attention_mask=torch.ones(1, 2))
    with pytest.raises(InputError, match="left padding"):
        model.logits(ids, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(InputError, match="left padding"):
        tiny_coconut().logits(ids, attention_mask=torch.tensor([[1, 1, 0]]))
    # thoughts beyond the context are refused before the markers are built (num_thoughts=2**63 raised OverflowError,
    # 10**9 made a list of a billion ids first: tools.fuzz)
    for k in (97, 2**63):
        with pytest.raises(InputError, match=r"num_thoughts must be an integer in \[0, 96 \(the model's context\)\]"):
            latentrt.generate(tiny_coconut(), [5, 6], num_thoughts=k)
    # model.logits checks its initial-state arguments as generate() does (a NaN scale gave finite-looking logits)
    for kwargs, msg in [
        (dict(init_scale=float("nan")), "init_scale must be a finite number >= 0"),
        (dict(init_scale="x"), "init_scale must be a finite number"),
        (dict(seed=-1), "seed must be an integer in"),
        (dict(seed="1"), "seed must be an integer in"),
    ]:
        with pytest.raises(InputError, match=msg):
            model.logits(ids, **kwargs)
    # a Coconut model names a recurrent-depth argument as such, and an unknown one is Python's TypeError (it named
    # every unknown keyword a recurrent-depth argument)
    with pytest.raises(InputError, match=r"arguments \['init_scale', 'num_steps'\] apply to recurrent-depth models"):
        tiny_coconut().logits(ids, num_steps=2, init_scale=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        tiny_coconut().logits(ids, bogus=1)


def test_bad_load_arguments_and_files(recurrent_dir, tmp_path):
    for kw, msg in [
        (dict(device="banana"), "not a device"),
        (dict(device=2**64), "device 18446744073709551616 is not a device torch knows"),  # (torch's ValueError)
        (dict(dtype=torch.int32), "unsupported dtype"),
        # a TypeError from pathlib, and a revision ignored whatever its type (found by tools.fuzz)
        (dict(weights=3), r"weights must be a file's path \(a str or os.PathLike\), got int"),
        (dict(weights=[tmp_path]), r"weights must be a file's path \(a str or os.PathLike\), got list"),
        (dict(revision=3), r"revision must be a branch, tag or commit name \(a str\), got 3"),
    ]:
        with pytest.raises(InputError, match=msg):
            latentrt.load(recurrent_dir, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            latentrt.load(recurrent_dir, device="cuda")
    from latentrt.loader import parse_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 1
    with pytest.MonkeyPatch.context() as mp:  # (a machine with `count` GPUs, whatever this one has)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: count)
        assert parse_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
        with pytest.raises(InputError, match=rf"device 'cuda:{count}': only {count} CUDA device\(s\) here"):
            parse_device(f"cuda:{count}")
    from latentrt.loader import parse_dtype  # the default: bf16 on a GPU (Huginn-0125's dtype), fp32 on the CPU

    assert (
        parse_dtype(None, torch.device("cuda")) == torch.bfloat16
        and parse_dtype(None, torch.device("cpu")) == torch.float32
    )
    assert (
        parse_dtype("BF16", torch.device("cpu")) == torch.bfloat16 and parse_dtype(torch.half, "cpu") == torch.float16
    )
    for field, value in (
        ("norm_eps", float("inf")),
        ("norm_eps", 0.0),
        ("rope_base", -1.0),
        ("rope_base", float("nan")),
    ):
        with pytest.raises(ConfigError, match=field):
            latentrt.load(recurrent_dir, device="cpu", **{field: value})
    (recurrent_dir / "config.json").write_bytes(b'{"model_type": "huginn_raven", "name": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        latentrt.load(recurrent_dir, device="cpu")
    with pytest.raises(CheckpointError, match="no built-in model '../recurrent'"):
        latentrt.load("builtin:../recurrent")
    with pytest.raises(CheckpointError, match=r"no built-in model ''; the built-in models are \['coconut'"):
        latentrt.load("builtin:")


@pytest.mark.parametrize(
    "weight_map,msg",
    [
        (["model.safetensors"], "weight_map"),
        ({"x": "../outside.safetensors"}, "must be files in the folder"),
        ({"x": "model-00001.safetensors", "y": 1}, "names shard 1: shards must be files"),  # was a TypeError
        ({"x": ["a.safetensors"]}, r"names shard \['a.safetensors'\]"),
    ],
)
def test_bad_shard_index(tmp_path, weight_map, msg):
    save_checkpoint(tiny_recurrent(), tmp_path, max_shard_bytes=20_000, tie_key="lm_head.weight")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({"x": torch.zeros(1)}, str(tmp_path.parent / "outside.safetensors"))
    with pytest.raises(CheckpointError, match=msg):
        latentrt.load(tmp_path, device="cpu")


def test_stream_result_survives_a_second_iteration_and_hooks_see_a_copy_of_the_mask():
    model = tiny_recurrent(seed=2)
    stream = latentrt.generate(model, [5, 6], max_new_tokens=3, num_steps=2, init_scale=0.0, stream=True)
    first = list(stream)
    assert list(stream) == [] and stream.result is not None and stream.result.tokens == [e.tokens for e in first]

    def meddle(ev):
        ev.active[:] = False  # a hook's copy: the engine keeps running every sequence

    out = latentrt.generate(model, PROMPTS, max_new_tokens=2, num_steps=3, init_scale=0.0, hooks=meddle)
    assert all(s == [3, 3] for s in out.steps)


def test_kv_bytes_match_latentrt_info(recurrent_dir, capsys):
    from latentrt.cli import main

    model = latentrt.load(recurrent_dir, device="cpu")
    out = latentrt.generate(model, PROMPTS, max_new_tokens=3, num_steps=8, kv_sharing="ring-4", init_scale=0.0)
    main(["info", str(recurrent_dir), "--steps", "8"])
    per_token = int(
        next(ln for ln in capsys.readouterr().out.splitlines() if "ring-4" in ln).split()[1].replace(",", "")
    )
    positions = max(len(p) for p in PROMPTS) + 2  # the last sampled token is never run
    assert out.kv_bytes == len(PROMPTS) * positions * per_token


def test_prompt_forms_a_user_has_at_hand():
    """An integer numpy array (a tokenizer's return_tensors="np") is a prompt as its tensor is, with its mask;
    an attention_mask beside a list prompt is refused (it was ignored without a word); text given to
    model.logits is named as text."""
    import numpy as np

    model = tiny_recurrent(seed=2)
    kw = dict(max_new_tokens=3, init_scale=0.0)
    ids = [[0, 5, 6, 7], [8, 9, 10, 11]]
    mask = [[0, 1, 1, 1], [1, 1, 1, 1]]
    want = latentrt.generate(model, torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    got = latentrt.generate(model, np.array(ids), attention_mask=np.array(mask), **kw)
    assert got.tokens == want.tokens == latentrt.generate(model, [[5, 6, 7], [8, 9, 10, 11]], **kw).tokens
    assert latentrt.generate(model, np.array([5, 6, 7], dtype=np.int32), **kw).tokens == want.tokens[0]
    with pytest.raises(InputError, match="input_ids must hold integer token ids, got dtype torch.float64"):
        latentrt.generate(model, np.array([5.0, 6.0]), **kw)
    for prompt in ([[5, 6], [7, 8]], [5, 6], "every cat"):
        with pytest.raises(InputError, match="attention_mask applies to a tensor prompt"):
            latentrt.generate(model, prompt, attention_mask=torch.ones(2, 2), **kw)
    for text in ("every cat", ["every cat"]):
        with pytest.raises(InputError, match="input_ids must be token ids, not text: encode it first"):
            model.logits(text)
    for empty in ([[]], torch.zeros(1, 0, dtype=torch.long), np.array([[]])):  # (it named [[]]'s float dtype)
        with pytest.raises(InputError, match=r"input_ids is empty \(shape \(1, 0\)\)"):
            model.logits(empty)


def test_every_malformed_ids_or_mask_is_named():
    """The prompt and mask shapes a caller gets wrong, each a message naming it: ragged or non-integer ids,
    ids of three dimensions, a mask that is no tensor, holds other values than 0/1, or has a hole; text for
    a model without a tokenizer. A 1-D mask beside a single 1-D prompt is that prompt's row (as its ids)."""
    model = tiny_recurrent(seed=2)
    model.tokenizer = None
    kw = dict(max_new_tokens=2, init_scale=0.0)
    ids = torch.tensor([[5, 6, 7]])
    cases = [
        (lambda: model.logits([[5, 6], [7]]), "input_ids must be a tensor or nested list of ints in range"),
        (
            lambda: model.logits(torch.ones(1, 1, 3, dtype=torch.long)),
            r"input_ids must be \[batch, seq\] with seq >= 1",
        ),
        (lambda: model.logits(ids, attention_mask="all"), "attention_mask must be a tensor of 0/1"),
        (lambda: model.logits(ids, attention_mask=torch.tensor([[0.5, 1, 1]])), "must hold 0/1 \\(or bool\\) values"),
        (lambda: model.logits(ids, attention_mask=torch.tensor([[1, 0, 1]])), r"left-padding mask \(0...0 1...1"),
        (lambda: latentrt.generate(model, [[5, 6], [7, "8"]], **kw), "token ids must be integers"),
        (lambda: latentrt.generate(model, [[5, 6], [7, True]], **kw), "token ids must be integers"),  # no bools
        (lambda: latentrt.generate(model, [5, -1, 40], **kw), r"token id out of range \[0, 40\): \[-1, 40\]"),
        (
            lambda: model.logits(torch.tensor([[True, False]])),
            "input_ids must hold integer token ids, got dtype torch.bool",
        ),
        (lambda: model.logits(torch.tensor([[5, 40]])), r"token id out of range \[0, 40\).*: min 5, max 40"),
        (lambda: latentrt.generate(model, "every cat", **kw), "this model has no tokenizer.json: pass token ids"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
    one_row = latentrt.generate(model, torch.tensor([0, 5, 6]), attention_mask=torch.tensor([0, 1, 1]), **kw)
    assert one_row.tokens == latentrt.generate(model, [5, 6], **kw).tokens


def test_a_path_the_file_system_refuses_to_look_up_is_named(tmp_path, capsys):
    """A name too long for the file system: pathlib's exists / is_file / is_dir raise OSError for it (they say
    False only for a path that is not there), which reached users as a bare OSError (the CLI's "unexpected
    failure" line). Each path a user gives names it: the model, weights=, a data file, a checkpoint or
    training output folder."""
    from latentrt.checkpoint import save_checkpoint
    from latentrt.cli import main
    from latentrt.errors import CheckpointError
    from latentrt.records import read_records_file
    from latentrt.train.checkpoints import check_output_folder

    long = str(tmp_path / ("a" * 300))
    cases = [
        (lambda: latentrt.load(long), CheckpointError, "cannot look up checkpoint folder"),
        (lambda: latentrt.load("builtin:recurrent", weights=long), CheckpointError, "cannot look up weights file"),
        (lambda: save_checkpoint(tiny_recurrent(), long), CheckpointError, "cannot look up checkpoint folder"),
        (lambda: read_records_file(long + ".json"), InputError, "cannot read data file"),
        (lambda: check_output_folder(long, None, False), InputError, "cannot look up out="),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message + ".*: File name too long"):
            call()
    assert main(["eval", "builtin:recurrent", long + ".json"]) == 2
    assert "cannot read data file" in capsys.readouterr().err
