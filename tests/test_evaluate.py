"""latentrt/evaluate.py with ``--chat``: each question asked as a user message through the chat template (a
chat-tuned model's evaluation), scored by the same published answer rule."""

import json
from types import SimpleNamespace

import pytest
from conftest import tiny_recurrent

import latentrt
from latentrt.chat import ChatTemplate
from latentrt.cli import main
from latentrt.evaluate import evaluate, extract_answer, is_correct
from latentrt.train.data import generate_dataset, save_records

TEMPLATE = ChatTemplate("{% for m in messages %}{{ m['content'] }} {% endfor %}")


def test_chat_evaluation_asks_through_the_template():
    """The accuracy, tokens and iterations of evaluate(chat=...) are those of generate() on the conversation's
    ids (system message first), scored on them; GSM8k's '#### 1,234' reads as '1234'."""
    model = latentrt.load("builtin:recurrent")
    records = generate_dataset(6, (1, 2), seed=3)
    table = evaluate(model, records, chat=TEMPLATE, system="Every", init_scale=0.0, max_new_tokens=8, progress=False)
    correct = tokens = 0
    for rec in records:
        messages = [{"role": "system", "content": "Every"}, {"role": "user", "content": rec.question}]
        ids = latentrt.apply_chat_template(model, messages, TEMPLATE)
        out = latentrt.generate(model, ids, max_new_tokens=8, temperature=0.0, init_scale=0.0)
        correct += is_correct(model.tokenizer, ids, out.tokens, rec.answer)
        tokens += len(out.tokens)
    assert table["all"]["n"] == 6 and table["all"]["accuracy"] == correct / 6
    assert table["all"]["generated_tokens"] == tokens / 6
    assert extract_answer("so 1,000 + 234 = 1,234.\n#### 1,234") == "1234"
    with pytest.raises(latentrt.InputError, match="max_new_tokens must be an integer >= 1"):
        evaluate(model, records, chat=TEMPLATE, max_new_tokens=0, progress=False)


def test_mean_iterations_count_the_decoded_tokens_or_the_only_one():
    """The iterations column: per token after the first (its iterations are the prompt pass's), and for a
    one-token answer that token's (it counted 0, and the column vanished when every answer had one token)."""
    from latentrt.evaluate import format_table

    model = latentrt.load("builtin:recurrent")
    records = generate_dataset(4, (1,), seed=5)
    # (the prompt pass runs all 12 iterations, the decoded tokens exit early: the first token's count differs)
    kw = dict(adaptive=True, num_steps=12, exit_criterion="kl", exit_threshold=1e-3, init_scale=0.0)
    kw.update(do_not_exit_in_prefill=True)
    for n in (1, 4):
        table = evaluate(model, records, max_new_tokens=n, progress=False, **kw)
        want, every = [], []
        for rec in records:
            prompt = model.tokenizer.encode(rec.question + "\n").ids
            steps = latentrt.generate(model, prompt, max_new_tokens=n, **kw).steps
            decoded = steps[1:] if len(steps) > 1 else steps
            want.append(sum(decoded) / len(decoded))
            every.append(sum(steps) / len(steps))
        assert table["all"]["mean_steps"] == pytest.approx(sum(want) / len(want)) and table["all"]["mean_steps"] > 0
        assert n == 1 or want != every
        assert "mean iterations" in format_table(table)
    # a model that does not iterate in latent space (Coconut's GPT-2): no iterations column
    coconut = evaluate(latentrt.load("builtin:coconut"), records, max_new_tokens=2, progress=False)
    assert coconut["all"]["mean_steps"] == 0 and "mean iterations" not in format_table(coconut)


def test_cli_eval_chat(tmp_path, capsys):
    save_records(generate_dataset(4, (1,), seed=5), tmp_path / "p.json")
    (tmp_path / "t.jinja").write_text(TEMPLATE.source)
    args = ["eval", "builtin:recurrent", str(tmp_path / "p.json")]
    assert main([*args, "--chat", "--chat-template", str(tmp_path / "t.jinja"), "--max-new-tokens", "8"]) == 0
    assert "(chat)" in capsys.readouterr().out
    for extra, message in [
        (["--system", "x"], "--system and --chat-template go with --chat"),
        (["--chat", "--modes", "coconut"], "--modes are the model's own prompt formats"),
        (["--max-new-tokens", "0"], "error: --max-new-tokens must be an integer >= 1"),
    ]:
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err


def test_bad_options_are_named_before_the_first_batch(monkeypatch):
    """A family option (exit_threshold) is checked before any batch runs: it was found by the first
    generate(), after the progress bar had started."""
    model = latentrt.load("builtin:recurrent")
    monkeypatch.setattr("latentrt.evaluate.generate", lambda *a, **k: pytest.fail("generate() ran"))
    records = generate_dataset(2, seed=3)
    for bad, message in [
        (dict(exit_threshold=-5.0), "exit_threshold must be >= 0"),
        (dict(num_thoughts=2), "apply"),
        (dict(kv_sharing="ring-0"), "kv_sharing must be"),
        (dict(decoding="speculative", decoding_options={"lookahead": 0}), "lookahead"),
    ]:
        with pytest.raises(latentrt.InputError, match=message):
            evaluate(model, records, progress=False, **bad)
    coconut = latentrt.load("builtin:coconut")
    for bad, message in [
        (dict(thoughts=-1), "thoughts must be an integer >= 0, got -1"),
        (dict(num_thoughts=2), "evaluate\\(\\) takes the thought count as thoughts="),
        (dict(mode="chatty"), "unknown prompt format 'chatty' for this model; choose from"),
    ]:
        with pytest.raises(latentrt.InputError, match=message):
            evaluate(coconut, records, progress=False, **bad)


def test_question_alone_formats_run_no_thoughts(monkeypatch, tmp_path, capsys):
    """A Coconut model asked in cot / nocot runs the question alone, no markers and no thoughts, as Coconut's
    data has those formats (generate() appended the trained count to the marker-less prompt: --modes cot on a
    Coconut-trained model scored the coconut format twice); coconut / pause run the trained count. ``--json``:
    a line per format."""
    import latentrt.evaluate as ev
    from latentrt.engine import Generation
    from latentrt.options import GenerateOptions

    model = latentrt.load("builtin:coconut")
    records = generate_dataset(4, (1, 2), seed=5)
    seen = []
    real = ev.generate

    def spy(m, prompts, **kw):
        options = GenerateOptions(**kw)
        seen.append([Generation(m, p, options).batch.ids.tolist()[0] == p for p in prompts])  # ran as given?
        out = real(m, prompts, **kw)
        seen[-1] = (seen[-1], out.num_thoughts)
        return out

    monkeypatch.setattr(ev, "generate", spy)
    for mode, as_given, thoughts in (("cot", True, 0), ("nocot", True, 0), ("coconut", True, 3), ("pause", True, 3)):
        seen.clear()
        evaluate(model, records, mode=mode, max_new_tokens=4, progress=False)
        assert seen and all(all(given) == as_given and k == [thoughts] * len(given) for given, k in seen), (mode, seen)
    start = model.config.start_latent_id
    assert start not in ev.family_for(model).decoder.eval_prompt(model, records[0].question, "cot")
    monkeypatch.undo()
    save_records(records, tmp_path / "r.json")
    assert main(["eval", "builtin:coconut", str(tmp_path / "r.json"), "--modes", "coconut,cot", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["mode"] for line in lines] == ["coconut", "cot"]
    assert lines[1]["table"]["all"] == evaluate(model, records, mode="cot", progress=False)["all"]


def test_evaluate_takes_record_dicts_and_names_bad_arguments():
    """evaluate() takes Record objects or their dicts (as the trainers do); a string for the model, a lone
    record, no records or batch_size 0 are InputErrors (they were AttributeError, TypeError, an empty table
    and range()'s ValueError)."""
    model = latentrt.load("builtin:recurrent")
    records = generate_dataset(3, (1,), seed=4)
    kw = dict(init_scale=0.0, max_new_tokens=4, progress=False)
    assert evaluate(model, [r.__dict__ for r in records], **kw) == evaluate(model, records, **kw)
    bare = tiny_recurrent()
    bare.tokenizer = None  # (a checkpoint without tokenizer.json)
    for args, extra, message in [
        (("builtin:recurrent", records), {}, "expected a model from latentrt.load"),
        ((model, records[0]), {}, r"records must be a list of records \(Record objects or their dicts\), got Record"),
        ((model, []), {}, "records is empty: nothing to evaluate"),
        ((model, records), {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ((bare, records), {}, "evaluation needs a model with a tokenizer.json"),
        ((model, [{"question": "q"}]), {}, "records: record 0 has no 'answer'"),
    ]:
        with pytest.raises(latentrt.InputError, match=message):
            evaluate(*args, **{**kw, **extra})


def test_hub_gsm8k_records_without_steps_are_scored_on_the_number_after_their_hashes(tmp_path, capsys):
    """{question, answer} records without steps (the Hub's GSM8k, whose answer is the worked solution ending
    in '#### 1,234'): the gold is the answer's text after its last '#', read by the rule that reads the model's
    output; the same score as the {question, steps, answer} record with that gold, from the API and the CLI."""
    from latentrt.evaluate import eval_records

    model = latentrt.load("builtin:recurrent")
    records = generate_dataset(6, (1, 2), seed=3)
    hub = [{"question": r.question, "answer": " ".join(r.steps) + f"\n#### {r.answer}"} for r in records]
    assert [r.answer for r in eval_records(hub)] == [extract_answer("#### " + r.answer) for r in records]
    assert eval_records([{"question": "q", "answer": "so 1,000 + 234 = 1,234.\n#### 1,234"}])[0].answer == "1234"
    kw = dict(init_scale=0.0, max_new_tokens=8, progress=False)
    want = evaluate(model, [dict(r.__dict__, difficulty=0, steps=[]) for r in records], **kw)  # (no CoT to match)
    assert evaluate(model, hub, **kw) == want and want["all"]["accuracy"] > 0
    (tmp_path / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in hub))
    assert main(["eval", "builtin:recurrent", str(tmp_path / "gsm.jsonl"), "--json", "--max-new-tokens", "8"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["table"]["all"]["accuracy"] == want["all"]["accuracy"]
    with pytest.raises(latentrt.InputError, match="record 0: 'answer' must be a str"):
        evaluate(model, [{"question": "q", "answer": 3}], **kw)


def test_default_answer_lengths_are_the_published_evaluations(monkeypatch, tmp_path):
    """Without --max-new-tokens a Coconut model gets its run.py's lengths in every format (64 tokens on a file
    whose path has 'gsm', 128 on any other: a chain of steps cut at 16 or 96 changed the answer read after the
    last '#'); recurrent depth 16, --chat 96; a given length wins."""
    import latentrt.evaluate as ev

    lengths = []
    monkeypatch.setattr(ev, "generate", lambda m, p, **kw: lengths.append(kw["max_new_tokens"]) or _no_answer(p))
    coconut, recurrent = latentrt.load("builtin:coconut"), latentrt.load("builtin:recurrent")
    records = generate_dataset(2, (1,), seed=1)
    for mode in ("coconut", "cot", "nocot"):
        evaluate(coconut, records, mode=mode, progress=False, source="data/gsm_valid.json")
        evaluate(coconut, records, mode=mode, progress=False, source="data/prosqa_valid.json")
    evaluate(coconut, records, progress=False)
    evaluate(recurrent, records, progress=False, source="gsm8k.json")
    evaluate(recurrent, records, chat=TEMPLATE, progress=False)
    evaluate(coconut, records, max_new_tokens=5, progress=False, source="gsm.json")
    assert lengths == [64, 128] * 3 + [128, 16, 96, 5]
    lengths.clear()
    for name in ("gsm_test.json", "prosqa.json"):
        save_records(records, tmp_path / name)
        assert main(["eval", "builtin:coconut", str(tmp_path / name)]) == 0
    assert lengths == [64, 128]


def _no_answer(prompts):
    """A generate() result of one empty answer per prompt (the length test runs no model)."""
    return SimpleNamespace(tokens=[[] for _ in prompts], steps=[[0] for _ in prompts])


def test_cot_match_is_the_published_rule(monkeypatch):
    """Coconut's run.py also reports "CoT match": the decoded sequence's lines after the question's, up to the
    first '#', stripped, equal to the record's steps joined by newlines. evaluate() reports it (``cot_match``)
    where every record has steps and the question is not asked through a chat template; a model whose tokenizer
    keeps newlines (GPT-2's byte-level BPE) answering with the gold chain matches, another chain does not."""
    from conftest import tiny_coconut
    from test_train import _byte_level_tokenizer

    import latentrt.evaluate as ev

    assert ev.extract_chain("Q? a\nstep 1\nstep 2\n### A #B") == "step 1\nstep 2"
    assert ev.extract_chain("no newline ### A") == ""
    tok = _byte_level_tokenizer(markers=False)
    model = tiny_coconut(latent_id=None, start_latent_id=None, end_latent_id=None)
    model.tokenizer = tok
    records = generate_dataset(4, (1, 2), seed=2)
    gold = {tuple(tok.encode(r.question + "\n").ids): r for r in records}

    def answering(chain):
        def fake(m, prompts, **kw):
            rows = [chain(gold[tuple(p)]) if tuple(p) in gold else "" for p in prompts]  # ("": a chat prompt)
            return SimpleNamespace(tokens=[tok.encode(t).ids for t in rows], steps=[[0] for _ in rows])

        return fake

    monkeypatch.setattr(ev, "generate", answering(lambda r: "\n".join(r.steps) + "\n### " + r.answer))
    table = evaluate(model, records, mode="cot", progress=False)
    assert table["all"]["cot_match"] == 1.0 and table["all"]["accuracy"] == 1.0
    monkeypatch.setattr(ev, "generate", answering(lambda r: "Every one.\n### " + r.answer))
    table = evaluate(model, records, mode="cot", progress=False)
    assert table["all"]["cot_match"] == 0.0 and table["all"]["accuracy"] == 1.0
    assert "cot_match" not in evaluate(model, records, mode="cot", chat=TEMPLATE, progress=False)["all"]
    no_steps = [dict(r.__dict__, steps=[]) for r in records]
    assert "cot_match" not in evaluate(model, no_steps, mode="cot", progress=False)["all"]
    some_steps = [records[0].__dict__, *no_steps[1:]]  # (not every record has them: no column)
    assert "cot_match" not in evaluate(model, some_steps, mode="cot", progress=False)["all"]


def test_cli_eval_scores_from_a_zero_initial_state_and_the_first_records(monkeypatch, tmp_path, capsys):
    """``latentrt eval`` scores a recurrent-depth model from a zero initial state (deterministic; a Coconut model
    has none), and ``--limit N`` scores the first N records."""
    import latentrt.evaluate as ev

    save_records(generate_dataset(5, (1,), seed=5), tmp_path / "p.json")
    seen = []
    real = ev.evaluate
    monkeypatch.setattr(
        ev, "evaluate", lambda m, records, **kw: seen.append((len(records), kw)) or real(m, records, **kw)
    )
    args = ["eval", "builtin:recurrent", str(tmp_path / "p.json"), "--max-new-tokens", "2"]
    assert main([*args, "--limit", "2"]) == 0
    assert main(["eval", "builtin:coconut", *args[2:]]) == 0
    capsys.readouterr()
    assert [(n, kw.get("init_scale", "none")) for n, kw in seen] == [(2, 0.0), (5, "none")]


def test_the_coconut_format_answers_as_run_py_generates(monkeypatch):
    """run.py evaluates the coconut format through the Coconut module's generate (its first answer token never
    ends the answer; the eos that ends it is not part of it: ``published_eos``) and the question-alone formats
    through HF's generate (latentrt's default); a caller's own value wins."""
    import latentrt.evaluate as ev

    model = latentrt.load("builtin:coconut")
    records = generate_dataset(2, (1,), seed=4)
    seen, real = [], ev.generate
    monkeypatch.setattr(ev, "generate", lambda m, p, **kw: seen.append(kw.get("published_eos")) or real(m, p, **kw))
    for mode in ("coconut", "pause", "cot", "nocot", "nothoughts"):
        evaluate(model, records, mode=mode, max_new_tokens=12, progress=False)
    evaluate(model, records, mode="coconut", max_new_tokens=12, progress=False, published_eos=False)
    assert seen == [True, None, None, None, None, False]
    monkeypatch.undo()
    table = evaluate(model, records, mode="coconut", max_new_tokens=12, progress=False)
    eos = model.eos_token_id
    outs = [latentrt.generate(model, r.question, max_new_tokens=12, published_eos=True) for r in records]
    assert table["all"]["generated_tokens"] == sum(len(o.tokens) for o in outs) / 2
    assert all(eos not in o.tokens for o in outs)  # (the answer's eos left out, as run.py's generate leaves it)
