"""Self-speculative decoding for recurrent depth (the published ``generate_speculative``).

The model drafts with fewer iterations and verifies with its full depth, many positions in one pass:

1. the prompt runs at ``num_steps`` (fixed depth) and gives the first token;
2. draft ``lookahead`` tokens one by one, each a unit of ``draft_steps`` iterations;
3. roll the cache back to before the drafts; verify: one unit of ``lookahead`` positions (the last
   committed token and the first lookahead - 1 drafts) at ``num_steps``, whose logits at position j judge
   draft j + 1;
4. accept the longest prefix of drafts the verifier agrees with: its argmax equals the draft
   (``verification_threshold`` >= 1), or p(draft) >= threshold x p_max; at the first disagreement the
   verifier's own token (drawn from its logits) replaces the draft and the round ends; the cache keeps the
   verified entries of what was accepted (all ``lookahead`` when every draft is accepted; no bonus token);
5. repeat from 2 with the last committed token.

With greedy decoding at fixed depth and ``full`` KV every verified position computes what sequential
decoding at ``num_steps`` computes, so the tokens equal ``generate()``'s (up to rounding: the verify pass
is a matrix product over ``lookahead`` positions). As published: fixed depths only (no adaptive exit), the
first verify position's K/V are recomputed at full depth, acceptance compares the verifier's argmax with
the draft. Unlike the published loop, which can run past ``max_new_tokens`` by up to ``lookahead`` - 1
tokens, latentrt commits at most ``max_new_tokens``. ``GenerationResult.decoding`` holds the tokens
committed per round (``accepted``), the passes run (``draft_passes``, ``verify_passes``), the share of drafts
the verifier accepted (``acceptance``) and the tokens per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import check_float, check_int
from .samplers import Proposal, Sampler, SamplerOptions


@dataclass(frozen=True)
class SpeculativeOptions(SamplerOptions):
    """The published defaults (``generate_speculative``)."""

    PUBLISHED_NAMES = dict(SamplerOptions.PUBLISHED_NAMES, lookahead_for_draft="decoding_options 'lookahead'")

    lookahead: int = 8  # lookahead_for_draft: drafts per round
    draft_steps: int = 32  # iterations per drafted token
    verification_threshold: float = 1.0  # >= 1: argmax match; else p(draft) >= threshold x p_max

    def check(self) -> None:
        check_int("lookahead", self.lookahead, 1)
        check_int("draft_steps", self.draft_steps, 1)
        check_float("verification_threshold", self.verification_threshold, 0.0)


class Speculative(Sampler):
    NAME = "speculative"
    Options = SpeculativeOptions

    REFUSES = {
        "adaptive": "it runs fixed depths (num_steps to verify, draft_steps to draft), as published",
        "continuous": "the published verify pass cannot start many positions from one carried state",
        "adaptive_prefill": "its prompt runs at num_steps in one pass, as published",
    }

    @property
    def kv_depth(self) -> int:
        return max(self.decoder.spec.r_max, self.options.draft_steps)

    @property
    def extra_positions(self) -> int:
        return self.options.lookahead

    def tokens(self, batch, draw: Callable[[Tensor], Tensor]) -> Iterator[Proposal]:
        dec, o = self.decoder, self.options
        cache, dev = dec.cache, dec.model.device
        depth = dec.spec.r_max
        verify, draft = dec.fixed(depth), dec.fixed(o.draft_steps)
        one = torch.ones(1, dtype=torch.bool, device=dev)
        accepted: list[int] = []
        self.stats = {"accepted": accepted, "draft_passes": 0, "verify_passes": 1, "drafts_accepted": 0}

        out = dec.unit(batch.ids, batch.mask, one, verify, batch.lengths())
        last = draw(out.logits)
        token, flags = torch.stack([last[0], out.nonfinite[0]]).tolist()
        yield Proposal(token, depth, out.logits[0], flags)
        while True:
            start = cache.length  # the committed tokens but the last are in the cache
            n = min(o.lookahead, cache.max_len - start)
            if n < 1:
                return
            drafts, x = [], last
            for _ in range(n):
                d = dec.unit(x[:, None], one[:, None], one, draft, [1])
                x = draw(d.logits)
                drafts.append(x)
            self.stats["draft_passes"] += n
            cache.truncate(start)
            drafted = torch.cat(drafts)  # [n]
            ids = torch.cat([last, drafted[:-1]])[None]  # [1, n]: position j's logits judge draft j + 1
            v = dec.unit(ids, torch.ones_like(ids, dtype=torch.bool), one, verify, [n], all_logits=True)
            self.stats["verify_passes"] += 1
            logits = v.logits[0]  # [n, V]
            if o.verification_threshold >= 1:
                agree = logits.argmax(-1) == drafted
            else:
                probs = torch.softmax(logits, -1)
                agree = probs.gather(-1, drafted[:, None])[:, 0] >= o.verification_threshold * probs.max(-1).values
            agree_l, drafted_l, flags = agree.tolist(), drafted.tolist(), int(v.nonfinite[0])
            a = agree_l.index(False) if False in agree_l else n
            committed = drafted_l[:a]
            if a < n:  # the verifier's token replaces the first rejected draft; keep the verified entries
                last = draw(logits[a : a + 1])
                committed.append(int(last[0]))
                cache.truncate(start + a + 1)
            else:
                last = drafted[-1:]
            accepted.append(len(committed))
            self.stats["drafts_accepted"] += a
            self.stats["acceptance"] = self.stats["drafts_accepted"] / self.stats["draft_passes"]
            self.stats["tokens_per_pass"] = (1 + sum(accepted)) / (
                self.stats["verify_passes"] + self.stats["draft_passes"]
            )
            for j, token in enumerate(committed):
                yield Proposal(token, depth, logits[j], flags)
