"""Developer tools that are not product code (run from the repository root: python -m tools.NAME)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

from latentrt.sampling import MAX_SEED


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


def check_budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The soaks' --seconds, --cases and --seed, or a parser error naming the flag: a soak of no case would say
    "no mismatch", and a seed out of range would make every case a mismatch."""
    if not args.seconds > 0:  # (nan too)
        parser.error(f"--seconds must be > 0, got {args.seconds}")
    if args.cases is not None and args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    if not 0 <= args.seed <= MAX_SEED - (args.cases or 10**9):
        parser.error(f"--seed must be >= 0 and leave room for the cases' seeds (seed + i), got {args.seed}")


def case_parser(prog: str, doc: str, checks: tuple[str, ...]) -> argparse.ArgumentParser:
    """The random-case tools' common flags (tools.soak, tools.fuzz): --seconds or --cases, --checks (of
    ``checks``), --model and --seed; a tool adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases instead")
    p.add_argument("--checks", default=",".join(checks), help=f"comma-separated, of {','.join(checks)}")
    p.add_argument("--model", default="builtin:recurrent", help="what latentrt.load takes (default builtin:recurrent)")
    p.add_argument("--seed", type=int, default=0, help="the first case's seed (case i: seed + i)")
    return p


def parsed_checks(parser: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]) -> list[str]:
    """``case_parser``'s --checks as a list (a parser error unless some of ``known``, and nothing else), after
    ``check_budget``."""
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    if not checks or set(checks) - set(known):
        parser.error(f"--checks takes {','.join(known)}; got {args.checks!r}")
    check_budget(parser, args)
    return checks
