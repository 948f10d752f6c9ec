"""The latent loop of recurrent depth: its semantics, written once.

Every implementation runs these rules; the reference path and the Triton token runner call
``run_recurrence`` itself, and the CUDA kernel (csrc/recurrent_loop.cu) implements them on the device
and is tested against it. They are the rules of the published ``generate_with_adaptive_compute``
(Huginn's raven_modeling_minimal.py) for one sequence; a batch applies them to each sequence on its own.

A *unit* is the prompt (prefill, many positions) or one generated token. For a batch of B sequences:

1. The prelude gives the unit's input e; the initial state s_0 is the random init (truncated normal,
   ``init_scale``), or with ``continuous`` the previous unit's final state (last position).
2. Iteration t = 0 .. r_max-1 runs for the sequences still *active*: the cache records that they write
   iteration t at the unit's positions (``written`` = t + 1, so the lookup rule of latentrt/kv_modes.py
   finds their entries), s <- core(s, e) with the core layers' K/V in slot t mod K, and each active
   sequence's iteration count goes up by one. A frozen sequence keeps its state, its K/V and its count.
3. Checks: the exit criterion (latentrt/exits.py) runs only after iterations t >= ``min_steps`` with
   (t - min_steps) a multiple of ``check_every`` (the published ``check_criterion_every_n_steps``), and
   never in the prefill with ``do_not_exit_in_prefill``. Between checks it keeps its state: a check
   compares the new state with the state of the previous check (the initial state at the first check:
   latent-diff, cosine), or the new logits with those of the previous check (uniform at the first: kl,
   minp-kl; a fresh counter: argmax-stability). So with ``min_steps`` m > 0 the earliest exit is usually
   after m + 2 iterations. Computing logits for a check writes the coda's K/V for the active sequences.
4. A sequence exits at a check when its criterion is met; it is frozen from then on.
5. Logits: a sequence that exited gets the logits of its exit state. One that never exited gets, for the
   logit-based criteria, the logits of the last check (as published: with ``check_every`` > 1 that may
   precede the last iterations), else one head pass over its final state.
6. The unit reports, per sequence, the iterations it ran (``GenerationResult.steps``) and whether its
   final state or logits are non-finite.

Without an exit criterion (``none``, i.e. fixed depth) every sequence runs r_max iterations. A
sequence's result does not depend on the others in the batch: masks, never host branches, decide who
runs. The loop never reads the device from the host unless ``host_may_stop`` (the reference path, and any
path with hooks: it stops early once every sequence has exited, a host read per check; so hooks are called
after the iterations some sequence runs, the same ones on every backend), or a caller of
``recurrence_segments`` stops it at one of its boundaries (the Triton token runner's ``early_stop``: a few
reads a token). Stopping once no sequence is active changes no result.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from .exits import ExitCriterion, ReferenceExitOps
from .transfer import fill_rows, to_device


@dataclass(frozen=True)
class LoopSpec:
    """What a generate() call asks of each unit's loop."""

    r_max: int  # iterations at most (num_steps)
    criterion: ExitCriterion  # ``none`` for fixed depth
    min_steps: int = 0  # no check after the first min_steps iterations
    check_every: int = 1  # then a check after every check_every-th iteration

    def checks_at(self, t: int) -> bool:
        """Whether the criterion runs after iteration t (0-based)."""
        return not self.criterion.never_exits and t >= self.min_steps and (t - self.min_steps) % self.check_every == 0

    @property
    def ever_checks(self) -> bool:
        return any(self.checks_at(t) for t in range(self.r_max))


class Rows:
    """Which rows of a LatentLoop a call concerns: all of them (``Rows.all``: plain slices, no index tensor,
    so capturable in a CUDA graph) or a list (index tensor on the device, the list on the host)."""

    def __init__(self, rows: list[int] | None, total: int, device) -> None:
        self.list = list(range(total)) if rows is None else list(rows)
        self.index = slice(None) if rows is None else to_device(self.list, device)

    @classmethod
    def all(cls, total: int) -> Rows:
        return cls(None, total, None)

    def __len__(self) -> int:
        return len(self.list)

    def subset(self, keep: list[bool], device) -> Rows:
        """The rows whose ``keep`` entry (aligned with ``list``) is true: all of them keeps ``self``."""
        if all(keep):
            return self
        return Rows([r for r, k in zip(self.list, keep) if k], 0, device)


def _take(state, ix):
    """A criterion's per-row state (a tensor or a tuple of tensors) at rows ``ix``."""
    if state is None:
        return None
    return tuple(_take(s, ix) for s in state) if isinstance(state, tuple) else state[ix]


def _each(state, value, put: Callable[[Tensor, Tensor], None]) -> None:
    """``put(tensor, its value)`` for each tensor of a criterion's per-row state (a tensor, a tuple, None)."""
    if state is None:
        return
    if isinstance(state, tuple):
        for s, v in zip(state, value):
            _each(s, v, put)
    else:
        put(state, value)


def _put(state, ix, value) -> None:
    """A criterion's per-row state takes ``value`` at rows ``ix``."""
    _each(state, value, lambda s, v: s.__setitem__(ix, v))


def _put_where(state, mask: Tensor, value) -> None:
    """A criterion's per-row state takes ``value`` (every row's) where ``mask`` [R], in place."""
    _each(state, value, lambda s, v: s.copy_(torch.where(mask.view(-1, *[1] * (s.dim() - 1)), v, s)))


class LatentLoop:
    """The latent loops of R rows following the rules above, each row at its own iteration with its own
    ``LoopSpec``: the one implementation of rules 2-5.

    ``run_recurrence`` starts every row of a batch together and drives them to the end; the server
    (latentrt/serve) starts a row when a request's unit begins and retires it when its loop ends, so rows
    of many requests at different depths advance in one batched iteration. Per iteration the caller
    computes the new states of some rows from ``s`` and calls ``advance``; the rows ``checking`` then get
    ``check`` (with the head's logits of their state for the logit criteria); a row's loop is over when it
    exited (``active`` false) or ran its r_max iterations (``at_end``); ``final_logits`` gives its logits.
    Iteration counts and check schedules are host values (the spec decides them); exits stay on the device.
    """

    def __init__(self, rows: int, state_shape: tuple, vocab: int, device, dtype, exit_ops=None) -> None:
        self.ops = exit_ops or ReferenceExitOps
        self.vocab, self.device = vocab, device
        self.s = torch.zeros(rows, *state_shape, dtype=dtype, device=device)
        self.reference = torch.zeros_like(self.s)  # the state the criterion saw last (rule 3)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self.used = torch.zeros(rows, dtype=torch.long, device=device)
        # logits (logit criteria) of the exit state, and of the last check
        self.out = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.checked_logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.t = [0] * rows  # host: iterations run per row
        self.specs: list[LoopSpec | None] = [None] * rows
        self.checked = [False] * rows  # host: whether a row's criterion ran on logits yet
        self.criterion_state: dict[ExitCriterion, object] = {}  # criterion -> its state for every row
        self._expand = (slice(None),) + (None,) * len(state_shape)  # mask [R] against states [R, ...]

    def start(self, rows: Rows, spec: LoopSpec, s0: Tensor, alive: Tensor | None = None) -> None:
        """Begin a unit for ``rows``: initial states ``s0``, ``alive`` the rows that run it (default all)."""
        ix = rows.index
        self.s[ix] = s0
        self.reference[ix] = s0
        if alive is None:
            fill_rows(self.active, ix, True)
        else:
            self.active[ix] = alive
        fill_rows(self.used, ix, 0)
        for r in rows.list:
            self.t[r], self.specs[r], self.checked[r] = 0, spec, False
        crit = spec.criterion
        _put(self._criterion_state(crit), ix, crit.start(len(rows), self.vocab, self.device))

    def _criterion_state(self, crit: ExitCriterion):
        if crit not in self.criterion_state:
            self.criterion_state[crit] = crit.start(self.s.shape[0], self.vocab, self.device)
        return self.criterion_state[crit]

    def advance(self, rows: Rows, new: Tensor) -> None:
        """Rule 2: the iteration just computed ``new`` for ``rows``; their active ones take it."""
        ix = rows.index
        act = self.active[ix]
        self.s[ix] = torch.where(act[self._expand], new, self.s[ix])
        self.used[ix] += act.long()
        self.count(rows)

    def take(self, new: Tensor, ran: Tensor) -> None:
        """Rule 2's device half over every row, by a mask (no index, no host value: capturable): the rows
        where ``ran`` (active ones the pass ran) take ``new`` [rows, ...]; ``count`` is the host half."""
        self.s.copy_(torch.where(ran[self._expand], new, self.s))
        self.used.add_(ran.long())

    def count(self, rows: Rows) -> None:
        """Rule 2's host half: ``rows`` ran one more iteration."""
        for r in rows.list:
            self.t[r] += 1

    def checking(self, rows: Rows) -> tuple[Rows, Rows]:
        """Of ``rows``, those whose criterion runs after their last iteration (rule 3), split into (those
        that need the head's logits, the others)."""
        check = [self.specs[r].checks_at(self.t[r] - 1) for r in rows.list]
        logits = [c and self.specs[r].criterion.needs_logits for c, r in zip(check, rows.list)]
        plain = [c and not n for c, n in zip(check, logits)]
        empty = Rows([], 0, self.device)
        return (
            rows.subset(logits, self.device) if any(logits) else empty,
            rows.subset(plain, self.device) if any(plain) else empty,
        )

    def check(self, rows: Rows, logits: Tensor | None, valid: Tensor) -> Tensor:
        """Rules 3-4 for ``rows`` (checking, one kind: all or none need ``logits``): each criterion compares
        with the state or logits of its previous check; rows whose criterion is met exit (freeze). ``valid``
        [len(rows), n] marks the units' real positions. Returns the exit mask of ``rows``."""
        groups: dict[ExitCriterion, list[int]] = {}
        for i, r in enumerate(rows.list):
            groups.setdefault(self.specs[r].criterion, []).append(i)
        ix = rows.index
        now, active = self.s[ix], self.active[ix]
        # (one criterion, the usual case: its mask is the rows' own, no gather and scatter of the rows)
        exits = None if len(groups) == 1 else torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        for crit, members in groups.items():
            whole = len(members) == len(rows)
            sub = rows if whole else Rows([rows.list[i] for i in members], 0, self.device)
            at = slice(None) if whole else to_device(members, self.device)
            prev, new = self.reference[sub.index], now[at]
            if prev.dim() == 2:  # one position per row: [R, d] -> [R, 1, d]
                prev, new = prev[:, None], new[:, None]
            state = _take(self._criterion_state(crit), sub.index)
            met, state = crit.update(state, prev, new, None if logits is None else logits[at], valid[at], self.ops)
            _put(self.criterion_state[crit], sub.index, state)
            if exits is None:
                exits = met
            else:
                exits[at] = met
        exits = exits & active
        self.reference[ix] = now
        if logits is not None:
            self.out[ix] = torch.where(exits[:, None], logits, self.out[ix])
            self.checked_logits[ix] = logits
            self.checked_on_host(rows.list)
        self.active[ix] = active & ~exits
        return exits

    def due(self, rows: Rows) -> dict[ExitCriterion, list[int]]:
        """Of ``rows``, those whose criterion runs after the iteration each runs next (rule 3; ``checking``
        asks the same after it), by criterion: what a captured pass checks by masks (``check_where``)."""
        due: dict[ExitCriterion, list[int]] = {}
        for r in rows.list:
            if self.specs[r].checks_at(self.t[r]):
                due.setdefault(self.specs[r].criterion, []).append(r)
        return due

    def check_where(self, crit: ExitCriterion, checking: Tensor, logits: Tensor | None, valid: Tensor) -> None:
        """``check`` by masks over every row (no index, no host value: capturable in a CUDA graph): the rows
        where ``checking`` [R] (all under ``crit``) run rules 3-4 exactly as ``check`` runs them (the criterion
        computed for every row, taken only where checking); the others keep their states, references, criterion
        states and logits. ``logits`` [R, V] every row's (logit criteria), ``valid`` [R, n]. The host half,
        for logit criteria: ``checked_on_host``."""
        prev, new = self.reference, self.s
        if prev.dim() == 2:  # one position per row: [R, d] -> [R, 1, d]
            prev, new = prev[:, None], new[:, None]
        state = self._criterion_state(crit)
        met, updated = crit.update(state, prev, new, logits, valid, self.ops)
        exits = met & self.active & checking
        _put_where(state, checking, updated)
        self.reference.copy_(torch.where(checking[self._expand], self.s, self.reference))
        if logits is not None:
            self.out.copy_(torch.where(exits[:, None], logits, self.out))
            self.checked_logits.copy_(torch.where(checking[:, None], logits, self.checked_logits))
        self.active &= ~exits

    def checked_on_host(self, rows: list[int]) -> None:
        """``check_where``'s host half for a logit criterion: ``rows`` have checked logits (rule 5 reads them)."""
        for r in rows:
            self.checked[r] = True

    def at_end(self, row: int) -> bool:
        """Whether a row ran its r_max iterations (host)."""
        return self.t[row] >= self.specs[row].r_max

    def final_logits(self, rows: Rows, head: Callable[[Rows], Tensor]) -> Tensor:
        """Rule 5 for ``rows`` whose loop is over: who exited keeps its exit logits; who never did gets the
        last check's logits (logit criteria), else ``head(rows needing it)``: the head of its state (a frozen
        state is its exit state). Returns [len(rows), V]."""
        from_checks = [self.checked[r] for r in rows.list]
        if all(from_checks):
            ix = rows.index
            return torch.where(self.active[ix][:, None], self.checked_logits[ix], self.out[ix])
        if not any(from_checks):
            return head(rows)
        out = torch.empty(len(rows), self.vocab, dtype=torch.float32, device=self.device)
        for want, pick in ((True, from_checks), (False, [not c for c in from_checks])):
            part = rows.subset(pick, self.device)
            at = to_device([i for i, p in enumerate(pick) if p], self.device)
            out[at] = self.final_logits(part, head) if want else head(part)
        return out


def recurrence_segments(
    spec: LoopSpec,
    s0: Tensor,
    alive: Tensor,
    valid: Tensor,
    vocab: int,
    iterate: Callable[[Tensor, int, Tensor], Tensor],
    head: Callable[[Tensor, Tensor], Tensor],
    mark: Callable[[int, Tensor], None],
    exit_ops=None,
    hooks=None,
    stops: Container[int] = (),
) -> Generator[LatentLoop, bool | None, tuple[Tensor, Tensor, Tensor]]:
    """``run_recurrence``'s loop as a generator with boundaries: after each iteration t in ``stops`` (and its
    check, if one is due) it yields its ``LatentLoop``, and the caller sends back whether to end the loop
    there (true only once no sequence is active, read from ``loop.active``: rule 2 then changes nothing);
    it returns what ``run_recurrence`` returns. The code between two boundaries reads nothing on the host,
    so a caller may capture each stretch as a CUDA graph (latentrt/backends/graph.py)."""
    B = s0.shape[0]
    loop = LatentLoop(B, tuple(s0.shape[1:]), vocab, s0.device, s0.dtype, exit_ops)
    rows = Rows.all(B)
    loop.start(rows, spec, s0, alive)
    for t in range(spec.r_max):
        mark(t, loop.active)
        new = iterate(loop.s, t, loop.active)
        if hooks:  # a frozen sequence's row shows the state it keeps (what a backend computed there is dropped)
            new = hooks.on_iteration(t, torch.where(loop.active[loop._expand], new, loop.s), loop.active)
        loop.advance(rows, new)
        if spec.checks_at(t):
            loop.check(rows, head(loop.s, loop.active) if spec.criterion.needs_logits else None, valid)
        if t in stops and (yield loop):
            break
    return loop.s, loop.used, loop.final_logits(rows, lambda _: head(loop.s, alive))


def all_exited(loop: LatentLoop) -> bool:
    """Whether no sequence of ``loop`` is active (a host read)."""
    return not bool(loop.active.any())


def drive(segments: Generator, stop: Callable[[object], bool] = lambda _: False):
    """Run a generator with boundaries to its end, sending ``stop(what it yielded)`` at each; its return value."""
    try:
        marker = next(segments)
        while True:
            marker = segments.send(stop(marker))
    except StopIteration as done:
        return done.value


def run_recurrence(
    spec: LoopSpec,
    s0: Tensor,
    alive: Tensor,
    valid: Tensor,
    vocab: int,
    iterate: Callable[[Tensor, int, Tensor], Tensor],
    head: Callable[[Tensor, Tensor], Tensor],
    mark: Callable[[int, Tensor], None],
    exit_ops=None,
    hooks=None,
    host_may_stop: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one unit's latent loop for a batch, every sequence from iteration 0 (rules in the module
    docstring; a ``LatentLoop`` over all rows, no index tensors: capturable in a CUDA graph).

    ``s0`` the initial state ([B, n, d] or [B, d]); ``alive`` [B] the sequences that run the unit; ``valid``
    [B, n] its real positions (for the latent-diff average); ``iterate(s, t, active)`` one core iteration;
    ``head(s, active)`` the next-token logits [B, vocab] (fp32) of a state; ``mark(t, active)`` records in
    the cache that ``active`` write iteration t; ``exit_ops`` the backend's exit formulas (None: reference);
    ``hooks`` a HookList called after every iteration; ``host_may_stop``: stop once every sequence has
    exited, read on the host after every check. Returns (final state, iterations used [B] long, logits
    [B, vocab] fp32)."""
    stops = {t for t in range(spec.r_max) if spec.checks_at(t)} if host_may_stop else ()
    segments = recurrence_segments(spec, s0, alive, valid, vocab, iterate, head, mark, exit_ops, hooks, stops)
    return drive(segments, all_exited)
