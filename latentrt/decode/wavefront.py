"""Wavefront (diffusion-style) decoding for recurrent depth (the published ``generate_diffusion_style``;
arXiv 2510.14961).

A window of positions is iterated together; every step advances each of them by ``inner_recurrence``
core iterations, so a token's state keeps converging while the next positions already start:

1. the prompt runs at ``num_steps`` (fixed depth) and gives the first token, committed at once; the window
   is its position, from a fresh initial state;
2. a step: the window's current token guesses go through the prelude (their embeddings mixed with the
   previous step's, ``ema_embeds``: new x (1 - ema) + old x ema where a position was in the last window),
   the states are mixed with fresh noise (``state_noise_mixing`` / (1 + iterations so far) with
   ``dampened_state_mixer``), ``inner_recurrence`` core iterations run for the whole window, the head
   gives a new guess for every position after the last committed one, and ``headway`` new positions join
   the window (capped at ``max_wavefront``);
3. freezing: with ``latent-diff`` (default) a position converged when ||s - s_prev|| / ||s|| < ``exit_t``
   against the previous step's state; the last converged position and everything before it are
   committed (its token and the tokens before), the cache keeps their entries, the window restarts at the
   last committed token's position; other strategies: ``latent-acceleration-1`` / ``-2`` (the change of
   the change), ``token-stability`` (a guess unchanged for more than num_steps // inner_recurrence steps),
   ``fixed`` (``headway`` positions per step once num_steps // inner_recurrence steps have run);
4. repeat until ``max_new_tokens`` are committed (or ``max_diffusion_steps``).

Everything follows the published code, including how the previous step's states are aligned after a
freeze (by the old window start, as published) and the window's cache entries being recomputed every
step. The published default KV mode is ``latest-m4-compress-s4`` (one slot per core layer: ``shared``),
used unless ``kv_sharing`` is given. Differences: latentrt stops at the first stop token it commits (the
published loop checks stops only after ``num_steps`` steps) and commits at most ``max_new_tokens``;
with ``headway`` > 1 the extra guesses are random ids below 65510 (the published range: Huginn-0125's ids up
to its last special token; below the vocabulary's size in a smaller one) from the call's generator. The
random draws follow the published code (its new positions' states drawn in bfloat16, whatever the model's
dtype), so the tokens equal the published code's (tests/test_published.py) with ``init_scale=0`` and with
a ``seed`` (the published run seeded alike), guesses included.
``GenerationResult.decoding`` holds the steps, core passes, tokens per step and the freeze statistics (``steps``
counts every step run, the last one too; the published ``diffusion_steps`` leaves out a step its loop breaks in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import GrowingKVCache
from ..errors import InputError, check_bool, check_float, check_int
from .samplers import Proposal, Sampler, SamplerOptions

# the published guesses for headway > 1: torch.randint(0, 65510), Huginn-0125's ids up to its last special token
PUBLISHED_GUESS_IDS = 65510
FREEZE = ("latent-diff", "latent-acceleration-1", "latent-acceleration-2", "token-stability", "fixed")


@dataclass(frozen=True)
class WavefrontOptions(SamplerOptions):
    """The published defaults (``generate_diffusion_style``)."""

    PUBLISHED_NAMES = dict(SamplerOptions.PUBLISHED_NAMES, continuous_compute="decoding_options 'continuous'")
    NOT_IMPLEMENTED = {
        "full_prefill": (
            True,
            "without the prompt's own pass the published sampler iterates the prompt in its window and re-guesses "
            "the prompt's own tokens (its output need not begin with the prompt: not a continuation)",
        ),
        "return_analysis_tablets": (False, "GenerationResult.decoding holds the steps and freeze statistics"),
        "return_full_state_tablet": (False, "GenerationResult.decoding holds the steps and freeze statistics"),
    }

    inner_recurrence: int = 4  # core iterations per step for every window position
    ema_embeds: float = 0.1  # weight of the previous step's embedding of a position
    state_noise_mixing: float = 0.5  # fresh noise mixed into the states before each step
    dampened_state_mixer: bool = True  # the noise divided by 1 + the position's iterations so far
    sqrt_mixer: bool = False  # mix with square roots of the weights
    freeze_strategy: str = "latent-diff"
    exit_t: float = 0.03  # latent-diff / acceleration threshold
    headway: int = 1  # new positions per step
    max_wavefront: int = 128  # window cap (0: none)
    max_diffusion_steps: int = 4096  # a bound for settings that never freeze
    continuous: bool = False  # new positions start from the window's last states (continuous_compute)

    def check(self) -> None:
        check_int("inner_recurrence", self.inner_recurrence, 1)
        check_float("ema_embeds", self.ema_embeds, 0.0, 1.0)
        check_float("state_noise_mixing", self.state_noise_mixing, 0.0, 1.0)
        check_bool("dampened_state_mixer", self.dampened_state_mixer)
        check_bool("sqrt_mixer", self.sqrt_mixer)
        check_bool("continuous", self.continuous)
        if self.freeze_strategy not in FREEZE:
            raise InputError(f"freeze_strategy must be one of {list(FREEZE)}, got {self.freeze_strategy!r}")
        check_float("exit_t", self.exit_t, 0.0)
        check_int("headway", self.headway, 1)
        check_int("max_wavefront", self.max_wavefront, 0)
        if 0 < self.max_wavefront <= self.headway:
            raise InputError(f"max_wavefront must exceed headway ({self.headway}) or be 0, got {self.max_wavefront}")
        check_int("max_diffusion_steps", self.max_diffusion_steps, 1)


class Wavefront(Sampler):
    NAME = "wavefront"
    Options = WavefrontOptions
    PUBLISHED_KV = "shared"  # the published latest-m4-compress-s4: one slot per core layer (for 4 core layers)

    REFUSES = {
        "adaptive": "positions freeze by its own rule (freeze_strategy, exit_t)",
        "continuous": "use decoding_options={'continuous': True} (new positions from the window's states)",
        "adaptive_prefill": "its prompt runs at num_steps in one pass, as published",
    }

    @classmethod
    def check(cls, o) -> None:
        super().check(o)
        if o.hooks:
            raise InputError("decoding='wavefront' runs no hooks (its iterations are a window's, not a token's)")

    def kv_sharing(self, o):
        return o.kv_sharing if o.is_set("kv_sharing") else self.PUBLISHED_KV

    @property
    def kv_depth(self) -> int:
        """The prompt's num_steps iterations and a step's inner_recurrence (iterations restart at 0 every
        step): a ``full`` cache keeps every prompt iteration, which a window query at iteration t reads at
        its own t (the published lookup), not wrapped onto the window's depth."""
        return max(self.decoder.spec.r_max, self.options.inner_recurrence)

    @property
    def extra_positions(self) -> int:
        o = self.options
        return (o.max_wavefront if o.max_wavefront else 1 << 30) + o.headway

    def tokens(self, batch, draw: Callable[[Tensor], Tensor]) -> Iterator[Proposal]:
        dec, o = self.decoder, self.options
        model, cache, backend = dec.model, dec.cache, dec.backend
        dev, block = model.device, model.config.block_size
        num_steps, inner, h = dec.spec.r_max, o.inner_recurrence, o.headway
        one = torch.ones(1, dtype=torch.bool, device=dev)
        st = self.stats = dict(steps=0, core_passes=1, positions_forward=0, cache_clears=0, standing_waves=0)

        # 1. the prompt at num_steps; its next token is committed
        prompt = batch.ids[0].tolist()
        S = len(prompt)
        out = dec.unit(batch.ids, batch.mask, one, dec.fixed(num_steps), batch.lengths())
        st["positions_forward"] += S
        first = int(draw(out.logits)[0])
        yield Proposal(first, num_steps, out.logits[0], int(out.nonfinite[0]))
        frozen = seq = prompt + [first]
        counter = torch.zeros(max(block, S + 1), dtype=torch.long, device=dev)  # iterations per position
        stable = torch.zeros_like(counter)  # steps a position's guess stayed the same
        counter[: len(frozen)] += num_steps
        d = model.config.n_embd
        guess_ids = min(PUBLISHED_GUESS_IDS, model.config.vocab_size)  # headway > 1: the range of the guesses
        states = self._init(torch.zeros(1, 1, d, dtype=model.dtype, device=dev))
        if o.ema_embeds > 0:  # the whole sequence's prelude, without the cache (as published)
            tmp = GrowingKVCache(1, model.config.n_layers_in_prelude, dev)
            chunk = tmp.begin(torch.ones(1, len(seq), dtype=torch.bool, device=dev))
            old_embeds = model.prelude(torch.tensor([seq], device=dev), tmp, chunk, model.rope(chunk))
        latent = "latent" in o.freeze_strategy
        accel = "latent-acceleration" in o.freeze_strategy
        previous = states.clone()
        prev_delta = prev_previous = torch.zeros_like(states)
        old_old = old_index = k = 0
        step, done = 0, len(frozen)

        while len(frozen) - S < dec.options.max_new_tokens and len(seq) <= block:
            index = cache.length
            W = states.shape[1]
            if index + W > cache.max_len:
                return
            # 2. prelude of the window's guesses, embeddings mixed with the last step's
            chunk = cache.begin(torch.ones(1, W, dtype=torch.bool, device=dev))
            rope = model.rope(chunk)
            if len(seq) - index < W:  # more states than guesses to embed: the published indexing fails too
                raise self.misaligned(f"the window holds {W} states for {len(seq) - index} tokens")
            ids = torch.tensor([seq[index : index + W]], device=dev)
            e = model.prelude(ids, cache, chunk, rope)
            if o.ema_embeds > 0:
                old = old_embeds[:, index - old_index :]
                mixed = e.clone() * (1 - o.ema_embeds)
                mixed[:, : old.shape[1], :] += old * o.ema_embeds
                e = old_embeds = mixed.clone()
            if o.state_noise_mixing > 0:
                noise_states = self._init(states)
                if o.dampened_state_mixer:
                    noise = (o.state_noise_mixing / (1 + counter[index : index + W]).float())[None, :, None].to(
                        states.dtype
                    )
                else:
                    noise = torch.as_tensor(o.state_noise_mixing, device=dev, dtype=states.dtype)
                if o.sqrt_mixer:
                    states = states * torch.relu(1 - noise).sqrt() + noise.sqrt() * noise_states
                else:
                    states = states * (1 - noise) + noise * noise_states
            active = one
            for t in range(inner):
                cache.mark_iteration(chunk, t, active)
                states = backend.core_iteration(states, e, cache, chunk, t, active, rope)
                counter[index : index + W] += 1
            st["core_passes"] += inner
            st["positions_forward"] += inner * W
            logits = model.head(states, cache, chunk, active, rope)[0]  # [W, V]
            lo = max(len(frozen) - 1 - index, 0)
            new = draw(logits[lo:]).tolist()
            edits = torch.tensor(frozen + new[:-1], device=dev)
            if len(seq) != len(edits):  # the published comparison fails here too (its window arithmetic)
                raise self.misaligned(f"{len(seq)} positions against {len(edits)} new guesses")
            stable[: len(seq)] += (torch.tensor(seq, device=dev) == edits).long()
            extra = [] if h == 1 else self._guesses(guess_ids, h - 1)
            seq = frozen + new + extra
            if o.continuous and states.shape[1] >= h:
                fresh = states[:, -h:].clone()
            else:
                fresh = self._init(torch.zeros(1, h, d, dtype=torch.bfloat16, device=dev)).to(states.dtype)
            states = torch.cat([states, fresh], dim=1)
            h_step = h
            if o.max_wavefront > 0 and states.shape[1] > o.max_wavefront:
                h_step = o.max_wavefront - (states.shape[1] - h)
                states = states[:, : o.max_wavefront]
                seq = seq[: index + o.max_wavefront]
                st["standing_waves"] += 1

            # 3. freezing
            before = len(frozen)
            if latent:
                prev = previous[:, index - old_index :]
                match = states[:, : prev.shape[1], :]
                if o.freeze_strategy == "latent-diff":
                    criterion = (match - prev).norm(dim=-1) / match.norm(dim=-1)
                elif o.freeze_strategy == "latent-acceleration-1":
                    delta = match - prev
                    m = min(delta.shape[1], prev_delta.shape[1])
                    criterion = (delta[:, :m] - prev_delta[:, :m]).norm(dim=-1) / match[:, :m].norm(dim=-1)
                    prev_delta = delta.clone()
                else:  # latent-acceleration-2: the three steps' common positions
                    lo2 = max(index, old_index, old_old)
                    hi2 = min(index + states.shape[1], old_index + previous.shape[1], old_old + prev_previous.shape[1])
                    cur = states[:, lo2 - index : hi2 - index]
                    last = previous[:, lo2 - old_index : hi2 - old_index]
                    earliest = prev_previous[:, lo2 - old_old : hi2 - old_old]
                    try:  # the published arithmetic broadcasts: a one-position slice against empty ones: none
                        torch.broadcast_shapes(cur.shape, last.shape, earliest.shape)
                    except RuntimeError:  # (where torch cannot broadcast, the published step fails)
                        widths = f"{cur.shape[1]}, {last.shape[1]} and {earliest.shape[1]} positions"
                        raise self.misaligned(f"the last three steps' states cover {widths}") from None
                    acc = (cur - last) - (last - earliest)
                    criterion = acc.norm(dim=-1) / (cur.norm(dim=-1) + 1e-6)
                exits = (criterion < o.exit_t)[0].nonzero()
                if len(exits):
                    k = index + int(exits[-1, 0]) + 1
                    frozen, states = self._freeze(cache, seq, states, index, k, h_step)
                else:
                    self._clear(cache, states.shape[1] - h_step)
            elif o.freeze_strategy == "token-stability":
                ready = (stable > num_steps // inner).nonzero()
                if len(ready):
                    k = int(ready[-1, 0]) + 1
                    frozen, states = self._freeze(cache, seq, states, index, k, h_step)
                else:
                    self._clear(cache, states.shape[1] - h_step)
                    k = 0
            else:  # fixed
                if step > num_steps // inner:
                    self._clear(cache, states.shape[1] - h - h_step)
                    states = states[:, h_step:, :]
                    frozen = frozen + new[:h_step]
                else:
                    self._clear(cache, states.shape[1] - h_step)
            st["steps"] = step + 1  # (before the tokens: the caller stops reading at max_new_tokens)
            st["tokens_per_step"] = min(len(frozen) - S, dec.options.max_new_tokens) / (2 + step)  # + the prompt's
            for p in range(max(before, done), len(frozen)):  # position p's token: position p - 1's state
                yield Proposal(frozen[p], int(counter[p - 1]), logits[p - 1 - index], 0)
            done = max(done, len(frozen))  # (token-stability can shorten the published frozen prefix)
            if step > o.max_diffusion_steps:
                return
            if accel:
                prev_previous, old_old = previous.clone(), old_index
            if latent:
                previous = states.clone()
            old_index = index
            step += 1

    def misaligned(self, what: str) -> InputError:
        """The window no longer lines up with the step's guesses or states: the published sampler fails on the
        same options (a RuntimeError or IndexError in its slicing), so there is no published result to give."""
        o = self.options
        return InputError(
            f"decoding='wavefront' cannot go on with freeze_strategy={o.freeze_strategy!r}, headway={o.headway}, "
            f"max_wavefront={o.max_wavefront}, inner_recurrence={o.inner_recurrence}: {what} (the published sampler "
            "fails on these options as well)"
        )

    def _freeze(self, cache, seq: list[int], states: Tensor, index: int, k: int, h_step: int):
        """Commit the tokens before position k; the cache keeps entries [0, k - 1); the window restarts at
        position k - 1 (the published clear count and slice)."""
        self._clear(cache, len(seq) - h_step - k + 1)
        return seq[:k], states[:, k - index - 1 :, :]

    def _clear(self, cache, n: int) -> None:
        """The published ``clear_last_k_entries(n)``."""
        cache.truncate(cache.length - n)
        self.stats["cache_clears"] += n

    def _init(self, like: Tensor) -> Tensor:
        """A fresh state like ``like`` (zeros at init_scale 0), from the call's generator with a seed."""
        dec = self.decoder
        return dec.model.initial_state(like, dec.init_scale, self._gen())

    def _guesses(self, high: int, n: int) -> list[int]:
        """``n`` random ids below ``high`` for the positions past the window (the sequence's generator with a seed,
        torch's global CPU generator without, as published), whatever torch's default device."""
        gen = self._gen()
        return torch.randint(0, high, (1, n), generator=gen, device=gen.device if gen else "cpu")[0].tolist()

    def _gen(self):
        return None if self.decoder.rng is None else self.decoder.rng[0]
