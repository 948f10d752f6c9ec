"""Question-answer records: a JSON list of ``{question, steps, answer}`` (ProsQA / ProntoQA / GSM8k files), or
JSON Lines of them.

Read by ``latentrt eval`` and by the trainers; ``steps`` are the reasoning steps in language, ``difficulty``
their count unless the record says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, check_unicode, json_loads


@dataclass
class Record:
    question: str
    steps: list[str]
    answer: str
    difficulty: int


def load_records(path: str | Path) -> list[Record]:
    """A JSON list of {question, steps, answer} (ProsQA / ProntoQA / GSM8k files), or JSON Lines of them;
    clear errors per record."""
    return as_records(read_records_file(path), str(path))


def read_records_file(path: str | Path) -> list:
    """The records of a data file as parsed JSON: a JSON list, or JSON Lines (one object per line, blank lines
    skipped: a ``.jsonl`` file, or any file whose first line is a whole JSON value followed by more, as HF
    datasets' json loader reads either); a UTF-8 byte-order mark is allowed. An InputError names an
    unreadable file, bad JSON and its line, a file that is not a list or holds none (nothing to train on or
    score). A file holding one JSON object is one record (a one-line JSON Lines file, as HF datasets reads it)."""
    records = _parse_records_file(Path(path))
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise InputError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    if not records:
        raise InputError(f"{path} holds no records (a JSON list, or JSON Lines, of records)")
    return records


def _parse_records_file(path: Path):
    try:
        if path.is_dir():
            raise InputError(f"data file {str(path)!r} is a folder, not a JSON file of records")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"data file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read data file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from None
    if path.suffix == ".jsonl" or _first_line_is_a_value(text):
        return _json_lines(text, path)
    try:
        return json_loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None


def _first_line_is_a_value(text: str) -> bool:
    """Whether ``text`` is JSON Lines by its shape: its first non-blank line a whole JSON value, more after it
    (a JSON list written on one line and nothing else is a list)."""
    first, _, rest = text.lstrip().partition("\n")
    if not rest.strip():
        return False
    try:
        json_loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _json_lines(text: str, path: Path) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json_loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {number}: not valid JSON: {exc}") from None
    return records


def as_records(items, source: str = "records") -> list[Record]:
    """Records from a list of Record objects or ``{question, steps, answer[, difficulty]}`` dicts (as in the
    published ProsQA / ProntoQA / GSM8k files); a clear error naming the first bad one."""
    if not isinstance(items, (list, tuple)):
        raise InputError(
            f"{source} must be a list of records (Record objects or their dicts), got {type(items).__name__}"
        )
    return [as_record(r, i, source) for i, r in enumerate(items)]


def as_record(r, i: int, source: str = "records") -> Record:
    """Record ``i`` of ``source`` (a Record or a dict), or an InputError naming what is wrong with it."""
    if isinstance(r, Record):
        return r
    if not isinstance(r, dict):
        raise InputError(f"{source}: record {i} is not an object with question, steps and answer")
    for key, kind in (("question", str), ("answer", str), ("steps", list)):
        if key not in r:
            raise InputError(f"{source}: record {i} has no {key!r}")
        if not isinstance(r[key], kind):
            raise InputError(f"{source}: record {i}: {key!r} must be a {kind.__name__}")
    if not all(isinstance(s, str) for s in r["steps"]):
        raise InputError(f"{source}: record {i}: every step must be a string")
    for key, text in [("question", r["question"]), ("answer", r["answer"])] + [
        (f"steps[{k}]", step) for k, step in enumerate(r["steps"])
    ]:  # a JSON escape can leave a lone surrogate, which the tokenizer refuses with a TypeError
        check_unicode(f"{source}: record {i}: {key!r}", text)
    difficulty = r.get("difficulty", len(r["steps"]))
    if isinstance(difficulty, bool) or not isinstance(difficulty, int):
        raise InputError(f"{source}: record {i}: 'difficulty' must be an integer")
    return Record(r["question"], list(r["steps"]), r["answer"], difficulty)


def save_records(records: list[Record], path: str | Path) -> None:
    Path(path).write_text(json.dumps([r.__dict__ for r in records], indent=1))
