"""`synthetic-boolq`: a generated, deterministic, learnable yes/no task in BoolQ's schema.

Each passage states how many items two coloured boxes hold; the question asks whether the first holds
more than the second. A small model trained from scratch learns it in a few hundred
steps, so the demo and the tests can show accuracy rising from chance.

Train and validation are disjoint by construction: an item's split is decided by a hash of its
text, so no validation passage/question pair can ever appear in the training split, whatever
sizes are drawn.
"""

from __future__ import annotations

import hashlib
import random

COLOURS = ("red", "blue", "green", "yellow", "white", "black")
ITEMS = ("apples", "marbles", "coins", "books")
MAX_COUNT = 20
SPLITS = ("train", "validation")


def _split_of(passage: str, question: str) -> str:
    digest = hashlib.sha256(f"{passage}|{question}".encode()).digest()
    return "validation" if digest[0] % 8 == 0 else "train"


def _draw(rng: random.Random) -> dict[str, object]:
    first, second = rng.sample(COLOURS, 2)
    item = rng.choice(ITEMS)
    n_first, n_second = rng.sample(range(1, MAX_COUNT + 1), 2)
    passage = f"The {first} box holds {n_first} {item}. The {second} box holds {n_second} {item}."
    # The question asks about the boxes in the order the passage states them, always "more":
    # comparing two numbers is learnable from scratch in a hundred steps; looking the colours up,
    # or flipping the answer for "fewer", kept a 1M-parameter model at chance for 300 steps.
    question = f"does the {first} box hold more {item} than the {second} box"
    answer = n_first > n_second
    return {"question": question, "passage": passage, "answer": answer}


def generate_synthetic_boolq(split: str, n: int, seed: int = 0) -> list[dict[str, object]]:
    """`n` rows of the given split with BoolQ's fields: question, passage, answer (bool), idx."""
    if split not in SPLITS:
        raise ValueError(f"synthetic-boolq has splits {SPLITS}, not {split!r}")
    rng = random.Random(f"synthetic-boolq-{seed}-{split}")
    rows: list[dict[str, object]] = []
    while len(rows) < n:
        row = _draw(rng)
        if _split_of(str(row["passage"]), str(row["question"])) == split:
            rows.append({**row, "idx": len(rows)})
    return rows
