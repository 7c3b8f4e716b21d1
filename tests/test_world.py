"""The synthetic world: the resolution-only detail (stripes that 128 px shows and 64 px averages away) and its text."""

import json

import numpy as np
import pytest

from mm1.data.images import square, to_tensor
from mm1.data.synth.language import dense_caption, questions, stripes_question
from mm1.data.synth.scene import Scene, Shape, render


def _scene(striped: bool) -> Scene:
    return Scene((Shape("star", "red", 0.3, 0.3, 0.15, striped), Shape("square", "yellow", 0.7, 0.65, 0.1)), "white")


def test_stripes_are_plain_at_128_px_and_gone_at_64_px_through_the_model_s_loader():
    plain, striped = render(_scene(False), 128), render(_scene(True), 128)
    hi = np.abs(np.asarray(striped, dtype=float) - np.asarray(plain, dtype=float))
    assert hi.max() >= 35  # each row is a tint up to 70 levels from the colour (as far as 0 or 255 allows)
    # what a 64-px model sees: the same loader's resize, then the tensor it is given
    lo = (to_tensor(striped, 64) - to_tensor(plain, 64)).abs().amax(0)
    full = (to_tensor(striped, 128) - to_tensor(plain, 128)).abs().amax(0)
    # the two tints average to the colour itself: inside the shape nothing is left, at slanted edges a
    # trace (measured: 31 pixels above 0.05, 2% of what 128 px shows)
    assert lo.sum() < 0.05 * full.sum() and (lo > 0.05).sum() < 0.1 * (full > 0.05).sum()
    assert np.asarray(square(striped, 64)).shape == (64, 64, 3)


def test_the_striped_shape_is_asked_about_only_when_there_is_exactly_one():
    assert stripes_question(_scene(True)) == ("What color is the striped shape?", "red", "stripes")
    assert stripes_question(_scene(False)) is None
    two = Scene((Shape("star", "red", 0.3, 0.3, 0.15, True), Shape("square", "blue", 0.7, 0.6, 0.1, True)), "gray")
    assert stripes_question(two) is None
    import random
    assert ("What color is the striped shape?", "red", "stripes") in questions(_scene(True), random.Random(0))
    assert "A large striped red star is at the" in dense_caption(_scene(True))
    assert "striped" not in dense_caption(_scene(False))


def test_the_world_writes_a_stripes_task_with_one_striped_shape_per_item(world):
    rows = [json.loads(line) for line in (world / "tasks" / "synth_stripes" / "test.jsonl").read_text().splitlines()]
    assert rows and all(r["question"] == "What color is the striped shape?" and r["type"] == "stripes" for r in rows)
    # the choices are the scene's own colours (two or more), in the world's order, the answer among them
    order = ["red", "green", "blue", "yellow", "purple", "orange"]
    assert all(len(r["choices"]) >= 2 and r["answers"][0] in r["choices"] for r in rows)
    assert all(r["choices"] == sorted(r["choices"], key=order.index) for r in rows)
    answers = {r["answers"][0] for r in rows}
    assert len(answers) > 1  # not one colour every time
    from mm1.eval.tasks import get_task
    task = get_task("synth_stripes", world=world)
    assert len(task.test) == len(rows) and task.ranks_choices


@pytest.mark.parametrize("size", [128, 64])
def test_rendering_is_deterministic(size):
    assert render(_scene(True), size).tobytes() == render(_scene(True), size).tobytes()


def test_one_text_document_in_four_is_a_labelled_list_never_in_the_evaluation_s_words():
    """MM1's 0-shot prompt is labelled text lines before the image; an LLM that has read the web knows
    that pattern, so the world's text has such lists (pictures described, questions answered), in each
    list's own words and never the evaluation's."""
    import random

    from mm1.data.synth.pages import EVAL_TEMPLATES, text_page

    rng = random.Random(0)
    docs = [text_page(rng) for _ in range(800)]
    lists = [d.split("\n") for d in docs if "\n" in d]
    assert 0.2 < len(lists) / len(docs) < 0.3
    assert all(len(lines) >= 2 for lines in lists)
    assert not [d for d in docs if any(t in d for t in EVAL_TEMPLATES)]
    described = [lines for lines in lists if any(c in lines[0] for c in ("circle", "square", "star", "triangle",
                                                                         "diamond", "shapes"))]
    asked = [lines for lines in lists if "?" in lines[0]]
    assert len(described) > 40 and len(asked) > 40
