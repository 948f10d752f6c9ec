"""torch's global defaults do not leak into results: a caller who set ``torch.set_default_dtype`` (bf16, fp64)
or a default device (``torch.set_default_device``, ``with torch.device(...)``; 'meta' here stands for a
device the model is not on) gets the same bits from generate(), the serving engine, hooks, streams and the
trainers as under torch's own defaults: every tensor latentrt makes names its dtype and device. ``load``
reads the default device as HF's ``from_pretrained`` does."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from conftest import tiny_coconut, tiny_recurrent
from test_serve_engine import coconut_requests, recurrent_requests
from test_train import TOK, _gpt2, _recurrent

import latentrt
from latentrt import kernels
from latentrt.backends import get_backend
from latentrt.errors import InputError
from latentrt.loader import parse_device
from latentrt.serve import Engine
from latentrt.train import Curriculum, TrainOptions, train_coconut, train_recurrent
from latentrt.train.data import generate_dataset

POISONS = ["bf16", "f64", "meta"]
pytestmark = pytest.mark.filterwarnings("ignore:min_p acts only when sampling")


@contextlib.contextmanager
def torch_defaults(poison: str):
    """torch's default dtype or device set as a caller might, restored after."""
    if poison == "meta":
        with torch.device("meta"):
            yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if poison == "bf16" else torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def same(a, b) -> bool:
    """Equal bits, dtypes and devices through nested results."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and (a.dtype, a.device) == (b.dtype, b.device) and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


RECURRENT_CASES = [
    dict(adaptive=True, exit_criterion="kl", exit_threshold=1e-3),  # fp32 logit buffers of the criterion
    dict(adaptive=True, exit_criterion="entropy-diff", exit_threshold=1e-2, kv_sharing="ring-2"),
    dict(num_steps=3, temperature=1.0, seed=1, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
    dict(num_steps=3, logit_bias={5: 2.0, 7: -1.5}, dry_multiplier=0.8, min_new_tokens=4),
    dict(decoding="wavefront", num_steps=2, seed=2, decoding_options={"headway": 2}),
]
COCONUT_CASES = [dict(), dict(num_thoughts=2, temperature=0.7, seed=5, logit_bias={4: 1.0})]


def _generate(model, prompt, kw, hooks=None, max_new_tokens=6):
    torch.manual_seed(0)
    seen = []

    def hook(event):
        seen.append((event.kind, event.step, event.state.float().sum().item()))

    out = latentrt.generate(
        model, prompt, max_new_tokens=max_new_tokens, return_logits=True, hooks=[hook] if hooks else None, **kw
    )
    return out.tokens, out.steps, out.text, out.logits, seen


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize(
    "family, kw",
    [("recurrent", kw) for kw in RECURRENT_CASES] + [("coconut", kw) for kw in COCONUT_CASES],
)
def test_generate_ignores_torchs_defaults(family, kw, poison):
    model = tiny_recurrent(seed=3) if family == "recurrent" else tiny_coconut(seed=2)
    prompts = [[5, 9, 6, 7, 8], [5, 6]] if kw.get("decoding") is None else [5, 9, 6, 7, 8]
    hooks = kw.get("decoding") is None and not kw.get("seed")
    expected = _generate(model, prompts, kw, hooks)
    with torch_defaults(poison):
        got = _generate(model, prompts, kw, hooks)
    assert same(got, expected)


@pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_status()[1])
def test_triton_backend_ignores_torchs_defaults():
    model = tiny_recurrent(seed=3)
    model.backend = get_backend("triton", model)
    kw = dict(RECURRENT_CASES[0], num_steps=4)
    expected = _generate(model, [[5, 9, 6, 7, 8], [5, 6]], kw, max_new_tokens=3)
    for poison in POISONS:
        with torch_defaults(poison):
            assert same(_generate(model, [[5, 9, 6, 7, 8], [5, 6]], kw, max_new_tokens=3), expected), poison


@pytest.mark.parametrize("poison", POISONS)
def test_streams_and_logits_ignore_torchs_defaults(poison):
    model = tiny_recurrent(seed=3)

    def both():
        torch.manual_seed(0)
        events = [
            (e.tokens, e.steps, e.text) for e in latentrt.generate(model, [4, 9, 3], max_new_tokens=4, stream=True)
        ]
        return events, model.logits([[4, 9, 3]], num_steps=3, seed=1)

    expected = both()
    with torch_defaults(poison):
        assert same(both(), expected)


@pytest.mark.parametrize("poison", POISONS)
def test_served_requests_ignore_torchs_defaults(poison):
    """The engine built and stepped under the caller's defaults: tokens, steps, text and log-probs unchanged."""
    for model, requests in (
        (tiny_recurrent(seed=3), recurrent_requests(10)),
        (tiny_coconut(seed=2), coconut_requests(6)),
    ):

        def serve(model=model, requests=requests):
            engine = Engine(model, max_batch=4)
            reqs = [engine.submit(p, top_logprobs=2, **kw) for p, kw in requests]
            engine.run_until_idle()
            assert all(r.error is None for r in reqs)
            return [(r.tokens, r.steps, r.text, [(x.logprob, x.top) for x in r.logprobs]) for r in reqs]

        expected = serve()
        with torch_defaults(poison):
            assert same(serve(), expected)


@pytest.mark.parametrize("poison", POISONS)
def test_trainers_ignore_torchs_defaults(poison):
    """Same losses, sampled depths and weights (the depth draw and the batches are host tensors)."""
    records = generate_dataset(4, (1, 2))

    def train(kind):
        torch.manual_seed(0)
        model = _recurrent() if kind == "recurrent" else _gpt2()
        opts = TrainOptions(progress=False, steps=3, batch_size=2)
        if kind == "recurrent":
            log = train_recurrent(model, TOK, records, opts)
        else:
            log = train_coconut(model, TOK, records, opts, Curriculum("coconut", max_stage=1))
        return [(e["loss"], e.get("depth")) for e in log], list(model.state_dict().values())

    for kind in ("recurrent", "coconut"):
        expected = train(kind)
        with torch_defaults(poison):
            assert same(train(kind), expected), kind


def test_load_reads_torchs_default_device():
    assert parse_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        if torch.get_default_device().type == "meta":
            with pytest.raises(InputError, match="default device is 'meta'.*pass device="):
                latentrt.load("builtin:recurrent")
        else:  # torch 2.4 does not report a `with` block's device: the model is loaded whole where it says
            assert latentrt.load("builtin:recurrent").device == torch.device("cpu")
    with mock.patch("torch.cuda.is_available", return_value=False):
        with mock.patch("torch.get_default_device", return_value=torch.device("cuda", 1)):
            with pytest.raises(InputError, match="'cuda:1': CUDA is not available.*torch's default device"):
                parse_device(None)
    with mock.patch("torch.get_default_device", return_value=torch.device("mps", 0)):
        with pytest.raises(InputError, match="'mps:0': latentrt runs on 'cpu' and 'cuda'.*torch's default device"):
            parse_device(None)
    if torch.cuda.is_available():  # a set default device is where the model goes, index included
        with mock.patch("torch.get_default_device", return_value=torch.device("cuda", 0)):
            assert parse_device(None) == torch.device("cuda", 0)
