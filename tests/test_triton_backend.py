"""End to end: the triton backend gives the torch backend's tokens and step counts (fp32, interpreter on CPU)."""

import pytest
import torch
from conftest import rel_err, tiny_coconut, tiny_recurrent

import kernels
import latentrt
from latentrt.backends import get_backend
from latentrt.errors import InputError

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [20, 21, 22, 23]]


def _pair(seed=1, **cfg):
    ref = tiny_recurrent(seed=seed, **cfg)
    fast = tiny_recurrent(seed=seed, **cfg)
    fast.backend = get_backend("triton", fast)
    return ref, fast


@pytest.mark.parametrize("kv", ["full", "shared", "ring-3"])
@pytest.mark.parametrize("criterion", ["latent-diff", "kl", "entropy-diff", "argmax-stability", "cosine"])
def test_triton_equals_torch_adaptive(kv, criterion):
    ref, fast = _pair()
    kw = dict(
        max_new_tokens=5,
        adaptive=True,
        num_steps=10,
        exit_criterion=criterion,
        kv_sharing=kv,
        init_scale=0.0,
        return_logits=True,
        exit_threshold={"argmax-stability": 2}.get(criterion),
    )
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    assert a.tokens == b.tokens and a.steps == b.steps
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y, x) < 1e-4
    assert b.backend == "triton"


@pytest.mark.parametrize("kv", ["full", "shared"])
def test_triton_equals_torch_fixed_depth_gqa(kv):
    ref, fast = _pair(seed=2, num_attention_heads=4, num_key_value_heads=2, qk_bias=False)
    kw = dict(max_new_tokens=4, num_steps=3, kv_sharing=kv, init_scale=0.0, return_logits=True)
    a, b = latentrt.generate(ref, PROMPTS[0], **kw), latentrt.generate(fast, PROMPTS[0], **kw)
    assert a.tokens == b.tokens
    assert rel_err(b.logits, a.logits) < 1e-4


def test_triton_coconut_feedback_equals_torch():
    ref, fast = tiny_coconut(seed=5), tiny_coconut(seed=5)
    fast.backend = get_backend("triton", fast)
    ids = [[5, 6, 7, 2, 4, 4, 4, 3], [8, 9, 2, 4, 4, 4, 3]]
    a = latentrt.generate(ref, ids, max_new_tokens=4, return_logits=True)
    b = latentrt.generate(fast, ids, max_new_tokens=4, return_logits=True)
    assert a.tokens == b.tokens
    assert rel_err(b.logits[0], a.logits[0]) < 1e-5


def test_backend_choice_and_errors(monkeypatch):
    m = tiny_recurrent()
    assert get_backend("auto", m).name == ("triton" if torch.cuda.is_available() else "torch")
    assert "reference" in get_backend("auto", m).reason or torch.cuda.is_available()
    with pytest.raises(InputError, match="unknown backend"):
        get_backend("fast", m)
    with pytest.raises(InputError, match="'cuda'"):
        get_backend("cuda", m)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="not on a CUDA device"):
            get_backend("triton", m)
