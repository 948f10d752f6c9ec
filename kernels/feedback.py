"""Hidden -> input feedback paths.

Coconut: the last hidden state goes through ln_f, gets wpe[pos] added and becomes the next pass's
residual input; layer 0's ln_1 of it is needed at once, so both come out of one kernel.
Recurrent depth: the adapter W [d, 2d] applied to [s, e]. Since e is fixed for a token, W[:, d:] e is
computed once per token; each iteration only computes W[:, :d] s + that term (half the adapter bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def coconut_reference(
    h: Tensor, ln_f_w: Tensor, ln_f_b: Tensor, wpe_row: Tensor, ln1_w: Tensor, ln1_b: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(x, ln1x): x = ln_f(h) + wpe[pos] (the next residual input), ln1x = ln_1(x)."""
    x = F.layer_norm(h, (h.shape[-1],), ln_f_w, ln_f_b, eps) + wpe_row
    return x, F.layer_norm(x, (x.shape[-1],), ln1_w, ln1_b, eps)


def adapter_reference(s: Tensor, e: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """The published adapter: Linear(2d -> d) on concat[s, e] (state first)."""
    return F.linear(torch.cat([s, e], -1), w, bias)


def adapter_input_term(e: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """W[:, d:] e (+ bias): the part of the adapter that is constant across a token's iterations."""
    d = e.shape[-1]
    return F.linear(e, w[:, d:], bias)


def adapter_split(s: Tensor, e_term: Tensor, w: Tensor) -> Tensor:
    """W[:, :d] s + e_term: equal to adapter_reference, reading half of W per iteration."""
    return torch.addmm(
        e_term.reshape(-1, e_term.shape[-1]), s.reshape(-1, s.shape[-1]), w[:, : s.shape[-1]].t()
    ).view_as(e_term)


reference = coconut_reference


def make_inputs(shape: str, device, dtype, seed: int = 0, rows: int = 32):
    from . import SHAPES

    d = SHAPES[shape][0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return r(rows, d), 1 + 0.1 * r(d), 0.1 * r(d), r(d), 1 + 0.1 * r(d), 0.1 * r(d), 1e-5


def bytes_moved(inputs) -> int:
    h = inputs[0]
    return (3 * h.numel() + 5 * h.shape[-1]) * h.element_size()
