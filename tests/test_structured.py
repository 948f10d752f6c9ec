"""latentrt/structured.py: ``guided_regex``, ``guided_json`` and ``guided_grammar`` (vLLM's structured outputs,
through llguidance). Each token is the argmax of the model's logits over the set llguidance itself allows after
the tokens before it (its own matcher, run here beside the generation: the spec, as vLLM's guidance backend
asks it), and that set keeps to the language's definition written out by brute force (a token may come next where
the text it makes is a prefix of a string of the language, a stop token where the text is one). Through
generate(), its batch rule, streams, the serving engine, the CLI and the server (the openai client); and the
errors."""

from __future__ import annotations

import itertools
import json
import re
import sys

import pytest
from conftest import tiny_coconut, tiny_recurrent
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import latentrt
from latentrt.options import GenerateOptions
from latentrt.serve import Engine

pytest.importorskip("llguidance")

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|start-latent|>", "<|end-latent|>", "<|latent|>"]  # ids 0-4
TEXT = "Every wumpus is a yumpus. Alex is a wumpus, a yumpus. Was Alex a zumpus? yes no maybe {} [] : 0123"


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE with GPT-2's end of text (id 0) and Coconut's markers (2, 3, 4)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,  # (as many as the text's merges give: 303)
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 8, trainer)
    return tok


TOKENIZER = byte_level_tokenizer()


def make(family: str, seed: int = 3):
    """A tiny model of ``family`` with the byte-level tokenizer, and options that make its tokens depend on the
    options alone."""
    vocab = TOKENIZER.get_vocab_size()
    if family == "recurrent":
        model, kw = tiny_recurrent(seed=seed, vocab_size=vocab), dict(num_steps=3, init_scale=0.0)
    else:
        model, kw = tiny_coconut(seed=seed, vocab_size=vocab), dict(num_thoughts=1)
    model.tokenizer = TOKENIZER
    return model, dict(kw, stop=[0])


# a finite language, written out: the reference enumerates it
REGEX = r"(Alex|Every|Was) (is|was) (a )?(wumpus|yumpus|zumpus)\."
PARTS = (["Alex", "Every", "Was"], ["is", "was"], ["a ", ""], ["wumpus", "yumpus", "zumpus"])
LANGUAGE = [f"{a} {b} {c}{d}." for a, b, c, d in itertools.product(*PARTS)]


def allowed_by(language: list[str], generated: list[int], vocab: int, stops: list[int]) -> set[int]:
    """The definition, by brute force: every token whose text after ``generated``'s is a prefix of a string of
    ``language``, and the stop tokens where ``generated``'s text is one."""
    text = TOKENIZER.decode(generated, skip_special_tokens=False)
    out = {t for t in stops if text in language}
    for t in range(vocab):
        after = TOKENIZER.decode(generated + [t], skip_special_tokens=False)
        if len(after) > len(text) and any(s.startswith(after) for s in language):
            out.add(t)
    return out


def library_allowed(grammar: str, generated: list[int], vocab: int) -> set[int]:
    """What llguidance allows after ``generated`` (stop token 0), asked directly: where the regex leaves one way
    on, only the tokenizer's own tokens for it (its fast-forward), so a subset of the brute-force set."""
    import llguidance
    import numpy as np

    tok = llguidance.LLTokenizer(TOKENIZER.to_str(), n_vocab=vocab, eos_token=[0])
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert m.consume_tokens(generated) if generated else True
    bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[:vocab]
    return {int(t) for t in np.nonzero(bits)[0]}


def test_the_reference_language_is_the_regex():
    assert len(LANGUAGE) == 36 and all(re.fullmatch(REGEX, s) for s in LANGUAGE)


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_each_greedy_token_is_the_argmax_of_what_the_regex_allows(family):
    """Token i is the argmax of the model's logits at i (``return_logits``: before any constraint) over the
    tokens llguidance allows after tokens[:i], a non-empty subset of the brute-force set; the text is a string of
    the language."""
    import llguidance

    model, kw = make(family)
    vocab = model.config.vocab_size
    kw = dict(kw, max_new_tokens=24, return_logits=True)
    plain = latentrt.generate(model, "Alex is", **kw)
    assert plain.text not in LANGUAGE
    got = latentrt.generate(model, "Alex is", **kw, guided_regex=REGEX)
    assert got.text in LANGUAGE and got.tokens[-1] == 0 and got.finish_reasons == ["stop"]
    for i, token in enumerate(got.tokens):
        x = got.logits[i, :vocab].clone()
        allowed = library_allowed(llguidance.grammar_from("regex", REGEX), got.tokens[:i], vocab)
        assert allowed and allowed <= allowed_by(LANGUAGE, got.tokens[:i], vocab, [0]), i
        x[[t for t in range(vocab) if t not in allowed]] = float("-inf")
        assert int(x.argmax()) == token, i


def test_sampled_tokens_stay_in_the_language_and_a_batch_equals_each_prompt_alone():
    model, kw = make("recurrent", seed=5)
    vocab = model.config.vocab_size
    prompts = ["Alex is", "Every", "Was Alex a zumpus?"]
    kw = dict(kw, max_new_tokens=24, temperature=1.5, seed=11, guided_regex=REGEX)
    batch = latentrt.generate(model, prompts, **kw)
    assert len(set(batch.text)) > 1
    for i, (p, tokens, text) in enumerate(zip(prompts, batch.tokens, batch.text)):
        assert text in LANGUAGE
        for j, token in enumerate(tokens):
            assert token in allowed_by(LANGUAGE, tokens[:j], vocab, [0]), (i, j)
        alone = latentrt.generate(model, p, **dict(kw, seed=11 + i))
        assert alone.tokens == tokens


def test_a_row_is_asked_once_per_token_and_never_after_it_stopped(monkeypatch):
    """A sequence of a batch that stopped is asked nothing more (its matcher would be fed the tokens a stopped
    row gets, none of which its grammar allowed): each row's grammar is asked once per token it generates."""
    from latentrt.structured import GrammarState

    asked: list[int] = []
    original = GrammarState.allowed
    monkeypatch.setattr(GrammarState, "allowed", lambda self, gen: asked.extend(gen) or original(self, gen))
    model, kw = make("recurrent", seed=5)
    out = latentrt.generate(
        model, ["Alex is", "Every", "Was"], **kw, max_new_tokens=24, temperature=1.5, seed=2, guided_regex=REGEX
    )
    lengths = [len(t) for t in out.tokens]
    assert len(set(lengths)) > 1 and out.finish_reasons == ["stop"] * 3  # (rows stop at different tokens)
    assert [asked.count(b) for b in range(3)] == lengths


def test_a_stream_gives_the_same_tokens_and_text():
    model, kw = make("recurrent")
    kw = dict(kw, max_new_tokens=24, guided_regex=REGEX)
    want = latentrt.generate(model, "Alex is", **kw)
    stream = latentrt.generate(model, "Alex is", **kw, stream=True)
    events = list(stream)
    assert [e.tokens for e in events] == want.tokens
    assert "".join(e.text for e in events) == want.text and stream.result.tokens == want.tokens


SCHEMA = {
    "type": "object",
    "properties": {"name": {"enum": ["Alex", "Every"]}, "kind": {"enum": ["wumpus", "yumpus"]}},
    "required": ["name", "kind"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_json_follows_its_schema(family):
    """The text parses as JSON and holds what the schema asks; the schema as a dict, as JSON text and as a
    pydantic model give the same tokens."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal

    model, kw = make(family)
    kw = dict(kw, max_new_tokens=48, disable_any_whitespace=True)
    got = latentrt.generate(model, "Alex is", **kw, guided_json=SCHEMA)
    assert got.finish_reasons == ["stop"], got.text
    value = json.loads(got.text)
    assert (
        set(value) == {"name", "kind"} and value["name"] in ("Alex", "Every") and value["kind"] in ("wumpus", "yumpus")
    )
    assert latentrt.generate(model, "Alex is", **kw, guided_json=json.dumps(SCHEMA)).tokens == got.tokens

    class Thing(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: Literal["Alex", "Every"]
        kind: Literal["wumpus", "yumpus"]

    typed = latentrt.generate(model, "Alex is", **kw, guided_json=Thing)
    assert typed.finish_reasons == ["stop"] and Thing.model_validate_json(typed.text)


def test_lark_and_gbnf_grammars_give_the_same_tokens():
    model, kw = make("recurrent")
    kw = dict(kw, max_new_tokens=16, temperature=1.0, seed=4)
    lark = latentrt.generate(model, "Was Alex a zumpus?", **kw, guided_grammar='start: " " ("yes" | "no" | "maybe")')
    gbnf = latentrt.generate(model, "Was Alex a zumpus?", **kw, guided_grammar='root ::= " " ("yes" | "no" | "maybe")')
    assert lark.text in (" yes", " no", " maybe") and gbnf.tokens == lark.tokens


def test_the_serving_engine_equals_generate_alone():
    model, kw = make("recurrent")
    cases = [
        dict(guided_regex=REGEX),
        dict(guided_json=SCHEMA, temperature=0.8, seed=3),
        dict(guided_grammar='start: " " ("yes" | "no")'),
        dict(),
        dict(guided_regex=r"[a-z]{3,5}", temperature=1.0, seed=9),
    ]
    prompts = ["Alex is", "Every", "Was Alex a zumpus?", "Alex", "a"]
    engine = Engine(model, max_batch=3)
    base = dict(kw, max_new_tokens=40)
    reqs = [engine.submit(p, GenerateOptions(**base, **c)) for p, c in zip(prompts, cases)]
    engine.run_until_idle()
    for req, p, c in zip(reqs, prompts, cases):
        alone = latentrt.generate(model, p, **base, **c)
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), c
    assert re.fullmatch(r"[a-z]{3,5}", latentrt.generate(model, "a", **base, **cases[4]).text)


def test_max_new_tokens_may_cut_the_text_and_min_new_tokens_past_the_end_leaves_no_token():
    model, kw = make("recurrent")
    cut = latentrt.generate(model, "Alex is", **kw, max_new_tokens=2, guided_regex=REGEX)
    assert cut.finish_reasons == ["length"] and any(s.startswith(cut.text) for s in LANGUAGE)
    with pytest.raises(latentrt.InputError, match="no token left to choose"):
        latentrt.generate(model, "Alex is", **kw, max_new_tokens=8, min_new_tokens=4, guided_regex="ab")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(guided_regex="(ab"),
            r"guided_regex must be a valid regular expression: invalid regex \"\(ab\" .* error: unclosed group$",
        ),
        (dict(guided_json={"type": "nonsense"}), "guided_json must be a valid JSON schema: Invalid type: nonsense"),
        (
            dict(guided_grammar="start: foo"),
            'guided_grammar must be a valid grammar: at 1\\(8\\): unknown name: "foo"$',
        ),
        (dict(guided_json=3), "guided_json must be a JSON schema: a dict or its JSON text, got 3"),
        (dict(guided_json="{nope"), "guided_json is not JSON text"),
        (dict(guided_json="[1]"), r"guided_json must be a JSON schema \(an object\)"),
        (dict(guided_json={"x": float("nan")}), "guided_json must be a JSON schema of JSON values"),
        (dict(guided_json={1j: 2}), "guided_json must be a JSON schema of JSON values"),
        (dict(guided_regex=""), "guided_regex must be a non-empty string"),
        (dict(guided_regex=["a"]), "guided_regex must be a non-empty string"),
        (dict(guided_grammar="a\ud800"), "guided_grammar is not valid Unicode text"),
        (dict(guided_regex="a" * 1_000_001), "guided_regex is 1,000,001 characters; at most 1,000,000"),
        (dict(guided_regex="a", guided_choice=["a"]), "give one of guided_choice, guided_json, .* not 2"),
        (dict(guided_regex="a", stop=None, default_stops=False), "guided_regex must end with a stop token"),
        (dict(guided_regex="a", decoding="speculative"), "guided_regex applies with decoding='sequential' only"),
    ],
)
def test_bad_structured_options_are_clear_errors(kwargs, message):
    model, kw = make("recurrent")
    with pytest.raises(latentrt.InputError, match=message):
        latentrt.generate(model, "Alex is", **dict(kw, max_new_tokens=4, **kwargs))


def test_grammars_past_llguidances_limits_are_errors_and_deep_ones_do_not_crash():
    """A regex of a million states: llguidance gives up after the first token (its lexer's limit), an InputError
    naming it, never "no token left". Rules nested 3,000 deep overflowed the 8 MB stack of the calling thread
    inside llguidance's compiler (the process died): its calls run on a thread with a larger stack."""
    model, kw = make("recurrent")
    kw = dict(kw, max_new_tokens=4)
    with pytest.raises(
        latentrt.InputError, match="guided_regex: llguidance stopped following it at new token 0: lexer"
    ):
        latentrt.generate(model, "Alex", **kw, guided_regex="a{1000000}")
    chain = "start: r0\n" + "\n".join(f'r{i}: r{i + 1} | "x"' for i in range(3000)) + '\nr3000: "y"'
    with pytest.raises(latentrt.InputError, match="guided_grammar: llguidance stopped .* Current row has \\d+ items"):
        latentrt.generate(model, "Alex", **kw, guided_grammar=chain)
    refs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(3000)} | {"a3000": {"enum": ["x"]}}
    out = latentrt.generate(model, "Alex", **kw, guided_json={"$defs": refs, "$ref": "#/$defs/a0"})
    assert out.text == '"x"'
    nested = {"type": "string"}
    for _ in range(3000):
        nested = {"type": "array", "items": nested}
    with pytest.raises(latentrt.InputError, match="guided_json must be a JSON schema of JSON values .*recursion"):
        latentrt.generate(model, "Alex", **kw, guided_json=nested)


def test_a_tokenizer_llguidance_cannot_read_and_a_missing_llguidance_are_clear_errors(monkeypatch):
    with pytest.raises(latentrt.InputError, match="need a tokenizer llguidance reads .*WordPiece"):
        latentrt.generate(tiny_recurrent(), "cat", max_new_tokens=2, stop=[0], guided_regex="a")
    model, kw = make("recurrent")
    short = tiny_recurrent(seed=3, vocab_size=TOKENIZER.get_vocab_size() - 1)  # (the last token has no logit)
    short.tokenizer = TOKENIZER
    size = TOKENIZER.get_vocab_size()
    with pytest.raises(latentrt.InputError, match=f"the tokenizer has {size}, the model {size - 1}$"):
        latentrt.generate(short, "Alex", **kw, max_new_tokens=2, guided_regex="a")
    model.tokenizer = None
    with pytest.raises(latentrt.InputError, match="structured outputs need a tokenizer"):
        latentrt.generate(model, [5, 6], **kw, max_new_tokens=2, guided_regex="a")
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(latentrt.InputError, match=r"need llguidance: pip install 'latentrt\[structured\]'"):
        latentrt.generate(make("recurrent")[0], "Alex", **kw, max_new_tokens=2, guided_regex="a")


def test_the_command_line_takes_the_flags_and_files(tmp_path, capsys):
    from latentrt.checkpoint import save_checkpoint
    from latentrt.cli import main

    model, kw = make("recurrent")
    save_checkpoint(model, tmp_path / "m", tie_key="lm_head.weight")
    TOKENIZER.save(str(tmp_path / "m" / "tokenizer.json"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    argv = ["generate", str(tmp_path / "m"), "Alex is", "--steps", "3", "--init-scale", "0", "--stop", "0"]
    argv += ["--max-new-tokens", "40"]
    for flag, value, option in [
        ("--guided-regex", REGEX, dict(guided_regex=REGEX)),
        ("--guided-json", "@" + str(schema), dict(guided_json=SCHEMA)),
        ("--guided-json", json.dumps(SCHEMA), dict(guided_json=SCHEMA)),
        ("--guided-grammar", 'start: " " ("yes" | "no")', dict(guided_grammar='start: " " ("yes" | "no")')),
    ]:
        capsys.readouterr()
        assert main(argv + [flag, value]) == 0
        want = latentrt.generate(latentrt.load(tmp_path / "m"), "Alex is", **kw, max_new_tokens=40, **option)
        assert want.text in capsys.readouterr().out, flag
    assert main(argv + ["--guided-json", "@" + str(tmp_path / "missing.json")]) == 2
    assert "latentrt: error: --guided-json @" in capsys.readouterr().err
    assert main(argv + ["--guided-regex", "(ab"]) == 2
    assert "latentrt: error: --guided-regex must be a valid regular expression" in capsys.readouterr().err


@pytest.fixture(scope="module")
def byte_level_server():
    from test_server import TEMPLATE, serving

    model, kw = make("recurrent", seed=3)
    with serving(model, template=TEMPLATE, max_batch=4) as (url, engine):
        yield url, engine, model


def test_the_server_takes_vllm_and_openai_structured_fields(byte_level_server):
    """vLLM's ``guided_*`` fields and ``structured_outputs``, OpenAI's ``response_format`` JSON modes: the tokens
    of generate() alone with the same option, completions and chat."""
    openai = pytest.importorskip("openai")
    url, _, model = byte_level_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    args = dict(model="tiny", max_tokens=40, temperature=0.8, seed=3)
    extra = {"stop_token_ids": [0], "num_steps": 3, "init_scale": 0.0}
    named = dict(name="thing", schema=SCHEMA)
    for body, option in [
        ({"guided_regex": REGEX}, dict(guided_regex=REGEX)),
        ({"structured_outputs": {"regex": REGEX}}, dict(guided_regex=REGEX)),
        ({"guided_json": SCHEMA}, dict(guided_json=SCHEMA)),
        ({"structured_outputs": {"json": SCHEMA}}, dict(guided_json=SCHEMA)),
        ({"response_format": {"type": "json_schema", "json_schema": named}}, dict(guided_json=SCHEMA)),
        ({"response_format": {"type": "json_object"}}, dict(guided_json={"type": "object"})),
        ({"structured_outputs": {"json_object": True}}, dict(guided_json={"type": "object"})),
        ({"guided_grammar": 'start: " " ("yes" | "no")'}, dict(guided_grammar='start: " " ("yes" | "no")')),
        ({"structured_outputs": {"grammar": 'root ::= "ab"'}}, dict(guided_grammar='root ::= "ab"')),
    ]:
        want = latentrt.generate(
            model, "Alex is", max_new_tokens=40, temperature=0.8, seed=3, stop=[0], num_steps=3, init_scale=0.0,
            **option,
        )  # fmt: skip
        r = c.completions.create(prompt="Alex is", extra_body=dict(extra, **body), **args)
        assert r.choices[0].latentrt["token_ids"] == want.tokens and r.choices[0].text == want.text, body
    chat = [{"role": "user", "content": "Alex is"}]
    compact = dict(extra, structured_outputs={"disable_any_whitespace": True})
    r = c.chat.completions.create(
        messages=chat, response_format={"type": "json_schema", "json_schema": named}, extra_body=compact, **args
    )
    assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].message.content)) == {"name", "kind"}


def test_the_servers_structured_errors_are_400s(byte_level_server):
    import httpx

    url, engine, _ = byte_level_server
    h = httpx.Client(base_url=url)
    args = dict(model="tiny", prompt="Alex is", max_tokens=4, stop_token_ids=[0])
    for bad, message in [
        (dict(guided_regex="a", guided_json={}), "give one of guided_choice, guided_json, guided_regex"),
        (dict(guided_regex="a", structured_outputs={"json": {}}), "give one kind of structured output, not 2"),
        (dict(structured_outputs={"json": {}, "regex": "a"}), "give one kind of structured output, not 2"),
        (dict(response_format={"type": "json_object"}, guided_regex="a"), "give one kind of structured output"),
        (
            dict(structured_outputs={"xml": "a"}),
            "structured_outputs takes one of ['choice', 'disable_any_whitespace', 'grammar'",
        ),
        (dict(structured_outputs={"json_object": 3}), "structured_outputs' json_object must be true or false"),
        (dict(response_format={"type": "xml"}), 'response_format must be {"type": "text"}'),
        (dict(response_format="json"), 'response_format must be {"type": "text"}'),
        (dict(response_format={"type": "json_schema", "json_schema": {}}), "json_schema must be an object with a"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "x": 1}}), "unknown field(s)"),
        (dict(guided_json={"type": "nonsense"}), "guided_json must be a valid JSON schema"),
        (dict(guided_regex="(a"), "guided_regex must be a valid regular expression"),
        (dict(guided_regex="a", stop_token_ids=None, ignore_eos=True), "guided_regex must end with a stop token"),
    ]:
        got = h.post("/v1/completions", json=dict(args, **bad))
        assert got.status_code == 400 and message in got.json()["error"]["message"], (bad, got.text)
    assert h.post("/v1/completions", json=dict(args, response_format={"type": "text"})).status_code == 200
