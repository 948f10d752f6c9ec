"""Trainers: depth sampling, loss masking, curriculum, gradient through thoughts, resume, DDP, data errors."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import recurrent_config, rel_err, tiny_coconut, tiny_recurrent, transformers_with_torch

import latentrt
from latentrt.errors import InputError
from latentrt.families import build_model
from latentrt.records import as_records
from latentrt.train.coconut import CoconutLoss, Curriculum, collate, encode, train_coconut
from latentrt.train.common import TrainOptions
from latentrt.train.data import build_tokenizer, generate_dataset, generate_problem, load_records, save_records
from latentrt.train.examples import encode_qa
from latentrt.train.recurrent import RecurrentLoss, sample_depth, train_recurrent

TOK = build_tokenizer()


def _recurrent():
    return build_model(recurrent_config(vocab_size=TOK.get_vocab_size(), block_size=256), seed=0)


def _gpt2(**over):
    """A tiny GPT-2 for the Coconut trainer (HF's dropout defaults unless ``over`` sets them)."""
    from latentrt.families import parse_config

    cfg = parse_config(
        dict(
            **over,
            model_type="gpt2",
            n_embd=32,
            n_head=2,
            n_layer=2,
            n_positions=256,
            vocab_size=TOK.get_vocab_size(),
            latent_id=TOK.token_to_id("<|latent|>"),
            start_latent_id=TOK.token_to_id("<|start-latent|>"),
            end_latent_id=TOK.token_to_id("<|end-latent|>"),
        )
    )
    return build_model(cfg, seed=0)


def test_depth_sampling_matches_published_distribution():
    g = torch.Generator().manual_seed(0)
    draws = [sample_depth(8, 3, g) for _ in range(4000)]
    total = [a + b for a, b in draws]
    assert abs(sum(total) / len(total) - 9.0) < 0.25  # E[Poisson(tau) + 1] = mean_recurrence + 1
    assert all(b == min(3, a + b) for a, b in draws) and min(total) >= 1
    # a backprop depth above the mean: the published log-mean is ln(max(mean - k, 0) + k) = ln(k)
    deep = [sum(sample_depth(2, 6, g)) for _ in range(4000)]
    assert abs(sum(deep) / len(deep) - 7.0) < 0.25


def test_generator_problems_are_sound():
    import random

    rng = random.Random(1)
    for d in range(1, 7):
        rec = generate_problem(rng, d)
        assert len(rec.steps) == d == rec.difficulty
        assert all(step in rec.question for step in rec.steps)
        person = rec.answer.split()[0]
        assert rec.steps[0].startswith(person) and rec.answer.endswith(rec.steps[-1].split()[-1])
        assert 0 not in TOK.encode(rec.question + " ### " + rec.answer).ids  # every word is in the vocabulary


def _facts_and_options(question: str):
    """(the facts as (subject, class) pairs, the person asked about, the two options) of a generated question."""
    *facts, ask = [f.strip() + "." for f in question.rstrip("?").split(".") if f.strip()]
    pairs = []
    for fact in facts:
        m = re.fullmatch(r"(\w+) is a (\w+)\.", fact) or re.fullmatch(r"Every (\w+) is a (\w+)\.", fact)
        assert m, fact
        pairs.append(m.groups())
    who, first, second = re.fullmatch(r"Is (\w+) a (\w+) or (\w+)\.", ask).groups()
    return facts, pairs, who, (first, second)


def test_generated_problems_are_answerable_one_way_only():
    """The answer's concept is reachable from the person through the facts and the other option is not (the two
    chains are disjoint, the distractors end in dead ends); the two people differ; names are subjects of 'X is a'
    facts, concepts of 'Every X is a'; the options' order and the facts' order are drawn; ``distractors`` counts
    the dead-end facts; a dataset cycles through its difficulties."""
    import random

    from latentrt.train.data import CONCEPTS, NAMES

    rng = random.Random(7)
    orders, leading = set(), set()
    for d in (1, 2, 3, 4) * 5:
        rec = generate_problem(rng, d)
        facts, pairs, who, options = _facts_and_options(rec.question)
        for fact, (subject, _) in zip(facts, pairs):
            assert (subject in NAMES) != fact.startswith("Every") and (subject in NAMES or subject in CONCEPTS), fact
        people = {subject for subject, _ in pairs if subject in NAMES}
        assert len(people) == 2 and who in people
        reach, todo = set(), [who]
        while todo:
            node = todo.pop()
            for subject, cls in pairs:
                if subject == node and cls not in reach:
                    reach.add(cls)
                    todo.append(cls)
        target = rec.answer.split()[-1].rstrip(".")
        assert rec.answer == f"{who} is a {target}." and target in options
        assert target in reach and [o for o in options if o != target][0] not in reach, rec.question
        orders.add(options.index(target))
        leading.add(facts.index(rec.steps[0]))
    assert orders == {0, 1} and len(leading) > 2  # (where the first step stands varies)
    for n in (0, 3):
        facts, *_ = _facts_and_options(generate_problem(rng, 2, distractors=n).question)
        assert len(facts) == 2 * 2 + n  # two chains of two facts, n dead ends
    assert [r.difficulty for r in generate_dataset(5, (1, 3))] == [1, 3, 1, 3, 1]
    with pytest.raises(InputError, match="difficulty must be >= 1, got 0"):
        generate_problem(rng, 0)


def test_qa_loss_covers_only_the_answer():
    rec = generate_dataset(1)[0]
    ids, labels = encode_qa(TOK, rec, 0)
    n_q = len(TOK.encode(rec.question).ids)
    assert labels[:n_q] == [-100] * n_q and labels[n_q:] == ids[n_q:]
    assert TOK.decode(ids[n_q:]).startswith("###")


def test_curriculum_layout_and_masking():
    rec = generate_problem(__import__("random").Random(3), 3)
    cur = Curriculum("coconut", max_stage=2, thoughts_per_step=2)
    lat, start, end = (TOK.token_to_id(t) for t in ("<|latent|>", "<|start-latent|>", "<|end-latent|>"))
    for stage, (skip, k) in zip(cur.stages(), [(0, 0), (1, 2), (2, 4), (3, 4)]):
        pre, post, labels = encode(TOK, rec, cur, stage)
        assert pre[-k - 1 :] == [start] + [lat] * k
        assert post[0] == end and labels[0] == -100 and labels[1:] == post[1:]
        remaining = TOK.decode(post[1:])
        for i, step in enumerate(rec.steps):
            assert (step.rstrip(".") in remaining) == (i >= skip)
    assert Curriculum("cot").stages() == [0]
    rows = [encode(TOK, rec, cur, 3), encode(TOK, generate_dataset(1)[0], cur, 3)]
    ids, mask, labels = collate(rows, 1, "cpu", lat)
    cols = [(row == lat).nonzero()[:, 0].tolist() for row in ids]
    assert cols[0] == cols[1] and len(cols[0]) == 4  # thoughts share columns: one pass per thought


def _byte_level_tokenizer(markers: bool = True):
    """A GPT-2-like byte-level BPE with the Coconut markers (or, as GPT-2's, without them and with a '<<'
    token): a newline is a token of its own, as in GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|start-latent|>", "<|latent|>", "<|end-latent|>"][: 4 if markers else 1]
    corpus = [r.question + "\n" + "\n".join(r.steps) + "\n### " + r.answer for r in generate_dataset(20)]
    corpus += [] if markers else ["<< " * 8]
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte: any text encodes
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_curriculum_uses_the_published_text_format():
    """Coconut's dataset.py: question + '\\n', each step + '\\n', '### ' + answer, eos; the markers and
    thoughts between question and steps; the evaluation prompt is the question + '\\n' and the markers.
    A byte-level tokenizer keeps the newlines (the built-in word-level one drops them)."""
    from latentrt.decode.coconut import thought_prompt

    tok = _byte_level_tokenizer()
    enc = lambda text: tok.encode(text).ids  # noqa: E731
    ids = tok.token_to_id
    rec = generate_problem(__import__("random").Random(5), 3)
    start, lat, end, eos = ids("<|start-latent|>"), ids("<|latent|>"), ids("<|end-latent|>"), ids("<|endoftext|>")
    assert enc("\n") and enc(rec.question + "\n") != enc(rec.question)
    cur = Curriculum("coconut", max_stage=2, thoughts_per_step=1)
    pre, post, labels = encode(tok, rec, cur, 1)
    steps = [t for s in rec.steps[1:] for t in enc(s + "\n")]
    answer = enc("### " + rec.answer) + [eos]
    assert pre == enc(rec.question + "\n") + [start, lat]
    assert post == [end] + steps + answer and labels == [-100] + steps + answer
    assert encode(tok, rec, Curriculum("cot"), 0)[1] == [t for s in rec.steps for t in enc(s + "\n")] + answer
    assert encode(tok, rec, Curriculum("nocot"), 0) == (enc(rec.question + "\n"), answer, answer)
    assert thought_prompt(tok, rec.question, 2) == enc(rec.question + "\n") + [start, lat, lat, end]


def test_generate_appends_thoughts_in_the_published_text_format():
    """generate() on a text prompt puts the newline Coconut's data has before the markers it appends
    (``question + "\\n"``, then ``<|start-latent|>``, k ``<|latent|>``, ``<|end-latent|>``: the eval prompt),
    not a second one, none when the text carries markers or when no markers are appended, and never
    changes a token-id prompt."""
    from latentrt.decode.coconut import thought_prompt
    from latentrt.engine import Generation
    from latentrt.families import build_model, parse_config
    from latentrt.options import GenerateOptions

    tok = _byte_level_tokenizer()
    ids = tok.token_to_id
    markers = dict(latent_id=ids("<|latent|>"), start_latent_id=ids("<|start-latent|>"))
    cfg = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, n_positions=128, vocab_size=tok.get_vocab_size())
    model = build_model(parse_config(dict(cfg, **markers, end_latent_id=ids("<|end-latent|>"))), seed=0)
    model.tokenizer = tok
    ran = lambda prompt, **kw: Generation(model, prompt, GenerateOptions(max_new_tokens=1, **kw)).batch.ids.tolist()  # noqa: E731
    q = generate_problem(__import__("random").Random(5), 2).question
    assert ran(q, num_thoughts=2) == [thought_prompt(tok, q, 2)]
    assert ran(q + "\n", num_thoughts=0) == [thought_prompt(tok, q, 0)]  # its own newline, not a second
    tail = [ids(m) for m in ("<|start-latent|>", "<|latent|>", "<|end-latent|>")]
    assert ran([q, "Is Tom a cat?"], num_thoughts=1)[1][-5:] == tok.encode("?\n").ids + tail  # each text
    written = q + "\n<|start-latent|><|latent|><|end-latent|>"
    assert ran(written) == [tok.encode(written).ids]  # markers in the text: the text as written
    assert ran(q) == [tok.encode(q).ids]  # no training.json: no thoughts appended, no newline
    assert ran(tok.encode(q).ids, num_thoughts=1) == [tok.encode(q).ids + tail]  # ids: as given


def test_a_plain_gpt2_gets_the_latent_markers_as_coconuts_run_py_adds_them(tmp_path):
    """run.py on GPT-2: the three markers appended to the tokenizer (start, end, latent), the embedding and
    the tied head grown by three rows copied from '<<', the ids in the config; train_coconut does it for a
    plain GPT-2 and its checkpoint loads with the markers and thinks."""
    from latentrt.families import parse_config
    from latentrt.train.coconut import add_latent_markers

    tok = _byte_level_tokenizer(markers=False)
    vocab, target = tok.get_vocab_size(), tok.token_to_id("<<")
    cfg = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, n_positions=256, vocab_size=vocab)
    model = build_model(parse_config(cfg), seed=0)
    before = model.transformer.wte.weight.detach().clone()
    assert target is not None and model.marker_ids == (None, None, None)
    assert add_latent_markers(model, tok)
    names = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
    assert [tok.token_to_id(n) for n in names] == [vocab, vocab + 1, vocab + 2]
    assert model.marker_ids == (vocab, vocab + 2, vocab + 1) and model.config.vocab_size == vocab + 3
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:vocab], before) and all(torch.equal(wte[vocab + i], before[target]) for i in range(3))
    assert model.lm_head.weight is wte and not add_latent_markers(model, tok)  # tied; a second call: nothing
    plain = build_model(parse_config(cfg), seed=1)
    tok = _byte_level_tokenizer(markers=False)
    opts = TrainOptions(steps=3, batch_size=2, progress=False, out=str(tmp_path / "ckpt"))
    train_coconut(plain, tok, generate_dataset(4, (1,)), opts, Curriculum("coconut", max_stage=1))
    loaded = latentrt.load(tmp_path / "ckpt", device="cpu")
    assert loaded.marker_ids == (vocab, vocab + 2, vocab + 1)
    assert latentrt.generate(loaded, "Tom is a cat.", max_new_tokens=2).num_thoughts == 1
    no_angle = _byte_level_tokenizer(markers=True)  # markers already in the tokenizer, not in the model
    with pytest.raises(InputError, match="cannot add the latent markers|no '<<' token"):
        add_latent_markers(build_model(parse_config(dict(cfg, vocab_size=no_angle.get_vocab_size()))), no_angle)


def test_the_pause_mode_trains_latent_tokens_as_tokens_and_leaves_the_model_so():
    """``pause`` (the pause-as-thought baseline): a plain GPT-2 gets the markers as for ``coconut``, every forward
    runs the <|latent|> tokens as ordinary tokens (no continuous thought), and the trained model is left in eval
    mode running them so (``continuous_thoughts``), as its checkpoint will load."""
    from latentrt.families import parse_config

    tok = _byte_level_tokenizer(markers=False)
    cfg = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, n_positions=256, vocab_size=tok.get_vocab_size())
    model = build_model(parse_config(cfg), seed=0)
    flags, real = [], model.run_prompt

    def spy(*args, **kwargs):
        flags.append(kwargs.get("continuous"))
        return real(*args, **kwargs)

    model.run_prompt = spy
    train_coconut(model, tok, generate_dataset(4, (2,)), TrainOptions(steps=3, batch_size=2, progress=False),
                  Curriculum("pause", max_stage=1))  # fmt: skip
    assert model.config.vocab_size == cfg["vocab_size"] + 3 and tok.token_to_id("<|latent|>") is not None
    assert flags and set(flags) == {False}
    assert not model.training and model.continuous_thoughts is False


def test_evaluation_uses_the_published_answer_rule():
    """Coconut's run.py: the decoded prompt and output after the last '#', commas removed, against the
    answer without commas; an output without '#' is judged on the whole decoded text (so it fails)."""
    from latentrt.evaluate import extract_answer, is_correct

    tok = _byte_level_tokenizer()
    prompt = tok.encode("Is Tom a cat?\n").ids
    assert is_correct(tok, prompt, tok.encode("Tom is a cat.\n### 1,000 cats").ids, "1000 cats")
    assert is_correct(tok, prompt, tok.encode("## Tom is a cat.").ids, "Tom is a cat.")
    assert not is_correct(tok, prompt, tok.encode("Tom is a cat.").ids, "Tom is a cat.")  # no '#'
    assert extract_answer("a ### b, c #d ") == "d"
    # the answer's commas go too; special tokens (the eos the model stopped on) are skipped
    assert is_correct(tok, prompt, tok.encode("### 1000 cats").ids, "1,000 cats")
    eos = tok.token_to_id("<|endoftext|>")
    assert is_correct(tok, prompt, tok.encode("### Tom is a cat.").ids + [eos], "Tom is a cat.")


def test_the_published_coconut_optimiser():
    """Coconut's run.py: AdamW(model.parameters(), lr=1e-4, weight_decay=0.01) at a constant rate, no
    clipping (a large gradient reaches the step unscaled)."""
    from latentrt.train.common import begin_step, finish_step, lr_at, make_optimizer

    opts = TrainOptions.coconut_published(steps=10)
    assert {lr_at(step, opts) for step in range(10)} == {1e-4}
    model = _gpt2()
    opt = make_optimizer(model, opts)
    decayed = [g for g in opt.param_groups if g["params"]]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == 0.01 and decayed[0]["betas"] == (0.9, 0.999)
    assert sum(p.numel() for p in decayed[0]["params"]) == sum(p.numel() for p in model.parameters())
    loss = 1e4 * sum(p.sum() for p in model.parameters())  # every parameter's gradient: 1e4
    begin_step(opt, 0, opts)
    loss.backward()
    norm = finish_step(model, opt, opts)
    assert norm > 1e4 and all(torch.all(p.grad == 1e4) for p in model.parameters())
    clipped = TrainOptions(steps=10)
    assert (
        lr_at(0, clipped) < lr_at(49, clipped) and make_optimizer(model, clipped).param_groups[1]["weight_decay"] == 0
    )
    for bad in (dict(grad_clip=0.0), dict(min_lr_ratio=0.0)):
        with pytest.raises(InputError, match=next(iter(bad))):
            TrainOptions(**bad).validate()


def test_the_schedules_clipping_and_parameter_groups_by_hand():
    """Cosine: linear warmup to lr over ``warmup`` steps (lr / warmup at step 0), then down to min_lr_ratio x lr,
    held there past ``steps`` (a longer resumed run). Warmup-stable-decay (transformers' shape) likewise ends at
    min_lr_ratio x lr. The norm is clipped to grad_clip and the unclipped one returned; qk_bias (a matrix) does
    not decay; Python's, NumPy's and torch's generators are seeded; autocast is off unless asked for."""
    import contextlib
    import random

    import numpy as np

    from latentrt.train.common import autocast, finish_step, lr_at, make_optimizer, seed_all

    cosine = TrainOptions(steps=10, warmup=4, lr=1.0, min_lr_ratio=0.1)
    got = [lr_at(step, cosine) for step in range(13)]
    assert got[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and got[9] > 0.1 and got[10:] == [pytest.approx(0.1)] * 3
    wsd = TrainOptions(steps=10, schedule="wsd", warmup=2, cooldown=2, lr=1.0, min_lr_ratio=0.1)
    got = [lr_at(step, wsd) for step in range(13)]
    assert got == pytest.approx([0.1, 0.55, *[1.0] * 7, 0.55, 0.1, 0.1, 0.1])
    model = _recurrent()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e4)
    opts = TrainOptions(grad_clip=0.5)
    norm = finish_step(model, make_optimizer(model, opts), opts)
    clipped = torch.stack([p.grad.norm() for p in model.parameters()]).norm()
    assert norm > 1e4 and clipped == pytest.approx(0.5, rel=1e-5)
    decay, no_decay = (g["params"] for g in make_optimizer(model, opts).param_groups)
    qk = [p for n, p in model.named_parameters() if n.endswith("qk_bias")]
    assert qk and all(p.dim() >= 2 for p in qk)
    assert all(any(p is q for q in no_decay) for p in qk) and not any(p is q for p in qk for q in decay)
    with pytest.raises(InputError, match="betas must be two numbers"):
        TrainOptions(betas=(0.9, 0.95, 0.99)).validate()
    draws = []
    for _ in range(2):
        seed_all(7)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    assert isinstance(autocast(torch.device("cuda"), enabled=False), contextlib.nullcontext)


def test_the_published_huginn_fine_tuning_optimiser_and_schedule():
    """Huginn's finetuning_simple_example.py: AdamW(lr 5e-7, no weight decay, betas (0.9, 0.95)) under
    transformers' get_scheduler("warmup_stable_decay", 10% warmup, 10% decay, min_lr_ratio 0.001) — the
    oracle — stepped once per optimizer step; batch 32 in micro-batches of 2."""
    transformers = transformers_with_torch()
    from latentrt.train.common import lr_at, make_optimizer

    for steps in (50, 7, 1):
        opts = TrainOptions.huginn_published(steps=steps)
        opts.validate()
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=5e-7, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
        warm = -(-steps // 10)
        sched = transformers.get_scheduler(
            name="warmup_stable_decay",
            optimizer=opt,
            num_warmup_steps=warm,
            num_training_steps=steps,
            scheduler_specific_kwargs={"num_decay_steps": warm, "min_lr_ratio": 0.001},
        )
        for step in range(steps):
            assert lr_at(step, opts) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-20), (steps, step)
            opt.step()
            sched.step()
    assert (opts.batch_size, opts.micro_batch_size, opts.weight_decay, opts.betas) == (32, 2, 0.0, (0.9, 0.95))
    groups = [g for g in make_optimizer(_recurrent(), opts).param_groups if g["params"]]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    bad_options = [
        (dict(batch_size=4, micro_batch_size=3), "micro_batch_size must divide batch_size=4"),
        (dict(micro_batch_size=0), "micro_batch_size must divide"),
        (dict(schedule="linear"), "schedule must be 'cosine' or 'wsd'"),
        (dict(schedule="wsd", cooldown=-1), "cooldown must be an integer >= 0"),
    ]
    for bad, message in bad_options:
        with pytest.raises(InputError, match=message):
            TrainOptions(**bad).validate()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(steps="3"), "steps must be an integer >= 1, got '3'"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(batch_size=(2,)), "batch_size must be an integer"),
        (dict(micro_batch_size=1.0), "micro_batch_size must divide"),
        (dict(lr=float("inf")), "lr must be a finite number"),
        (dict(lr="1e-3"), "lr must be a finite number"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
        (dict(weight_decay=True), "weight_decay must be a finite number"),
        (dict(warmup=1.5), "warmup must be an integer >= 0"),
        (dict(cooldown=[1]), "cooldown must be an integer >= 0"),
        (dict(schedule=["cosine"]), "schedule must be 'cosine' or 'wsd'"),
        (dict(grad_clip="1"), "grad_clip must be a number"),
        (dict(grad_clip=0), r"grad_clip must be > 0 or None"),
        (dict(min_lr_ratio=(0.1,)), "min_lr_ratio must be a number in"),
        (dict(min_lr_ratio=0.0), r"min_lr_ratio must be in \(0, 1\]"),
        (dict(betas=0.9), "betas must be two numbers in"),
        (dict(betas=(1.5, 0.9)), "betas must be two numbers in"),
        (dict(betas=(0.9, float("nan"))), "betas must be two numbers in"),
        (dict(seed=-1), "seed must be an integer in"),
        (dict(seed=float("nan")), "seed must be an integer in"),
        (dict(save_every="10"), "save_every must be an integer >= 0"),
        (dict(log_every=-1), "log_every must be an integer >= 0"),
        (dict(decay_everything="yes"), "decay_everything must be True or False"),
        (dict(checkpoint_activations=1), "checkpoint_activations must be True or False"),
        (dict(out=3), "out must be a folder path or None"),
    ],
)
def test_train_options_of_a_wrong_type_are_named_before_training(bad, message):
    """Each option's type and range is checked up front: before, a string lr or a tuple batch size failed as a
    TypeError inside the optimizer, betas (1.5, 0.9) as torch's ValueError, an infinite lr trained to NaN."""
    with pytest.raises(InputError, match=message):
        train_recurrent(_recurrent(), TOK, generate_dataset(2, (1,)), TrainOptions(progress=False, **bad))


def test_micro_batches_add_up_to_the_batchs_gradient(monkeypatch):
    """Gradient accumulation: at one depth and a zero initial state (so nothing differs but the split), a
    batch of 4 in micro-batches of 2 or 1 gives the whole batch's gradient norm, loss and weights; each
    micro-batch draws its own depth, the first the one a whole-batch step draws."""
    import latentrt.train.recurrent as recurrent

    recs = generate_dataset(8, (1,))  # answers of equal length: equal token counts per micro-batch
    assert len({len(encode_qa(TOK, r, 0)[0]) - len(TOK.encode(r.question).ids) for r in recs}) == 1
    depths = []
    monkeypatch.setattr(recurrent, "sample_depth", lambda *a: depths.append(sample_depth(*a)) or (1, 2))
    runs = {}
    for micro in (None, 2, 1):
        model = _recurrent()
        model.initial_state = lambda e, *args: torch.zeros_like(e)
        opts = TrainOptions(steps=3, batch_size=4, micro_batch_size=micro, lr=1e-2, warmup=0, progress=False)
        runs[micro] = (train_recurrent(model, TOK, recs, opts), model.state_dict())
    (log, weights) = runs[None]
    for micro in (2, 1):
        other_log, other_weights = runs[micro]
        for a, b in zip(log, other_log):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert b["depth"] == [3] * (4 // micro)
        for name, w in weights.items():
            assert rel_err(other_weights[name], w) < 1e-3, (micro, name)  # Adam on near-zero gradients
    assert depths[:3] == depths[3:9:2] == depths[9:21:4]  # the first micro-batch: the whole batch's depth
    assert len(set(depths[9:13])) > 1  # the others draw their own


def test_coconut_micro_batches_add_up_to_the_batchs_gradient():
    """The published gradient_accumulation_steps: a batch of 4 in micro-batches of 2 gives the whole batch's
    loss and gradient norm (answers of equal length: equal token counts per micro-batch; no dropout, whose
    masks are drawn per micro-batch)."""
    recs = generate_dataset(8, (1,))
    logs = []
    no_dropout = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    for micro in (None, 2):
        opts = TrainOptions(steps=3, batch_size=4, micro_batch_size=micro, lr=1e-2, warmup=0, progress=False)
        logs.append(train_coconut(_gpt2(**no_dropout), TOK, recs, opts, Curriculum("nocot")))
    for whole, split in zip(*logs):
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)


def test_coconut_records_fit_alone_though_their_batch_is_wider():
    """Positions count each row's own tokens, so a record that fits n_positions trains even when its batch,
    left-padded to align the first thoughts and right-padded after, is wider (it was refused mid-run); the
    padded batch's loss is the token-weighted mean of the rows' own. A record too long at a stage it would
    train on is named before any step (it failed only when a batch drew it)."""

    fact, short = "Alex is a wumpus . ", "Alex is a wumpus ."
    wide = [
        dict(question=fact * 40 + "Is Alex a wumpus ?", steps=[short], answer=short),
        dict(question="Is Alex a wumpus ?", steps=[short, fact * 40], answer=short),
    ]
    cur = Curriculum("coconut", max_stage=1)
    rows = [encode(TOK, r, cur, 1) for r in as_records(wide)]  # one thought each: the first thoughts aligned
    assert all(len(pre) + len(post) <= 256 for pre, post, _ in rows)
    lat = TOK.token_to_id("<|latent|>")
    ids, mask, labels = collate(rows, 1, "cpu", lat)
    assert ids.shape[1] > 256
    from latentrt.hooks import HookList

    model = _gpt2()
    loss_fn = CoconutLoss(model, HookList(None), True)
    with torch.no_grad():
        batch = loss_fn(ids, mask, labels)
        alone = [loss_fn(*collate([r], 1, "cpu", lat)) for r in rows]
    counts = [sum(t != -100 for t in labels_of_row) for _, _, labels_of_row in rows]  # the loss's tokens
    want = sum(loss * n for loss, n in zip(alone, counts)) / sum(counts)
    assert float(batch) == pytest.approx(float(want), rel=1e-5)
    opts = TrainOptions(steps=3, batch_size=2, warmup=0, progress=False)
    log = train_coconut(model, TOK, wide, opts, cur)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)

    too_long = dict(question=fact * 40 + "Is Alex a wumpus ?", steps=[fact * 40], answer=short)
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        InputError,
        match=r"records: record 2 is \d+ tokens long at stage 0, more than the model's "
        r"n_positions=256",
    ):
        train_coconut(model, TOK, [*wide, too_long], opts, cur)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:the curriculum skips the first")
def test_coconut_lengths_are_checked_at_the_stages_the_run_can_train():
    """A record too long only at stage 0 trains on a published schedule that skips stage 0's epochs; with
    ``uniform_prob`` any stage may be drawn for it, so it is refused; an invalid curriculum is named."""
    fact, short = "Alex is a wumpus . ", "Alex is a wumpus ."
    long_at_0 = [dict(question=fact * 40 + "Is Alex a wumpus ?", steps=[fact * 40], answer=short)] * 2
    opts = TrainOptions(steps=1, batch_size=2, progress=False)
    skip_0 = Curriculum("coconut", max_stage=1, epochs=3, start_epoch=1)
    log = train_coconut(_gpt2(), TOK, long_at_0, opts, skip_0)
    assert [e["stage"] for e in log] == [1, 2]
    with pytest.raises(InputError, match=r"record 0 is \d+ tokens long at stage 0"):
        train_coconut(_gpt2(), TOK, long_at_0, opts, dataclasses.replace(skip_0, uniform_prob=0.5))
    with pytest.raises(InputError, match="max_stage must be an integer >= 0"):
        train_coconut(_gpt2(), TOK, long_at_0, opts, Curriculum("coconut", max_stage=-1))


def test_gradient_flows_through_the_thought_chain():
    model = _gpt2()
    rec = generate_dataset(2, (2,))
    cur = Curriculum("coconut", max_stage=2)
    ids, mask, labels = collate([encode(TOK, r, cur, 3) for r in rec], 1, "cpu", TOK.token_to_id("<|latent|>"))
    seen = []

    def keep(ev):
        ev.state.retain_grad()
        seen.append(ev.state)

    from latentrt.hooks import HookList

    loss = CoconutLoss(model, HookList(keep), True)(ids, mask, labels)
    loss.backward()
    assert len(seen) == 2
    for thought in seen:  # both thoughts affect the loss only through the continuous chain
        assert thought.grad is not None and thought.grad.abs().sum() > 0
    pause = CoconutLoss(model, HookList(None), False)(ids, mask, labels)
    assert not torch.isclose(loss, pause)


def test_coconut_loss_is_the_shifted_cross_entropy_of_the_models_logits():
    """CoconutLoss is GPT-2's language-model loss (the logits at position t against the label at t + 1, -100
    ignored) over the prompt run as the model runs it: its <|latent|> positions as continuous thoughts, or with
    ``continuous=False`` (the pause mode) as ordinary tokens, the model's logits either way (dropout off)."""
    model = _gpt2().eval()
    rec = generate_dataset(1, (2,), seed=5)[0]
    cur = Curriculum("coconut", max_stage=2)
    ids, mask, labels = collate([encode(TOK, rec, cur, 2)], 1, "cpu", TOK.token_to_id("<|latent|>"))
    assert (ids == TOK.token_to_id("<|latent|>")).sum() == 2 and (labels[0] != -100).sum() > 1
    for continuous in (True, False):
        model.continuous_thoughts = continuous  # (what model.logits runs the latent positions as)
        logits = model.logits(ids)[0]
        want = torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100)
        got = CoconutLoss(model, None, continuous)(ids, mask, labels)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), continuous
    assert not torch.allclose(CoconutLoss(model, None, True)(ids, mask, labels), got)


def test_recurrent_training_learns_saves_and_loads(tmp_path):
    model = _recurrent()
    recs = generate_dataset(4, (1,))
    log = train_recurrent(
        model, TOK, recs, TrainOptions(steps=40, batch_size=4, lr=3e-3, warmup=5, progress=False, out=str(tmp_path))
    )
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    loaded = latentrt.load(tmp_path, device="cpu")
    ids = torch.tensor([encode_qa(TOK, recs[0], 0)[0]])
    assert (
        rel_err(loaded.logits(ids, num_steps=3, init_scale=0.0), model.logits(ids, num_steps=3, init_scale=0.0)) < 1e-6
    )
    assert (tmp_path / "trainer_state.pt").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_frozen_parameters_stay_frozen_and_a_frozen_model_is_refused():
    """Parameters a user froze (requires_grad=False: fine-tuning only the core block, say) are neither trained
    nor unfrozen, by either trainer (the trainers unfroze every parameter, silently training all of them), a
    plain GPT-2's grown embedding included; a model with nothing to train is a clear error."""
    model = _recurrent()
    model.transformer.wte.requires_grad_(False)
    model.transformer.prelude.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(frozen) > 5 and trained
    train_recurrent(model, TOK, generate_dataset(4, (1,)), TrainOptions(steps=2, batch_size=2, progress=False))
    after = dict(model.named_parameters())
    assert all(not after[n].requires_grad and torch.equal(after[n], p) for n, p in frozen.items())
    assert all(after[n].requires_grad for n in trained) and any(
        not torch.equal(after[n], p) for n, p in trained.items()
    )
    gpt2, cur = _gpt2(), Curriculum("coconut", max_stage=0)
    gpt2.transformer.wte.requires_grad_(False)  # (tied: the head too)
    before = gpt2.transformer.wte.weight.detach().clone()
    train_coconut(gpt2, TOK, generate_dataset(2, (1,)), TrainOptions(steps=2, batch_size=2, progress=False), cur)
    assert not gpt2.transformer.wte.weight.requires_grad and torch.equal(gpt2.transformer.wte.weight, before)
    tok = _byte_level_tokenizer(markers=False)
    from latentrt.families import parse_config
    from latentrt.train.coconut import add_latent_markers

    for tied in (True, False):
        cfg = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, n_positions=256, vocab_size=tok.get_vocab_size(),
                   tie_word_embeddings=tied)  # fmt: skip
        plain = build_model(parse_config(cfg), seed=0)
        plain.transformer.wte.requires_grad_(False)
        assert add_latent_markers(plain, _byte_level_tokenizer(markers=False))
        assert not plain.transformer.wte.weight.requires_grad and plain.lm_head.weight.requires_grad == (not tied)
    model.requires_grad_(False)
    with pytest.raises(InputError, match="every parameter of the model is frozen"):
        train_recurrent(model, TOK, generate_dataset(4, (1,)), TrainOptions(steps=2, batch_size=2, progress=False))


def test_the_recurrent_trainers_log_saves_and_mode(tmp_path, monkeypatch):
    """Each step draws its own depth (a function of seed and step), logged as a number without micro-batches; a
    save every ``save_every`` steps (after steps 2 and 4 of 5) and at the end; the model in eval mode after;
    ``loss_on`` reaches the examples."""
    import latentrt.train.recurrent as rec

    saved = []
    monkeypatch.setattr(rec, "save_training", lambda model, opt, out, step, *a, **k: saved.append(step))
    model = _recurrent()
    opts = TrainOptions(steps=5, batch_size=2, save_every=2, out=str(tmp_path / "run"), progress=False)
    log = train_recurrent(model, TOK, generate_dataset(4, (1,)), opts)
    assert all(isinstance(e["depth"], int) for e in log) and len({e["depth"] for e in log}) > 1
    assert saved == [2, 4, 5] and not model.training
    with pytest.raises(InputError, match="loss_on"):
        train_recurrent(_recurrent(), TOK, generate_dataset(4, (1,)), opts, loss_on="everything")


def test_trainer_state_keeps_the_generators_and_what_the_run_adds(tmp_path, monkeypatch):
    """The trainer state restores Python's, NumPy's and torch's generators and returns the ``extra`` the trainer
    saved; training.json says whether torchrun started the run."""
    import random

    import numpy as np

    from latentrt.train.checkpoints import load_training, rng_state, save_training, set_rng_state
    from latentrt.train.common import make_optimizer

    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    model, opts = _recurrent(), TrainOptions(steps=1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    save_training(model, make_optimizer(model, opts), tmp_path, 3, opts, extra={"stage": 2})
    assert json.loads((tmp_path / "training.json").read_text())["torchrun"] is True
    assert load_training(tmp_path, model, None)["extra"] == {"stage": 2}


@pytest.mark.gpu
def test_training_on_the_gpu_in_bf16_is_anchored_on_fp32():
    """On a GPU the trainers run bf16 weights under bf16 autocast (``load``'s default dtype there): at one
    depth and a zero initial state the loss and gradient norm equal an fp32 CPU run's within bf16
    tolerance (on the CPU, bf16 under autocast: 3e-4 and 7e-4 relative)."""
    from latentrt.train.recurrent import RecurrentLoss, collate

    recs = generate_dataset(8, (1, 2))
    data = [encode_qa(TOK, r, TOK.token_to_id("<|endoftext|>")) for r in recs]
    results = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = _recurrent().to(device, dtype)
        model.initial_state = lambda e, *args: torch.zeros_like(e)
        ids, labels = collate(data, 1, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = RecurrentLoss(model)(ids, labels, 2, 2)
        loss.backward()
        norm = sum(p.grad.float().norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
        results.append((loss.item(), float(norm)))
    (loss32, norm32), (loss16, norm16) = results
    assert abs(loss16 - loss32) <= 2e-2 * loss32 and abs(norm16 - norm32) <= 5e-2 * norm32, results


@pytest.mark.gpu
def test_training_on_the_gpu_micro_batched_and_checkpointed_steps_stay_finite():
    """A few micro-batched bf16 steps of each trainer on the GPU, activation-checkpointed where that applies
    (recurrent depth: the Coconut trainer refuses it since 2e38506, which this test, then one GPU-only test,
    had not followed: the 2026-12-04 H200 run failed there)."""
    recs = generate_dataset(8, (1, 2))
    opts = TrainOptions(steps=3, batch_size=4, micro_batch_size=2, checkpoint_activations=True, progress=False)
    log = train_recurrent(_recurrent().to("cuda", torch.bfloat16), TOK, recs, opts)
    assert all(torch.isfinite(torch.tensor([e["loss"], e["grad_norm"]])).all() for e in log)
    opts = dataclasses.replace(opts, checkpoint_activations=False)
    log = train_coconut(_gpt2().to("cuda", torch.bfloat16), TOK, recs, opts, Curriculum("coconut", max_stage=1))
    assert all(torch.isfinite(torch.tensor([e["loss"], e["grad_norm"]])).all() for e in log)


@pytest.mark.gpu
def test_training_on_the_gpu_with_the_published_coconut_recipe_equals_the_cpu():
    """The published Coconut recipe trains fp32 weights without autocast (run.py's bf16: False): its GPU steps
    equal the CPU's within fp32 tolerance (no dropout: the devices draw different masks; on the CPU three
    steps move by 2e-7 under a 1e-6 weight perturbation, far inside 1e-4)."""
    recs = generate_dataset(8, (1, 2))
    losses = []
    for device in ("cpu", "cuda"):
        model = _gpt2(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0).to(device)
        published = TrainOptions.coconut_published(steps=3, batch_size=4, progress=False)
        losses.append([e["loss"] for e in train_coconut(model, TOK, recs, published, Curriculum("coconut", 1))])
    assert all(abs(g - c) <= 1e-4 * c for g, c in zip(losses[1], losses[0])), losses


def test_recurrent_batches_are_padded_as_the_published_script_pads_them(monkeypatch):
    """With the cut (``max_seq_length``, the huginn recipe's 128) every batch is max_seq_length + 1 columns wide,
    as the published script's padding="max_length" makes it (its random initial state is drawn over those
    positions: a narrower batch draws other numbers for the same tokens), at most the model's context; without
    the cut, a batch is as wide as its longest example. Padding changes no loss but through those draws."""
    import latentrt.train.recurrent as recurrent

    widths, real = [], recurrent.collate
    monkeypatch.setattr(recurrent, "collate", lambda *a: widths.append(real(*a)[0].shape[1]) or real(*a))
    recs = generate_dataset(4, (1, 2))
    longest = max(len(x) for x, _ in recurrent.training_examples(recs, TOK))
    for cut, want in ((60, {61}), (None, None), (1000, {256})):
        widths.clear()
        opts = TrainOptions(steps=2, batch_size=2, progress=False, max_seq_length=cut)
        train_recurrent(_recurrent(), TOK, recs, opts)
        assert len(widths) == 2 and (set(widths) == want if want else max(widths) <= longest), (cut, widths)
    model = _recurrent().train()
    data = [encode_qa(TOK, r, TOK.token_to_id("<|endoftext|>")) for r in recs[:2]]
    losses = []
    for width in (None, 64):
        torch.manual_seed(5)
        losses.append(RecurrentLoss(model)(*real(data, 1, "cpu", width), 2, 1).item())
    assert losses[0] != losses[1]  # (the same tokens and depth: only the initial state's draws differ)


def test_recurrent_resume_is_exact(tmp_path):
    recs = generate_dataset(8, (1, 2))
    straight = _recurrent()
    train_recurrent(straight, TOK, recs, TrainOptions(steps=6, batch_size=2, progress=False, warmup=2))
    first = _recurrent()
    train_recurrent(first, TOK, recs, TrainOptions(steps=3, batch_size=2, progress=False, warmup=2, out=str(tmp_path)))
    resumed = latentrt.load(tmp_path, device="cpu")
    train_recurrent(
        resumed, TOK, recs, TrainOptions(steps=6, batch_size=2, progress=False, warmup=2), resume=str(tmp_path)
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_recurrent_batches_are_shuffled_passes_over_the_records(monkeypatch):
    """Each step's batch comes from a shuffled pass over the records, as the published fine-tuning script's
    DataLoader makes them: an epoch takes every record once (the last batch short), a fresh shuffle per epoch;
    under torchrun each process takes its share of the order padded as DistributedSampler pads it. (Records
    were drawn at random with replacement: a 'pass' of steps left about a third unseen.)"""
    import latentrt.train.recurrent as recurrent
    from latentrt.train.common import epoch_batches
    from latentrt.train.examples import training_examples

    recs = generate_dataset(7, (1, 2))
    seen = []
    collate = recurrent.collate
    monkeypatch.setattr(recurrent, "collate", lambda ex, *a: seen.append(ex) or collate(ex, *a))
    log = train_recurrent(_recurrent(), TOK, recs, TrainOptions(steps=8, batch_size=3, progress=False))
    assert [e["epoch"] for e in log] == [1, 1, 1, 2, 2, 2, 3, 3] and [len(b) for b in seen] == [3, 3, 1] * 2 + [3, 3]
    every = sorted(map(str, training_examples(recs, TOK)))
    orders = []
    for epoch in range(2):
        drawn = [ex for batch in seen[3 * epoch : 3 * epoch + 3] for ex in batch]
        assert sorted(map(str, drawn)) == every, epoch  # every record once
        orders.append([every.index(str(ex)) for ex in drawn])
    assert orders[0] != orders[1]
    shares = [epoch_batches(7, 2, 0, 1, rank, 3) for rank in range(3)]
    assert [len(b) for b in shares[0]] == [2, 1] and all(len(s) == 2 for s in shares)  # 7 padded to 9: 3 each
    flat = sorted(i for share in shares for batch in share for i in batch)
    assert set(flat) == set(range(7)) and len(flat) == 9


def test_coconut_curriculum_trains_and_hooks_run(tmp_path):
    model = _gpt2()
    calls = []
    log = train_coconut(
        model,
        TOK,
        generate_dataset(6, (1, 2)),
        TrainOptions(steps=6, batch_size=3, progress=False, out=str(tmp_path)),  # 2 per stage
        Curriculum("coconut", max_stage=1),
        hooks=lambda ev: calls.append(ev.step),
    )
    assert [e["stage"] for e in log] == [0, 0, 1, 1, 2, 2]
    assert calls == [0] * 2 + [0] * 2  # one thought per step at stages 1 and 2
    assert latentrt.load(tmp_path, device="cpu").config.latent_id == TOK.token_to_id("<|latent|>")


def test_the_published_coconut_epoch_schedule():
    """Coconut's run.py: epoch e trains stage e // epochs_per_stage (every stage past max_stage is the final
    one); args/*_coconut.yaml: ProsQA / ProntoQA 6 stages x 5 epochs in 50, GSM8k 3 x 3 in 25 (2 thoughts)."""
    pros = Curriculum.published("prosqa")
    assert (pros.max_stage, pros.thoughts_per_step, pros.epochs) == (6, 1, 50)
    from latentrt.train.coconut import stage_steps

    assert stage_steps(10, 3) == [3, 3, 4] and stage_steps(6, 3) == [2, 2, 2]  # (the step schedule: remainder last)
    assert [pros.stage_of_epoch(e) for e in range(50)] == [min(e // 5, 7) for e in range(50)]
    gsm = Curriculum.published("gsm")
    assert [gsm.stage_of_epoch(e) for e in range(25)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 13
    assert gsm.thoughts_per_step == 2 and Curriculum.published("gsm", "cot").stage_of_epoch(20) == 0
    # gsm_coconut.yaml: resume 3 (it starts from a CoT-tuned model); gsm_cot.yaml: reset_optimizer False
    assert (gsm.start_epoch, gsm.reset_optimizer, pros.start_epoch, pros.reset_optimizer) == (3, True, 0, True)
    cot = Curriculum.published("gsm", "cot")
    assert (cot.epochs, cot.start_epoch, cot.reset_optimizer, cot.uniform_prob) == (25, 0, False, 0.0)
    for bad in (dict(epochs=0), dict(epochs=2, epochs_per_stage=0)):
        with pytest.raises(InputError, match=next(iter(bad)) if "per" not in str(bad) else "epochs_per_stage"):
            Curriculum(**bad).validate()
    with pytest.raises(InputError, match="no published Coconut curriculum"):
        Curriculum.published("mnist")


def test_coconut_epochs_pass_over_every_record_and_reset_the_optimizer(monkeypatch):
    """With ``Curriculum.epochs`` each epoch is one shuffled pass over the records (each once, in batches,
    the last short), on its stage's encoding, and the optimizer is made anew at every epoch (the published
    ``reset_optimizer``); the log says each step's epoch and stage."""
    import latentrt.train.coconut as coconut

    recs = generate_dataset(7, (1, 2))
    cur = Curriculum("coconut", max_stage=1, epochs=5, epochs_per_stage=2)
    seen, made = [], []
    collate, make = coconut.collate, coconut.make_optimizer
    monkeypatch.setattr(coconut, "collate", lambda ex, *a: seen.append(ex) or collate(ex, *a))
    monkeypatch.setattr(coconut, "make_optimizer", lambda *a: made.append(1) or make(*a))
    log = train_coconut(_gpt2(), TOK, recs, TrainOptions(steps=1, batch_size=3, progress=False), cur)
    assert [(e["epoch"], e["stage"]) for e in log] == [(ep + 1, min(ep // 2, 2)) for ep in range(5) for _ in range(3)]
    assert len(made) == 5 and [len(b) for b in seen] == [3, 3, 1] * 5
    orders = []
    for ep in range(5):
        drawn = [ex for batch in seen[3 * ep : 3 * ep + 3] for ex in batch]
        want = [encode(TOK, r, cur, min(ep // 2, 2)) for r in recs]
        assert sorted(map(str, drawn)) == sorted(map(str, want)), ep  # every record once, at its stage
        orders.append([want.index(ex) for ex in drawn])
    assert len({tuple(o) for o in orders}) > 1, "a fresh shuffle per epoch"


def _coconut_run(monkeypatch, cur, opts, recs):
    """train_coconut with the optimizers it makes and the examples of each batch recorded."""
    import latentrt.train.coconut as coconut

    seen, made = [], []
    collate, make = coconut.collate, coconut.make_optimizer
    monkeypatch.setattr(coconut, "collate", lambda ex, *a: seen.append(ex) or collate(ex, *a))
    monkeypatch.setattr(coconut, "make_optimizer", lambda *a: made.append(1) or make(*a))
    return train_coconut(_gpt2(), TOK, recs, opts, cur), seen, made


def test_coconut_step_schedule_takes_shuffled_passes_within_each_stage(monkeypatch):
    """On the step schedule each stage's steps take their batches from shuffled passes over the records (every
    record once per pass, the last batch short), not random draws with replacement."""
    recs = generate_dataset(5, (1, 2))
    cur = Curriculum("coconut", max_stage=0)  # stages 0 and 1 (final): 3 steps each, one pass of 2 + 2 + 1
    log, seen, _ = _coconut_run(monkeypatch, cur, TrainOptions(steps=6, batch_size=2, progress=False), recs)
    assert [e["stage"] for e in log] == [0, 0, 0, 1, 1, 1] and [len(b) for b in seen] == [2, 2, 1] * 2
    for stage in (0, 1):
        drawn = [ex for batch in seen[3 * stage : 3 * stage + 3] for ex in batch]
        assert sorted(map(str, drawn)) == sorted(str(encode(TOK, r, cur, stage)) for r in recs), stage


def test_coconut_segments_reshuffle_every_pass_and_stage_and_count_the_padded_share():
    """A stage's passes each draw a new order, and so does every stage (a seed per stage and pass, not one order
    repeated); under torchrun an epoch has as many steps as the largest share of the padded records (torch's
    DistributedSampler pads 5 records to 6 for 2 processes: 3 each, 2 batches of 2), on every process."""
    from latentrt.train.coconut import Segment, schedule
    from latentrt.train.common import epoch_batches

    opts = TrainOptions(steps=9, batch_size=2, seed=3, progress=False)
    passes = {}
    for stage in (0, 1):
        batches = [Segment(stage, 9).batches(5, opts, 0, 1, n) for n in range(9)]
        assert [len(b) for b in batches] == [2, 2, 1] * 3
        for p in range(3):
            order = [i for b in batches[3 * p : 3 * p + 3] for i in b]
            assert sorted(order) == [0, 1, 2, 3, 4]  # every record once per pass
            passes[stage, p] = tuple(order)
    assert len(set(passes.values())) == 6, passes
    cur = Curriculum("coconut", max_stage=1, epochs=2)
    segments = schedule(cur, opts, 5, world=2)
    assert [seg.steps for seg in segments] == [2, 2]
    for rank in (0, 1):
        for seg in segments:
            assert len(epoch_batches(5, 2, opts.seed, seg.epoch, rank, 2)) == seg.steps
            assert [len(seg.batches(5, opts, rank, 2, n)) for n in range(seg.steps)] == [2, 1]


def test_coconut_start_epoch_skips_the_first_epochs(monkeypatch, tmp_path):
    """``start_epoch`` (the published ``resume``): the epochs before it are not run; the others train the
    stage of their own number (GSM8k's Coconut: epochs 3-24 from a CoT-tuned model, stage 0 skipped). As run.py
    warns when it skips epochs without loading a checkpoint, a model that is no trained checkpoint (no
    training.json, no weights file) is warned about; a training run's folder or a ``weights=`` file trains
    silently."""
    recs = generate_dataset(5, (1, 2))
    cur = Curriculum("coconut", max_stage=1, epochs=5, epochs_per_stage=2, start_epoch=3)
    with pytest.warns(UserWarning, match=r"skips the first 3 epoch\(s\) \(it starts at stage 1\) but the model is no"):
        log, seen, made = _coconut_run(monkeypatch, cur, TrainOptions(steps=1, batch_size=3, progress=False), recs)
    assert [(e["epoch"], e["stage"], e["step"]) for e in log] == [(4, 1, 1), (4, 1, 2), (5, 2, 1), (5, 2, 2)]
    assert len(made) == 2 and sorted(map(str, seen[0] + seen[1])) == sorted(str(encode(TOK, r, cur, 1)) for r in recs)
    for bad, message in (
        (dict(start_epoch=2), "start_epoch=2 skips epochs of the published epoch schedule: it needs epochs"),
        (dict(epochs=3, start_epoch=3), "start_epoch=3 skips epochs"),
        (dict(epochs=3, start_epoch=-1), "start_epoch must be an integer >= 0"),
        (dict(thoughts_per_step=-1), "thoughts_per_step must be an integer >= 0"),
    ):
        with pytest.raises(InputError, match=message):
            Curriculum(**bad).validate()
    (tmp_path / "training.json").write_text(json.dumps({"trainer": "coconut", "mode": "cot"}))
    cot_tuned, published_cot = _gpt2(), _gpt2()
    cot_tuned.folder, published_cot.weights_file = tmp_path, "checkpoint_25"
    for model in (cot_tuned, published_cot):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train_coconut(model, TOK, recs, TrainOptions(steps=1, batch_size=3, progress=False), cur)
    saving = TrainOptions(steps=1, batch_size=3, progress=False, out=str(tmp_path / "run"), save_every=1)
    with pytest.warns(UserWarning, match="skips the first 3"):
        train_coconut(_gpt2(), TOK, recs, saving, cur)
    with warnings.catch_warnings():  # resumed: the run's own weights are restored, nothing to warn about
        warnings.simplefilter("error")
        train_coconut(_gpt2(), TOK, recs, saving, cur, resume=str(tmp_path / "run"))


@pytest.mark.parametrize("reset", [True, False])
def test_coconut_reset_optimizer_off_keeps_one_optimizer_and_one_schedule(monkeypatch, reset):
    """``reset_optimizer=False`` (the published CoT config's): one optimizer for the whole run, its moments
    carried across epochs and its learning-rate schedule (here warmup + cosine) over every step; on (every
    published Coconut config), a fresh optimizer and schedule per epoch."""
    from latentrt.train.common import lr_at

    recs = generate_dataset(6, (1, 2))
    cur = Curriculum("coconut", max_stage=1, epochs=3, reset_optimizer=reset)
    opts = TrainOptions(steps=1, batch_size=2, warmup=2, progress=False)  # 3 steps per epoch
    log, _, made = _coconut_run(monkeypatch, cur, opts, recs)
    assert len(log) == 9 and len(made) == (3 if reset else 1)
    per_epoch = [lr_at(step, dataclasses.replace(opts, steps=3)) for _ in range(3) for step in range(3)]
    whole = [lr_at(step, dataclasses.replace(opts, steps=9)) for step in range(9)]
    assert [e["lr"] for e in log] == (per_epoch if reset else whole) and per_epoch != whole
    with pytest.raises(InputError, match="reset_optimizer must be True or False, got 0"):
        Curriculum(reset_optimizer=0).validate()


def test_coconut_uniform_prob_mixes_stages_as_published(monkeypatch):
    """``uniform_prob`` (the published analysis runs' 0.3): per record and epoch, with that probability a stage
    drawn uniformly from 0 to the record's step count (past max_stage: the final stage), else the epoch's;
    seeded, so a resumed run draws the same; one-stage modes and values outside [0, 1] refused."""
    cur = Curriculum("coconut", max_stage=2, uniform_prob=0.3)
    n_steps = [3] * 4000
    drawn = cur.record_stages(n_steps, 99, (0, 1, 2))
    mixed = [s for s in drawn if s != 99]
    assert abs(len(mixed) / len(drawn) - 0.3) < 0.03 and set(mixed) == {0, 1, 2, 3}
    assert drawn == cur.record_stages(n_steps, 99, (0, 1, 2)) != cur.record_stages(n_steps, 99, (0, 2, 2))
    assert Curriculum("coconut").record_stages([1, 2], 5, (0,)) == [5, 5]
    every = Curriculum("coconut", max_stage=1, epochs=2, epochs_per_stage=2, uniform_prob=1.0)  # stage 0 twice
    recs = generate_dataset(40, (1, 3))
    _, seen, _ = _coconut_run(monkeypatch, every, TrainOptions(steps=1, batch_size=40, progress=False), recs)
    assert len(seen) == 2
    for batch in seen:  # each record at one of its own stages 0..len(steps), and several stages in a batch
        stages = []
        for ex in batch:
            rec = next(r for r in recs if any(encode(TOK, r, every, s) == ex for s in range(len(r.steps) + 1)))
            stages.append(next(s for s in range(len(rec.steps) + 1) if encode(TOK, rec, every, s) == ex))
        assert len(set(stages)) >= 3
    assert sorted(map(str, seen[0])) != sorted(map(str, seen[1]))  # drawn anew per epoch, within a stage too
    for bad, message in (
        (dict(uniform_prob=1.5), r"uniform_prob must be a probability in \[0, 1\], got 1.5"),
        (dict(uniform_prob=True), "uniform_prob must be a probability"),
        (
            dict(mode="cot", uniform_prob=0.3),
            "uniform_prob acts only where the curriculum has stages to mix .*; mode 'cot' has one",
        ),
    ):
        with pytest.raises(InputError, match=message):
            Curriculum(**bad).validate()


def test_nothoughts_removes_the_steps_with_nothing_in_their_place(tmp_path):
    """Coconut's ``no_thoughts`` ("w/o thought"): the curriculum removes steps stage by stage, no thoughts and
    no markers in their place (a plain GPT-2 gets none); the checkpoint is asked with the question alone."""
    from latentrt.families import parse_config

    cur = Curriculum("nothoughts", max_stage=2, thoughts_per_step=3)
    assert cur.stages() == [0, 1, 2, 3] and cur.thoughts_at(1, 3) == (1, 0) and cur.thoughts_at(3, 3) == (3, 0)
    tok = _byte_level_tokenizer(markers=False)
    vocab = tok.get_vocab_size()
    cfg = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, n_positions=256, vocab_size=vocab)
    plain = build_model(parse_config(cfg), seed=1)
    opts = TrainOptions(steps=4, batch_size=2, progress=False, out=str(tmp_path / "ckpt"))
    log = train_coconut(plain, tok, generate_dataset(4, (2,)), opts, cur)
    assert [e["stage"] for e in log] == [0, 1, 2, 3] and tok.get_vocab_size() == vocab
    loaded = latentrt.load(tmp_path / "ckpt", device="cpu")
    assert loaded.marker_ids == (None, None, None) and loaded.config.vocab_size == vocab
    assert json.loads((tmp_path / "ckpt" / "training.json").read_text())["mode"] == "nothoughts"
    from latentrt.decode.coconut import CoconutDecoder

    question = "Tom is a cat. Is Tom a cat?"
    assert CoconutDecoder.eval_prompt(loaded, question, "nothoughts") == tok.encode(question + "\n").ids
    assert latentrt.generate(loaded, question, max_new_tokens=2).num_thoughts == 0


def test_malformed_data_files(tmp_path):
    p = tmp_path / "d.json"
    cases = [
        ("{", "not valid JSON"),
        ('{"a": 1}', "record 0 has no 'question'"),  # one object: one record (as HF datasets reads it)
        ("3", "must hold a JSON list of records, got int"),
        ("[]", "holds no records"),  # nothing to train on or score: not an empty table
        ('[{"question": "q", "steps": []}]', "record 0 has no 'answer'"),
        (
            '[{"question": "q", "steps": [], "answer": "a"}, {"question": 3, "steps": [], "answer": "a"}]',
            "record 1: 'question' must be a str",
        ),
        ('[{"question": "q", "steps": [1], "answer": "a"}]', "step"),
        # a lone surrogate escape: valid JSON, not valid text (the tokenizer raised a TypeError)
        (
            '[{"question": "q", "steps": ["s", "t \\ud800"], "answer": "a"}]',
            "record 0: 'steps\\[1\\]' is not valid Unicode",
        ),
        ('[{"question": "q \\udcff", "steps": [], "answer": "a"}]', "record 0: 'question' is not valid Unicode"),
    ]
    for text, msg in cases:
        p.write_text(text)
        with pytest.raises(InputError, match=msg):
            load_records(p)
    save_records(generate_dataset(3), p)
    assert len(load_records(p)) == 3
    with pytest.raises(InputError, match="does not exist"):
        load_records(tmp_path / "none.json")
    with pytest.raises(InputError, match="is a folder, not a JSON file of records"):
        load_records(tmp_path)
    # JSON Lines after blank lines; records as a tuple; a bool is no difficulty
    (tmp_path / "blank.json").write_text("\n\n" + "\n".join(json.dumps(r.__dict__) for r in generate_dataset(3)))
    assert load_records(tmp_path / "blank.json") == load_records(p)
    assert as_records(tuple(load_records(p))) == load_records(p)
    with pytest.raises(InputError, match="records: record 0: 'difficulty' must be an integer"):
        as_records([{"question": "q", "steps": [], "answer": "a", "difficulty": True}])
    lines = tmp_path / "d.jsonl"  # JSON Lines: one record per line, blank lines skipped
    lines.write_text("\n".join(json.dumps(r.__dict__) for r in generate_dataset(3)) + "\n\n")
    assert load_records(lines) == load_records(p)
    lines.write_text("\n\n")
    with pytest.raises(InputError, match="d.jsonl holds no records"):
        load_records(lines)
    lines.write_text(json.dumps(generate_dataset(1)[0].__dict__) + "\n[\n")
    with pytest.raises(InputError, match="d.jsonl, line 2: not valid JSON"):
        load_records(lines)
    # JSON Lines under another name (as HF datasets' json loader reads it), and a byte-order mark: the same records
    other = tmp_path / "lines.json"
    other.write_text("\n".join(json.dumps(r.__dict__) for r in generate_dataset(3)))
    assert load_records(other) == load_records(p)
    other.write_text(json.dumps(generate_dataset(1)[0].__dict__) + "\n{not json\n")
    with pytest.raises(InputError, match="lines.json, line 2: not valid JSON"):
        load_records(other)
    other.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert load_records(other) == load_records(p)
    # one record alone, a JSON object (a one-line JSON Lines file, as HF datasets reads it): it said "must hold
    # a JSON list of records, got dict"
    one = generate_dataset(1)[0]
    for text in (json.dumps(one.__dict__), json.dumps(one.__dict__, indent=2)):
        other.write_text(text)
        assert load_records(other) == [one]


def test_prosqa_file_reads(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "prosqa_valid.json"
    if not shared.is_file():
        pytest.skip("../shared/data not present")
    recs = load_records(shared)
    assert len(recs) == 300 and all(3 <= r.difficulty <= 6 for r in recs)


@pytest.mark.parametrize("lora", [False, True])
def test_ddp_two_processes_gloo(tmp_path, lora):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(Path(__file__).parent / "_ddp_train.py"),
        str(tmp_path),
        str(Path(__file__).parent),
        *(["lora"] if lora else []),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # gradients were all-reduced: the replicas stayed identical
    if lora:  # the checkpoint is the adapter; the replicas' base weights never moved
        assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
        from _tiny_train import CONFIG

        from latentrt.families import parse_config

        base = build_model(parse_config(CONFIG), seed=0).state_dict()
        assert all(torch.equal(a[k], base[k.replace(".base_layer", "")]) for k in a if ".lora_" not in k)
        assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if ".lora_B" in k)
    else:
        assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "huginn_raven"
    assert json.loads((tmp_path / "training.json").read_text())["world_size"] == 2
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # one all-reduce a step (the second micro-batch's backward; the first ran under no_sync), the logged loss
    # the mean over the processes (the same on both), distributed.mean the mean of the ranks 0 and 1
    assert ranks[0]["syncs"] == ranks[1]["syncs"] == [False, True] * 3
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
    assert [r["mean"] for r in ranks] == [0.5, 0.5]


def test_trainers_name_a_wrong_argument():
    """The trainers' Python arguments: another family's model, no tokenizer, no records, options or a
    curriculum of the wrong type are InputErrors naming them (they were AttributeErrors and a ValueError from
    random.randrange, deep inside)."""
    rec, coc = tiny_recurrent(seed=1), tiny_coconut(seed=1)
    records = generate_dataset(4, (1,), seed=2)
    opts = TrainOptions(steps=4, batch_size=2, progress=False)
    cases = [
        (lambda: train_recurrent(coc, coc.tokenizer, records, opts), "train_recurrent trains recurrent-depth models"),
        (
            lambda: train_coconut(rec, rec.tokenizer, records, opts, Curriculum("coconut", max_stage=1)),
            "train_coconut trains Coconut",
        ),
        (lambda: train_recurrent(rec, None, records, opts), "train_recurrent needs a tokenizer"),
        (lambda: train_recurrent(rec, "words.json", records, opts), "has none), got str"),
        (lambda: train_recurrent(rec, rec.tokenizer, [], opts), "records is empty: nothing to train on"),
        (lambda: train_recurrent(rec, rec.tokenizer, records, {"steps": 4}), "opts must be a TrainOptions, got dict"),
        (lambda: train_coconut(coc, coc.tokenizer, records, opts, "coconut"), "cur must be a Curriculum"),
        (lambda: train_recurrent("builtin:recurrent", None, records, opts), "expected a model from latentrt.load"),
        (  # (it was ignored: only the recurrent trainer recomputes activations)
            lambda: train_coconut(
                coc, coc.tokenizer, records, dataclasses.replace(opts, checkpoint_activations=True), Curriculum("cot")
            ),
            "checkpoint_activations applies to recurrent-depth models",
        ),
        (  # (Huginn's fine-tuning script cuts its examples; Coconut's run.py does not)
            lambda: train_coconut(
                coc, coc.tokenizer, records, dataclasses.replace(opts, max_seq_length=8), Curriculum("cot")
            ),
            "max_seq_length applies to recurrent-depth models",
        ),
        (
            lambda: train_coconut(coc, coc.tokenizer, records, opts, Curriculum("thoughtful")),
            "unknown Coconut training mode 'thoughtful'; choose one of",
        ),
        (  # the tiny model's context is 96 positions
            lambda: train_recurrent(rec, rec.tokenizer, [dict(question="a " * 120, steps=[], answer="b")], opts),
            "records [0] are longer than block_size=96",
        ),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            call()


def test_every_process_seeds_torch_alike(monkeypatch):
    """Both published trainers seed torch with the same seed on every process (Coconut's set_seed, Huginn's
    seed_everything): dropout masks and initial states are drawn alike; the data differ by rank."""
    from latentrt.train import common, distributed

    monkeypatch.setattr(distributed, "init", lambda: (1, 2, torch.device("cpu")))
    common.prepare(_gpt2(), TOK, TrainOptions(seed=7, progress=False), None)
    assert torch.initial_seed() == 7


@pytest.mark.parametrize(
    "kept, every, stop, rest",
    [
        (False, 3, 4, [(1, 2), (2, 1), (2, 2)]),
        (True, 3, 4, [(1, 2), (2, 1), (2, 2)]),
        (False, 2, 5, [(2, 1), (2, 2)]),
    ],
    ids=["reset", "one optimizer, mixed stages", "at a stage's start"],
)
def test_coconut_resume_is_exact(tmp_path, kept, every, stop, rest):
    """A run stopped mid-stage and resumed from its last checkpoint ends with the uninterrupted run's weights
    bit for bit: the optimizer, the stage schedule and torch's generator (GPT-2's dropout masks) restored;
    with one optimizer for the run, its schedule and moments; with mixed stages, the same draws; resumed where
    a stage starts, the new stage's fresh optimizer (not the checkpoint's)."""
    recs = generate_dataset(8, (1, 2))
    cur = Curriculum("coconut", max_stage=1)  # 3 stages of 2 steps
    if kept:
        cur = dataclasses.replace(cur, reset_optimizer=False, uniform_prob=0.5)

    def opts(out=None):
        return TrainOptions(steps=6, batch_size=2, progress=False, warmup=1, save_every=every, out=out)

    straight = _gpt2()
    assert straight.config.resid_pdrop > 0  # dropout draws
    train_coconut(straight, TOK, recs, opts(), cur)

    class Stop(Exception):
        pass

    calls = []

    def stop_at(entry):
        calls.append(entry)
        if len(calls) == stop:  # before its step's save: the last checkpoint is the one before (step 3 or 4)
            raise Stop

    with pytest.raises(Stop):
        train_coconut(_gpt2(), TOK, recs, opts(str(tmp_path)), cur, on_step=stop_at)
    resumed = latentrt.load(tmp_path, device="cpu")
    log = train_coconut(resumed, TOK, recs, opts(str(tmp_path)), cur, resume=str(tmp_path))
    assert [(e["stage"], e["step"]) for e in log] == rest
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_token_outside_the_models_vocabulary_is_named_before_training():
    """A tokenizer with a token the model has no row for (here one added past the model's vocabulary) is refused
    before any step, as generate() refuses such a prompt: the recurrent model's padded embedding trained its
    padding row silently, GPT-2's failed inside a batch. The model stays as it was."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(TOK.to_str())
    tok.add_tokens(["zorbix"])
    (extra,) = tok.encode("zorbix", add_special_tokens=False).ids
    assert extra == TOK.get_vocab_size()
    record = dict(question="Is Alex a zorbix ?", steps=["Alex is a wumpus ."], answer="Alex is a zorbix .")
    clean = dict(record, question="Is Alex a wumpus ?", answer="Alex is a wumpus .")
    opts = TrainOptions(steps=3, batch_size=1, warmup=0, progress=False)
    for model, train in [
        (_recurrent(), lambda m, records: train_recurrent(m, tok, records, opts)),
        (_gpt2(), lambda m, records: train_coconut(m, tok, records, opts, Curriculum("coconut", max_stage=1))),
    ]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InputError, match=rf"record 1 holds token id {extra}, outside the model's vocabulary"):
            train(model, [clean, record])
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert train(model, [clean])  # the same tokenizer, records within the vocabulary: trains


def test_coconut_needs_the_end_of_text_token_its_answers_end_in():
    """Coconut's answers end in <|endoftext|> (its dataset.py): a tokenizer without it is named before training
    (a None token id failed inside the first batch)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(TOK.to_str().replace("<|endoftext|>", "<|eot|>"))
    record = dict(question="Is Alex a wumpus ?", steps=["Alex is a wumpus ."], answer="Alex is a wumpus .")
    opts = TrainOptions(steps=3, batch_size=1, warmup=0, progress=False)
    with pytest.raises(InputError, match=r"Coconut's answers end in <\|endoftext\|> .*the tokenizer has none"):
        train_coconut(_gpt2(), tok, [record], opts, Curriculum("coconut", max_stage=1))
