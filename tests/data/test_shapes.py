"""Shapes-VQA generator: exact captions, answers that are true of the scene, balance, rendering, vocabulary."""

from collections import Counter

import numpy as np
import pytest

from qtl_jax.data import shapes
from qtl_jax.data.builders import shapes_vocabulary
from qtl_jax.data.tokenizer import split_words


def test_caption_hand_case():
    objs = (shapes.Obj("square", "blue", "large", 2, 1), shapes.Obj("circle", "red", "small", 0, 0))
    assert shapes.caption(objs) == "a small red circle at the top left and a large blue square at the bottom"
    assert shapes.position_phrase(1, 1) == "in the center" and shapes.position_phrase(1, 2) == "on the right"


def _answer_from_scene(s: shapes.Sample) -> str:
    """Independent check: answer the question from the objects alone."""
    words = s.question.rstrip("?").split()
    objs = s.objects
    if s.question_type == "color":
        (match,) = [o for o in objs if o.shape == words[-1]]
        return match.color
    if s.question_type == "shape":
        (match,) = [o for o in objs if o.color == words[-2]]
        return match.shape
    if s.question_type == "count":
        return shapes.COUNT_WORDS[len(objs) - 1]
    if s.question_type == "position":
        color, shape = words[-3], words[-2]
        (match,) = [o for o in objs if (o.color, o.shape) == (color, shape)]
        return shapes.ROWS[match.row] if words[1] == "row" else shapes.COLUMNS[match.col]
    color, shape = words[-2], words[-1]
    return "yes" if any((o.color, o.shape) == (color, shape) for o in objs) else "no"


def test_answers_are_true_and_scenes_valid():
    samples = shapes.generate_samples("t", 7, 3000, 200)
    for s in samples:
        assert 1 <= len(s.objects) <= shapes.MAX_OBJECTS
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)  # one object per cell
        if s.question_type == "caption":
            assert s.answer == shapes.caption(s.objects)
        else:
            assert _answer_from_scene(s) == s.answer, s


def test_answers_are_balanced_given_the_question_text():
    samples = shapes.generate_samples("t", 3, 20000, 0)
    # Per question type (position questions ask a row or a column: two answer sets).
    groups = {}
    for s in samples:
        key = (s.question_type, s.question.split()[1] if s.question_type == "position" else "")
        groups.setdefault(key, Counter())[s.answer] += 1
    assert len(groups) == 6
    for key, answers in groups.items():
        top = max(answers.values()) / sum(answers.values())
        assert top < 1 / len(answers) + 0.04, (key, answers)
    # Conditioned on the exact question text, too (a text-only model sees only that).
    by_text = {}
    for s in samples:
        by_text.setdefault(s.question, Counter())[s.answer] += 1
    frequent = [c for c in by_text.values() if sum(c.values()) >= 150]
    assert frequent and all(max(c.values()) / sum(c.values()) < 0.75 for c in frequent)


def test_generation_is_deterministic_and_splits_differ():
    a, b = shapes.generate_samples("x", 1, 50, 5), shapes.generate_samples("x", 1, 50, 5)
    assert a == b and a != shapes.generate_samples("x", 2, 50, 5)
    img1 = shapes.render(a[0].objects, 64, np.random.default_rng(0))
    img2 = shapes.render(a[0].objects, 64, np.random.default_rng(0))
    np.testing.assert_array_equal(img1, img2)


def test_render_draws_the_colours_where_the_objects_are():
    obj = shapes.Obj("square", "red", "large", 0, 2)
    img = shapes.render((obj,), 96, np.random.default_rng(0))
    cell = img[0:32, 64:96].reshape(-1, 3).astype(int)
    red = np.all(cell == shapes.COLORS["red"], axis=1).mean()
    assert red > 0.4 and img.dtype == np.uint8 and img.shape == (96, 96, 3)
    elsewhere = img[40:90, 0:60].reshape(-1, 3).astype(int)
    assert not np.any(np.all(elsewhere == shapes.COLORS["red"], axis=1))


def test_vocabulary_covers_everything_generated():
    vocab = set(shapes_vocabulary())
    for s in shapes.generate_samples("v", 11, 2000, 500):
        assert set(split_words(s.question + " " + s.answer)) <= vocab


def test_unknown_question_type():
    with pytest.raises(ValueError, match="unknown question type"):
        shapes.make_sample(np.random.default_rng(0), "x", "size")
