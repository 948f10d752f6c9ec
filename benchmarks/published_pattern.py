"""The published implementations' decode patterns, re-created in our own code on our modules.

Used as the slow baseline in benchmarks and as an independent oracle in tests: the layers are the same
modules, but the KV cache is a dict {block index: {position: tensor}} re-stacked at every call (with the
published "latest entry of the same physical layer" and "compress" lookups), the recurrence is a Python
loop with a host sync per exit check, and batch size is 1. Coconut's pattern runs a full pass per
thought and recomputes the whole prefix for every answer token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.exits import ExitTracker, make_criterion


class DictKVCache:
    """Per-position entries keyed by block index; prelude i -> i, core (t, j) -> P + t*L + j, coda -> -(i+1)."""

    def __init__(self, n_prelude: int, n_core: int, core_slots: int | None) -> None:
        self.P, self.L, self.slots = n_prelude, n_core, core_slots  # slots None = full (latest lookup)
        self.k: dict[int, dict[int, Tensor]] = {}
        self.v: dict[int, dict[int, Tensor]] = {}
        self.seen = 0

    def update(self, k: Tensor, v: Tensor, idx: int, start: int) -> tuple[Tensor, Tensor]:
        if self.slots is not None and idx >= self.P:  # compress-s: ring of slots per physical layer
            idx = self.P + (idx - self.P) % (self.slots * self.L)
        kd, vd = self.k.setdefault(idx, {}), self.v.setdefault(idx, {})
        for i in range(k.shape[2]):
            kd[start + i], vd[start + i] = k[:, :, i], v[:, :, i]
        self.seen = max(self.seen, start + k.shape[2])
        if len(kd) == self.seen:
            order = sorted(kd)
            return torch.stack([kd[p] for p in order], 2), torch.stack([vd[p] for p in order], 2)
        keys, vals = [], []
        for p in range(self.seen):  # latest entry of the same physical core layer, up to this index
            if p in kd:
                src = idx
            else:
                same = [
                    s
                    for s in self.k
                    if self.P <= s <= idx and (s - self.P) % self.L == (idx - self.P) % self.L and p in self.k[s]
                ]
                src = max(same)
            keys.append(self.k[src][p])
            vals.append(self.v[src][p])
        return torch.stack(keys, 2), torch.stack(vals, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() * 2 for d in self.k.values() for t in d.values())


def _mask(n_new: int, start: int, device) -> Tensor:
    q = torch.arange(start, start + n_new, device=device)[:, None]
    k = torch.arange(start + n_new, device=device)[None, :]
    return (k <= q)[None, None]


@torch.no_grad()
def recurrent_generate(
    model,
    ids: Tensor,
    max_new_tokens: int,
    num_steps: int,
    *,
    adaptive: bool = False,
    criterion: str = "kl",
    threshold: float | None = None,
    kv: str = "full",
    continuous: bool = False,
) -> tuple[list[int], list[int], int]:
    """Batch-1 recurrent-depth decoding in the published pattern. Returns (tokens, steps, kv bytes)."""
    assert ids.shape[0] == 1, "the published pattern is batch-1"
    cfg = model.config
    P, L = cfg.n_layers_in_prelude, cfg.n_layers_in_recurrent_block
    slots = None if kv == "full" else (1 if kv == "shared" else int(kv.split("-")[1]))
    cache = DictKVCache(P, L, slots)
    crit = make_criterion(criterion if adaptive else "none", threshold)
    tokens, steps, carry = [], [], None
    x_ids, start = ids, 0
    V = cfg.padded_vocab_size
    for _ in range(max_new_tokens):
        n = x_ids.shape[1]
        pos = torch.arange(start, start + n, device=ids.device)[None]
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        mask = _mask(n, start, ids.device)
        t_ = model.transformer
        e = _layers(t_.prelude, t_.wte(x_ids) * cfg.embed_scale, cos, sin, mask, cache, start, lambda i: i)
        s = carry.expand_as(e).clone() if (continuous and carry is not None) else torch.zeros_like(e)
        tracker = ExitTracker(crit, 1, V, e.device)
        valid = torch.ones(1, n, dtype=torch.bool, device=e.device)
        head = _Head(model, cos, sin, mask, cache, start)
        logits, used = None, num_steps
        for t in range(num_steps):
            prev = s
            s = _layers(
                t_.core_block,
                t_.adapter(torch.cat([s, e], -1)),
                cos,
                sin,
                mask,
                cache,
                start,
                lambda j, t=t: P + t * L + j,
            )
            if crit.never_exits:
                continue
            logits = head(s) if crit.needs_logits else None
            if bool(tracker.update(prev, s, logits, valid).item()):  # host sync at every iteration
                used = t + 1
                break
        if logits is None:  # no exit test computed them for this state
            logits = head(s)
        carry = s[:, -1:]
        tok = int(logits.argmax(-1).item())
        tokens.append(tok)
        steps.append(used)
        start += n
        x_ids = torch.tensor([[tok]], device=ids.device)
    return tokens, steps, cache.nbytes()


def _layers(blocks, x, cos, sin, mask, cache: DictKVCache, start: int, index_of):
    """Run blocks whose K/V go to the dict cache under the block index ``index_of(i)``."""
    for i, blk in enumerate(blocks):
        idx = index_of(i)
        x = blk(x, cos, sin, mask, lambda k, v, idx=idx: cache.update(k, v, idx, start))
    return x


class _Head:
    """ln_f -> coda (K/V under negative indices, overwritten per call) -> ln_f -> last-position logits."""

    def __init__(self, model, cos, sin, mask, cache, start) -> None:
        self.model, self.args = model, (cos, sin, mask, cache, start)

    def __call__(self, state: Tensor) -> Tensor:
        t_ = self.model.transformer
        h = _layers(t_.coda, t_.ln_f(state), *self.args, lambda i: -(i + 1))
        return self.model.lm_head(t_.ln_f(h)).float()[:, -1]


@torch.no_grad()
def coconut_generate(model, ids: Tensor, max_new_tokens: int) -> list[int]:
    """Batch-1 Coconut decoding in the published pattern: a full pass over the whole prefix per thought
    and per answer token, no cache kept between passes."""
    assert ids.shape[0] == 1
    latent = model.config.latent_id
    embeds = model.embed(ids)
    cols = (ids[0] == latent).nonzero()[:, 0].tolist() if latent is not None else []
    for c in cols:
        h = model.pass_whole(embeds[:, :c])
        embeds = embeds.clone()
        embeds[:, c] = h[:, -1]
    out = []
    for _ in range(max_new_tokens):
        h = model.pass_whole(embeds)
        tok = int(model.lm_logits(h[:, -1]).argmax(-1).item())
        out.append(tok)
        embeds = torch.cat([embeds, model.embed(torch.tensor([[tok]], device=ids.device))], 1)
    return out
