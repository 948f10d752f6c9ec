"""The command line: generate, info, errors as exit code 2."""

import io
import json
import socket

import pytest

import latentrt
from latentrt.cli import main


def test_info(recurrent_dir, capsys):
    assert main(["info", str(recurrent_dir), "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "KV bytes per token (r=8)" in out and "shared" in out
    assert "backend: torch" in out
    assert "  triton: " in out and "  cuda: " in out  # each backend: available, or why not
    assert "sampling defaults (generation_config.json): none (greedy)" in out
    (recurrent_dir / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6}')
    assert main(["info", str(recurrent_dir)]) == 0
    assert "sampling defaults (generation_config.json): temperature=0.6" in capsys.readouterr().out
    assert main(["info", str(recurrent_dir), "--hf-overrides", '{"mean_recurrence": 7}']) == 0  # vLLM's flag
    assert "  mean_recurrence: 7" in capsys.readouterr().out


def test_info_says_a_coconut_models_trained_format(capsys):
    """What ``generate()`` appends to a prompt without markers is the model's training.json's count: info
    says it (and the format), as the README's models table does."""
    for name, line in (
        ("coconut", "coconut; a prompt without markers gets 3"),
        ("coconut-cot", "cot; a prompt without markers gets 0"),
    ):
        assert main(["info", f"builtin:{name}"]) == 0
        assert f"trained prompt format: {line} continuous thought(s)" in capsys.readouterr().out


def test_version(capsys):
    """``latentrt --version``: the one version pyproject.toml and ``latentrt.__version__`` read."""
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"latentrt {latentrt.__version__}\n"
    assert importlib.metadata.version("latentrt") == latentrt.__version__


def test_python_dash_m_latentrt_is_the_command(recurrent_dir):
    """``python -m latentrt ...`` runs the command (where the console script is not on PATH), exit status
    included."""
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "latentrt", *a], capture_output=True, text=True)  # noqa: E731
    ok = run("info", str(recurrent_dir))
    assert ok.returncode == 0 and "parameters:" in ok.stdout
    bad = run("info", str(recurrent_dir), "--steps", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("latentrt: error: --steps must be >= 1")


def test_generate_recurrent(recurrent_dir, capsys):
    assert (
        main(
            [
                "generate",
                str(recurrent_dir),
                "every cat is",
                "--adaptive",
                "--criterion",
                "latent-diff",
                "--steps",
                "8",
                "--kv",
                "shared",
                "--max-new-tokens",
                "4",
                "--init-scale",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "steps per token: [" in out and "KV cache:" in out


def test_generate_json_batch_stream(recurrent_dir, capsys):
    assert main(["generate", str(recurrent_dir), "every cat", "Tom is", "--max-new-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["tokens"]) == 2 and all(len(t) == 3 for t in res["tokens"])
    sampled = [
        "generate",
        str(recurrent_dir),
        "every cat",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--temperature",
        "1",
    ]
    assert main([*sampled, "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert main([*sampled, "--stream"]) == 0
    lines = capsys.readouterr().out.split("\n")  # the pieces on one line as they came, then the report
    assert text.count(" ") >= 2 and lines[0] == text and lines[1].startswith("steps per token: [")
    # --json with --stream: every line is JSON (the streamed text came before the JSON, so no reader parsed it)
    for prompts in (["every cat"], ["every cat", "Tom is"]):
        assert main(["generate", str(recurrent_dir), *prompts, "--max-new-tokens", "3", "--stream", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        events, result = lines[:-1], lines[-1]
        assert [e["index"] for e in events] == [0, 1, 2]
        tokens = [e["tokens"] for e in events]
        assert (tokens if len(prompts) == 1 else [list(t) for t in zip(*tokens)]) == result["tokens"]


def test_generate_takes_the_checkpoints_sampling_defaults_unless_a_flag_is_given(recurrent_dir, capsys):
    """A flag not given is left to generate(), so a checkpoint's generation_config.json sampling defaults
    apply (as in the API); ``--temperature 0`` overrides them."""
    import latentrt

    (recurrent_dir / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.9, "top_k": 4}')
    model = latentrt.load(recurrent_dir, device="cpu")
    kw = dict(max_new_tokens=8, seed=3, default_stops=False, init_scale=0.0)
    flags = ["--max-new-tokens", "8", "--seed", "3", "--no-default-stops", "--init-scale", "0", "--json"]
    for extra, want in (([], {}), (["--temperature", "0"], {"temperature": 0.0})):
        assert main(["generate", str(recurrent_dir), "every cat is", *flags, *extra]) == 0
        got = json.loads(capsys.readouterr().out)["tokens"]
        assert got == latentrt.generate(model, "every cat is", **kw, **want).tokens
    sampled = latentrt.generate(model, "every cat is", **kw).tokens
    assert sampled != latentrt.generate(model, "every cat is", **kw, temperature=0.0).tokens
    plain = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "2"]
    assert main(plain) == 0  # the summary says which defaults were in force
    assert "sampling defaults from generation_config.json: temperature=0.9, top_k=4" in capsys.readouterr().out
    assert main([*plain, "--temperature", "0.5"]) == 0
    assert "generation_config.json: top_k=4 (" in capsys.readouterr().out


def test_warnings_are_one_line_saying_latentrt(recurrent_dir, capsys):
    """A warning reads as the errors do (``latentrt: warning: ...``), not as Python's file:line: UserWarning
    with a source line; and main() leaves Python's display as it was (tests call it in-process)."""
    import warnings

    shown = warnings.showwarning
    assert main(["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "1", "--top-p", "0.9"]) == 0
    err = capsys.readouterr().err
    assert (
        err == "latentrt: warning: --top-p acts only when sampling (temperature > 0); with temperature=0 it is unused\n"
    )
    assert warnings.showwarning is shown


def test_generate_stop_text_equals_the_api(recurrent_dir, capsys):
    """``--stop-text`` strings join ``--stop`` ids in generate()'s ``stop``: the same tokens and text; the
    text options too."""
    import latentrt

    model = latentrt.load(recurrent_dir, device="cpu")
    kw = dict(max_new_tokens=8, temperature=0.0, seed=2, default_stops=False)
    plain = latentrt.generate(model, "every cat is", **kw)
    text = plain.text
    assert len(text) >= 3  # text[2:6] is a stop string it meets
    stop_id = min(set(range(5, 40)) - set(plain.tokens))  # an id it does not make: the stop string ends it
    want = latentrt.generate(model, "every cat is", stop=[stop_id, text[2:6]], **kw)
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "8", "--temperature", "0"]
    argv += ["--seed", "2", "--no-default-stops", "--stop", str(stop_id), "--stop-text", text[2:6], "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["tokens"], res["text"], res["finish_reasons"]) == (want.tokens, want.text, want.finish_reasons)
    # and the ids stop it where they come first
    first = ["--stop", str(plain.tokens[0]), "--stop-text", "zebra", "--json"]
    assert main([*argv[: argv.index("--stop")], *first]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["tokens"], res["finish_reasons"]) == (plain.tokens[:1], ["stop"])
    # --include-stop-str-in-output and --no-skip-special-tokens: the text as generate()'s with those options
    want = latentrt.generate(
        model,
        "every cat is",
        stop=[stop_id, text[2:6]],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        **kw,
    )
    assert main(argv + ["--include-stop-str-in-output", "--no-skip-special-tokens"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["text"] == want.text != latentrt.generate(model, "every cat is", stop=[stop_id, text[2:6]], **kw).text


def test_generate_penalties_equal_the_api(recurrent_dir, capsys):
    """The sampling flags reach generate(): min-p, the penalties, ``--logit-bias ID=BIAS`` (repeatable),
    ``--min-new-tokens``, the DRY penalty's three."""
    import latentrt

    model = latentrt.load(recurrent_dir, device="cpu")
    opts = dict(min_p=0.1, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=1.5, min_new_tokens=3)
    kw = dict(max_new_tokens=8, temperature=0.9, seed=2, default_stops=False, logit_bias={5: 2.0, 9: -3.5}, **opts)
    want = latentrt.generate(model, "every cat is", **kw)
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "8", "--temperature", "0.9"]
    argv += ["--seed", "2", "--no-default-stops", "--logit-bias", "5=2", "--logit-bias", "9=-3.5", "--json"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want.tokens
    for item, form in (
        ("5", "ID=BIAS"),
        ("5=much", "ID=BIAS (a token id and a number)"),
        ("x=1", "ID=BIAS (a token id and a number)"),
    ):
        assert main(["generate", str(recurrent_dir), "x", "--logit-bias", item]) == 2
        assert f"--logit-bias takes {form}, got '{item}'" in capsys.readouterr().err
    assert main(["generate", str(recurrent_dir), "x", "--repetition-penalty", "0"]) == 2
    assert "error: --repetition-penalty must be in [1e-30, 1e+30]" in capsys.readouterr().err
    dry = dict(dry_multiplier=2.5, dry_base=1.5, dry_allowed_length=1)
    want = latentrt.generate(model, "every cat is", max_new_tokens=8, default_stops=False, seed=2, **dry)
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "8", "--no-default-stops", "--json"]
    argv += ["--seed", "2"]
    assert main(argv + [f"--{k.replace('_', '-')}={v}" for k, v in dry.items()]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want.tokens
    assert main(argv + ["--dry-multiplier", "1", "--repetition-penalty", "1.2"]) == 2
    assert "dry_multiplier and repetition_penalty are exclusive" in capsys.readouterr().err


def test_generate_allowed_token_ids_bad_words_and_guided_choice_equal_the_api(recurrent_dir, capsys):
    """``--allowed-token-ids ID ...``, ``--bad-words WORD ...`` and ``--guided-choice TEXT ...`` reach generate();
    errors name the flags."""
    import latentrt

    model = latentrt.load(recurrent_dir, device="cpu")
    words = [i for i in range(model.config.vocab_size) if (model.tokenizer.id_to_token(i) or "<").isalpha()]
    kw = dict(max_new_tokens=8, temperature=0.9, seed=2, default_stops=False)
    want = latentrt.generate(model, "every cat is", **kw, allowed_token_ids=words, bad_words=["cat", "is a"])
    assert want.tokens != latentrt.generate(model, "every cat is", **kw).tokens
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "8", "--temperature", "0.9"]
    argv += ["--seed", "2", "--no-default-stops", "--json", "--bad-words", "cat", "is a", "--allowed-token-ids"]
    assert main(argv + [str(i) for i in words]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want.tokens
    assert main(["generate", str(recurrent_dir), "x", "--allowed-token-ids", "999"]) == 2
    assert "error: --allowed-token-ids must be ids of the vocabulary [0, 40), got [999]" in capsys.readouterr().err
    want = latentrt.generate(model, "every cat is", max_new_tokens=8, stop=[0], guided_choice=["Tom is a cat", "no"])
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "8", "--stop", "0", "--json"]
    assert main(argv + ["--guided-choice", "Tom is a cat", "no"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want.tokens and want.text in ("Tom is a cat", "no")
    assert main(["generate", str(recurrent_dir), "x", "--guided-choice", "no"]) == 2
    assert "error: --guided-choice must end with a stop token and there is none" in capsys.readouterr().err


def test_generate_coconut(coconut_dir, capsys):
    assert main(["generate", str(coconut_dir), "every cat", "--thoughts", "2", "--max-new-tokens", "3"]) == 0
    assert "continuous thoughts: 2" in capsys.readouterr().out
    argv = ["generate", str(coconut_dir), "every cat", "--thoughts", "2", "--max-new-tokens", "3", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["num_thoughts"] == 2


def test_errors_exit_2(recurrent_dir, tmp_path, capsys):
    assert main(["generate", str(recurrent_dir), "x", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_decoding_options_from_the_command_line_equal_the_api(recurrent_dir, capsys):
    """``--decoding-option KEY=VALUE`` (repeatable) reaches the sampler: VALUE read as JSON, else as text (so
    the sampler names a wrong one); ``--ids`` with ``--chat`` is refused."""
    import latentrt

    model = latentrt.load(recurrent_dir, device="cpu")
    kw = dict(max_new_tokens=5, default_stops=False, init_scale=0.0)
    want = latentrt.generate(model, "every cat is", decoding="speculative", decoding_options={"lookahead": 3}, **kw)
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "5", "--no-default-stops"]
    argv += ["--init-scale", "0", "--decoding", "speculative", "--decoding-option", "lookahead=3", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == want.tokens and got["decoding"] == want.decoding
    for option, message in (
        ("lookahead=three", "lookahead must be an integer >= 1, got 'three'"),
        ("lookahead", "--decoding-option takes KEY=VALUE, got 'lookahead'"),
        ("=3", "--decoding-option takes KEY=VALUE, got '=3'"),
    ):
        assert main([*argv[:-2], option]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", str(recurrent_dir), "--ids", "5,6", "--chat"]) == 2
    assert "--ids and --chat do not go together" in capsys.readouterr().err


def test_recurrence_flags_take_the_api_names_too():
    """--num-steps, --exit-criterion, --exit-threshold, --kv-sharing, --num-thoughts (generate()'s and the
    server's names) are the same flags as --steps, --criterion, --threshold, --kv, --thoughts."""
    from latentrt.cli import build_parser

    parse = build_parser().parse_args
    short = ["--steps", "3", "--criterion", "cosine", "--threshold", "0.1", "--kv", "shared", "--thoughts", "2"]
    long = ["--num-steps", "3", "--exit-criterion", "cosine", "--exit-threshold", "0.1", "--kv-sharing", "shared"]
    long += ["--num-thoughts", "2"]
    assert parse(["generate", "m", "p", *short]) == parse(["generate", "m", "p", *long])
    assert parse(["chat", "m", *short]) == parse(["chat", "m", *long])
    assert parse(["eval", "m", "d", *short[:6]]) == parse(["eval", "m", "d", *long[:6]])
    assert parse(["info", "m", "--num-steps", "8"]).steps == 8


def test_every_error_is_one_line_and_nonzero(recurrent_dir, coconut_dir, tmp_path, capsys):
    """Bad flags and inputs: ``latentrt: error: ...`` on stderr, a non-zero exit, no traceback."""
    (tmp_path / "records.json").write_text('[{"question": "q"}]')
    (tmp_path / "empty.json").write_text("[]")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = str(s.getsockname()[1])
    cases = [
        (["generate", str(coconut_dir), "every cat", "--adaptive"], "adaptive does not apply to this Coconut"),
        (["generate", str(recurrent_dir), "every cat", "--thoughts", "2"], "error: --thoughts does not apply"),
        (["info", str(recurrent_dir), "--steps", "-3"], "--steps must be >= 1"),
        (["eval", str(recurrent_dir), str(tmp_path), "--limit", "2"], "is a folder"),
        (["eval", str(recurrent_dir), str(tmp_path / "records.json")], "has no 'answer'"),
        (["eval", str(recurrent_dir), str(tmp_path / "records.json"), "--limit", "0"], "--limit must be >= 1"),
        (["eval", str(recurrent_dir), str(tmp_path / "empty.json")], "empty.json holds no records"),
        (["serve", str(recurrent_dir), "--port", "99999"], "--port must be in [1, 65535], got 99999"),
        (["serve", str(recurrent_dir), "--max-queue", "0"], "--max-queue must be >= 1, got 0"),
        (["serve", str(recurrent_dir), "--max-len", "1"], "--max-len must be >= 2, got 1"),
        (["serve", str(recurrent_dir), "--kv-slots", "0"], "--kv-slots must be >= 1, got 0"),
        (["serve", str(recurrent_dir), "--max-num-steps", "0"], "--max-num-steps must be >= 1, got 0"),
        (
            [
                "serve",
                str(recurrent_dir),
                "--port",
                free,
                "--max-num-steps",
                "100",
                "--override-generation-config",
                '{"num_steps": 200}',
            ],
            "--max-num-steps must be an integer >= 200 (the num_steps a request gets by default), got 100",
        ),
        (["eval", str(recurrent_dir), str(tmp_path / "records.json"), "--batch-size", "0"], "--batch-size"),
        (["generate", str(recurrent_dir), "every cat", "--kv", "ring-0"], "error: --kv must be"),
        (["generate", "builtin:", "x"], "the built-in models are"),
        (["info", str(recurrent_dir), "--hf-overrides", "{mean_recurrence: 3}"], "--hf-overrides must be a JSON"),
        (["info", str(recurrent_dir), "--hf-overrides", "[3]"], "must be a JSON object, got list"),
        (["info", str(recurrent_dir), "--hf-overrides", '{"mean_recurence": 3}'], "mean_recurence"),
        (
            ["serve", str(recurrent_dir), "--port", free, "--override-generation-config", '{"num_thoughts": 2}'],
            "num_thoughts does not apply",
        ),
        (["serve", str(recurrent_dir), "--override-generation-config", "3"], "must be a JSON object"),
    ]
    for argv, msg in cases:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        assert err.startswith("latentrt: error:") and msg in err and "Traceback" not in err, (argv, err)
    (tmp_path / "ok.json").write_text('[{"question": "every cat", "steps": [], "answer": "Tom"}]')
    assert main(["eval", str(coconut_dir), str(tmp_path / "ok.json"), "--modes", "bogus"]) == 2
    assert "unknown prompt format 'bogus'" in capsys.readouterr().err


def test_an_unexpected_failure_and_ctrl_c_are_one_line(recurrent_dir, capsys, monkeypatch):
    """A failure no check foresaw: one line naming its type and how to see the traceback, status 1 (with
    LATENTRT_DEBUG=1 the exception itself); Ctrl-C: 'interrupted', status 130 (as a shell reports SIGINT)."""
    from latentrt import cli

    def fails(args):
        raise RuntimeError("the device fell over")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", fails)
    assert main(["info", str(recurrent_dir)]) == 1
    err = capsys.readouterr().err
    assert err == "latentrt: error: RuntimeError: the device fell over (LATENTRT_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("LATENTRT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="the device fell over"):
        main(["info", str(recurrent_dir)])
    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info", str(recurrent_dir)]) == 130
    assert capsys.readouterr().err == "latentrt: interrupted\n"


def test_a_prompt_dash_is_standard_input(recurrent_dir, capsys, monkeypatch):
    """``echo TEXT | latentrt generate MODEL -``: the text less its final newline, beside other prompts too;
    two ``-`` are an error before the model loads."""
    d, kw = str(recurrent_dir), ["--max-new-tokens", "3", "--seed", "3", "--json"]
    assert main(["generate", d, "every cat is", "a dog", *kw]) == 0
    want = json.loads(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO("every cat is\n"))
    assert main(["generate", d, "-", "a dog", *kw]) == 0
    assert json.loads(capsys.readouterr().out) == want
    assert main(["generate", d, "-", "-"]) == 2
    assert "only one prompt can be - (standard input)" in capsys.readouterr().err
    # only the final newline goes (what echo adds): the text's own lines and spaces are the prompt's
    from latentrt.cli import _read_stdin_prompt

    monkeypatch.setattr("sys.stdin", io.StringIO("  two lines\nend \n\n"))
    assert _read_stdin_prompt(["x", "-"]) == ["x", "  two lines\nend \n"]


def test_ids_prompts_for_a_model_without_a_tokenizer(recurrent_dir, capsys):
    """``--ids 5,6,7``: prompts as token ids, for a model folder without tokenizer.json (whose text prompts
    are refused naming the flag); the output is the generated ids, batched and streamed too."""
    import latentrt

    d = str(recurrent_dir)
    (recurrent_dir / "tokenizer.json").unlink()
    model = latentrt.load(recurrent_dir, device="cpu")
    kw = dict(max_new_tokens=3, seed=2, default_stops=False)
    one, two = latentrt.generate(model, [5, 6, 7], **kw), latentrt.generate(model, [[5, 6, 7], [8, 9]], **kw)
    flags = ["--max-new-tokens", "3", "--seed", "2", "--no-default-stops"]
    assert main(["generate", d, "every cat"]) == 2
    assert "no tokenizer.json: give the prompts as token ids with --ids" in capsys.readouterr().err
    assert main(["generate", d, "--ids", "5,6,7", *flags]) == 0
    assert capsys.readouterr().out.splitlines()[0] == " ".join(map(str, one.tokens))
    assert main(["generate", d, "--ids", "5 6 7", "[8, 9]", *flags]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"[{i}] " + " ".join(map(str, t)) for i, t in enumerate(two.tokens)]
    assert main(["generate", d, "--ids", "5,6,7", "8,9", "--stream", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"{a} | {b}" for a, b in zip(*two.tokens)]
    assert main(["generate", d, "--ids", "5,x"]) == 2
    assert "--ids: a prompt must be token ids separated by commas or spaces, got '5,x'" in capsys.readouterr().err


def test_generate_options_are_named_as_the_commands_flags(recurrent_dir, tmp_path, capsys, monkeypatch):
    """Errors and warnings about generate()'s options name the flag the user types (``--threshold must be``,
    not ``exit_threshold``), in generate, chat and eval, as train's name its flags; an on/off flag stands for
    the value it sets (``append_thoughts=False`` is ``--no-append-thoughts``); an option not given keeps its
    name (``without adaptive=True``)."""
    d = str(recurrent_dir)
    (tmp_path / "r.json").write_text('[{"question": "every cat", "steps": [], "answer": "Tom"}]')
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # chat checks its options before reading a message
    for argv, message in [
        (["generate", d, "x", "--threshold", "-1", "--adaptive"], "error: --threshold must be >= 0, got -1.0"),
        (
            ["generate", d, "x", "--min-new-tokens", "5", "--max-new-tokens", "2"],
            "error: --min-new-tokens must be an integer in [0, --max-new-tokens=2], got 5",
        ),
        (["generate", d, "x", "--thoughts", "2"], "error: --thoughts does not apply to this recurrent-depth model"),
        (["generate", d, "x", "--no-append-thoughts"], "error: --no-append-thoughts does not apply to this recurrent"),
        (
            ["generate", "builtin:coconut", "x", "--no-append-thoughts", "--thoughts", "2"],
            "error: --thoughts=2 appends thoughts and --no-append-thoughts appends none",
        ),
        (
            ["chat", d, "--chat-template", str(tmp_path / "t.jinja"), "--check-every", "0", "--adaptive"],
            "error: --check-every must be an integer in [1, 2**31 - 1], got 0",
        ),
        (["eval", d, str(tmp_path / "r.json"), "--criterion", "kl", "--adaptive", "--threshold", "-2"], "--threshold"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("latentrt: ") and message in err, (argv, err)
    assert main(["generate", d, "x", "--top-k", "3", "--threshold", "0.1", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "latentrt: warning: --top-k acts only when sampling (temperature > 0); with temperature=0 it" in err
    assert "latentrt: warning: --threshold acts only on the adaptive exit: without adaptive=True" in err


def test_a_closed_pipe_ends_the_command_quietly(recurrent_dir, monkeypatch, capsys):
    """``latentrt ... | head -1``: once the reader has gone, the command stops with the status a shell
    gives a process SIGPIPE ended (141) and prints nothing more (it said "latentrt: error:
    BrokenPipeError", status 1)."""
    import os
    import sys

    commands = [["info"], ["generate", "every cat", "--max-new-tokens", "3", "--stream"]]
    for command, *args in commands:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader has gone before the first line
        closed = os.fdopen(write_end, "w", buffering=1)
        monkeypatch.setattr(sys, "stdout", closed)
        try:
            assert main([command, str(recurrent_dir), *args]) == 141
        finally:
            closed.close()  # its descriptor now points at /dev/null: closing it cannot fail
    assert capsys.readouterr().err == ""


def test_the_top_level_help_says_what_the_tool_does_and_its_examples_parse(capsys):
    """``latentrt --help``: a description for users (no docstring markup), and examples each of which the
    parser takes as given (the serve example is only parsed; test_readme runs such commands)."""
    import shlex

    from latentrt.cli import EXAMPLES, build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "latent space" in out and "``" not in out and "examples:" in out
    examples = [shlex.split(line.strip()) for line in EXAMPLES.splitlines()[1:]]
    commands = [argv[:2] for argv in examples]
    assert commands == [["latentrt", c] for c in ("generate", "info", "serve", "run-batch")]
    for argv in examples:
        build_parser().parse_args(argv[1:])
    assert main(examples[1][1:]) == 0 and "coconut" in capsys.readouterr().out


def test_the_recurrent_report_lines():
    """The lines ``latentrt generate`` prints after the text: steps per token and their mean, a row index only
    for a batch, and a sampler's statistics (floats to three significant digits)."""
    from types import SimpleNamespace

    from latentrt.decode.recurrent import RecurrentDecoder

    one = SimpleNamespace(text="a", steps=[4, 1], decoding=None)
    assert RecurrentDecoder.report(one) == ["steps per token: [4, 1] (mean 2.50)"]
    empty = SimpleNamespace(text="", steps=[], decoding=None)
    assert RecurrentDecoder.report(empty) == ["steps per token: [] (mean 0.00)"]
    batch = SimpleNamespace(text=["a", "b"], steps=[[3], [1, 2]], decoding={"tokens_per_step": 1.23456, "steps": 3})
    assert RecurrentDecoder.report(batch) == [
        "[0] steps per token: [3] (mean 3.00)",
        "[1] steps per token: [1, 2] (mean 1.50)",
        "decoding: tokens_per_step 1.23, steps 3",
    ]


def test_save_writes_the_model_with_its_flags_baked_in(tmp_path, capsys):
    """``latentrt save MODEL OUT``: save_pretrained from the command line; --weights, --hf-overrides and --dtype
    end up in the folder, and its errors name the command's flags."""
    import torch

    out = tmp_path / "r8"
    argv = ["save", "builtin:recurrent", str(out), "--hf-overrides", '{"mean_recurrence": 8}', "--dtype", "bf16"]
    assert main([*argv, "--max-shard-size", "100000"]) == 0
    assert f"latentrt: saved builtin:recurrent (recurrent, torch.bfloat16) to {out}" in capsys.readouterr().out
    saved = latentrt.load(out)
    assert saved.config.mean_recurrence == 8 and saved.dtype == torch.float32  # (load's CPU default)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert main(["save", "builtin:recurrent", str(out), "--max-shard-size", "1GB"]) == 0  # a checkpoint: replaced
    assert latentrt.load(out).config.mean_recurrence == 4 and (out / "model.safetensors").exists()
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    for flags, message in (
        (["--max-shard-size", "5XB"], "latentrt: error: --max-shard-size '5XB' is not a size such as"),
        (
            [],
            "holds files that are not a checkpoint's (notes.txt); save_pretrained replaces the folder whole: "
            "choose another folder, or pass --overwrite to",
        ),
    ):
        assert main(["save", "builtin:recurrent", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["save", "builtin:recurrent", str(out), "--overwrite"]) == 0 and not (out / "notes.txt").exists()
