"""``latentrt eval MODEL DATA``: accuracy per difficulty on {question, steps, answer} records.

Recurrent depth: the prompt is the question, the model answers '### X is a Y.'; with --adaptive the mean
recurrence iterations per generated token are reported per difficulty. Coconut: --mode coconut appends
the thoughts (count from the model's training.json, or --thoughts), cot lets the model write its steps,
nocot answers directly; accuracy and generated tokens are reported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from .engine import generate
from .errors import InputError
from .train.coconut import Curriculum, inference_prompt
from .train.data import Record, load_records


def extract_answer(text: str) -> str:
    """The text after the last '###' (the Coconut data format), stripped."""
    return text.split("###")[-1].strip() if "###" in text else text.strip()


def training_info(model) -> dict:
    src = getattr(model, "source", None)
    if src is None:
        return {}
    from .checkpoint import resolve

    p = resolve(src) / "training.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def evaluate(
    model,
    records: list[Record],
    *,
    mode: str | None = None,
    thoughts: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    **gen_kwargs,
) -> dict:
    """Per-difficulty accuracy, mean generated tokens and (recurrent) mean iterations per token."""
    if model.tokenizer is None:
        raise InputError("evaluation needs a model with a tokenizer.json")
    info = training_info(model)
    if model.family == "coconut":
        mode = mode or info.get("mode", "coconut")
        cur = Curriculum(mode, info.get("max_stage", 0), info.get("thoughts_per_step", 1))
        if thoughts is not None:
            cur = Curriculum(mode, thoughts, 1)
        prompts = [inference_prompt(model.tokenizer, r.question, cur) for r in records]
        max_new = max_new_tokens or (96 if mode == "cot" else 16)
    else:
        prompts = [model.tokenizer.encode(r.question).ids for r in records]
        max_new = max_new_tokens or 16
    stats: dict[int, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "tokens": 0, "steps": 0.0})
    for i in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress):
        batch = records[i : i + batch_size]
        out = generate(model, prompts[i : i + batch_size], max_new_tokens=max_new, **gen_kwargs)
        for rec, text, toks, steps in zip(batch, out.text, out.tokens, out.steps):
            s = stats[rec.difficulty]
            s["n"] += 1
            s["correct"] += int(extract_answer(text) == rec.answer.strip())
            s["tokens"] += len(toks)
            s["steps"] += sum(steps[1:]) / max(len(steps) - 1, 1) if model.family == "recurrent" else 0
    table = {}
    for d in sorted(stats):
        s = stats[d]
        table[d] = {
            "n": s["n"],
            "accuracy": s["correct"] / s["n"],
            "generated_tokens": s["tokens"] / s["n"],
            "mean_steps": s["steps"] / s["n"],
        }
    total = sum(s["n"] for s in stats.values())
    table["all"] = {
        "n": total,
        "accuracy": sum(s["correct"] for s in stats.values()) / max(total, 1),
        "generated_tokens": sum(s["tokens"] for s in stats.values()) / max(total, 1),
        "mean_steps": sum(s["steps"] for s in stats.values()) / max(total, 1),
    }
    return table


def format_table(table: dict, family: str) -> str:
    cols = "| difficulty | n | accuracy | generated tokens |" + (" mean iterations |" if family == "recurrent" else "")
    rows = [cols, "|---" * (5 if family == "recurrent" else 4) + "|"]
    for d, s in table.items():
        row = f"| {d} | {s['n']} | {100 * s['accuracy']:.1f}% | {s['generated_tokens']:.1f} |"
        if family == "recurrent":
            row += f" {s['mean_steps']:.2f} |"
        rows.append(row)
    return "\n".join(rows)


def run_eval(args) -> int:
    from .loader import load

    model = load(args.model, device=args.device, dtype=args.dtype, backend=args.backend, weights=args.weights)
    records = load_records(Path(args.data))[: args.limit]
    kw = {}
    if model.family == "recurrent":
        kw = dict(
            adaptive=args.adaptive,
            exit_criterion=args.criterion,
            exit_threshold=args.threshold,
            num_steps=args.steps,
            init_scale=0.0,
        )
    modes = [None] if model.family == "recurrent" else args.modes.split(",")
    for mode in modes:
        table = evaluate(model, records, mode=mode, batch_size=args.batch_size, **kw)
        title = f"{args.model} on {args.data}" + (f" ({mode})" if mode else "")
        print(f"\n{title}\n{format_table(table, model.family)}")
    return 0
