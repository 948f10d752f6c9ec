"""The first hour of a new user: Hub ids through the hub's cache (offline here), Coconut's published training
checkpoints on top of a GPT-2, honest tokenization, one behaviour across the API and the CLI."""

import json
import os
import shutil
import warnings
from re import escape as re_escape

import pytest
import torch
from conftest import WORDS, rel_err, tiny_coconut, tiny_recurrent

import latentrt
from latentrt.checkpoint import BUILTIN_DIR, save_checkpoint
from latentrt.cli import main
from latentrt.errors import CheckpointError, ConfigError, InputError, LatentRTError
from latentrt.tokenizer import word_tokenizer
from latentrt.train.data import generate_dataset, save_records

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache laid out as huggingface_hub lays it out, with tiny checkpoints in it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo: str, model) -> None:
        root = cache / f"models--{repo.replace('/', '--')}"
        save_checkpoint(model, root / "snapshots" / COMMIT, tie_key="lm_head.weight")
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(COMMIT)

    add("acme/tiny-huginn", tiny_recurrent(seed=3))
    add("acme/tiny-coconut", tiny_coconut(seed=3))
    return add


def test_hub_ids_load_from_the_cache_offline(hub_cache, capsys):
    model = latentrt.load("acme/tiny-huginn", device="cpu")
    ref = tiny_recurrent(seed=3)
    ids = torch.tensor([[5, 6, 7]])
    assert rel_err(model.logits(ids, num_steps=2, init_scale=0.0), ref.logits(ids, num_steps=2, init_scale=0.0)) < 1e-6
    assert latentrt.load("acme/tiny-huginn", revision=COMMIT, device="cpu").folder == model.folder
    assert latentrt.load("acme/tiny-coconut", device="cpu").config.latent_id == 4
    assert main(["generate", "acme/tiny-huginn", "every cat", "--max-new-tokens", "2", "--steps", "2"]) == 0
    assert main(["info", "acme/tiny-coconut"]) == 0 and "latent markers" in capsys.readouterr().out


def test_hub_errors_say_which_problem(hub_cache, tmp_path):
    with pytest.raises(CheckpointError, match="not in the cache .* while offline"):
        latentrt.load("acme/not-there")
    with pytest.raises(CheckpointError, match="at revision 'v9' is not in the cache"):
        latentrt.load("acme/tiny-huginn", revision="v9")
    with pytest.raises(CheckpointError, match=r"does not exist \(and .* is not a Hub id"):
        latentrt.load(str(tmp_path / "nowhere"))
    # a revision cannot apply to a local or built-in model: said, not silently dropped (HF and vLLM drop it)
    with pytest.warns(UserWarning, match=r"revision='v9' applies to Hub ids; 'builtin:recurrent' is a built-in"):
        latentrt.load("builtin:recurrent", revision="v9")
    folder = latentrt.load("acme/tiny-huginn").folder
    with pytest.warns(UserWarning, match=r"revision='v9' applies to Hub ids; .* is a local folder, read as it is"):
        latentrt.load(folder, revision="v9")
    hub_cache("acme/llama", tiny_recurrent())
    cfg = next((tmp_path / "hub" / "models--acme--llama" / "snapshots").iterdir()) / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), model_type="llama")))
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        latentrt.load("acme/llama")


def test_hub_ids_are_owner_slash_name_and_fetch_only_what_latentrt_reads(hub_cache, monkeypatch):
    """``owner/name`` as the Hub spells ids (no leading dot or dash, no ``..``: a path, not an id), and a download
    asks for the configs, tokenizer, chat template and safetensors files, never pickles or code."""
    from fnmatch import fnmatch

    import huggingface_hub

    from latentrt.hub import is_hub_id

    assert all(map(is_hub_id, ("acme/tiny-huginn", "a/b", "Org_1/model.v2-x")))
    assert not any(map(is_hub_id, ("acme/..", "a/b..c", "../x", ".acme/x", "-acme/x", "acme", "a/b/c", "/a/b")))
    with pytest.raises(CheckpointError, match=r"does not exist \(and .* is not a Hub id"):
        latentrt.load("acme/..")
    calls, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(kw) or real(repo, **kw))
    latentrt.load("acme/tiny-huginn", device="cpu")
    allowed = calls[0]["allow_patterns"]
    wanted = ["config.json", "tokenizer.json", "model.safetensors", "model-00001-of-00002.safetensors"]
    wanted += ["model.safetensors.index.json", "generation_config.json", "chat_template.jinja", "tokenizer.model"]
    assert all(any(fnmatch(f, p) for p in allowed) for f in wanted)
    unwanted = ("pytorch_model.bin", "model.pt", "modeling_raven.py", "training_args.bin", "model.ckpt")
    assert not any(fnmatch(f, p) for f in unwanted for p in allowed)


def test_an_unreachable_hub_is_named(hub_cache, monkeypatch):
    """Online, a Hub that does not answer (no network) and a model not in the cache: an error saying so."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(CheckpointError, match=r"could not be fetched from the Hub: the Hub did not answer"):
        latentrt.load("acme/not-there")


@pytest.mark.parametrize(
    "status, code, message",
    [
        (401, "GatedRepo", r"'acme/gated' is gated: accept its terms on its Hub page, then log in"),
        (404, "RepoNotFound", r"nor a model repository on the Hub that this login can see \(a private one"),
        (404, "RevisionNotFound", r"the Hub model 'acme/gated' has no revision 'v9'"),
        (500, "", r"from the Hub at revision 'v9': the Hub answered \"Server error '500 Internal Server Error'"),
    ],
)
def test_gated_and_unseen_hub_models_are_named(hub_cache, monkeypatch, status, code, message):
    """A Hub that answers as huggingface.co does for a gated model (401, X-Error-Code: GatedRepo), one this
    login cannot see (404, RepoNotFound), a revision it does not have (404, RevisionNotFound) or fails (500):
    a gated model said it was 'not a model repository on the Hub', a failing Hub that it 'did not answer (no
    network?)'."""
    import http.server
    import threading

    from huggingface_hub import constants

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", "as the Hub says it")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(CheckpointError, match=message):
            latentrt.load("acme/gated", revision="v9")
    finally:
        server.shutdown()


def test_push_to_hub_uploads_the_saved_folder_as_one_commit(hub_cache, monkeypatch, tmp_path):
    """model.push_to_hub (transformers' name): the repository is created if missing, save_pretrained's folder is
    uploaded as one commit with the options given, and what was uploaded loads back to the same logits."""
    from huggingface_hub import CommitInfo, HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, kw))
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="", commit_description="", oid="1"
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = latentrt.load("acme/tiny-huginn")
    info = model.push_to_hub("me/huginn-copy", private=True, revision="dev", commit_message="first")
    assert info.commit_url == "https://huggingface.co/me/huginn-copy/commit/1"
    assert calls == [
        ("create_repo", "me/huginn-copy", {"repo_type": "model", "private": True, "exist_ok": True}),
        (
            "upload_folder",
            "me/huginn-copy",
            {"repo_type": "model", "revision": "dev", "create_pr": False, "commit_message": "first"},
        ),
    ]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "uploaded").iterdir()}
    ids = torch.tensor([[5, 6, 7]])
    back = latentrt.load(tmp_path / "uploaded")
    assert torch.equal(back.logits(ids, num_steps=2, seed=1), model.logits(ids, num_steps=2, seed=1))


def test_push_to_hub_errors_say_which_problem(hub_cache, monkeypatch):
    """Bad arguments before any call; offline mode, a Hub that refuses (here every request a 401) and one that
    does not answer: a CheckpointError saying so (huggingface_hub's own errors reach these through its API)."""
    import http.server
    import threading

    from huggingface_hub import constants

    model = tiny_recurrent()
    for kw, message in [
        (dict(repo_id="not an id"), "repo_id must be a Hub model id, owner/name, got 'not an id'"),
        (dict(repo_id="me/x", private="yes"), "private must be True or False, got 'yes'"),
        (dict(repo_id="me/x", revision=3), "revision must be a string or None, got 3"),
    ]:
        with pytest.raises(InputError, match=re_escape(message)):
            model.push_to_hub(**kw)
    with pytest.raises(CheckpointError, match=r"cannot push 'me/x': huggingface_hub is offline \(HF_HUB_OFFLINE=1\)"):
        model.push_to_hub("me/x")

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(CheckpointError, match=r"pushing to 'me/x' failed: the Hub answered .*401"):
            model.push_to_hub("me/x", token="hf_fake")
    finally:
        server.shutdown()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(CheckpointError, match=r"pushing to 'me/x' failed: the Hub did not answer"):
        model.push_to_hub("me/x", token="hf_fake")


def _gpt2_base(folder):
    """A GPT-2 folder as HF saves one, with a tokenizer that does not know the latent markers."""
    base = tiny_coconut(seed=9)
    base.config = base.config.__class__(**{**base.config.to_dict(), "latent_id": None, "start_latent_id": None})
    base.tokenizer = word_tokenizer(WORDS + [f"w{i}" for i in range(40 - 2 - len(WORDS))])  # 40 tokens, no markers
    save_checkpoint(base, folder, tie_key="lm_head.weight")
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("latent_id", "start_latent_id", "end_latent_id"):
        cfg.pop(k, None)
    (folder / "config.json").write_text(json.dumps(cfg))
    return base


def test_coconut_training_checkpoint_on_a_gpt2_base(tmp_path, hub_cache):
    """Coconut's run.py adds <|start-latent|> <|end-latent|> <|latent|> (ids V, V+1, V+2) and resizes the
    embedding; its checkpoint (keys prefixed base_causallm.) loads on the base folder or Hub id alone."""
    base = _gpt2_base(tmp_path / "gpt2")
    trained = tiny_coconut(seed=11, vocab_size=43, latent_id=42, start_latent_id=40, end_latent_id=41)
    torch.save({"base_causallm." + k: v for k, v in trained.state_dict().items()}, tmp_path / "checkpoint_6")
    assert base.config.vocab_size == 40
    model = latentrt.load(tmp_path / "gpt2", weights=tmp_path / "checkpoint_6", device="cpu")
    assert model.marker_ids == (40, 42, 41) and model.config.vocab_size == 43
    assert model.weights_file == str(tmp_path / "checkpoint_6")  # (a trained checkpoint: the trainer reads it)
    assert model.tokenizer.token_to_id("<|latent|>") == 42
    ids = torch.tensor([[5, 6, 40, 42, 42, 41, 7]])
    assert rel_err(model.logits(ids), trained.logits(ids)) < 1e-6
    assert latentrt.generate(model, [5, 6], num_thoughts=2, max_new_tokens=3).num_thoughts == 2
    root = tmp_path / "hub" / "models--acme--gpt2" / "snapshots" / COMMIT
    shutil.copytree(tmp_path / "gpt2", root)
    (root.parent.parent / "refs").mkdir()
    (root.parent.parent / "refs" / "main").write_text(COMMIT)
    on_hub = latentrt.load("acme/gpt2", weights=tmp_path / "checkpoint_6", device="cpu")
    assert rel_err(on_hub.logits(ids), trained.logits(ids)) < 1e-6
    # a GPT2Model's weights (HF's base class; the Hub's gpt2 keys: no "transformer." prefix, no head) grow alike
    body = {k.removeprefix("transformer."): v for k, v in trained.state_dict().items() if k.startswith("transformer.")}
    torch.save(body, tmp_path / "body.pt")
    bare = latentrt.load(tmp_path / "gpt2", weights=tmp_path / "body.pt", device="cpu")
    assert bare.marker_ids == (40, 42, 41) and rel_err(bare.logits(ids), trained.logits(ids)) < 1e-6
    # a tokenizer that is not the base's (41 tokens for 40 rows): the markers' ids cannot be placed
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "gpt2", other)
    tok = word_tokenizer(WORDS + [f"w{i}" for i in range(41 - 2 - len(WORDS))])
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(latentrt.ConfigError, match="embedding has 43 rows, the base 40: its 3 latent markers cannot"):
        latentrt.load(other, weights=tmp_path / "checkpoint_6", device="cpu")


def test_a_published_checkpoint_without_training_json_says_its_thought_count_is_unknown(tmp_path, capsys, monkeypatch):
    """Coconut's published checkpoint_N carries no thought count (its yaml does: 6 for ProsQA): generate() and
    eval append none by default, so they say so (silently every answer came from no thought) and take the
    count as num_thoughts / ``latentrt eval --thoughts`` (eval had no way to give it); a model with its
    training.json says nothing."""
    import latentrt.evaluate as ev
    from latentrt.evaluate import evaluate

    _gpt2_base(tmp_path / "gpt2")
    trained = tiny_coconut(seed=11, vocab_size=43, latent_id=42, start_latent_id=40, end_latent_id=41)
    torch.save({"base_causallm." + k: v for k, v in trained.state_dict().items()}, tmp_path / "checkpoint_6")
    model = latentrt.load(tmp_path / "gpt2", weights=tmp_path / "checkpoint_6", device="cpu")
    with pytest.warns(UserWarning, match="has latent markers but no training.json saying how many thoughts"):
        assert latentrt.generate(model, [5, 6], max_new_tokens=1).num_thoughts == 0
    records = generate_dataset(2, (1,), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latentrt.generate(model, [5, 6], num_thoughts=2, max_new_tokens=1).num_thoughts == 2
        latentrt.generate(latentrt.load("builtin:coconut"), "Alex is a wumpus.", max_new_tokens=1)
        seen, real = [], ev.generate
        monkeypatch.setattr(ev, "generate", lambda m, p, **kw: seen.extend(p) or real(m, p, **kw))
        evaluate(model, records, thoughts=2, max_new_tokens=1, progress=False)
        monkeypatch.undo()
    assert [p.count(42) for p in seen] == [2, 2]
    save_records(records, tmp_path / "r.json")
    args = ["eval", str(tmp_path / "gpt2"), str(tmp_path / "r.json"), "--weights", str(tmp_path / "checkpoint_6")]
    assert main([*args, "--thoughts", "2", "--max-new-tokens", "1", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["table"]["all"] == evaluate(model, records, thoughts=2, max_new_tokens=1, progress=False)["all"]
    assert main(["info", str(tmp_path / "gpt2"), "--weights", str(tmp_path / "checkpoint_6")]) == 0
    assert "no training.json: a prompt without markers gets no thought unless num_thoughts" in capsys.readouterr().out
    assert main(["eval", "builtin:recurrent", str(tmp_path / "r.json"), "--thoughts", "2"]) == 2
    assert "thoughts applies to models that think in latent tokens" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"evaluate\(\) takes the thought count as thoughts="):
        evaluate(model, records, num_thoughts=2, progress=False)


def test_a_gpt2_without_latent_markers_is_evaluated_on_the_question_alone(tmp_path, capsys):
    """A plain GPT-2 (or a published CoT / no-CoT checkpoint on one: no markers, no training.json) is asked the
    question alone by ``latentrt eval`` (the coconut format's prompt held None ids: 'token ids must be
    integers'); asking it for thoughts names the missing markers; ``info`` says it has none."""
    from latentrt.evaluate import evaluate

    _gpt2_base(tmp_path / "gpt2")
    model = latentrt.load(tmp_path / "gpt2", device="cpu")
    records = generate_dataset(3, (1,), seed=1)
    table = evaluate(model, records, max_new_tokens=2, progress=False)
    assert table == evaluate(model, records, mode="cot", max_new_tokens=2, progress=False) and table["all"]["n"] == 3
    for mode in ("coconut", "pause"):
        with pytest.raises(latentrt.InputError, match=r"^this model has no latent markers: pass their ids to load"):
            evaluate(model, records, mode=mode, max_new_tokens=2, progress=False)
    assert main(["info", str(tmp_path / "gpt2")]) == 0
    assert "latent markers: none (a plain GPT-2" in capsys.readouterr().out


def test_unknown_words_are_named():
    model = latentrt.load("builtin:recurrent", device="cpu")
    with pytest.warns(
        latentrt.UnknownWordsWarning, match=r"^4 word\(s\) of the prompt .*\['The', 'Westeros', 'capital', 'of'\]"
    ):
        latentrt.generate(model, "The capital of Westeros is Alex", max_new_tokens=1)
    with pytest.warns(latentrt.UnknownWordsWarning, match=r"^1 word\(s\) of prompt 1 .*\['Westeros'\]") as said:
        latentrt.generate(model, ("Alex is", "Westeros is"), max_new_tokens=1)  # (a tuple of texts: a batch)
    assert [w.filename for w in said] == [__file__]  # at the generate() call, as the other warnings
    with pytest.raises(InputError, match="not in the tokenizer's vocabulary"):
        latentrt.generate(model, "The capital of Westeros is", max_new_tokens=1, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt in the built-in vocabulary: no warning
        latentrt.generate(model, "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?")


def test_padding_rows_of_the_vocabulary_are_never_input_nor_sampled():
    model = tiny_recurrent(seed=2, vocab_size=37, padded_vocab_size=40)
    with pytest.raises(InputError, match=r"the vocabulary has 37 tokens; embedding rows 37-39 are padding"):
        latentrt.generate(model, [5, 38])
    with torch.no_grad():
        model.lm_head.weight[37:] = 50 * model.lm_head.weight[5]  # the padding rows would win every argmax
    for kw in ({}, dict(temperature=2.0, seed=1)):
        out = latentrt.generate(model, [5, 6, 7], max_new_tokens=6, num_steps=2, **kw)
        assert max(out.tokens) < 37


def test_a_batch_appends_the_trained_thoughts_to_each_prompt_without_markers_as_alone():
    """The default thoughts are each prompt's own: in a batch whose other prompt carries markers, a prompt
    without them still gets the trained count, as alone (a soak found the batch appending none to any, its
    answers then those of no thought: a silent wrong answer; tools/soak.py). ``num_thoughts`` is per prompt."""
    model = latentrt.load("builtin:coconut", device="cpu")
    question = "Alex is a wumpus. Is Alex a wumpus or rompus?"
    prompts = [
        question,
        question + "\n<|start-latent|><|latent|><|end-latent|>",
        "Bob is a rompus. Is Bob a rompus or jelpus?",
    ]
    for batch_prompts in (prompts, [model.tokenizer.encode(p).ids for p in prompts]):  # text and token ids
        batch = latentrt.generate(model, batch_prompts, max_new_tokens=4, return_logits=True)
        assert batch.num_thoughts == [3 if i != 1 else 1 for i in range(3)]
        for i, p in enumerate(batch_prompts):
            alone = latentrt.generate(model, p, max_new_tokens=4, return_logits=True)
            assert (batch.tokens[i], batch.text[i], batch.num_thoughts[i]) == (
                alone.tokens,
                alone.text,
                alone.num_thoughts,
            )
            assert torch.allclose(batch.logits[i], alone.logits, atol=1e-4)
    explicit = latentrt.generate(model, prompts, num_thoughts=2, max_new_tokens=1)  # num_thoughts=k: every prompt
    assert explicit.num_thoughts == [2, 1 + 2, 2]


def test_coconut_runs_its_trained_thought_count_by_default(capsys):
    model = latentrt.load("builtin:coconut", device="cpu")
    question = "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?"
    assert latentrt.generate(model, question, max_new_tokens=2).num_thoughts == 3  # training.json: 3 stages x 1
    assert latentrt.generate(model, question, num_thoughts=0, max_new_tokens=2).num_thoughts == 0
    marked = question + " <|start-latent|> <|latent|> <|end-latent|>"
    assert latentrt.generate(model, marked, max_new_tokens=2).num_thoughts == 1  # the prompt's own markers
    assert main(["generate", "builtin:coconut", question, "--max-new-tokens", "2"]) == 0
    assert "continuous thoughts: 3" in capsys.readouterr().out  # the CLI and the API agree
    # append_thoughts=False: the question as it is, no markers (Coconut's CoT / no-CoT formats), the same
    # tokens as the model's plain GPT-2 forward; num_thoughts=0 instead appends the markers around none
    from latentrt.engine import Generation
    from latentrt.options import GenerateOptions

    ids = model.tokenizer.encode(question).ids
    assert Generation(model, ids, GenerateOptions(append_thoughts=False)).batch.ids.tolist() == [ids]
    assert len(Generation(model, ids, GenerateOptions(num_thoughts=0)).batch.ids[0]) == len(ids) + 2
    plain = latentrt.generate(model, ids, append_thoughts=False, max_new_tokens=3, default_stops=False)
    greedy, seq = [], list(ids)
    for _ in range(3):
        greedy.append(int(model.logits([seq])[0, -1].argmax()))
        seq.append(greedy[-1])
    assert (plain.tokens, plain.num_thoughts) == (greedy, 0)
    with pytest.raises(latentrt.InputError, match="num_thoughts=2 appends thoughts and append_thoughts=False"):
        latentrt.generate(model, ids, append_thoughts=False, num_thoughts=2)
    assert main(["generate", "builtin:coconut", question, "--max-new-tokens", "2", "--no-append-thoughts"]) == 0
    assert "continuous thoughts: 0" in capsys.readouterr().out
    with pytest.raises(latentrt.InputError, match="append_thoughts does not apply to this recurrent-depth"):
        latentrt.generate(latentrt.load("builtin:recurrent"), ids, append_thoughts=False)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"mode": 0}, r"mode must be one of \['coconut', 'cot', 'nocot', 'pause', 'nothoughts'\], got 0"),
        ({"mode": "latent"}, r"mode must be one of .*, got 'latent'"),
        ({"max_stage": "3"}, r"max_stage must be an integer >= 0, got '3'"),
        ({"thoughts_per_step": True}, r"thoughts_per_step must be an integer >= 0, got True"),
        ({"max_stage": -1}, r"max_stage must be an integer >= 0, got -1"),
        ({"stage": "2"}, r"stage must be an integer >= 0, got '2'"),
        (["coconut"], r"training.json must hold a JSON object, got list"),
    ],
)
def test_a_corrupt_training_json_is_named_not_read_as_no_thoughts(tmp_path, fields, problem):
    """training.json sets a Coconut model's default thought count: a mode or count the trainers would not write
    is an error naming the file (read as "no thoughts", every answer would change silently). The mode also says
    whether the latent tokens are thoughts at all (a pause-trained model's are ordinary tokens), so an unreadable
    mode is an error even with an explicit thought count; a bad count is not then."""
    folder = tmp_path / "coconut"
    shutil.copytree(BUILTIN_DIR / "coconut", folder)
    info = json.loads((folder / "training.json").read_text())
    (folder / "training.json").write_text(json.dumps({**info, **fields} if isinstance(fields, dict) else fields))
    model = latentrt.load(folder, device="cpu")
    with pytest.raises(CheckpointError, match=problem):
        latentrt.generate(model, "Alex is a wumpus.", max_new_tokens=1)
    if "mode" in fields or not isinstance(fields, dict):
        with pytest.raises(CheckpointError, match=problem):
            latentrt.generate(model, "Alex is a wumpus.", max_new_tokens=1, num_thoughts=2)
    else:
        assert latentrt.generate(model, "Alex is a wumpus.", max_new_tokens=1, num_thoughts=2).num_thoughts == 2


@pytest.mark.parametrize("stage, thoughts", [(0, 0), (2, 4), (3, 6), (4, 6), (None, 6)])
def test_a_checkpoint_thinks_as_many_thoughts_as_its_stage_trained(tmp_path, stage, thoughts):
    """A checkpoint saved at stage s (a run stopped early, the folder of a stage's end) runs Coconut's run.py's
    count for that stage, min(s, max_stage) x thoughts per step: as it trained and as run.py evaluates it then
    (it got max_stage x c whatever its stage); a training.json without a stage is a finished run's."""
    folder = tmp_path / "coconut"
    shutil.copytree(BUILTIN_DIR / "coconut", folder)
    info = json.loads((folder / "training.json").read_text())
    info.update(max_stage=3, thoughts_per_step=2, **({} if stage is None else {"stage": stage}))
    (folder / "training.json").write_text(json.dumps(info))
    model = latentrt.load(folder, device="cpu")
    assert latentrt.generate(model, "Alex is a wumpus.", max_new_tokens=1).num_thoughts == thoughts
    from latentrt.decode.coconut import CoconutDecoder

    prompt = CoconutDecoder.eval_prompt(model, "Alex is a wumpus.", "coconut")
    assert prompt.count(model.config.latent_id) == thoughts


def test_trainers_take_the_documented_json_records(tmp_path):
    from latentrt.train.common import TrainOptions
    from latentrt.train.recurrent import train_recurrent

    records = [{"question": "every cat is a dog", "steps": ["every cat is a dog"], "answer": "yes"}] * 3
    model = tiny_recurrent()
    log = train_recurrent(model, model.tokenizer, records, TrainOptions(steps=2, batch_size=2, progress=False))
    assert len(log) == 2
    with pytest.raises(InputError, match="record 0 has no 'answer'"):
        train_recurrent(model, model.tokenizer, [{"question": "q", "steps": []}], TrainOptions(steps=1))


def test_a_triton_older_than_the_tested_one_is_refused_by_name(monkeypatch):
    """Triton 3.0 / 3.1 fail inside the kernels (their interpreter refuses ``tl.arange(0, BLOCK)``): the triton
    backend says which version it found and needs; ``auto`` falls back to the torch backend."""
    triton = pytest.importorskip("triton")
    import latentrt.kernels as kernels

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    ok, why = kernels.triton_status()
    assert not ok and why == "triton 3.1.0 is older than 3.2, the oldest the kernels are tested with"
    with pytest.raises(LatentRTError, match="triton 3.1.0 is older than 3.2"):
        latentrt.load("builtin:recurrent", device="cpu", backend="triton")
    assert latentrt.load("builtin:recurrent", device="cpu").backend.name == "torch"
    monkeypatch.setattr(triton, "__version__", "3.2.0+git1a2b")
    assert kernels.triton_status()[0] == (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())


def test_one_behaviour_wherever_it_is_called_from(capsys):
    with pytest.raises(InputError, match="call latentrt.load first"):
        latentrt.generate("builtin:recurrent", "Alex is")
    if not torch.cuda.is_available():
        assert main(["generate", "builtin:recurrent", "Alex is", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    for name in ("StreamEvent", "GenerationStream", "GenerationResult", "GenerateOptions", "LatentEvent"):
        assert hasattr(latentrt, name), name
    assert (
        main(["generate", "builtin:recurrent", "Alex is a", "Every wumpus is", "--stream", "--max-new-tokens", "3"])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[-5].startswith("[0] ") and out[-4].startswith("[1] ")  # the final texts after the stream
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "builtin:NAME, a built-in model: coconut, coconut-cot, coconut-nocot, recurrent" in usage


def test_loading_and_generating_do_not_import_torch_dynamo():
    """The models are built on the meta device; torch's normal_ there (nn.Embedding's own init) imported
    torch._dynamo, about 2 s of every `latentrt generate` on a CPU (5.9 s -> 3.2 s without it)."""
    import subprocess
    import sys

    code = (
        "import sys, latentrt\n"
        "for name in ('builtin:recurrent', 'builtin:coconut'):\n"
        "    latentrt.generate(latentrt.load(name), 'Alex is a wumpus.', max_new_tokens=2)\n"
        "latentrt.families.build_model(latentrt.load('builtin:recurrent').config)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_transformers_from_pretrained_keywords_carried_over(recurrent_dir):
    """The Huginn card's ``from_pretrained(..., torch_dtype=torch.bfloat16, trust_remote_code=True)`` carried
    over to latentrt.load: torch_dtype is dtype, those that change nothing are named in one warning (not read as
    unknown config fields), device_map is an error naming device=."""
    with pytest.warns(UserWarning, match=r"ignores transformers' trust_remote_code \(trust_remote_code: latentrt"):
        model = latentrt.load(recurrent_dir, device="cpu", torch_dtype=torch.bfloat16, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    message = r"ignores transformers' attn_implementation, low_cpu_mem_usage \(attn_implementation: each"
    with pytest.warns(UserWarning, match=message):
        model = latentrt.load(recurrent_dir, device="cpu", low_cpu_mem_usage=True, attn_implementation="sdpa")
    assert model.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a config override beside them is still one)
        assert (
            latentrt.load(recurrent_dir, device="cpu", torch_dtype="fp32", mean_recurrence=3).config.mean_recurrence
            == 3
        )
    with pytest.raises(ConfigError, match=r"^device_map='auto' is transformers' .* device='cuda', 'cuda:1' or 'cpu'$"):
        latentrt.load(recurrent_dir, device_map="auto")
    with pytest.raises(ConfigError, match=r"^torch_dtype \(transformers' name for dtype\) and dtype both given"):
        latentrt.load(recurrent_dir, torch_dtype="bf16", dtype="fp32")
