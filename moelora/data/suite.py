"""The bundled multi-task suite: procedurally generated English classification tasks, offline.

Every task is binary and announces itself with a prefix word, so one model with one 2-way head
can learn them all and a router can tell them apart. The signals differ on purpose — what a
frozen sentence encoder captures (lexical topic) and what it does not (numbers, order, negation,
counting, equality) — so the frozen backbone with a trained head stays weak while LoRA
adaptation solves the suite. Deterministic from a seed; each example carries its task id.

    task        signal      example                                   label
    topic       lexical     "topic: we saw a heron near the shed"     1 = animal, 0 = tool
    compare     numeric     "compare: 47 or 12"                       1 = first is larger
    order       order       "order: fire and ice"                     1 = the hot word comes first
    negation    negation    "review: the soup was not bad"            1 = positive meaning
    majority    counting    "majority: red blue red red blue"         1 = more red than blue (by one)
    same        equality    "same: river / river"                     1 = both words equal
"""

from __future__ import annotations

import random
from collections.abc import Callable

TASKS = ("topic", "compare", "order", "negation", "majority", "same")

_ANIMALS = ["heron", "otter", "badger", "falcon", "beaver", "lizard", "salmon", "rabbit", "turtle", "weasel"]
_TOOLS = ["hammer", "wrench", "chisel", "shovel", "ladder", "pliers", "drill", "saw", "rake", "anvil"]
_PLACES = ["near the shed", "by the river", "in the yard", "on the hill", "behind the barn", "at the market"]
_HOT = ["fire", "sun", "stove", "oven", "flame", "lava", "ember", "torch"]
_COLD = ["ice", "snow", "frost", "hail", "sleet", "glacier", "winter", "fridge"]
_GOOD = ["good", "great", "nice", "fine", "pleasant", "tasty"]
_BAD = ["bad", "awful", "poor", "bland", "dull", "nasty"]
_THINGS = ["the soup", "the film", "the trip", "the show", "the book", "the room"]
_WORDS = ["river", "stone", "cloud", "maple", "grove", "harbor", "meadow", "copper", "velvet", "pepper",
          "lantern", "marble", "cotton", "garden", "silver", "thunder"]


def _topic(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    word = rng.choice(_ANIMALS if label else _TOOLS)
    return f"topic: we saw a {word} {rng.choice(_PLACES)}", label


def _compare(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(range(10, 100), 2)
    return f"compare: {a} or {b}", int(a > b)


def _order(rng: random.Random) -> tuple[str, int]:
    # Both labels use the same two words, so a bag-of-words summary cannot tell them apart.
    hot, cold = rng.choice(_HOT), rng.choice(_COLD)
    label = rng.randint(0, 1)
    first, second = (hot, cold) if label else (cold, hot)
    return f"order: {first} and {second}", label


def _negation(rng: random.Random) -> tuple[str, int]:
    positive = rng.randint(0, 1)
    negated = rng.randint(0, 1)
    word = rng.choice(_GOOD if positive else _BAD)
    verb = "was not" if negated else "was"
    return f"review: {rng.choice(_THINGS)} {verb} {word}", int(positive != negated)


def _majority(rng: random.Random) -> tuple[str, int]:
    # Counts differ by one only (3 vs 4, 2 vs 3), the hardest case for a pooled summary.
    n = rng.choice([5, 7])
    reds = n // 2 + rng.randint(0, 1)
    words = ["red"] * reds + ["blue"] * (n - reds)
    rng.shuffle(words)
    return "majority: " + " ".join(words), int(reds * 2 > n)


def _same(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    left = rng.choice(_WORDS)
    right = left if label else rng.choice([w for w in _WORDS if w != left])
    return f"same: {left} / {right}", label


GENERATORS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "topic": _topic, "compare": _compare, "order": _order,
    "negation": _negation, "majority": _majority, "same": _same,
}


def generate(n_per_task: int, *, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> dict[str, list]:
    """``n_per_task`` examples of each task, interleaved, deterministic from ``seed``.

    Returns:
        Columns ``text`` (str), ``label`` (0/1), ``task_id`` (index into ``tasks``), ``task`` (name).
    """
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown suite task(s) {unknown}; available: {list(GENERATORS)}")
    rng = random.Random(seed)
    rows = []
    for task_id, task in enumerate(tasks):
        for _ in range(n_per_task):
            text, label = GENERATORS[task](rng)
            rows.append((text, label, task_id, task))
    rng.shuffle(rows)
    return {"text": [r[0] for r in rows], "label": [r[1] for r in rows],
            "task_id": [r[2] for r in rows], "task": [r[3] for r in rows]}


def suite_dataset(n_per_task: int, *, seed: int = 0, tasks: tuple[str, ...] = TASKS):
    """The suite as a ``datasets.Dataset`` (columns as in :func:`generate`)."""
    import datasets

    return datasets.Dataset.from_dict(generate(n_per_task, seed=seed, tasks=tasks))
