"""Callbacks at every recurrence iteration and every continuous thought.

A hook is any callable ``hook(event) -> Tensor | None``. It sees the latent state after an iteration
(or the fed-back input of a thought) and the mask of active sequences; returning a tensor of the same
shape replaces the state (for probing, noise injection, steering). The same API is used by
``generate()`` and by the trainers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .errors import InputError


@dataclass
class LatentEvent:
    kind: str  # "recurrence" (one core-block iteration) or "thought" (one Coconut continuous thought)
    step: int  # iteration index within the token, or thought index within the prompt
    state: Tensor  # recurrence: [B, n, d] latent state; thought: [B, 1, d] next residual input (ln_f(h) + wpe)
    active: Tensor  # [B] bool: sequences this step updates (other rows show the state they keep, or in a
    # thought's event the token input they run)
    token_index: int = 0  # which generated token (0 = the prompt / prefill)


Hook = Callable[[LatentEvent], "Tensor | None"]


class HookList:
    """Calls hooks in order, threading replaced states through; checks each replacement's shape."""

    def __init__(self, hooks: Sequence[Hook] | Hook | None) -> None:
        if hooks is None:
            hooks = []
        elif callable(hooks):
            hooks = [hooks]
        elif not isinstance(hooks, (list, tuple)):
            raise InputError(f"hooks must be a callable or a list of callables, got {type(hooks).__name__}")
        for h in hooks:
            if not callable(h):
                raise InputError(f"hooks must be callables taking a LatentEvent, got {type(h).__name__}")
        self.hooks = list(hooks)
        self.token_index = 0

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def _run(self, kind: str, step: int, state: Tensor, active: Tensor) -> Tensor:
        for h in self.hooks:  # a copy of the mask: a hook cannot change who the engine runs
            out = h(LatentEvent(kind, step, state, active.clone(), self.token_index))
            if out is not None:
                like = isinstance(out, Tensor) and out.shape == state.shape and out.device == state.device
                if not (like and out.is_floating_point()):  # an int tensor would truncate the state silently
                    got = (
                        f"a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}"
                        if isinstance(out, Tensor)
                        else type(out).__name__
                    )
                    raise InputError(
                        f"a {kind} hook returned {got}; expected a floating-point tensor of shape "
                        f"{tuple(state.shape)} on {state.device}, or None"
                    )
                state = out.to(state.dtype)
        return state

    def on_iteration(self, step: int, state: Tensor, active: Tensor) -> Tensor:
        return self._run("recurrence", step, state, active)

    def on_thought(self, step: int, state: Tensor, active: Tensor) -> Tensor:
        return self._run("thought", step, state, active)
