"""Data for the trainers: a ProsQA-style problem generator, the word tokenizer, and a JSON reader.

A problem is a random DAG of made-up concepts: an individual belongs to a concept, a chain of
"Every A is a B." facts leads from it to the target, a disjoint chain leads another root to the negative
target, and distractor facts branch off both chains into dead ends. The question asks "Is X a T or N?";
the reasoning steps are the facts along the path; difficulty = path length (number of steps).
The vocabulary (names and concept words) is that of ProsQA (github.com/facebookresearch/coconut, MIT),
so models trained here can be evaluated on the published validation file.
"""

from __future__ import annotations

import random

from ..errors import InputError
from ..records import Record, load_records, save_records
from ..tokenizer import word_tokenizer

__all__ = ["Record", "build_tokenizer", "generate_dataset", "generate_problem", "load_records", "save_records"]

NAMES = ("Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex Sally Sam Stella Tom Wren").split()
CONCEPTS = (
    "bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus hilpus impus jelpus "
    "jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus scrompus shumpus sterpus storpus "
    "terpus timpus tumpus vumpus worpus wumpus yerpus yimpus yumpus zhorpus zumpus"
).split()
FUNCTION_WORDS = ["Every", "is", "a", "Is", "or", ".", "?", "###"]


def build_tokenizer():
    """The built-in models' tokenizer: specials, latent markers, function words, names, concepts."""
    return word_tokenizer(FUNCTION_WORDS + NAMES + CONCEPTS, markers=True)


def generate_problem(rng: random.Random, difficulty: int, distractors: int | None = None) -> Record:
    """One ProsQA-style problem whose answer needs ``difficulty`` hops."""
    if difficulty < 1:
        raise InputError(f"difficulty must be >= 1, got {difficulty}")
    names = rng.sample(NAMES, 2)
    need = 2 * difficulty + 2 * (distractors if distractors is not None else difficulty + 1)
    concepts = rng.sample(CONCEPTS, min(len(CONCEPTS), need + 2))
    path, rest = concepts[:difficulty], concepts[difficulty:]
    neg_path, leaves = rest[:difficulty], rest[difficulty:]
    person, other = names
    facts = [f"{person} is a {path[0]}."] + [f"Every {a} is a {b}." for a, b in zip(path, path[1:])]
    steps = list(facts)
    facts += [f"{other} is a {neg_path[0]}."] + [f"Every {a} is a {b}." for a, b in zip(neg_path, neg_path[1:])]
    n_dis = distractors if distractors is not None else difficulty + 1
    sources = path + neg_path[:-1] + [person, other]
    for _ in range(n_dis):  # branches into dead ends: never connect the person to the negative chain
        if not leaves:
            break
        src = rng.choice(sources)
        leaf = leaves.pop()
        facts.append(f"{src} is a {leaf}." if src in names else f"Every {src} is a {leaf}.")
    rng.shuffle(facts)
    target, neg = path[-1], neg_path[-1]
    options = [target, neg] if rng.random() < 0.5 else [neg, target]
    question = " ".join(facts) + f" Is {person} a {options[0]} or {options[1]}?"
    return Record(question, steps, f"{person} is a {target}.", difficulty)


def generate_dataset(n: int, difficulties: tuple[int, ...] = (1, 2, 3, 4), seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    return [generate_problem(rng, difficulties[i % len(difficulties)]) for i in range(n)]
