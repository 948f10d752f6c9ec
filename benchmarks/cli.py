"""The benchmark commands' flag types and error reporting.

A bad flag is ``PROG: error: ...`` with exit status 2 before anything is measured, as ``latentrt``'s own
commands report it: never a traceback, and never one after minutes of measuring because the output path
cannot be written. latentrt's own errors raised while a benchmark runs (a model that does not load, an
option the engine refuses) are reported the same way by ``reported``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from latentrt.errors import LatentRTError
from latentrt.loader import parse_device


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0 (a threshold)."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def rate(text: str) -> float:
    """An argparse type: arrivals per second, > 0; ``inf`` sends every request at once."""
    value = _number(text)
    if not value > 0:  # nan fails this too
        raise argparse.ArgumentTypeError(f"must be a number > 0 (inf: all at once), got {text!r}")
    return value


def device(text: str) -> str:
    """An argparse type: a device this machine has, checked as ``latentrt.load`` checks it (the text is
    kept: the records hold the flags as given)."""
    try:
        parse_device(text)
    except LatentRTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def output_file(text: str) -> str:
    """An argparse type: a file that can be written (its folder exists and is writable; not a folder)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written here (permissions)")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder that exists and is writable, or can be made (its nearest existing
    ancestor is a writable folder)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be made: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written here (permissions on {str(existing)!r})")
    return text


@contextlib.contextmanager
def reported(parser: argparse.ArgumentParser) -> Iterator[None]:
    """latentrt's errors inside the block end the command as ``PROG: error: MESSAGE`` (exit 2), no
    traceback; anything else is a benchmark failure and keeps its traceback."""
    try:
        yield
    except LatentRTError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
