"""Developer tools that are not product code (run from the repository root: python -m tools.NAME)."""

from __future__ import annotations

import functools
import warnings


def warnings_silenced(fn):
    """``fn`` with every warning silenced while it runs, the filters restored after (the soaks' commands: the
    options' warnings, e.g. top_k unused when greedy, are not their point)."""

    @functools.wraps(fn)
    def silenced(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return silenced
