"""The argument checks every layer shares (latentrt.errors): what each accepts, and the message it raises."""

import math

import pytest

import latentrt
from latentrt.errors import (
    InputError,
    check_bool,
    check_finite,
    check_float,
    check_int,
    is_choice,
    json_loads,
    renamed,
)


@pytest.mark.parametrize("value", [0, 3, 2**70])
def test_check_int_accepts_ints_in_range(value):
    check_int("n", value, 0)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1], -1])
def test_check_int_refuses_non_ints_bools_and_low_values(value):
    with pytest.raises(InputError, match=rf"^n must be an integer >= 0, got {value!r}$".replace("[", r"\[")):
        check_int("n", value, 0)


def test_check_int_names_its_upper_bound():
    check_int("n", 5, 1, 5)
    with pytest.raises(InputError, match=r"^n must be an integer in \[1, 5\], got 6$"):
        check_int("n", 6, 1, 5)
    with pytest.raises(InputError, match=r"^m must be an integer in \[0, max_new_tokens=4\], got 5$"):
        check_int("m", 5, 0, 4, high_label="max_new_tokens=4")


def test_check_finite_returns_a_float_and_refuses_nan_inf_and_bools():
    assert check_finite("t", 2) == 2.0 and isinstance(check_finite("t", 2), float)
    assert check_finite("t", -1.5) == -1.5
    for bad in (math.nan, math.inf, -math.inf, True, "1", None):
        with pytest.raises(InputError, match=r"^t must be a finite number, got "):
            check_finite("t", bad)
    with pytest.raises(InputError, match=r"^t must be a finite number >= 0, got -0.5$"):
        check_finite("t", -0.5, 0)


def test_check_float_and_check_bool():
    check_float("p", 0.5, 0.0, 1.0)
    check_float("p", 1.0, 0.0, 1.0)  # (the bounds are in the range: top_p=1.0)
    check_float("p", 0, 0.0, 1.0)
    for bad in (math.nan, 1.5, -0.1, True, "0.5"):
        with pytest.raises(InputError, match=r"^p must be a number in \[0.0, 1.0\], got "):
            check_float("p", bad, 0.0, 1.0)
    check_bool("b", False)
    for bad in (0, 1, "true", None):
        with pytest.raises(InputError, match=r"^b must be True or False, got "):
            check_bool("b", bad)


def test_is_choice_is_false_for_unhashable_values():
    choices = {"kl": 1}
    assert is_choice("kl", choices)
    assert not is_choice("KL", choices)
    assert not is_choice(["kl"], choices) and not is_choice({"kl": 1}, choices) and not is_choice(None, choices)


def test_numpy_scalars_are_the_python_numbers_they_hold():
    """A sweep's np.arange / np.float32 values pass as the options they hold (they were refused: np.int64 is
    not an int), and serialise as JSON; other values are left for the checks to judge."""
    import dataclasses
    import json

    import numpy as np
    import torch

    import latentrt
    from latentrt.errors import plain_scalar
    from latentrt.train.common import TrainOptions

    assert type(plain_scalar(np.int64(3))) is int and type(plain_scalar(np.float32(0.5))) is float
    for kept in (True, 3, 0.5, "3", None, np.bool_(True), np.array([3])):
        assert plain_scalar(kept) is kept
    model = latentrt.load("builtin:recurrent")
    for steps in np.arange(2, 6, 3):
        swept = latentrt.generate(model, "Alex is", max_new_tokens=np.int64(3), num_steps=steps, init_scale=0.0)
        plain = latentrt.generate(model, "Alex is", max_new_tokens=3, num_steps=int(steps), init_scale=0.0)
        assert (swept.tokens, swept.steps) == (plain.tokens, plain.steps)
    assert latentrt.load("builtin:recurrent", mean_recurrence=np.int64(6)).config.mean_recurrence == 6
    ids = torch.tensor([[5, 6]])
    assert torch.equal(
        model.logits(ids, num_steps=np.int64(3), init_scale=np.float32(0)), model.logits(ids, num_steps=3, init_scale=0)
    )
    opts = TrainOptions(steps=np.int64(3), batch_size=np.int32(4), lr=np.float32(0.5), betas=(np.float32(0.5), 0.9))
    opts.validate()
    assert json.loads(json.dumps(dataclasses.asdict(opts)))["betas"] == [0.5, 0.9]


def test_environment_numbers_are_checked_and_named(monkeypatch):
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK and the streamed kernels' watchdog seconds: a value that is
    not a number, or out of range, is an InputError naming the variable (it was int()'s bare ValueError)."""
    from latentrt.errors import env_number
    from latentrt.train import distributed

    monkeypatch.delenv("LATENTRT_TEST_N", raising=False)
    assert env_number("LATENTRT_TEST_N", 3) == 3
    for raw, want in (("", 3), ("  ", 3), (" 7 ", 7)):
        monkeypatch.setenv("LATENTRT_TEST_N", raw)
        assert env_number("LATENTRT_TEST_N", 3) == want
    monkeypatch.setenv("LATENTRT_TEST_N", "0.5")
    assert env_number("LATENTRT_TEST_N", 2.0) == 0.5
    for raw, default in (("abc", 1), ("1.5", 1), ("-1", 1), ("nan", 1.0), ("inf", 1.0), ("-0.5", 1.0)):
        monkeypatch.setenv("LATENTRT_TEST_N", raw)
        with pytest.raises(InputError, match=f"environment variable LATENTRT_TEST_N must be .*got '{raw}'"):
            env_number("LATENTRT_TEST_N", default)
    for name, raw, message in (
        ("WORLD_SIZE", "abc", "WORLD_SIZE must be an integer >= 1"),
        ("WORLD_SIZE", "0", "WORLD_SIZE must be an integer >= 1"),
        ("RANK", "2", "RANK must be below WORLD_SIZE=1"),
        ("RANK", "1", "RANK must be below WORLD_SIZE=1"),
        ("LOCAL_RANK", "-1", "LOCAL_RANK must be an integer >= 0"),
    ):
        with monkeypatch.context() as env:
            env.setenv(name, raw)
            with pytest.raises(InputError, match=message):
                distributed.init()
    assert distributed.init()[:2] == (0, 1)


def test_renamed_names_options_as_the_caller_knows_them():
    """The CLI's flags and the server's fields replace generate()'s names where an option is the subject or
    shows a value; nowhere else, never inside another name, never twice."""
    names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "lr": "--lr", "top_k": "--top-k"}
    cases = [
        (
            "min_new_tokens must be an integer in [0, max_new_tokens=2], got 5",
            "min_tokens must be an integer in [0, max_tokens=2], got 5",
        ),
        ("prompt (9 tokens) + max_new_tokens (16) = 25 exceeds", "prompt (9 tokens) + max_tokens (16) = 25 exceeds"),
        ("top_k, lr do not apply", "--top-k, --lr do not apply"),
        ("top_k acts only when sampling", "--top-k acts only when sampling"),
        ("--lr must be > 0; lr must be > 0", "--lr must be > 0; --lr must be > 0"),
        (
            "the lr schedule; lr_min must be; my_lr=3; top_k is 3",
            "the lr schedule; lr_min must be; my_lr=3; top_k is 3",
        ),
        # a record's shape names data fields, not options (it read '{question, --max-steps, answer}')
        ("records are {lr, top_k, answer}; lr=2", "records are {lr, top_k, answer}; --lr=2"),
    ]
    for message, want in cases:
        assert renamed(message, names) == want
    assert renamed("lr must be", {}) == "lr must be"


def test_json_nested_past_pythons_reader_is_bad_json_everywhere_json_is_read(tmp_path):
    """json.loads raises RecursionError on a value nested past Python's recursion limit, which no handling of bad
    JSON caught (a request body of 100,000 ``[`` gave a 500): ``json_loads`` makes it a JSONDecodeError, and each
    reader of JSON says so as for any bad JSON."""
    import json

    from latentrt.records import read_records_file

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        json_loads(deep)
    assert json_loads("[[1]]") == [[1]]
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(InputError, match="deep.json is not valid JSON: nested too deeply"):
        read_records_file(tmp_path / "deep.json")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(deep)
    with pytest.raises(latentrt.ConfigError, match="config.json is not valid JSON: nested too deeply"):
        latentrt.load(tmp_path / "m")
