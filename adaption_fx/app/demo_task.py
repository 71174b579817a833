"""The demo's instruction task: pull a person's name and city out of a sentence, in a fixed,
made-up answer format.

Each example asks "Extract the name and the city." about a sentence such as "Last spring
Amara moved to Lisbon to work as a nurse." and expects exactly ``NAME: Amara | CITY:
Lisbon``. The base model has never seen that format, so it answers in prose or in some
other layout; an adapter has to learn the format and to copy the right two words out of the
sentence. The held-out split uses names, cities and sentence shapes that never occur in
training, so a high held-out score means the adapter learnt the rule, not the examples.

The data is generated from a fixed seed (``python -m adaption_fx.app.demo_task --out DIR``);
nothing is copied from an existing dataset. The metric is exact match of the answer line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adaption_fx.checkpoint import write_text_atomic

INSTRUCTION = "Extract the name and the city."
TASK_NAME = "name-city-extraction"

# Disjoint pools: every held-out name, city and sentence shape is unseen in training.
_TRAIN_NAMES = (
    "Amara Bruno Chen Dario Elena Farid Greta Hiro Ines Jonas Kofi Lena Mateo Nadia Omar "
    "Priya Quentin Rosa Sven Tala Umar Vera Wen Ximena Yusuf Zoe Anton Bianca Carlos Dagny "
    "Emil Fatima Gustav Hana Ivan Jade Karim Lucia Malik Nora"
).split()
_HELD_OUT_NAMES = (
    "Aiko Boris Clara Dmitri Esther Felix Gloria Hugo Irene Jamal Kira Leon Mira Nils Olga "
    "Pablo Rania Stefan Tessa Viktor"
).split()
_TRAIN_CITIES = (
    "Lisbon Oslo Nairobi Lima Hanoi Dublin Quito Seoul Vienna Accra Denver Porto Krakow "
    "Manila Tunis Zurich Bergen Cusco Dakar Leeds Malmo Perth Riga Sofia Turin Utrecht "
    "Valencia Warsaw Austin Bogota"
).split()
_HELD_OUT_CITIES = (
    "Prague Cairo Helsinki Osaka Madrid Boston Geneva Kyoto Lyon Tallinn Bristol Havana "
    "Munich Nantes Seville"
).split()
_JOBS = (
    "nurse teacher baker pilot chemist painter lawyer farmer engineer librarian chef "
    "carpenter dentist journalist"
).split()
_TRAIN_SHAPES = (
    "Last spring {name} moved to {city} to work as a {job}.",
    "{name} is a {job} who lives in {city}.",
    "Born far away, {name} now works as a {job} in {city}.",
    "After years of travel, {name} settled in {city} and became a {job}.",
    "In {city}, everyone knows {name}, the local {job}.",
    "{name} took a job as a {job} and rented a flat in {city}.",
    "The {job} {name} commutes every day across {city}.",
    "When {name} finished school, the family moved to {city}; today {name} is a {job}.",
)
_HELD_OUT_SHAPES = (
    "{name} has worked as a {job} in {city} for ten years.",
    "Ask anyone in {city} about {name}, the best {job} in town.",
    "A {job} named {name} opened a small office in {city}.",
)


@dataclass(frozen=True)
class TaskSplits:
    """Train and held-out records in Alpaca form (instruction, input, output)."""

    train: list[dict[str, str]]
    held_out: list[dict[str, str]]


def answer(name: str, city: str) -> str:
    """The expected answer for a person and a city, in the task's fixed format."""
    return f"NAME: {name} | CITY: {city}"


def _records(
    rng: random.Random, count: int, names: list[str], cities: list[str], shapes: Sequence[str]
) -> list[dict[str, str]]:
    records = []
    for _ in range(count):
        name, city = rng.choice(names), rng.choice(cities)
        sentence = rng.choice(shapes).format(name=name, city=city, job=rng.choice(_JOBS))
        records.append(
            {"instruction": INSTRUCTION, "input": sentence, "output": answer(name, city)}
        )
    return records


def make_splits(train_size: int = 600, held_out_size: int = 100, seed: int = 0) -> TaskSplits:
    """Generate the task's two splits from ``seed`` (same seed, same data)."""
    if train_size < 1 or held_out_size < 1:
        raise ValueError(
            f"split sizes must be positive, got train_size={train_size}, "
            f"held_out_size={held_out_size}"
        )
    rng = random.Random(seed)
    train = _records(rng, train_size, _TRAIN_NAMES, _TRAIN_CITIES, _TRAIN_SHAPES)
    held_out = _records(rng, held_out_size, _HELD_OUT_NAMES, _HELD_OUT_CITIES, _HELD_OUT_SHAPES)
    return TaskSplits(train, held_out)


def write_splits(splits: TaskSplits, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``held_out.jsonl`` (atomically) into ``directory``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = (root / "train.jsonl", root / "held_out.jsonl")
    for path, records in zip(paths, (splits.train, splits.held_out), strict=True):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return paths


_ANSWER = re.compile(r"NAME: (?P<name>[^|\n]+?) \| CITY: (?P<city>[^\n]+?)\s*$")


def is_task_example(instruction: str, output: str) -> bool:
    """Whether an Alpaca example belongs to this task (so ``eval`` can report its metric)."""
    return instruction == INSTRUCTION and _ANSWER.match(output) is not None


def exact_match(prediction: str, reference: str) -> bool:
    """The task metric for one answer: the generated text, stripped, equals the reference."""
    return prediction.strip() == reference.strip()


def score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of exact matches (0..1)."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("nothing to score: no references")
    hits = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaption_fx.app.demo_task", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="directory for train.jsonl, held_out.jsonl")
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--held-out-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        splits = make_splits(args.train_size, args.held_out_size, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    for path in write_splits(splits, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
