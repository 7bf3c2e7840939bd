"""Shapes-VQA: the project's built-in dataset, rendered locally and deterministically (SPEC §5).

Each image shows 1-4 simple shapes (circle, square, triangle) in six colours and two sizes, each in its own
cell of a 3 x 3 grid, on a light background with a little noise. Stage 1 uses captions
("a small red circle at the top left and a large blue square at the bottom"); stage 2 uses single-turn
question/answer pairs with single-word answers of five types: colour, shape, count, position (row or
column) and yes/no existence.

Answers need the image: for every question the answer is drawn first, uniformly over that question's
possible answers, and the scene is then built to match it (with distractor objects that never make the
question ambiguous). So given only the question text, every answer is equally likely, and a text-only
model cannot beat the majority baseline of its question type. `baselines()` reports chance and majority
accuracy per type.

Everything here is NumPy and `random.Random`-free: one `np.random.Generator` per split seed.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np

COLORS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (225, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
COUNT_WORDS = ("one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")
# The fixed words of the question and caption templates below (the vocabulary is fixed by the generator).
QUESTION_WORDS = ("what color is the ?", "what shape is the object ?", "how many objects are there ?",
                  "which row column is the in ?", "is there a ?", "a and")
MAX_OBJECTS = 4
BACKGROUND = 235
NOISE_STD = 6.0


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated example (before rendering).

    Attributes:
      uid: stable id, e.g. "train-000123".
      objects: the scene.
      question_type: one of QUESTION_TYPES, or "caption".
      question: the question text ("" for captions).
      answer: the single-word answer, or the caption.
    """

    uid: str
    objects: tuple[Obj, ...]
    question_type: str
    question: str
    answer: str

    def conversations(self) -> list[dict[str, str]]:
        """The sample in LLaVA format (captions: the human turn is just the image)."""
        human = "<image>" if self.question_type == "caption" else f"<image>\n{self.question}"
        return [{"from": "human", "value": human}, {"from": "gpt", "value": self.answer}]

    def to_json(self) -> str:
        return json.dumps({"id": self.uid, "conversations": self.conversations()})


def position_phrase(row: int, col: int) -> str:
    """'at the top left', 'at the top', 'on the left', 'in the center', ..."""
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {COLUMNS[col]}"
    if col == 1:
        return f"at the {ROWS[row]}"
    return f"at the {ROWS[row]} {COLUMNS[col]}"


def caption(objects: tuple[Obj, ...]) -> str:
    """'a small red circle at the top left and a large blue square at the bottom' (row-major order)."""
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    return " and ".join(f"a {o.size} {o.color} {o.shape} {position_phrase(o.row, o.col)}" for o in ordered)


class _SceneMaker:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def choice(self, options):
        return options[int(self.rng.integers(len(options)))]

    def free_cells(self, used: set[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        cells = [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]
        order = self.rng.permutation(len(cells))[:k]
        return [cells[i] for i in order]

    def scene(self, fixed: list[tuple[str, str]], allowed, total: int) -> tuple[Obj, ...]:
        """`fixed` (shape, colour) objects plus distractors from `allowed(shape, colour)` up to `total`."""
        specs = list(fixed)
        pool = [(s, c) for s in SHAPES for c in COLORS if allowed(s, c)]
        while len(specs) < total and pool:
            specs.append(pool[int(self.rng.integers(len(pool)))])
        cells = self.free_cells(set(), len(specs))
        objects = [Obj(s, c, self.choice(SIZES), r, col) for (s, c), (r, col) in zip(specs, cells, strict=True)]
        order = self.rng.permutation(len(objects))
        return tuple(objects[i] for i in order)


def make_sample(rng: np.random.Generator, uid: str, question_type: str) -> Sample:
    """Draws the answer uniformly for the question, then a scene that makes it true."""
    m = _SceneMaker(rng)
    total = int(rng.integers(1, MAX_OBJECTS + 1))
    colors = tuple(COLORS)
    if question_type == "caption":
        objs = m.scene([], lambda s, c: True, total)
        return Sample(uid, objs, "caption", "", caption(objs))
    if question_type == "color":  # exactly one object of the asked shape
        shape, answer = m.choice(SHAPES), m.choice(colors)
        objs = m.scene([(shape, answer)], lambda s, c: s != shape, total)
        return Sample(uid, objs, question_type, f"what color is the {shape}?", answer)
    if question_type == "shape":  # exactly one object of the asked colour
        color, answer = m.choice(colors), m.choice(SHAPES)
        objs = m.scene([(answer, color)], lambda s, c: c != color, total)
        return Sample(uid, objs, question_type, f"what shape is the {color} object?", answer)
    if question_type == "count":
        answer = int(rng.integers(1, MAX_OBJECTS + 1))
        objs = m.scene([], lambda s, c: True, answer)
        return Sample(uid, objs, question_type, "how many objects are there?", COUNT_WORDS[answer - 1])
    if question_type == "position":  # exactly one object of that colour and shape; ask its row or column
        shape, color = m.choice(SHAPES), m.choice(colors)
        objs = list(m.scene([(shape, color)], lambda s, c: (s, c) != (shape, color), total))
        target = next(i for i, o in enumerate(objs) if (o.shape, o.color) == (shape, color))
        axis = m.choice(("row", "column"))
        names = ROWS if axis == "row" else COLUMNS
        answer_index = int(rng.integers(3))
        used = {(o.row, o.col) for i, o in enumerate(objs) if i != target}
        options = [(r, c) for r in range(3) for c in range(3)
                   if (r, c) not in used and (r if axis == "row" else c) == answer_index]
        if not options:  # the wanted row/column is full: move a distractor out of it
            blocker = next(i for i, o in enumerate(objs) if i != target
                           and (o.row if axis == "row" else o.col) == answer_index)
            free = m.free_cells(used | {(objs[target].row, objs[target].col)}, 9)
            spot = next(cell for cell in free if (cell[0] if axis == "row" else cell[1]) != answer_index)
            objs[blocker] = dataclasses.replace(objs[blocker], row=spot[0], col=spot[1])
            used = {(o.row, o.col) for i, o in enumerate(objs) if i != target}
            options = [(r, c) for r in range(3) for c in range(3)
                       if (r, c) not in used and (r if axis == "row" else c) == answer_index]
        r, c = options[int(rng.integers(len(options)))]
        objs[target] = dataclasses.replace(objs[target], row=r, col=c)
        question = f"which {axis} is the {color} {shape} in?"
        return Sample(uid, tuple(objs), question_type, question, names[answer_index])
    if question_type == "exists":
        shape, color = m.choice(SHAPES), m.choice(colors)
        present = bool(rng.integers(2))
        fixed = [(shape, color)] if present else []
        objs = m.scene(fixed, lambda s, c: (s, c) != (shape, color), total)
        return Sample(uid, objs, question_type, f"is there a {color} {shape}?", "yes" if present else "no")
    raise ValueError(f"unknown question type {question_type!r}; expected caption or one of {QUESTION_TYPES}")


def generate_samples(split: str, seed: int, num_qa: int, num_captions: int) -> list[Sample]:
    """`num_captions` caption samples then `num_qa` QA samples (types in turn), all from one seeded stream."""
    rng = np.random.default_rng(seed)
    samples = [make_sample(rng, f"{split}-cap-{i:06d}", "caption") for i in range(num_captions)]
    samples += [make_sample(rng, f"{split}-qa-{i:06d}", QUESTION_TYPES[i % len(QUESTION_TYPES)])
                for i in range(num_qa)]
    return samples


def _masks(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def render(objects: tuple[Obj, ...], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[image_size, image_size, 3]: the shapes on a light, slightly noisy background."""
    image = np.full((image_size, image_size, 3), BACKGROUND, np.float32)
    image += rng.normal(0.0, NOISE_STD, image.shape).astype(np.float32)
    cell = image_size / 3
    yy, xx = _masks(image_size)
    for o in objects:
        cy, cx = (o.row + 0.5) * cell, (o.col + 0.5) * cell
        r = cell * (0.22 if o.size == "small" else 0.42)
        if o.shape == "circle":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        elif o.shape == "square":
            inside = (np.abs(yy - cy) <= r * 0.9) & (np.abs(xx - cx) <= r * 0.9)
        else:  # triangle pointing up
            inside = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        image[inside] = COLORS[o.color]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def baselines(train: list[Sample], test: list[Sample]) -> dict[str, dict[str, float]]:
    """Per question type: chance (1 / number of possible answers) and majority (the most frequent training
    answer of that type, scored on `test`) accuracy."""
    possible = {"color": len(COLORS), "shape": len(SHAPES), "count": MAX_OBJECTS, "position": 3, "exists": 2}
    out = {}
    for qtype in QUESTION_TYPES:
        train_answers = Counter(s.answer for s in train if s.question_type == qtype)
        test_answers = [s.answer for s in test if s.question_type == qtype]
        if not train_answers or not test_answers:
            continue
        majority = train_answers.most_common(1)[0][0]
        out[qtype] = {"chance": 1.0 / possible[qtype],
                      "majority": float(np.mean([a == majority for a in test_answers])),
                      "majority_answer": majority}
    return out
