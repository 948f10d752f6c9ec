"""``latentrt eval MODEL DATA``: accuracy per difficulty on {question, steps, answer} records (``--chat``: each
question through the model's chat template, for chat-tuned models), or {question, answer} ones without steps
(the Hub's GSM8k: the answer a worked solution ending in '#### 72', scored against the part after its last '#').

The model answers '### X is a Y.' (the Coconut data format); accuracy is the published rule (Coconut's
run.py): the decoded prompt and output (special tokens skipped), after its last '#', commas removed and
stripped, equals the record's answer with commas removed and stripped. The prompt format comes from the
family's decoder (``EVAL_MODES``: for Coconut, the question and a newline, then ``coconut`` appends the
trained thoughts, ``cot`` lets the model write its steps, ``nocot`` answers directly). Reported per
difficulty: accuracy, generated tokens and, for families that iterate in latent space, mean iterations per
generated token after the first (the first's are the prompt pass's), or of the only one.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from .chat import ChatTemplate, chat_prompt_ids, chat_template_for, require_template, system_opening
from .engine import check_options_for, generate
from .errors import InputError, check_int
from .families import family_for
from .models.base import LatentModel
from .options import GenerateOptions
from .records import Record, as_records, read_records_file


def extract_answer(text: str) -> str:
    """The published answer of a decoded sequence: after its last '#', commas removed, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def eval_records(records, source: str = "records") -> list[Record]:
    """The records to score: ``{question, steps, answer}`` ones as they are (the published files), and
    ``{question, answer}`` ones without steps (the Hub's GSM8k, whose answer is the worked solution) with the
    answer's text after its last '#' as the gold, read by the rule that reads the model's output (difficulty 0
    unless given)."""
    if isinstance(records, (list, tuple)):
        records = [_gold_of_solution(r) if isinstance(r, dict) and "steps" not in r else r for r in records]
    return as_records(records, source)


def _gold_of_solution(record: dict) -> dict:
    if "question" not in record or "answer" not in record:
        return record  # (as_records names what is missing)
    answer = record["answer"]
    gold = extract_answer(answer) if isinstance(answer, str) else answer  # (a bad one: as_records names it)
    return {**record, "steps": [], "answer": gold}


def extract_chain(text: str) -> str:
    """The published chain of thought of a decoded sequence: its lines after the first (the question's), up to
    the first '#', stripped (Coconut's run.py, its "CoT match")."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def decoded(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The whole sequence as the published evaluation reads it: prompt and output, special tokens skipped."""
    return tokenizer.decode(list(prompt) + list(tokens), skip_special_tokens=True)


def answer_matches(text: str, answer: str) -> bool:
    """Coconut's accuracy rule on a decoded sequence: its text after the last '#' (commas removed, stripped)
    equals the answer (commas removed, stripped)."""
    return extract_answer(text) == answer.replace(",", "").strip()


def is_correct(tokenizer, prompt: list[int], tokens: list[int], answer: str) -> bool:
    """Coconut's accuracy rule on the whole decoded sequence (prompt and output, special tokens skipped):
    an output without '#' leaves the prompt's text as its answer, as published."""
    return answer_matches(decoded(tokenizer, prompt, tokens), answer)


def evaluate(
    model: LatentModel,
    records: list[Record] | list[dict],
    *,
    mode: str | None = None,
    thoughts: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    chat: ChatTemplate | None = None,
    system: str | None = None,
    source: str = "records",
    **gen_kwargs,
) -> dict:
    """Per-difficulty accuracy, mean generated tokens and mean latent iterations per token. Greedy unless
    ``temperature`` is given (as the published evaluations and lm-evaluation-harness score), whatever
    sampling defaults the checkpoint's generation_config.json has. With ``chat`` (a chat template) each
    question is a user message (after ``system``'s) through it, as a chat-tuned model is asked (the answer
    rule is the same: a GSM8k-style '#### 42' is read as '42'); ``mode`` then does not apply. ``mode``: the
    family's prompt format (default: the trained one); ``thoughts``: the count its thought formats (Coconut's
    coconut / pause) append (default: the trained one; the other formats have none). ``source`` names
    the data (a file's path) in errors and picks the default ``max_new_tokens`` as the family's published
    evaluation does (Coconut's run.py: 64 on GSM8k, 128 otherwise; recurrent depth: 16; --chat: 96). Where every
    record has steps (and no chat template), each row also has run.py's "CoT match", ``cot_match`` (``extract_chain``;
    it reads lines, so a tokenizer that drops newlines, as the built-in models' word tokenizer does, never matches)."""
    gen_kwargs.setdefault("temperature", 0.0)
    decoder = family_for(model).decoder  # (anything but a loaded model: its own error)
    records = eval_records(records, source)  # Record objects or their dicts, each checked
    if not records:
        raise InputError("records is empty: nothing to evaluate")
    check_int("batch_size", batch_size, 1)
    if max_new_tokens is not None:
        check_int("max_new_tokens", max_new_tokens, 1)
    if model.tokenizer is None:
        raise InputError("evaluation needs a model with a tokenizer.json")
    if "num_thoughts" in gen_kwargs and "num_thoughts" in decoder.OPTIONS:  # (generate() would append a 2nd group)
        raise InputError("evaluate() takes the thought count as thoughts= (the prompt format appends them)")
    if thoughts is not None:
        if "num_thoughts" not in decoder.OPTIONS:
            raise InputError(f"thoughts applies to models that think in latent tokens, not {decoder.TITLE} models")
        check_int("thoughts", thoughts, 0)
    mode = mode or decoder.eval_mode(model)
    if mode not in decoder.EVAL_MODES:
        raise InputError(f"unknown prompt format {mode!r} for this model; choose from {list(decoder.EVAL_MODES)}")
    if chat is not None:
        opening = system_opening(system)
        prompts = [
            chat_prompt_ids(chat, model.tokenizer, [*opening, {"role": "user", "content": r.question}]) for r in records
        ]
    else:
        prompts = [decoder.eval_prompt(model, r.question, mode, thoughts) for r in records]
        gen_kwargs = {**decoder.eval_options(mode), **gen_kwargs}  # (a caller's own value of these wins)
    max_new = max_new_tokens or (96 if chat is not None else decoder.eval_max_new_tokens(mode, source))
    defaults = getattr(model, "generation_defaults", None)
    options = GenerateOptions.build(None, defaults, max_new_tokens=max_new, **gen_kwargs)
    check_options_for(model, options)  # a bad option is named before the first batch (and its progress bar)
    # run.py's "CoT match" where every record has its steps (not through a chat template, whose lines it cannot read)
    chains = chat is None and all(r.steps for r in records)
    stats: dict[int, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "tokens": 0, "steps": 0.0, "chain": 0})
    for i in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress):
        batch = records[i : i + batch_size]
        out = generate(model, prompts[i : i + batch_size], max_new_tokens=max_new, **gen_kwargs)
        for rec, prompt, toks, steps in zip(batch, prompts[i : i + batch_size], out.tokens, out.steps):
            s, text = stats[rec.difficulty], decoded(model.tokenizer, prompt, toks)
            s["n"] += 1
            s["correct"] += int(answer_matches(text, rec.answer))
            s["chain"] += int(chains and extract_chain(text) == "\n".join(rec.steps))
            s["tokens"] += len(toks)
            # the tokens after the first (whose iterations are the prompt pass's), or the only one (a one-token
            # answer counted 0 iterations, and the column vanished when every answer had one token)
            iterated = steps[1:] or steps
            s["steps"] += sum(iterated) / max(len(iterated), 1)

    def row(group: list[dict]) -> dict:
        n = sum(s["n"] for s in group)
        mean = lambda key: sum(s[key] for s in group) / max(n, 1)  # noqa: E731
        out = {"n": n, "accuracy": mean("correct"), "generated_tokens": mean("tokens"), "mean_steps": mean("steps")}
        return {**out, "cot_match": mean("chain")} if chains else out

    return {**{d: row([stats[d]]) for d in sorted(stats)}, "all": row(list(stats.values()))}


def format_table(table: dict) -> str:
    """A markdown table; the iterations column only where the model iterated in latent space."""
    iterates = any(s["mean_steps"] for s in table.values())
    cols = "| difficulty | n | accuracy | generated tokens |" + (" mean iterations |" if iterates else "")
    rows = [cols, "|---" * (5 if iterates else 4) + "|"]
    for d, s in table.items():
        row = f"| {d} | {s['n']} | {100 * s['accuracy']:.1f}% | {s['generated_tokens']:.1f} |"
        if iterates:
            row += f" {s['mean_steps']:.2f} |"
        rows.append(row)
    return "\n".join(rows)


def run_eval(model: LatentModel, args: argparse.Namespace, gen_kwargs: dict) -> int:
    """The CLI's eval command on a loaded model (``gen_kwargs``: the generate() options given)."""
    records = eval_records(read_records_file(Path(args.data)), args.data)[: args.limit]
    decoder = family_for(model).decoder
    if "init_scale" in decoder.OPTIONS and "init_scale" not in gen_kwargs:
        gen_kwargs = dict(gen_kwargs, init_scale=0.0)  # a deterministic initial state for scoring
    if args.chat and args.modes:
        raise InputError("--modes are the model's own prompt formats; --chat asks through the chat template")
    template = require_template(chat_template_for(model, args.chat_template)) if args.chat else None
    max_new_tokens = gen_kwargs.pop("max_new_tokens", None)
    thoughts = gen_kwargs.pop("num_thoughts", None)  # (--thoughts: the formats' count, not generate()'s)
    modes = args.modes.split(",") if args.modes else [decoder.eval_mode(model)]
    for mode in modes:
        table = evaluate(
            model,
            records,
            mode=mode,
            thoughts=thoughts,
            batch_size=args.batch_size,
            max_new_tokens=max_new_tokens,
            chat=template,
            system=args.system,
            source=args.data,
            **gen_kwargs,
        )
        shown = "chat" if args.chat else mode
        if args.json:  # one line per mode, for scripts: the table's rows by difficulty ("all": every record)
            rows = {str(d): s for d, s in table.items()}
            print(json.dumps({"model": args.model, "data": args.data, "mode": shown, "table": rows}), flush=True)
            continue
        title = f"{args.model} on {args.data}" + (f" ({shown})" if args.chat or len(decoder.EVAL_MODES) > 1 else "")
        print(f"\n{title}\n{format_table(table)}")
    return 0
