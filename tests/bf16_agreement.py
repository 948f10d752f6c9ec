"""When a bf16 run may decode other tokens than the fp32 run: the rule the GPU tests judge a kernel by.

bf16 moves every logit by a few percent of the logits' scale (measured on an H200 after 8 iterations x 2 core
layers: 2-4% of the norm per path, torch and kernels alike). A token can therefore flip where the fp32 run's
top two logits are that close (an argmax near-tie: on 2026-12-04 the built-in model's KL-exit run had 67 over
61 by 0.097 with logits of rms 6.7, and both CUDA loops decoded 61 where fp32 and torch bf16 decoded 67), or
where bf16 noise moves an exit criterion across its threshold so the token comes from another iteration (the
step counts differ there). Anything else is a kernel defect. After the first split the contexts differ, so
only the first one per sequence is judged.
"""

from __future__ import annotations

import torch

TWO_BF16_PATHS = 6e-2  # two bf16 paths may differ by up to the sum of their 2-4% errors (of the logits' rms)


def _first_split(x: list[int], y: list[int]) -> int:
    return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))


def splits_not_explained(run, anchor) -> list[str]:
    """One message per sequence whose tokens in ``run`` (a bf16 Generation) leave the fp32 ``anchor``'s
    (made with ``return_logits=True``) other than at a bf16 near-tie; empty when every split is one."""
    problems = []
    for i, (tb, tf) in enumerate(zip(run.tokens, anchor.tokens)):
        j = _first_split(tb, tf)
        if tb == tf:
            continue
        if j == min(len(tb), len(tf)):
            problems.append(f"sequence {i}: {tb} and the fp32 run's {tf} have different lengths")
            continue
        logits = anchor.logits[i][j].float()
        gap = (logits[tf[j]] - logits[tb[j]]).item()
        tie = near_tie_tolerance(logits)
        other_exit = run.steps[i][j] != anchor.steps[i][j]
        if gap > tie and not other_exit:
            problems.append(
                f"sequence {i}: token {j} is {tb[j]} where fp32 decodes {tf[j]} by a logit gap of {gap:.3f} "
                f"(a bf16 near-tie is under {tie:.3f}) at the same exit step {run.steps[i][j]}: {tb} vs {tf}"
            )
    return problems


def near_tie_tolerance(logits: torch.Tensor) -> float:
    """The logit gap under which two bf16 paths may pick either token."""
    return TWO_BF16_PATHS * logits.float().pow(2).mean().sqrt().item()
