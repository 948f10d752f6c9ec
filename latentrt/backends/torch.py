"""The reference backend: the seams are the model's own PyTorch methods."""

from __future__ import annotations

from torch import Tensor


class TorchBackend:
    name = "torch"

    def __init__(self, model, reason: str = "") -> None:
        self.model = model
        self.reason = reason

    def core_step(self, s: Tensor, e: Tensor, cache, chunk, iteration: int, active: Tensor, rope) -> Tensor:
        """One recurrent-block iteration (adapter + core layers), K/V into the iteration's slot."""
        return self.model.core_step(s, e, cache, chunk, iteration, active, rope)

    sync_free = False  # the engine may read exit masks on the host between iterations
    exit_ops = None  # the criteria's reference formulas

    def token_step(self, cache, r_max: int, criterion, min_steps: int):
        """A graph-capturable decode token, or None: the engine then loops over ``core_step``."""
        return None

    def thought_step(self, cache, embeds: Tensor, latent: Tensor, mask: Tensor):
        """A graph-capturable Coconut prompt column, or None: run_prompt then loops in PyTorch."""
        return None

    def feedback(self, h_pre: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Coconut: (ln_f(h) + wpe[pos], layer 0's ln_1 of it) for the next thought."""
        return self.model.feedback(h_pre, positions)

    def __repr__(self) -> str:
        return f"TorchBackend({self.reason})"
