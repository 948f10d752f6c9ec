"""Tiny random checkpoints, written in the published formats, for every test."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # run the Triton kernels through the interpreter on CPU machines (CI)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from latentrt.checkpoint import save_checkpoint
from latentrt.families import build_model, parse_config
from latentrt.tokenizer import word_tokenizer

WORDS = "every cat dog bird is a an not yes no . ? , Tom Alex Ann the of".split()


# The longest test files first (seconds of one core on CI's machine, 2026-12-05: 277, 174, 160, 68, 63, 62, 50,
# 47, 45, 43, 42, 33, 29, 23), the rest in collection order. CI's two pytest-xdist workers each take a whole file
# when they run low (--dist loadfile --no-loadscope-reorder: this order); by xdist's own order (most tests first)
# the Ray file (one test, ~60 s) came second to last and one worker idled ~55 s at the end.
LONGEST_FIRST = (
    "test_serve_engine.py",
    "test_published.py",
    "test_triton_backend.py",
    "test_benchmark_serve.py",
    "test_server.py",
    "test_serve_ray.py",
    "test_readme.py",
    "test_benchmark_baselines.py",
    "test_reliability.py",
    "test_samplers.py",
    "test_kernels.py",
    "test_torch_defaults.py",
    "test_generate.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items):
    """The longest files first (``LONGEST_FIRST``; a stable sort: each file's tests keep their order, which
    test_readme.py's commands need); gpu-marked tests skip cleanly without CUDA, triton-marked ones without a
    Triton the kernels can use."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    from latentrt.kernels import triton_status

    usable, why = triton_status()
    if not usable:  # triton-marked tests need the kernels (Triton >= 3.2; torch 2.4 brings 3.0)
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"needs the Triton kernels: {why}"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def recurrent_config(**over):
    raw = dict(
        model_type="huginn_raven",
        n_embd=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=40,
        block_size=96,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
        mean_backprop_depth=2,
        padding_multiple=8,
    )
    raw.update(over)
    return parse_config(raw)


def gpt2_config(**over):
    raw = dict(model_type="gpt2", n_embd=32, n_head=2, n_layer=2, n_positions=96, vocab_size=40)
    raw.update(over)
    return parse_config(raw)


def tiny_recurrent(seed: int = 0, **over):
    model = build_model(recurrent_config(**over), seed=seed)
    model.tokenizer = word_tokenizer(WORDS)
    return model


def draw_norm_weights(model, seed: int) -> None:
    """Every RMSNorm weight drawn around 1: with the init's ones, ln_f of a state the core block's last norm
    just normalised is that state again, so a backend that left a norm out would go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def tiny_coconut(seed: int = 0, **over):
    cfg = gpt2_config(**{"latent_id": 4, "start_latent_id": 2, "end_latent_id": 3, **over})
    model = build_model(cfg, seed=seed)
    model.tokenizer = word_tokenizer(WORDS, markers=True)
    return model


@pytest.fixture
def recurrent_model():
    return tiny_recurrent()


@pytest.fixture
def coconut_model():
    return tiny_coconut()


@pytest.fixture
def recurrent_dir(tmp_path):
    save_checkpoint(tiny_recurrent(), tmp_path / "rec", tie_key="lm_head.weight")
    return tmp_path / "rec"


@pytest.fixture
def coconut_dir(tmp_path):
    save_checkpoint(tiny_coconut(), tmp_path / "coc", tie_key="lm_head.weight")
    return tmp_path / "coc"


def transformers_with_torch():
    """transformers as a test oracle of models or schedules: skip where it is absent or cannot use this torch
    (transformers 5 needs torch >= 2.6; latentrt itself runs on older ones)."""
    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_torch_available():
        reason = f"transformers {transformers.__version__} does not run on torch {torch.__version__}"
        pytest.skip(reason, allow_module_level=True)
    return transformers


class CodeRunningPickle:
    """Pickled, a file that would create ``marker`` when unpickled without weights_only (loading tests: no code
    from a file ever runs)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def penalty_state(ids: list[list[int]], new: list[list[int]], vocab: int, **options):
    """latentrt/penalties.py's state for prompts ``ids`` (right-padded with -1: padding) after generating
    ``new`` (one list per sequence, of equal lengths), with generate() ``options``."""
    from latentrt.options import GenerateOptions
    from latentrt.penalties import LogitPenalties

    S = max(len(r) for r in ids)
    t = torch.tensor([r + [-1] * (S - len(r)) for r in ids])
    pen = LogitPenalties.build(GenerateOptions(**options), t.clamp(min=0), t >= 0, vocab)
    for step in zip(*new):
        pen.record(torch.tensor(step))
    return pen
