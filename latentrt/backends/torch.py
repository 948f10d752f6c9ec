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

    def feedback(self, h_last: Tensor) -> Tensor:
        """Coconut: the last hidden state (already after ln_f) becomes the next input embedding."""
        return self.model.feedback(h_last)

    def __repr__(self) -> str:
        return f"TorchBackend({self.reason})"
