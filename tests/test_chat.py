"""latentrt/chat.py: a conversation's prompt ids, as the server's chat route runs them, for the Python API
(``latentrt.apply_chat_template``) and ``latentrt generate --chat``."""

import json
import re

import pytest
from conftest import tiny_recurrent

import latentrt
from latentrt.chat import ChatTemplate, find_chat_template, render_chat
from latentrt.cli import main

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Alex is a wumpus."}]


def test_the_model_folders_template_renders_and_tokenizes_without_special_tokens():
    model = latentrt.load("builtin:recurrent")  # its tokenizer_config.json: the user messages, each + " "
    ids = latentrt.apply_chat_template(model, MESSAGES)
    assert ids == model.tokenizer.encode("Alex is a wumpus. ", add_special_tokens=False).ids
    parts = [{"role": "user", "content": [{"type": "text", "text": "Alex is"}, {"type": "text", "text": "a wumpus."}]}]
    assert latentrt.apply_chat_template(model, parts) == ids  # OpenAI's text parts
    assert render_chat(find_chat_template(model.folder), parts) == "Alex is\na wumpus. "  # joined as vLLM joins them


def test_a_template_given_as_an_object_or_a_file(tmp_path):
    model = tiny_recurrent(seed=1)  # built in memory: no folder, no template
    with pytest.raises(latentrt.InputError, match="this model has no chat template"):
        latentrt.apply_chat_template(model, MESSAGES)
    source = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    want = model.tokenizer.encode("system : Be brief. . user : Alex is a wumpus. . ", add_special_tokens=False).ids
    assert latentrt.apply_chat_template(model, MESSAGES, ChatTemplate(source)) == want
    (tmp_path / "t.jinja").write_text(source)
    assert latentrt.apply_chat_template(model, MESSAGES, tmp_path / "t.jinja") == want
    with pytest.raises(latentrt.InputError, match="messages must be a non-empty list"):
        latentrt.apply_chat_template(model, [], ChatTemplate(source))
    # a model's name where the model goes, a template of another type: named (AttributeErrors before)
    with pytest.raises(latentrt.InputError, match="expected a model from latentrt.load"):
        latentrt.apply_chat_template("builtin:recurrent", MESSAGES)
    with pytest.raises(latentrt.InputError, match="template must be a ChatTemplate or a template file's path"):
        latentrt.apply_chat_template(model, MESSAGES, 3)


@pytest.mark.parametrize(
    "field, message",
    [
        ({"chat_template": 3}, "chat_template must be a string, got int"),
        (
            {"chat_template": [{"name": "tool_use", "template": "x"}]},
            r"named chat templates \(tool_use\) and none named 'default'",
        ),
        ({"chat_template": [{"name": "default", "template": 3}]}, r"must be a list of \{name, template\} objects"),
        ({"chat_template": ["x"]}, r"must be a list of \{name, template\} objects"),
        (None, "tokenizer_config.json cannot be read as JSON"),
        ([], "tokenizer_config.json must be a JSON object, got list"),
    ],
)
def test_a_malformed_template_field_is_named_when_chatting(tmp_path, field, message):
    """A template field of the wrong shape (or a tokenizer_config.json that is not a JSON object) read as "no
    chat template"; now chatting names it, while loading and plain prompts still work (a server still serves
    completions). A named template called "default" is used, as transformers uses it."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(latentrt.load("builtin:recurrent").folder, folder)
    config = folder / "tokenizer_config.json"
    good = json.loads(config.read_text())
    config.write_text(
        "{not json" if field is None else json.dumps(field if isinstance(field, list) else {**good, **field})
    )
    model = latentrt.load(folder)
    assert latentrt.generate(model, "Alex is a wumpus.", max_new_tokens=2).tokens
    with pytest.raises(latentrt.InputError, match="this model's chat template cannot be used: .*" + message):
        latentrt.apply_chat_template(model, MESSAGES)
    config.write_text(json.dumps({**good, "chat_template": [{"name": "default", "template": good["chat_template"]}]}))
    assert latentrt.apply_chat_template(latentrt.load(folder), MESSAGES) == latentrt.apply_chat_template(
        latentrt.load("builtin:recurrent"), MESSAGES
    )
    for blank in ("", " \n ", []):  # an empty template (or list) is none: chatting says the model has none
        config.write_text(json.dumps({**good, "chat_template": blank}))
        with pytest.raises(latentrt.InputError, match="this model has no chat template"):
            latentrt.apply_chat_template(latentrt.load(folder), MESSAGES)


def test_whitespace_around_block_tags_renders_as_transformers_renders_it():
    """transformers renders templates with trim_blocks and lstrip_blocks: the newline after a block tag and the
    indentation before one are not output, so an indented, multi-line template gives transformers' text."""
    transformers = pytest.importorskip("transformers")
    model = latentrt.load("builtin:recurrent")
    source = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "  U: {{ m['content'] }}\n"
        "    {% else %}\n"
        "  {{ m['role'] }}: {{ m['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "  {% if add_generation_prompt %}A:{% endif %}"
    )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=model.tokenizer)
    want = hf.apply_chat_template(MESSAGES, chat_template=source, tokenize=False, add_generation_prompt=True)
    assert render_chat(ChatTemplate(source), MESSAGES) == want == "  system: Be brief.\n  U: Alex is a wumpus.\nA:"


def test_the_special_tokens_a_template_sees_are_transformers(tmp_path):
    """Every special token transformers passes a template (bos, eos, unk, sep, pad, cls, mask), from
    tokenizer_config.json with special_tokens_map.json's winning; one neither names is undefined (it was bos
    and eos only, each "" when absent: ``bos_token is defined`` was true). The text equals transformers'."""
    transformers = pytest.importorskip("transformers")
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(latentrt.load("builtin:recurrent").folder, folder)
    source = (
        "{% for name in ['bos', 'eos', 'unk', 'sep', 'pad', 'cls', 'mask'] %}{% set t = name + '_token' %}"
        "[{{ name }}:{% if t == 'bos_token' and bos_token is defined %}{{ bos_token }}{% elif t == 'eos_token' and "
        "eos_token is defined %}{{ eos_token }}{% elif t == 'unk_token' and unk_token is defined %}{{ unk_token }}"
        "{% elif t == 'sep_token' and sep_token is defined %}{{ sep_token }}{% elif t == 'pad_token' and pad_token "
        "is defined %}{{ pad_token }}{% elif t == 'cls_token' and cls_token is defined %}{{ cls_token }}{% elif t =="
        " 'mask_token' and mask_token is defined %}{{ mask_token }}{% else %}-{% endif %}]{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    config = {"chat_template": source, "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "Alex"}
    cases = [
        ({**config, "eos_token": {"__type": "AddedToken", "content": "is"}, "pad_token": "a"}, None),
        ({**config, "mask_token": "wumpus"}, {"bos_token": "Every", "cls_token": {"content": "yumpus"}}),
        ({"chat_template": source, "tokenizer_class": "PreTrainedTokenizerFast"}, None),
    ]
    for tokenizer_config, special_map in cases:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (folder / "special_tokens_map.json").unlink(missing_ok=True)
        if special_map is not None:
            (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
        hf = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
        want = hf.apply_chat_template(MESSAGES, tokenize=False)
        assert render_chat(find_chat_template(folder), MESSAGES) == want
    assert want == "[bos:-][eos:-][unk:-][sep:-][pad:-][cls:-][mask:-]Be brief.Alex is a wumpus."
    (folder / "special_tokens_map.json").write_text("[1]")
    with pytest.raises(latentrt.InputError, match="cannot be used: special_tokens_map.json must be a JSON object"):
        render_chat(find_chat_template(folder), MESSAGES)


# a template in the shape of Huginn-0125's: a {% generation %} block around the assistant's turns (for
# transformers' assistant masks), bos_token on the first turn, trim, the generation prompt
GENERATION_BLOCK_TEMPLATE = (
    "{% for m in messages %}{% set head = '<h>' %}{% if loop.index0 == 0 %}{% set head = bos_token + head %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ head + 'bot</h>' }}{% generation %}{{ m['content'] | trim + '<e>' }}"
    "{% endgeneration %}{% else %}{{ head + m['role'] + '</h>' + m['content'] | trim + '<e>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<h>bot</h>' }}{% endif %}"
)


def test_a_generation_block_renders_as_transformers_renders_it():
    """``{% generation %}`` (Huginn-0125's template uses it) renders its body; the text equals transformers'
    apply_chat_template rendering (the oracle) for a conversation with an assistant turn."""
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    from latentrt.chat import render_chat

    conversation = [*MESSAGES, {"role": "assistant", "content": " Yes. "}, {"role": "user", "content": "Why?"}]
    got = render_chat(ChatTemplate(GENERATION_BLOCK_TEMPLATE, "<s>", "</s>"), conversation)
    want = render_jinja_template(
        [conversation],
        chat_template=GENERATION_BLOCK_TEMPLATE,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )
    want = want[0][0] if isinstance(want, tuple) else want[0]
    assert got == want and "bot</h>Yes.<e>" in got and got.startswith("<s><h>system")


def test_tojson_and_tools_render_as_transformers_renders_them():
    """transformers' own ``tojson`` (no HTML escaping, keeps non-ASCII; templates render tools and arguments
    with it) and ``tools`` / ``documents`` passed as none (defined): the same text as its renderer."""
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    from latentrt.chat import render_chat

    source = (
        "{% if tools is defined and tools is none %}[no tools]{% endif %}{% if documents is defined %}[docs]{% endif %}"
        "{% for m in messages %}{{ m | tojson }}{{ m['content'] | tojson(indent=2) }}{% endfor %}"
    )
    conversation = [{"role": "user", "content": "a < b & c > 'd' \"é\" ✓"}]
    got = render_chat(ChatTemplate(source), conversation)
    want = render_jinja_template([conversation], chat_template=source, add_generation_prompt=True)
    want = want[0][0] if isinstance(want, tuple) else want[0]
    assert got == want and got.startswith("[no tools][docs]") and "a < b & c" in got and "é" in got


def test_continue_final_message_and_template_variables_render_as_transformers_renders_them():
    """transformers' continue_final_message (the text ends inside the last message: an assistant prefix the
    model continues; a template that trims it too), add_generation_prompt=False and extra template
    variables (vLLM's chat_template_kwargs) give its text; the ids are that text's."""
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    from latentrt.chat import ChatOptions, render_chat

    trimmed = GENERATION_BLOCK_TEMPLATE + "{% if mood is defined %}[{{ mood }}]{% endif %}"
    kept = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} .\n{% endfor %}"
    conversation = [*MESSAGES, {"role": "assistant", "content": "Yes, because "}]
    for source in (trimmed, kept):
        for options in (
            ChatOptions(add_generation_prompt=False, continue_final_message=True),
            ChatOptions(add_generation_prompt=False, template_kwargs={"mood": "calm"}),
            ChatOptions(add_generation_prompt=True, template_kwargs={"mood": "calm", "bos_token": "<B>"}),
        ):
            got = render_chat(ChatTemplate(source, "<s>", "</s>"), conversation, options)
            want = render_jinja_template(
                [conversation],
                chat_template=source,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                **{"bos_token": "<s>", "eos_token": "</s>", **(options.template_kwargs or {})},
            )
            assert got == (want[0][0] if isinstance(want, tuple) else want[0]), (source, options)
    continued = render_chat(ChatTemplate(kept), conversation, ChatOptions(False, True))
    assert continued.endswith("assistant: Yes, because ")  # the prefix as written, for the model to continue
    model = latentrt.load("builtin:recurrent")
    prefix = [{"role": "user", "content": "Alex is a wumpus."}, {"role": "assistant", "content": "Alex is"}]
    template = ChatTemplate(kept)
    ids = latentrt.apply_chat_template(
        model, prefix, template, add_generation_prompt=False, continue_final_message=True
    )
    assert ids == model.tokenizer.encode("user: Alex is a wumpus. .\nassistant: Alex is", add_special_tokens=False).ids
    bad = [
        (ChatOptions(True, True), "continue_final_message and add_generation_prompt cannot both be true"),
        (ChatOptions(False, "yes"), "continue_final_message must be true or false"),
        (ChatOptions(template_kwargs={"messages": []}), "chat_template_kwargs cannot set ['messages']"),
        (
            ChatOptions(template_kwargs={"tools": [], "documents": [], "add_generation_prompt": False, "x": 1}),
            "chat_template_kwargs cannot set ['add_generation_prompt', 'documents', 'tools']",
        ),
        (ChatOptions(template_kwargs=[1]), "chat_template_kwargs must be an object"),
    ]
    for options, message in bad:
        with pytest.raises(latentrt.InputError, match=re.escape(message)):
            render_chat(ChatTemplate(kept), conversation, options)
    drops_last = ChatTemplate("{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}")
    changes_it = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }} {% endfor %}")  # (the tag kept)
    for template in (drops_last, changes_it):  # as transformers: the final message must appear as written
        with pytest.raises(latentrt.InputError, match="does not render the final message as written"):
            render_chat(template, conversation, ChatOptions(False, True))


def conversations_rendered(monkeypatch) -> list:
    """The message lists the CLI renders through latentrt.chat.apply_chat_template, recorded as it is called."""
    seen, real = [], latentrt.chat.apply_chat_template

    def record(model, messages, *args, **kwargs):
        seen.append(list(messages))  # (chat appends to its history after rendering it)
        return real(model, messages, *args, **kwargs)

    monkeypatch.setattr("latentrt.chat.apply_chat_template", record)
    return seen


def test_cli_chat_equals_the_api(recurrent_dir, tmp_path, capsys, monkeypatch):
    """``--chat`` (with ``--system`` and ``--chat-template``): each prompt a user message, the tokens of
    generate() on the API's ids; the flags that need --chat without it are an error."""
    import json

    model = latentrt.load(recurrent_dir, device="cpu")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    want = [
        latentrt.generate(
            model,
            latentrt.apply_chat_template(model, MESSAGES[:1] + [m], tmp_path / "t.jinja"),
            max_new_tokens=4,
            init_scale=0.0,
        )
        for m in ({"role": "user", "content": "every cat"}, {"role": "user", "content": "is a"})
    ]
    argv = ["generate", str(recurrent_dir), "every cat", "is a", "--chat", "--system", "Be brief."]
    seen = conversations_rendered(monkeypatch)
    assert (
        main(
            [
                *argv,
                "--chat-template",
                str(tmp_path / "t.jinja"),
                "--max-new-tokens",
                "4",
                "--init-scale",
                "0",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["tokens"] == [w.tokens for w in want]
    # (the tiny model answers alike with or without the system message: the messages themselves are checked)
    assert seen == [MESSAGES[:1] + [{"role": "user", "content": p}] for p in ("every cat", "is a")]
    for flag in (["--system", "hi"], ["--chat-template", str(tmp_path / "t.jinja")]):
        assert main(["generate", str(recurrent_dir), "x", *flag]) == 2
        assert "--system and --chat-template go with --chat" in capsys.readouterr().err
    assert main(["generate", str(recurrent_dir), "x", "--chat"]) == 2  # a folder without a template
    assert "has no chat template" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation(recurrent_dir, tmp_path, capsys, monkeypatch):
    """``latentrt chat``: each input line a user message; each answer is generate() on the conversation so far
    (answers included, through the template), streamed; ``/reset`` starts over, ``/exit`` ends."""
    import io

    model = latentrt.load(recurrent_dir, device="cpu")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}")
    kw = dict(max_new_tokens=4, init_scale=0.0)
    history, want = [{"role": "system", "content": "cat"}], []
    for line in ("every cat", "is a"):
        history.append({"role": "user", "content": line})
        want.append(latentrt.generate(model, latentrt.apply_chat_template(model, history, template), **kw).text)
        history.append({"role": "assistant", "content": want[-1]})
    fresh = [history[0], {"role": "user", "content": "a cat"}]
    want.append(latentrt.generate(model, latentrt.apply_chat_template(model, fresh, template), **kw).text)
    monkeypatch.setattr("sys.stdin", io.StringIO("every cat\n\nis a\n/reset\na cat\n/exit\nnever read\n"))
    argv = ["chat", str(recurrent_dir), "--system", "cat", "--chat-template", str(template)]
    seen = conversations_rendered(monkeypatch)
    assert main([*argv, "--max-new-tokens", "4", "--init-scale", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == want
    # the messages are the lines without their newline (the word tokenizer would not show it in the answers)
    contents = [[m["content"] for m in messages] for messages in seen]
    assert contents == [["cat", "every cat"], ["cat", "every cat", want[0], "is a"], ["cat", "a cat"]]


def test_text_that_is_not_unicode_is_named(recurrent_dir, tmp_path, capsys, monkeypatch):
    """A lone surrogate (a JSON escape, or bytes on stdin that are not UTF-8) in a message is an InputError
    naming the message; the tokenizer refused it with a TypeError (the server answered 500, the CLI
    'TypeError: TextInputSequence must be str')."""
    import io

    model = latentrt.load(recurrent_dir, device="cpu")
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}{{ x }}")
    for messages, where in [
        ([{"role": "user", "content": "every cat"}, {"role": "user", "content": "is \ud800"}], "messages[1].content"),
        ([{"role": "us\udcffer", "content": "a"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "text", "text": "a \ud800"}]}], "messages[0].content"),
    ]:
        with pytest.raises(latentrt.InputError, match=rf"{re.escape(where)} is not valid Unicode text"):
            latentrt.apply_chat_template(model, messages, template)
    with pytest.raises(latentrt.InputError, match="the rendered conversation .* is not valid Unicode text"):
        latentrt.apply_chat_template(model, [{"role": "user", "content": "a"}], template, x="\ud800")
    (tmp_path / "t.jinja").write_text(template.source)
    monkeypatch.setattr("sys.stdin", io.StringIO("every \udcff cat\n"))  # as Python reads bytes 0xff
    assert main(["chat", str(recurrent_dir), "--chat-template", str(tmp_path / "t.jinja")]) == 2
    assert "latentrt: error: messages[0].content is not valid Unicode text" in capsys.readouterr().err


def test_a_conversation_the_template_or_the_tokenizer_cannot_take_is_named(tmp_path):
    """A template's own refusal (transformers' ``raise_exception``, as Llama's and Mistral's templates refuse
    roles out of order) is the template's message; content that is no text, a conversation rendered to nothing,
    a model without a tokenizer, and a template file that is not UTF-8 each say so."""
    import shutil

    from latentrt.chat import chat_prompt_ids, chat_training_ids

    model = latentrt.load("builtin:recurrent")
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    )
    user_first = MESSAGES[1:]
    text = render_chat(strict, user_first)
    assert text.startswith(user_first[0]["content"])
    assert latentrt.apply_chat_template(model, user_first, strict) == chat_prompt_ids(
        strict, model.tokenizer, user_first
    )
    with pytest.raises(
        latentrt.InputError, match="the chat template rejected the conversation: Conversations must start with a user"
    ):
        latentrt.apply_chat_template(model, MESSAGES, strict)  # (a system message first)
    with pytest.raises(latentrt.InputError, match=r"messages\[0\].content must be a string or a list of text parts"):
        latentrt.apply_chat_template(model, [{"role": "user", "content": 5}], strict)
    silent = ChatTemplate("{% for m in messages %}{% endfor %}")
    with pytest.raises(latentrt.InputError, match="the rendered conversation is empty"):
        chat_prompt_ids(silent, model.tokenizer, MESSAGES)
    for call in (chat_prompt_ids, chat_training_ids):
        with pytest.raises(latentrt.InputError, match="this model has no tokenizer.json: chat needs one"):
            call(strict, None, MESSAGES)
    folder = tmp_path / "m"
    shutil.copytree(model.folder, folder)
    (folder / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    copy = latentrt.load(folder)
    assert latentrt.generate(copy, "Alex is a wumpus.", max_new_tokens=2).tokens  # (loading and prompts work)
    with pytest.raises(latentrt.InputError, match="chat template cannot be used: chat_template.jinja cannot be read"):
        latentrt.apply_chat_template(copy, MESSAGES)
