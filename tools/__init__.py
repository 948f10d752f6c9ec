"""Developer tools that are not product code (run from the repository root: python -m tools.NAME)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator


def warnings_silenced(fn):
    """``fn`` with every warning silenced while it runs, the filters restored after (the soaks' commands: the
    options' warnings, e.g. top_k unused when greedy, are not their point)."""

    @functools.wraps(fn)
    def silenced(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return silenced


@contextlib.contextmanager
def wrapped(owner, name: str, wrap: Callable) -> Iterator[None]:
    """``owner.name`` (a class's method, a module's function) replaced by ``wrap(the real one)`` while the block
    runs, then put back: the soaks' recorders of what a run computes."""
    real = vars(owner)[name]
    setattr(owner, name, wrap(real))
    try:
        yield
    finally:
        setattr(owner, name, real)
