"""The decode loop: prefill, per-token latent loop with per-sequence freezing, sampling, streaming.

This is the only module that orchestrates the seams. A generated token (the prompt counts as the unit
that produces the first one) runs: prelude -> up to r_max core iterations, each followed by the exit
test -> head -> sample. Sequences that exit are frozen by masking (their state and KV stop changing)
while the others go on; a sequence's result in a batch equals its result alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import parse_kv_sharing
from .errors import InputError, NonFiniteStateError
from .exits import ExitCriterion, ExitTracker, make_criterion
from .hooks import HookList
from .models.recurrent import check_steps
from .prompts import make_batch
from .sampling import check_sampling, sample


@dataclass
class GenerationResult:
    """What generate() returns. For a single prompt (str, list of ids, 1-D tensor) ``tokens``,
    ``steps`` and ``text`` hold one sequence; for a batch they are lists with one entry per prompt."""

    tokens: list = field(default_factory=list)  # new token ids
    steps: list = field(default_factory=list)  # recurrence iterations used per new token (0 for Coconut)
    text: str | list | None = None  # decoded new tokens (None without a tokenizer)
    kv_bytes: int = 0  # K/V storage held by the cache at the end
    finish_reasons: list = field(default_factory=list)  # "stop" or "length" per sequence
    num_thoughts: int = 0  # Coconut: continuous thoughts run for the prompt
    backend: str = "torch"
    logits: list | None = None  # with return_logits=True: fp32 next-token logits [n, V] per sequence


@dataclass
class StreamEvent:
    """One generated position: the new token of every (still running) sequence."""

    index: int  # 0 for the first new token
    tokens: int | list  # int for a single prompt; list with None for finished sequences otherwise
    steps: int | list
    text: str | list | None  # decoded text of this token


class GenerationStream:
    """Iterator of StreamEvents; ``.result`` holds the GenerationResult once exhausted."""

    def __init__(self, events: Iterator) -> None:
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while True:
                yield next(self._events)
        except StopIteration as stop:
            self.result = stop.value


def generate(
    model,
    prompt,
    *,
    max_new_tokens: int = 64,
    adaptive: bool = False,
    num_steps: int | None = None,
    exit_criterion: str = "kl",
    exit_threshold: float | None = None,
    min_steps: int = 0,
    kv_sharing: str = "full",
    continuous: bool = False,
    init_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop=None,
    num_thoughts: int | None = None,
    stream: bool = False,
    attention_mask: Tensor | None = None,
    hooks=None,
    return_logits: bool = False,
):
    """Generate from a loaded model. See README for the meaning of each argument.

    Returns a GenerationResult, or with ``stream=True`` a GenerationStream yielding one StreamEvent per
    generated position (its ``.result`` is set at the end). All arguments are checked before any work.
    """
    run = _Run(model, prompt, locals())
    if stream:
        return GenerationStream(run.events(stream=True))
    events = run.events(stream=False)
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


class _Run:
    """One generate() call: validated arguments, the cache, and the token loop."""

    def __init__(self, model, prompt, args: dict) -> None:
        self.model, self.cfg = model, model.config
        self.recurrent = model.family == "recurrent"
        self.backend = model.backend
        a = args
        self.max_new = a["max_new_tokens"]
        if isinstance(self.max_new, bool) or not isinstance(self.max_new, int) or self.max_new < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new!r}")
        check_sampling(a["temperature"], a["top_k"], a["top_p"])
        self.temperature, self.top_k, self.top_p = a["temperature"], a["top_k"], a["top_p"]
        if a["seed"] is not None and (isinstance(a["seed"], bool) or not isinstance(a["seed"], int)):
            raise InputError(f"seed must be an integer or None, got {a['seed']!r}")
        self.generator = None if a["seed"] is None else torch.Generator(model.device).manual_seed(a["seed"])
        self.hooks = HookList(a["hooks"])
        self.return_logits = bool(a["return_logits"])
        criterion = make_criterion(a["exit_criterion"], a["exit_threshold"])
        init_scale = a["init_scale"]
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or init_scale < 0:
            raise InputError(f"init_scale must be a number >= 0, got {init_scale!r}")
        if self.recurrent:
            if a["num_thoughts"] is not None:
                raise InputError("num_thoughts applies to Coconut models, not recurrent-depth ones")
            self.r_max = self.cfg.mean_recurrence if a["num_steps"] is None else check_steps(a["num_steps"])
            self.slots = parse_kv_sharing(a["kv_sharing"], self.r_max)
            self.criterion = criterion if a["adaptive"] else ExitCriterion("none", 0.0)
            ms = a["min_steps"]
            if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
                raise InputError(f"min_steps must be an integer >= 0, got {ms!r}")
            if ms > self.r_max:
                raise InputError(f"min_steps={ms} exceeds the maximum number of steps {self.r_max}")
            self.min_steps, self.continuous, self.init_scale = ms, bool(a["continuous"]), float(init_scale)
        else:
            extra = [
                n
                for n, bad in (
                    ("adaptive", a["adaptive"]),
                    ("num_steps", a["num_steps"] is not None),
                    ("continuous", a["continuous"]),
                    ("min_steps", a["min_steps"] != 0),
                    ("kv_sharing", a["kv_sharing"] != "full"),
                )
                if bad
            ]
            if extra:
                raise InputError(f"{extra} apply to recurrent-depth models, not Coconut")
        self.batch = make_batch(prompt, model.tokenizer, self.cfg, model.device, a["attention_mask"])
        if not self.recurrent and a["num_thoughts"] is not None:
            self._append_thoughts(a["num_thoughts"])
        self.stop_ids = self._stop_ids(a["stop"])
        need = self.batch.ids.shape[1] + self.max_new
        if need > self.cfg.block_size:
            raise InputError(
                f"prompt ({self.batch.ids.shape[1]} tokens) + max_new_tokens ({self.max_new}) = "
                f"{need} exceeds the model's context (block_size={self.cfg.block_size})"
            )

    # ---------------------------------------------------------------- argument helpers
    def _append_thoughts(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"num_thoughts must be an integer >= 0, got {k!r}")
        start, latent, end = self.model.marker_ids
        if latent is None:
            raise InputError(
                "this model has no latent markers: pass their ids to load() "
                "(latent_id=, start_latent_id=, end_latent_id=)"
            )
        B = self.batch.ids.shape[0]
        extra = torch.tensor([start] + [latent] * k + [end], device=self.batch.ids.device).expand(B, -1)
        self.batch.ids = torch.cat([self.batch.ids, extra], dim=1)
        self.batch.mask = torch.cat([self.batch.mask, torch.ones_like(extra, dtype=torch.bool)], dim=1)

    def _stop_ids(self, stop) -> Tensor:
        ids = set()
        if getattr(self.model, "eos_token_id", None) is not None:
            ids.add(self.model.eos_token_id)
        items = [] if stop is None else ([stop] if isinstance(stop, (int, str)) else list(stop))
        for s in items:
            if isinstance(s, str):
                tok = self.model.tokenizer
                enc = tok.encode(s, add_special_tokens=False).ids if tok is not None else []
                if len(enc) != 1:
                    raise InputError(
                        f"stop string {s!r} must be exactly one token of the tokenizer "
                        f"(it is {len(enc)}); pass token ids instead"
                    )
                ids.add(enc[0])
            elif isinstance(s, int) and not isinstance(s, bool) and 0 <= s < self.cfg.padded_vocab_size:
                ids.add(s)
            else:
                raise InputError(f"stop entries must be token ids in the vocabulary or strings, got {s!r}")
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.model.device)

    # ---------------------------------------------------------------- the loop
    @torch.no_grad()
    def events(self, stream: bool):
        """Yields a StreamEvent per generated position when streaming (None otherwise: decoding the text
        so far every token is only worth it for a stream); returns the GenerationResult."""
        model, ids, mask = self.model, self.batch.ids, self.batch.mask
        B, S = ids.shape
        cache = model.new_cache(B, S + self.max_new, getattr(self, "slots", 1))
        alive = torch.ones(B, dtype=torch.bool, device=model.device)
        tokens: list[list[int]] = [[] for _ in range(B)]
        steps: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        self._shown = [""] * B
        kept_logits: list[list[Tensor]] = [[] for _ in range(B)]
        thoughts = 0
        alive_l = [True] * B
        if self.recurrent:
            self.carry = None
            # decode tokens as one captured launch sequence where the backend has one (not with hooks:
            # they are Python called between iterations)
            self.token_step = (
                None if self.hooks else self.backend.token_step(cache, self.r_max, self.criterion, self.min_steps)
            )
            logits, used, bad = self._recurrent_unit(ids, mask, alive, cache)
        else:
            logits, _, thoughts = model.run_prompt(ids, mask, cache, self.hooks, self.backend)
            logits = logits[:, -1]
            used = torch.zeros(B, dtype=torch.long, device=model.device)
            bad = 2 * (~torch.isfinite(logits).all(-1)).long()
        for i in range(self.max_new):
            tok = sample(logits, self.temperature, self.top_k, self.top_p, self.generator)
            stopped = torch.isin(tok, self.stop_ids) & alive
            # the one device->host read per token
            tok_l, used_l, stop_l, bad_l = torch.stack([tok, used, stopped.long(), bad]).tolist()
            self._raise_if_bad(bad_l, i)
            if self.recurrent:
                cache.finish(self.last_end, used_l, alive_l)
            for b in range(B):
                if alive_l[b]:
                    tokens[b].append(tok_l[b])
                    steps[b].append(used_l[b])
                    if self.return_logits:
                        kept_logits[b].append(logits[b].cpu())
            yield self._event(i, tok_l, used_l, alive_l, tokens) if stream else None
            for b in range(B):
                if stop_l[b]:
                    reasons[b] = "stop"
            alive = alive & ~stopped
            alive_l = [a and not st for a, st in zip(alive_l, stop_l)]
            if i + 1 == self.max_new or not any(alive_l):
                break
            self.hooks.token_index = i + 1
            if self.recurrent:
                logits, used, bad = self._recurrent_unit(tok[:, None], alive[:, None], alive, cache)
            else:
                chunk = cache.begin(alive[:, None])
                h = model.forward_embeds(model.embed(tok[:, None]), cache, chunk)
                logits = model.lm_logits(h)[:, -1]
                bad = 2 * (~torch.isfinite(logits).all(-1) & alive).long()
        logits_out = [torch.stack(k) for k in kept_logits] if self.return_logits else None
        return self._result(tokens, steps, reasons, cache.used_bytes(), thoughts, logits_out)

    def _raise_if_bad(self, bad: list[int], token: int) -> None:
        """Non-finite flags computed on the device (1: latent state, 2: logits) -> a clear error."""
        if not any(bad):
            return
        where = f" at new token {token}" if token else " in the prompt"
        what = "latent state" if any(b & 1 for b in bad) else "logits"
        seqs = [i for i, b in enumerate(bad) if b]
        raise NonFiniteStateError(
            f"non-finite {what}{where} in sequence(s) {seqs}; check the weights, the init_state and any hooks"
        )

    def _recurrent_unit(self, ids: Tensor, valid: Tensor, alive: Tensor, cache) -> tuple[Tensor, Tensor, Tensor]:
        """Run one token (or the prompt) through prelude, the adaptive recurrence and the head.

        Returns next-token logits [B,V], the iterations each sequence used [B], and non-finite flags [B]
        (1: latent state, 2: logits), all on the device: nothing is read back here, except the exit test's
        mask once per iteration when adaptive (the reference path)."""
        model, backend, crit = self.model, self.backend, self.criterion
        if self.token_step is not None and self.carry is not None:  # a decode token (not the prompt)
            return self._token_step(ids, alive, cache)
        chunk = cache.begin(valid)
        self.last_end = chunk.end
        rope = model.rope(chunk)
        e = model.prelude(ids, cache, chunk, rope)
        if self.continuous and self.carry is not None:
            s = self.carry.expand_as(e).clone()
        else:
            s = model.initial_state(e, self.init_scale, self.generator)
        B = ids.shape[0]
        active = alive.clone()
        used = torch.zeros(B, dtype=torch.long, device=e.device)
        out = torch.zeros(B, self.cfg.padded_vocab_size, device=e.device)
        tracker = ExitTracker(crit, B, self.cfg.padded_vocab_size, e.device, backend.exit_ops)
        sync_free = backend.sync_free
        last_logits, completed = None, True
        for t in range(self.r_max):
            cache.mark_iteration(chunk, t, active)
            new = backend.core_step(s, e, cache, chunk, t, active, rope)
            if self.hooks:
                new = self.hooks.on_iteration(t, new, active)
            prev, s = s, torch.where(active[:, None, None], new, s)
            used += active.long()
            if crit.never_exits:
                continue
            last_logits = (
                model.head(s, cache, chunk, active, rope, last_only=True)[:, -1] if crit.needs_logits else None
            )
            exits = tracker.update(prev, s, last_logits, chunk.valid) & active
            if t + 1 < self.min_steps:
                continue
            if sync_free:  # device masks only; frozen rows' kernels skip their work
                if crit.needs_logits:
                    out = torch.where(exits[:, None], last_logits, out)
                active = active & ~exits
                continue
            if exits.any():  # reference path: one host read per iteration
                if last_logits is None:
                    last_logits = model.head(s, cache, chunk, exits, rope, last_only=True)[:, -1]
                out = torch.where(exits[:, None], last_logits, out)
                active = active & ~exits
                if not active.any():
                    completed = False
                    break
        if sync_free and not crit.needs_logits:
            # a frozen row's state is its exit state, so one head pass gives every row its exit logits
            # (and rewrites its coda K/V with the same values)
            out = model.head(s, cache, chunk, alive, rope, last_only=True)[:, -1]
        elif completed:  # sequences that ran every iteration: their logits at the final state
            if last_logits is None or not crit.needs_logits:
                last_logits = model.head(s, cache, chunk, active, rope, last_only=True)[:, -1]
            out = torch.where(active[:, None], last_logits, out)
        bad_state = (~torch.isfinite(s).all(-1) & chunk.valid).any(-1) & alive
        bad_logits = ~torch.isfinite(out).all(-1) & alive
        self.carry = s[:, -1:]
        return out, used, bad_state.long() + 2 * bad_logits.long()

    def _token_step(self, ids: Tensor, alive: Tensor, cache) -> tuple[Tensor, Tensor, Tensor]:
        """``_recurrent_unit`` for one decode token through the backend's TokenStep (a CUDA graph on GPU)."""
        step = self.token_step
        start = cache.reserve()
        self.last_end = start + 1
        if self.continuous:
            s0 = self.carry
        else:
            s0 = self.model.initial_state(step.s0[:, None], self.init_scale, self.generator)
        step.prepare(ids, alive, s0, start)
        out, used, bad, s = step()
        self.carry = s[:, None]
        return out, used, bad

    # ---------------------------------------------------------------- output
    def _decode(self, ids: list[int]) -> str | None:
        tok = self.model.tokenizer
        return None if tok is None else tok.decode(ids, skip_special_tokens=True)

    def _event(self, i: int, tok: list[int], used: list[int], alive: list[bool], tokens) -> StreamEvent:
        """The new token of each sequence; its text is the decoded growth, so multi-byte characters that
        span tokens come out whole (an incomplete one is held back until it completes)."""
        toks = [t if a else None for t, a in zip(tok, alive)]
        st = [u if a else None for u, a in zip(used, alive)]
        texts = []
        for b, t in enumerate(toks):
            if t is None or self.model.tokenizer is None:
                texts.append(None)
                continue
            full = self._decode(tokens[b]) or ""
            if full.endswith("\ufffd"):
                texts.append("")
                continue
            texts.append(full[len(self._shown[b]) :])
            self._shown[b] = full
        if self.batch.single:
            return StreamEvent(i, toks[0], st[0], texts[0])
        return StreamEvent(i, toks, st, texts)

    def _result(self, tokens, steps, reasons, kv_bytes: int, thoughts: int, logits) -> GenerationResult:
        texts = [self._decode(t) for t in tokens]
        if self.batch.single:
            tokens, steps, texts = tokens[0], steps[0], texts[0]
            logits = logits[0] if logits is not None else None
        return GenerationResult(
            tokens=tokens,
            steps=steps,
            text=texts,
            kv_bytes=kv_bytes,
            finish_reasons=reasons,
            num_thoughts=thoughts,
            backend=self.backend.name,
            logits=logits,
        )
