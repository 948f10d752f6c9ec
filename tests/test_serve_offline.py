"""``Engine.generate`` (latentrt/serve/offline.py): many prompts with their own options through continuous
batching, each result equal to ``latentrt.generate()`` alone, field by field."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_coconut, tiny_recurrent
from test_serve_engine import coconut_requests, generate_alone, recurrent_requests

import latentrt
from latentrt.errors import InputError, NonFiniteStateError, PromptError
from latentrt.serve import Engine

QUESTION = "Stella is a rempus. Fae is a worpus. Every worpus is a timpus. Is Fae a rempus or worpus?"


def _options(kw: dict) -> latentrt.GenerateOptions:
    return latentrt.GenerateOptions.build(None, **kw)


@pytest.mark.parametrize("scheduler", ["depth", "token"])
def test_each_prompt_with_its_own_options_equals_generate_alone(scheduler):
    """Mixed depths, criteria, KV modes, sampling, penalties and stops, more prompts than rows and than the
    queue takes: every field of each result is generate()'s for that prompt alone (kv_bytes and the backend
    included)."""
    model = tiny_recurrent(seed=3)
    requests = recurrent_requests(20, seed=7)
    engine = Engine(model, max_batch=4, max_queue=3, scheduler=scheduler)
    results = engine.generate([p for p, _ in requests], [_options(kw) for _, kw in requests])
    assert len(results) == len(requests)
    for result, (prompt, kw) in zip(results, requests):
        assert result == generate_alone(model, prompt, **kw), (prompt, kw)
    assert not engine.busy and len(engine.program.pool.free_rows) == 4


def test_coconut_prompts_with_their_thoughts_equal_generate_alone():
    model = tiny_coconut(seed=2)
    requests = coconut_requests(10)
    results = Engine(model, max_batch=3).generate([p for p, _ in requests], [_options(kw) for _, kw in requests])
    for result, (prompt, kw) in zip(results, requests):
        assert result == generate_alone(model, prompt, **kw), (prompt, kw)
    assert {r.num_thoughts for r in results} >= {0, 1, 3}  # (thoughts as generate() counts them)


def test_text_prompts_one_prompt_and_keywords_for_every_prompt():
    model = latentrt.load("builtin:coconut", device="cpu")
    engine = Engine(model, max_batch=2)
    few = latentrt.GenerateOptions(max_new_tokens=3)
    texts = [QUESTION, "Bob is a rompus. Is Bob a rompus or jelpus?", "Alex is a wumpus."]
    got = engine.generate(texts, [few, None, few], num_thoughts=1)
    want = [latentrt.generate(model, t, o, num_thoughts=1) for t, o in zip(texts, [few, None, few])]
    assert got == want and [r.num_thoughts for r in got] == [1, 1, 1] and len(got[0].tokens) == 3
    # one prompt (text, or a list of ids) is a list of one result; no options: the model's defaults
    assert engine.generate(QUESTION) == [latentrt.generate(model, QUESTION)]
    ids = model.tokenizer.encode("Alex is a wumpus.").ids
    assert engine.generate(ids, max_new_tokens=2) == [latentrt.generate(model, ids, max_new_tokens=2)]


def test_every_prompt_is_checked_before_any_runs():
    """A bad prompt or option is generate()'s error naming the prompt's index, and nothing was queued or run."""
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=2, max_len=64)
    ok = [[5, 6, 7], [8, 9]]
    cases = [
        (ok + [[]], None, {}, InputError, r"prompts\[2\]: empty prompt"),
        (ok, [None, _options(dict(temperature=-1))], {}, InputError, r"prompts\[1\]: .*temperature"),
        (ok, None, dict(num_stepz=3), InputError, r"prompts\[0\]: unknown generate\(\) option"),
        (ok + [[5] * 62], None, {}, PromptError, r"prompts\[2\]: .*"),
        (ok, None, dict(hooks=[lambda e: None]), InputError, r"prompts\[0\]: hooks cannot be used"),
        (ok, [None], {}, InputError, "options has 1 entries for 2 prompts"),
        (ok, {"max_new_tokens": 2}, {}, InputError, "options must be a GenerateOptions or a list"),
        ([], None, {}, InputError, "prompts is empty"),
        (b"bytes", None, {}, InputError, "prompts must be a prompt"),
        (7, None, {}, InputError, "prompts must be a prompt"),
    ]
    for prompts, options, kw, error, message in cases:
        with pytest.raises(error, match=message):
            engine.generate(prompts, options, **{"max_new_tokens": 3, **kw})
    assert not engine.queue and not engine.resident and engine.metrics.steps == 0


def test_a_failing_prompt_is_its_error_naming_it():
    model = tiny_recurrent(seed=3)
    bad_kw = dict(max_new_tokens=4, init_scale=1e39, seed=1, temperature=0.8)  # the state overflows fp32
    with pytest.raises(NonFiniteStateError) as alone:
        latentrt.generate(model, [5, 6, 7], **bad_kw)
    engine = Engine(model, max_batch=2)
    with pytest.raises(NonFiniteStateError, match=r"prompts\[1\]: ") as served:
        engine.generate([[8, 9], [5, 6, 7], [10]], [None, _options(bad_kw), None])
    assert str(served.value) == f"prompts[1]: {alone.value}"
    assert not engine.busy  # (the others finished; the engine serves on)
    assert engine.generate([[8, 9]], seed=2) == [latentrt.generate(model, [8, 9], seed=2)]


def test_while_a_server_loop_runs_the_engine_it_waits_for_its_results():
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=2, kv_slots=32)
    real, stepped_on = engine._step, set()

    def step():
        stepped_on.add(threading.current_thread().name)
        real()

    engine._step = step
    loop = threading.Thread(target=engine.run_forever, name="server-loop")
    loop.start()
    try:
        requests = recurrent_requests(6, seed=2)
        from_thread = engine.submit([5, 6, 7], max_new_tokens=3, seed=4)  # a server's request beside ours
        results = engine.generate([p for p, _ in requests], [_options(kw) for _, kw in requests])
        assert engine.looping
    finally:
        engine.stop()
        loop.join(timeout=60)
    assert not loop.is_alive() and not engine.looping
    assert stepped_on == {"server-loop"}  # (the caller waited; it did not step the engine itself)
    for result, (prompt, kw) in zip(results, requests):
        assert result == generate_alone(model, prompt, **kw)
    assert (
        from_thread.done.is_set()
        and from_thread.tokens == latentrt.generate(model, [5, 6, 7], max_new_tokens=3, seed=4).tokens
    )


def test_kv_bytes_count_the_positions_generate_fills():
    """The prompt as run and every new token but the last, in the request's KV mode: a stop token and the
    length limit, full and shared K/V, a bf16 model."""
    model = tiny_recurrent(seed=3).to(torch.bfloat16)
    engine = Engine(model, max_batch=2, kv_slots=16)
    prompts = [[5, 6, 7], [5, 6, 7], [9, 10]]
    options = [
        _options(dict(max_new_tokens=n, kv_sharing=kv, stop=[7, 11], seed=1))
        for n, kv in ((1, "full"), (9, "shared"), (9, "ring-3"))
    ]
    for result, prompt, opts in zip(engine.generate(prompts, options), prompts, options):
        alone = latentrt.generate(model, prompt, opts)
        assert result.kv_bytes == alone.kv_bytes > 0 and result == alone


def test_callers_on_several_threads_take_turns_stepping():
    """Two threads each serving their prompts through one engine (no server loop): the steps never overlap,
    and each gets generate()'s results."""
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=3, kv_slots=32)
    real, inside, overlapped = engine._step, [0], []

    def watched_step():
        inside[0] += 1
        overlapped.append(inside[0] > 1)
        try:
            real()
        finally:
            inside[0] -= 1

    engine._step = watched_step
    batches = [recurrent_requests(6, seed=11), recurrent_requests(6, seed=12)]
    results: dict = {}

    def serve(i: int) -> None:
        prompts, kws = zip(*batches[i])
        results[i] = engine.generate(list(prompts), [_options(kw) for kw in kws])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert overlapped and not any(overlapped)
    for i, requests in enumerate(batches):
        for result, (prompt, kw) in zip(results[i], requests):
            assert result == generate_alone(model, prompt, **kw)


def test_a_stop_token_the_output_leaves_out_still_counts_in_kv_bytes():
    """Coconut's published eos: the eos that ends an answer is sampled and left out of the tokens; generate()'s
    cache holds its position's predecessor all the same (found by tools/soak.py's offline check)."""
    model = latentrt.load("builtin:coconut", device="cpu")
    engine = Engine(model, max_batch=2)
    for published in (False, True):
        got = engine.generate([QUESTION, "Alex is a wumpus."], published_eos=published)
        want = [latentrt.generate(model, q, published_eos=published) for q in (QUESTION, "Alex is a wumpus.")]
        assert got == want and got[0].finish_reasons == ["stop"]
        assert (got[0].tokens[-1] == model.eos_token_id) != published  # (left out with the published eos)


def test_one_options_object_for_every_prompt_and_a_model_without_a_tokenizer():
    model = tiny_recurrent(seed=3)
    model.tokenizer = None
    engine = Engine(model, max_batch=2)
    options = latentrt.GenerateOptions(max_new_tokens=4, num_steps=3, seed=7)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    got = engine.generate(prompts, options)
    assert got == [latentrt.generate(model, p, options) for p in prompts]
    assert all(r.text is None and len(r.tokens) == 4 and r.steps[1:] == [3] * 3 for r in got)


def test_chat_is_the_chat_template_then_generate(tmp_path):
    """``Engine.chat`` (vLLM's ``LLM.chat``): each conversation rendered as ``apply_chat_template`` renders it
    (the template, its flags and variables passed on), then each result ``generate()``'s alone; one
    conversation alone is a list of one; a conversation the template refuses is an error naming its index."""
    model = latentrt.load("builtin:recurrent")
    convs = [
        [{"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "Bob is a rompus. Is Bob a rompus or jelpus?"}],
    ]
    kw = dict(max_new_tokens=8, init_scale=0.0)
    engine = Engine(model, max_batch=2)
    got = engine.chat(convs, **kw)
    for conv, result in zip(convs, got):
        alone = latentrt.generate(model, latentrt.apply_chat_template(model, conv), **kw)
        assert (result.tokens, result.steps, result.text) == (alone.tokens, alone.steps, alone.text)
    assert got[0].text == "### Fae is a worpus."
    template = tmp_path / "t.jinja"  # a template of its own, with a flag and a variable it reads
    template.write_text(
        "{{ first }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ###{% endif %}"
    )
    for flags in (dict(chat_template_kwargs={"first": "Alex is a wumpus. "}), dict(add_generation_prompt=False)):
        (one,) = engine.chat(convs[1], template=template, **flags, **kw)  # (one conversation: its messages)
        variables = flags.pop("chat_template_kwargs", {})
        ids = latentrt.apply_chat_template(model, convs[1], template, **flags, **variables)
        assert one.tokens == latentrt.generate(model, ids, **kw).tokens
    with pytest.raises(InputError, match="conversations must be a list of messages or a list of such lists"):
        engine.chat([])
    with pytest.raises(InputError, match=r"conversations\[1\]: messages\[0\].content must be a string"):
        engine.chat([convs[0], [{"role": "user"}]])
    with pytest.raises(InputError, match="chat_template_kwargs must be a dict"):
        engine.chat(convs, chat_template_kwargs=[1])
    assert not engine.busy
