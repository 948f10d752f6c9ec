"""Several LoRA adapters served at once (latentrt/lora_serving.py; vLLM's --enable-lora --lora-modules): each
request with its adapter, mixed in one batch, equals generate() alone under ``using`` bit for bit; the base
model's requests are the plain model's; the server routes by the request's model name, through the official
client; the flags and bad adapters are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import rel_err, tiny_coconut, tiny_recurrent
from safetensors.torch import load_file, save_file
from test_serve_engine import coconut_requests, generate_alone, recurrent_requests

import latentrt
from latentrt import lora
from latentrt.backends import get_backend
from latentrt.cli import main
from latentrt.errors import CheckpointError, InputError
from latentrt.lora_serving import serve_adapters, using
from latentrt.serve import Engine

openai = pytest.importorskip("openai")
IDS = torch.tensor([[5, 9, 11, 3, 7, 20, 21, 2]])
PROMPT = "every cat is"


def _adapters(tmp_path, make, shapes) -> dict[str, str]:
    """Adapter folders trained on nothing: each with its own rank, targets and random A and B."""
    out = {}
    for i, (name, rank, targets) in enumerate(shapes):
        model = lora.add_lora(make(), rank=rank, targets=targets, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        lora.save_adapter(model, tmp_path / name)
        out[name] = str(tmp_path / name)
    return out


SHAPES = [("sql", 2, None), ("poet", 5, ["Wqkv", "fc"])]  # (ranks apart: the bank pads to the largest)


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_mixed_adapters_in_one_batch_each_equal_generate_alone(tmp_path, family):
    make = (lambda: tiny_recurrent(seed=3)) if family == "recurrent" else (lambda: tiny_coconut(seed=2))
    shapes = SHAPES if family == "recurrent" else [("sql", 2, None), ("poet", 4, ["c_attn", "c_fc"])]
    sources = _adapters(tmp_path, make, shapes)
    model, plain = make(), make()
    serve_adapters(model, sources)
    assert model.backend.name == "torch" and "LoRA" in model.backend.reason
    requests = recurrent_requests(9, seed=7) if family == "recurrent" else coconut_requests(9)
    adapters = [("sql", "poet", None)[i % 3] for i in range(len(requests))]
    results = Engine(model, max_batch=4).generate(
        [p for p, _ in requests],
        [latentrt.GenerateOptions.build(None, **kw) for _, kw in requests],
        adapter=adapters,
    )
    for result, (prompt, kw), adapter in zip(results, requests, adapters):
        with using(model, adapter):
            assert result == generate_alone(model, prompt, **kw), (adapter, prompt, kw)
        if adapter is None:  # the base model's requests: the plain model's tokens (nothing added)
            assert result.tokens == generate_alone(plain, prompt, **kw).tokens
    assert len({tuple(r.tokens) for r in results}) > 3


def test_a_served_adapter_computes_the_merged_models_numbers(tmp_path, recurrent_dir):
    sources = _adapters(tmp_path, lambda: latentrt.load(recurrent_dir, device="cpu"), SHAPES)
    model = latentrt.load(recurrent_dir, device="cpu")
    serve_adapters(model, sources)
    for name, path in sources.items():
        merged = latentrt.load(recurrent_dir, device="cpu", adapter=path)
        with using(model, name):
            assert rel_err(model.logits(IDS, seed=0), merged.logits(IDS, seed=0)) < 1e-5
    base = latentrt.load(recurrent_dir, device="cpu").logits(IDS, seed=0)
    assert torch.equal(model.logits(IDS, seed=0), base)
    with pytest.raises(
        InputError, match=r"no LoRA adapter 'nope' is served here; the served adapters: \['sql', 'poet'\]"
    ):
        with using(model, "nope"):
            pass
    with pytest.raises(InputError, match="merge them first"):
        get_backend("triton", model)
    with pytest.raises(InputError, match="not merged"):
        model.save_pretrained(tmp_path / "saved")


def test_bad_adapter_sets_are_clear_errors(tmp_path, recurrent_dir):
    sources = _adapters(tmp_path, lambda: latentrt.load(recurrent_dir, device="cpu"), [("a", 2, ["adapter"])])
    model = latentrt.load(recurrent_dir, device="cpu")
    with pytest.raises(InputError, match="outside the model's blocks"):
        serve_adapters(model, sources)
    other = _adapters(tmp_path / "o", lambda: tiny_recurrent(n_embd=48), [("b", 2, None)])
    with pytest.raises(CheckpointError, match="does not fit this model"):
        serve_adapters(model, other)
    with pytest.raises(InputError, match="at least one"):
        serve_adapters(model, {})
    served = _adapters(tmp_path / "s", lambda: latentrt.load(recurrent_dir, device="cpu"), [("c", 2, None)])
    serve_adapters(model, served)
    with pytest.raises(InputError, match="already has LoRA adapters"):
        serve_adapters(model, served)
    with pytest.raises(InputError, match="already has LoRA adapters"):
        lora.add_lora(model)
    with pytest.raises(InputError, match="serves no LoRA adapters"):
        Engine(latentrt.load(recurrent_dir, device="cpu")).generate(["every cat"], adapter="c")


def test_the_server_routes_a_request_to_the_adapter_its_model_names(tmp_path, recurrent_dir):
    """Through the official client: /v1/models lists each adapter with vLLM's root and parent; a completion or chat
    naming an adapter runs with it (equal to generate() alone under ``using``) and answers under its name."""
    from test_server import serving

    sources = _adapters(tmp_path, lambda: latentrt.load(recurrent_dir, device="cpu"), SHAPES)
    model = latentrt.load(recurrent_dir, device="cpu")
    serve_adapters(model, sources)
    with serving(model, name="base", max_batch=4) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        assert list(cards) == ["base", "sql", "poet"]
        assert cards["sql"].parent == "base" and cards["sql"].root == sources["sql"]
        assert not hasattr(cards["base"], "parent") or cards["base"].parent is None
        extra = {"num_steps": 3, "init_scale": 0.0}
        for name in ("base", "sql", "poet"):
            r = client.completions.create(
                model=name, prompt="every cat is", max_tokens=5, temperature=0, extra_body=extra
            )
            with using(model, None if name == "base" else name):
                want = latentrt.generate(model, "every cat is", max_new_tokens=5, **extra)
            assert r.model == name and r.choices[0].latentrt["token_ids"] == want.tokens, name
            stream = client.completions.create(
                model=name, prompt="every cat is", max_tokens=5, temperature=0, extra_body=extra, stream=True
            )
            chunks = list(stream)
            assert {c.model for c in chunks} == {name}
        assert client.models.retrieve("poet").parent == "base"
        # echo with log-probs scores the prompt with the adapter too (one forward, as model.logits)
        ids = [5, 9, 14, 3, 22]
        r = client.completions.create(
            model="sql", prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0, extra_body=extra
        )
        with using(model, "sql"):
            lp = model.logits(torch.tensor([ids]), num_steps=3, init_scale=0.0)[0, :, : model.config.vocab_size]
        want = [lp.log_softmax(-1)[i, t].item() for i, t in enumerate(ids[1:])]
        assert r.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-5)
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.completions.create(model="nope", prompt="every cat", max_tokens=2)
    from latentrt.serve.app import create_app

    with pytest.raises(InputError, match="'sql' names both the model and a served LoRA adapter"):
        create_app(Engine(model), ["base", "sql"])


def test_the_flags(tmp_path, recurrent_dir, capsys):
    from test_server import free_port

    base = ["serve", str(recurrent_dir), "--port", str(free_port())]
    for bad, message in [
        (["--lora-modules", "a=x"], "--lora-modules is read with --enable-lora: give it too"),
        (["--max-loras", "2"], "--max-loras is read with --enable-lora: give it too"),
        (["--allow-runtime-lora-updating"], "--allow-runtime-lora-updating is read with --enable-lora"),
        (["--enable-lora"], "--enable-lora serves the adapters --lora-modules NAME=PATH names"),
        (
            ["--enable-lora", "--lora-modules", "a=x", "--lora-modules", "b=y", "--max-loras", "1"],
            "--max-loras 1 is fewer",
        ),
        (
            ["--enable-lora", "--allow-runtime-lora-updating", "--max-lora-rank", "0"],
            "--max-lora-rank must be at least 1",
        ),
        (["--enable-lora", "--lora-modules", "a"], "--lora-modules takes NAME=PATH"),
        (["--enable-lora", "--lora-modules", "a=x", "--lora-modules", "a=y"], "--lora-modules names 'a' twice"),
        (["--enable-lora", "--lora-modules", '{"name": "a", "path": "x", "rank": 2}'], "unknown field 'rank'"),
        (["--enable-lora", "--lora-modules", f"a={tmp_path / 'missing'}"], "does not exist"),
    ]:
        assert main([*base, *bad]) == 2
        assert message in capsys.readouterr().err, bad
    from latentrt.cli_flags import lora_modules, lora_options

    class Args:
        enable_lora, lora_modules = True, ['{"name": "sql", "path": "/a/b", "base_model_name": "m"}', "poet=c=d"]
        max_loras = max_lora_rank = None
        allow_runtime_lora_updating = False

    assert lora_modules(Args) == {"sql": "/a/b", "poet": "c=d"}
    assert lora_options(Args) == dict(
        lora_modules={"sql": "/a/b", "poet": "c=d"}, max_loras=None, max_lora_rank=None, runtime_lora_updating=False
    )
    Args.allow_runtime_lora_updating = True  # (room for one more than given, vLLM's default of 1 beyond them)
    assert lora_options(Args)["max_loras"] == 3


def test_run_batch_serves_adapters(tmp_path, recurrent_dir, capsys):
    sources = _adapters(tmp_path, lambda: latentrt.load(recurrent_dir, device="cpu"), SHAPES)
    lines = [
        {"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": body}
        for i, body in enumerate(
            [
                {
                    "model": name,
                    "prompt": "every cat",
                    "max_tokens": 3,
                    "temperature": 0,
                    "num_steps": 3,
                    "init_scale": 0,
                }
                for name in ("sql", "poet", str(recurrent_dir))
            ]
        )
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = ["run-batch", str(recurrent_dir), "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    modules = [f"--lora-modules={name}={path}" for name, path in sources.items()]
    assert main([*args, "--enable-lora", *modules]) == 0
    capsys.readouterr()
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["response"]["body"]["model"] for o in out] == ["sql", "poet", str(recurrent_dir)]
    model = latentrt.load(recurrent_dir, device="cpu")
    serve_adapters(model, sources)
    for o, name in zip(out, ("sql", "poet", None)):
        with using(model, name):
            want = latentrt.generate(model, "every cat", max_new_tokens=3, num_steps=3, temperature=0.0, init_scale=0.0)
        assert o["response"]["body"]["choices"][0]["latentrt"]["token_ids"] == want.tokens


@pytest.mark.gpu
def test_served_adapters_on_the_gpu_each_equal_generate_alone(tmp_path):
    """On a GPU (the torch backend, bf16, the engine's captured passes where it takes them): mixed adapters in one
    batch, each request equal to generate() alone under ``using``."""
    make = lambda: latentrt.load("builtin:recurrent", device="cuda")  # noqa: E731
    sources = _adapters(tmp_path, make, SHAPES)
    model = make()
    serve_adapters(model, sources)
    prompts = ["Alex is a wumpus. Is Alex a wumpus or rompus?", "Every cat is a dog.", "Tom is", "Ann is a"]
    adapters = ["sql", None, "poet", "sql"]
    options = dict(num_steps=6, max_new_tokens=6, init_scale=0.0)
    results = Engine(model, max_batch=3).generate(prompts, None, adapter=adapters, **options)
    for prompt, adapter, result in zip(prompts, adapters, results):
        with using(model, adapter):
            assert result.tokens == latentrt.generate(model, prompt, **options).tokens, adapter


def test_adapters_load_and_unload_while_the_server_runs(tmp_path, recurrent_dir):
    """vLLM's runtime routes: a loaded adapter serves at once (equal to generate() alone under ``using``), in a
    slot of the bank's fixed room; an unloaded one is a 404 again; loading past --max-loras, above the rank, twice,
    onto the model's name, or unloading one that is not served are clear errors; the routes exist only when
    asked for."""
    from test_server import serving

    from latentrt.serve.app import create_app

    make = lambda: latentrt.load(recurrent_dir, device="cpu")  # noqa: E731
    sources = _adapters(tmp_path, make, [*SHAPES, ("big", 9, None), ("third", 3, None)])
    model = make()
    serve_adapters(model, {"sql": sources["sql"]}, max_loras=2, max_lora_rank=8, targets=("Wqkv", "proj", "fc"))
    reference = make()
    serve_adapters(reference, {n: sources[n] for n in ("sql", "poet")})
    extra = {"num_steps": 3, "init_scale": 0.0}
    with serving(model, name="base", max_batch=4) as (url, _):
        import httpx

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert httpx.post(url + "/v1/load_lora_adapter", json={}).status_code == 404  # (not enabled)
    app = create_app(Engine(model, max_batch=4), "base", runtime_lora_updating=True)
    from test_server import loopback

    with loopback(app) as url:
        import httpx

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def post(route, body):  # (JSON's escapes: a lone surrogate sent as the fuzz sends it)
            return httpx.post(url + route, content=json.dumps(body), headers={"content-type": "application/json"})

        r = post("/v1/load_lora_adapter", {"lora_name": "poet", "lora_path": sources["poet"]})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'poet' added successfully.")
        assert [m.id for m in client.models.list().data] == ["base", "sql", "poet"]
        for name in ("sql", "poet"):
            got = client.completions.create(
                model=name, prompt="every cat is", max_tokens=4, temperature=0, extra_body=extra
            )
            with using(reference, name):
                want = latentrt.generate(reference, PROMPT, max_new_tokens=4, **extra)
            assert got.choices[0].latentrt["token_ids"] == want.tokens, name
        for body, status, message in [
            ({"lora_name": "third", "lora_path": sources["third"]}, 400, "2 LoRA adapters are served, the most"),
            ({"lora_name": "poet", "lora_path": sources["poet"]}, 400, "'poet' is served already"),
            ({"lora_name": "base", "lora_path": sources["poet"]}, 400, "'base' is served already"),
            ({"lora_name": "x"}, 400, "lora_path must be"),
            ({"lora_name": "x", "lora_path": sources["poet"], "rank": 2}, 400, "unknown field 'rank'"),
            ({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, 400, "does not exist"),
            ({"lora_name": "\ud800", "lora_path": sources["poet"]}, 400, "lora_name is not valid Unicode text"),
            ({"lora_name": "y", "lora_path": sources["poet"], "load_inplace": True}, 400, "load_inplace"),
        ]:
            r = post("/v1/load_lora_adapter", body)
            assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
        r = post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.completions.create(model="sql", prompt="every cat", max_tokens=2)
        r = post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert r.status_code == 404 and "no LoRA adapter 'sql'" in r.json()["error"]["message"]
        r = post("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": sources["big"]})
        assert r.status_code == 400 and "rank 9, above this server's 8 (--max-lora-rank)" in r.text
        # poet's slot reused by a smaller adapter (rank 3 on every layer, its file's layers named without
        # "transformer.", as PEFT on the base model class names them): none of poet's columns left over
        assert post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": sources["sql"]}).status_code == 200
        assert post("/v1/unload_lora_adapter", {"lora_name": "poet"}).status_code == 200
        path = Path(sources["third"]) / "adapter_model.safetensors"
        save_file({k.replace("model.transformer.", "model."): v for k, v in load_file(str(path)).items()}, str(path))
        r = post("/v1/load_lora_adapter", {"lora_name": "third", "lora_path": sources["third"]})
        assert r.status_code == 200 and model.adapter_bank.names == {"sql": 1, "third": 2}
        got = client.completions.create(
            model="third", prompt="every cat is", max_tokens=4, temperature=0, extra_body=extra
        )
        alone = make()
        serve_adapters(alone, {"third": sources["third"]})
        with using(alone, "third"):
            want = latentrt.generate(alone, PROMPT, max_new_tokens=4, **extra)
        assert got.choices[0].latentrt["token_ids"] == want.tokens
        with using(model, "third"), using(alone, "third"):  # (the numbers too: a leftover column would show)
            assert rel_err(model.logits(IDS, seed=0), alone.logits(IDS, seed=0)) < 1e-6
    with pytest.raises(InputError, match="runtime_lora_updating needs a model that serves LoRA adapters"):
        create_app(Engine(make()), "base", runtime_lora_updating=True)


def test_an_adapter_in_use_is_not_unloaded(tmp_path, recurrent_dir):
    model = latentrt.load(recurrent_dir, device="cpu")
    sources = _adapters(tmp_path, lambda: latentrt.load(recurrent_dir, device="cpu"), SHAPES)
    serve_adapters(model, sources)
    engine = Engine(model, max_batch=2)
    req = engine.submit("every cat", adapter="sql", max_new_tokens=2)
    with pytest.raises(InputError, match="'sql' is in use by 1 request"):
        engine.unload_adapter("sql")
    while not req.finished:
        engine.step()
    engine.unload_adapter("sql")
    late = engine.request("every cat", adapter="poet", max_new_tokens=2)
    engine.unload_adapter("poet")  # (between the request's check and its queueing)
    with pytest.raises(InputError, match="'poet' is served here \\(it was unloaded\\)|no LoRA adapter 'poet'"):
        engine.enqueue(late)


def test_ray_replicas_do_not_load_adapters_at_runtime(capsys):
    from latentrt.serve import ray as serve_ray

    assert serve_ray.main(["--enable-lora", "--allow-runtime-lora-updating"]) == 2
    assert "a load would reach one replica only" in capsys.readouterr().err


def test_room_names_and_layers_of_a_bank(tmp_path, recurrent_dir):
    """The room is the adapters given unless max_loras; an adapter's name must be text; a file naming a layer that
    is not linear is refused as such; load_engine's runtime loading wraps the family's default LoRA layers, so an
    adapter of other layers than the startup's loads."""
    from latentrt.lora import read_adapter
    from latentrt.serve.app import load_engine

    make = lambda: latentrt.load(recurrent_dir, device="cpu")  # noqa: E731
    sources = _adapters(tmp_path, make, [("q", 2, ["Wqkv"]), *SHAPES])
    bank = serve_adapters(make(), {n: sources[n] for n in ("sql", "poet")})
    with pytest.raises(InputError, match="2 LoRA adapters are served, the most"):
        bank.add("q", read_adapter(sources["q"]))
    with pytest.raises(InputError, match="not valid Unicode"):
        serve_adapters(make(), {"\ud800": sources["q"]})
    path = Path(sources["q"]) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.transformer.ln_f.lora_A.weight"] = torch.zeros(2, 32)
    tensors["base_model.model.transformer.ln_f.lora_B.weight"] = torch.zeros(32, 2)
    save_file(tensors, str(tmp_path / "ln_f.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((Path(sources["q"]) / "adapter_config.json").read_bytes())
    (tmp_path / "ln_f.safetensors").rename(broken / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="'transformer.ln_f' is not a linear layer of this model"):
        serve_adapters(make(), {"b": str(broken)})
    engine = load_engine(
        str(recurrent_dir), device="cpu", lora_modules={"q": sources["q"]}, max_lora_rank=8, runtime_lora_updating=True
    )
    assert engine.model.adapter_bank.capacity == 1  # (load_engine's room: as given; the flags add one)
    engine.unload_adapter("q")
    engine.load_adapter("poet", sources["poet"])  # (fc: wrapped for adapters loaded later, not by q)
    assert set(engine.model.adapter_bank.names) == {"poet"}
