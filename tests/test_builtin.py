"""The shipped models load with no files or network, generate, and are above chance where they were trained."""

import pytest

import latentrt
from latentrt.evaluate import evaluate
from latentrt.train.data import generate_dataset


@pytest.mark.parametrize("name", ["recurrent", "coconut", "coconut-cot", "coconut-nocot"])
def test_builtin_loads_and_generates(name):
    model = latentrt.load(f"builtin:{name}", device="cpu")
    out = latentrt.generate(
        model, "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?", max_new_tokens=4
    )
    assert len(out.tokens) >= 1 and isinstance(out.text, str)


@pytest.mark.parametrize("name,kw", [("recurrent", dict(num_steps=4, init_scale=0.0)), ("coconut", {})])
def test_builtin_is_above_chance_on_one_hop_problems(name, kw):
    """Two-way choice: chance is 50%; the shipped weights measured 83-88% at one hop (README)."""
    model = latentrt.load(f"builtin:{name}", device="cpu")
    table = evaluate(model, generate_dataset(40, (1,), seed=777), progress=False, **kw)
    assert table["all"]["accuracy"] >= 0.65
