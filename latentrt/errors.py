"""Exception types, and the argument checks every layer shares. Each error names the problem; all are
ValueError subclasses except the numeric one."""

import json
import math
import numbers
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class LatentRTError(Exception):
    """Base class of every error latentrt raises on purpose."""


class ConfigError(LatentRTError, ValueError):
    """config.json (or a load() override) is missing a field, has a bad value or an unknown name."""


class CheckpointError(LatentRTError, ValueError):
    """Weights are missing, unexpected, misshaped or unreadable."""


class InputError(LatentRTError, ValueError):
    """A bad argument to logits() / generate(): prompt, step count, criterion, markers..."""


class PromptError(InputError):
    """One prompt is bad (its tokens, its markers, its length or KV memory with ``max_new_tokens``) where the
    options are fine: the server names which prompt of a request with several."""


class NonFiniteStateError(LatentRTError, FloatingPointError):
    """A latent state or logits became NaN/inf; generation stops rather than return garbage."""


def renamed(message: str, names: Mapping[str, str]) -> str:
    """``message`` with the options it names as the caller knows them: a command's flags (``--seed must be
    ...``), a request's fields (``max_tokens must be ...``). A name is replaced where it is the subject
    (``NAME must``, ``NAME acts only``, ``NAME does not``, a list of them: ``NAME, NAME do not``) or shows
    a value (``NAME=2``, ``NAME (2)``); never inside another name, nor a name already replaced (``--lr``
    stays ``--lr``), nor inside braces (a record's shape, ``{question, steps, answer}``, names fields of data,
    not options)."""
    if not names:
        return message
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w-])({alternatives})\b(?==| must| act| do|, | \()")
    parts = re.split(r"(\{[^{}]*\})", message)  # odd parts: the braces' contents, left as they are
    return "".join(part if i % 2 else pattern.sub(lambda m: names[m.group(1)], part) for i, part in enumerate(parts))


def not_a_model(value) -> InputError:
    """The error for something given where a loaded model goes (most likely its name: load it first; or the
    model wrapped by ``torch.compile``, whose module is not the model latentrt's backends run)."""
    if hasattr(value, "_orig_mod"):  # torch.compile's OptimizedModule
        inner = type(value._orig_mod).__name__
        return InputError(
            f"expected a model from latentrt.load(...), got a torch.compile'd {inner}; pass the model itself "
            "(latentrt compiles its decode step through its backends: load(..., backend='triton' or 'cuda'))"
        )
    inner = getattr(value, "module", None)  # DistributedDataParallel / DataParallel around a model
    if hasattr(inner, "config") and hasattr(inner, "tokenizer"):
        return InputError(
            f"expected a model from latentrt.load(...), got a {type(value).__name__} wrapping a "
            f"{type(inner).__name__}; pass its .module"
        )
    what = f"the string {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"
    return InputError(f"expected a model from latentrt.load(...), got {what}; call latentrt.load first")


def is_choice(value, choices) -> bool:
    """Whether ``value`` names one of ``choices`` (a registry's keys). Only a string can: any other value, an
    unhashable list or dict from a JSON request or config file included, is not one (where a plain ``in``
    on a dict would raise TypeError instead of the caller's error naming the choices)."""
    return isinstance(value, str) and value in choices


def check_int(name: str, value, low: int, high: int | None = None, high_label: str | None = None) -> None:
    """InputError unless ``value`` is an int (not a bool) in [low, high] (high None: no upper bound);
    ``high_label`` shows the upper bound by its source (``max_new_tokens=5``) rather than as a bare number."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high_label or high}]"
        raise InputError(f"{name} must be an integer {bound}, got {value!r}")


def as_float(value: int | float) -> float:
    """A number as a float, an int past a float's range as the infinity of its sign (``float()`` raises there)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_finite(name: str, value, low: float | None = None) -> float:
    """``value`` as a float; InputError unless it is a finite number (not a bool) and, with ``low``, >= low."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(as_float(value))
    if not ok or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise InputError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_float(name: str, value, low: float, high: float | None = None) -> None:
    """InputError unless ``value`` is a number (int or float, not a bool, not NaN) in [low, high]."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be a number {bound}, got {value!r}")


def check_bool(name: str, value) -> None:
    """InputError unless ``value`` is True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")


@contextmanager
def os_errors_as(error: type[LatentRTError], what: str) -> Iterator[None]:
    """Looking up a path a user gave (``Path.exists`` / ``is_file`` / ``is_dir``): those say False for a path
    that is not there but raise OSError for one the file system refuses to look up (a name too long, a parent
    folder that cannot be searched); that becomes ``error`` naming ``what`` and the reason."""
    try:
        yield
    except OSError as exc:
        raise error(f"cannot look up {what}: {exc.strerror or exc}") from None


def json_loads(text: str | bytes):
    """``json.loads``, with a value nested past Python's recursion limit (a body of 100,000 ``[``) a
    ``json.JSONDecodeError`` like any other bad JSON: json.loads raises RecursionError there, which no caller's
    handling of bad JSON caught (a request body gave a 500)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None


def check_unicode(name: str, text: str) -> None:
    """InputError unless ``text`` is valid Unicode (no lone surrogates, which a JSON body's ``\\ud800`` or
    undecodable bytes on stdin leave in a Python string and which a tokenizer refuses with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{name} is not valid Unicode text ({exc.reason} at {exc.start})") from None


def plain_scalar(value):
    """A numpy scalar number (``np.int64`` from ``np.arange``, ``np.float32``) as the Python int / float it
    holds, so a sweep's values pass the checks above and serialise as JSON; anything else unchanged (a bool,
    a tensor, a string: the checks judge those)."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def env_number(name: str, default: int | float, low: int | float = 0):
    """The environment variable ``name`` as a number of ``default``'s type (``default`` when unset or empty);
    an InputError naming the variable when it is not one or is below ``low`` (where ``int()`` would raise a
    bare "invalid literal" ValueError that names nothing)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        what = "an integer" if kind is int else "a finite number"
        raise InputError(f"environment variable {name} must be {what} >= {low}, got {raw!r}")
    return value
