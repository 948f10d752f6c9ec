"""latentrt/caller.py: every warning latentrt gives points at the user's line that called into latentrt, whatever
the depth of the call path (generate(), evaluate(), load(), a trainer's helper)."""

import json
import warnings

from conftest import tiny_recurrent

import latentrt
from latentrt.checkpoint import save_checkpoint
from latentrt.evaluate import evaluate
from latentrt.train.builtin import generate_dataset
from latentrt.train.recurrent import cut_examples


def _said(call) -> list[tuple[str, int, str]]:
    """(file, line, first words) of each warning ``call`` gives."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        call()
    return [(w.filename, w.lineno, str(w.message)[:40]) for w in said]


def test_warnings_point_at_the_call_into_latentrt(tmp_path):
    """They pointed into latentrt where a hand-counted stack level was off for the path: generate()'s adaptive-only
    options at latentrt/engine.py, and the same check under evaluate() deeper still."""
    model = latentrt.load("builtin:recurrent")
    records = generate_dataset(2, (1,), seed=3)
    save_checkpoint(tiny_recurrent(seed=5), tmp_path, tie_key="lm_head.weight")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, eos_token_id=-1, flux_capacitor=3)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"no_repeat_ngram_size": 3}))
    calls = {  # each call on its own line: the line every warning it gives must name
        "unused adaptive options": lambda: latentrt.generate(model, "Alex is", max_new_tokens=1, min_steps=2),
        "min_steps above num_steps": lambda: latentrt.generate(
            model, [5, 6], max_new_tokens=1, adaptive=True, num_steps=3, min_steps=5
        ),
        "unused sampling options": lambda: latentrt.generate(model, [5, 6], max_new_tokens=1, top_k=3),
        "unknown words": lambda: latentrt.generate(model, "Westeros is", max_new_tokens=1),
        "evaluate": lambda: evaluate(model, records, max_new_tokens=1, progress=False, min_steps=2),
        "revision of a built-in": lambda: latentrt.load("builtin:recurrent", revision="v9"),
        "a folder's config": lambda: latentrt.load(tmp_path, device="cpu"),
        "a trainer's cut": lambda: cut_examples([([1, 2, 3, 4], [1, 2, 3, 4])], 2),
    }
    lines = {name: call.__code__.co_firstlineno for name, call in calls.items()}
    for name, call in calls.items():
        said = _said(call)
        assert said, name
        assert all(file == __file__ and line == lines[name] for file, line, _ in said), (name, said)
    assert len(_said(calls["a folder's config"])) == 3  # (unknown field, eos, generation_config's unread field)
