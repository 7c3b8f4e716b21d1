"""The words of the synthetic world: captions, questions, documents and conversations about scenes.

Short alt-text-like captions and long dense ones (MM1's VeCap) are both generated from the same
scene; questions cover colour, shape, count, position, size, existence, stripes and printed words,
with graded difficulty (big shapes are easy; counts of small shapes, stripes and printed words are
hard, the last two because they need resolution).
"""

from __future__ import annotations

import random

from mm1.data.synth.scene import COLOURS, SHAPES, WORDS, Scene, Shape
from mm1.data.template import CAPTION_PROMPT, SHORT_ANSWER

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def plural(kind: str, n: int) -> str:
    return kind if n == 1 else f"{kind}s"


def _reading_order(scene: Scene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda s: (round(s.y * 3), s.x))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(s: Shape, *, size: bool) -> str:
    """A shape in words ("a small striped red star"): a striped one is always called so."""
    words = f"{'striped ' if s.striped else ''}{s.colour} {s.kind}"
    words = f"{s.size} {words}" if size else words
    return f"{article(words)} {words}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def short_caption(scene: Scene, rng: random.Random) -> str:
    """Alt-text style: brief, sometimes only the gist."""
    shapes = _reading_order(scene)
    style = rng.random()
    n = len(shapes)
    if n > 3 and style < 0.3:
        return f"{NUMBER_WORDS[n]} colorful shapes on a {scene.background} background"
    parts = [_phrase(s, size=rng.random() < 0.4) for s in shapes]
    text = _join(parts) if style < 0.6 else f"{_join(parts)} on a {scene.background} background"
    if scene.word and rng.random() < 0.5:
        text += f' with the word "{scene.word}"'
    return text


def dense_caption(scene: Scene) -> str:
    """VeCap style: every shape with its size, colour and place, the background and the word."""
    shapes = _reading_order(scene)
    n = len(shapes)
    head = f"An image with {NUMBER_WORDS[n]} {plural('shape', n)} on a {scene.background} background."
    body = " ".join(f"{_phrase(s, size=True).capitalize()} is at the {s.region}." for s in shapes)
    tail = f' The word "{scene.word}" is printed at the bottom.' if scene.word else ""
    return f"{head} {body}{tail}"


def reference_captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """Several human-like references for captioning evaluation."""
    shapes = _reading_order(scene)
    refs = [_join([_phrase(s, size=False) for s in shapes]),
            _join([_phrase(s, size=True) for s in shapes]),
            f"{_join([_phrase(s, size=False) for s in shapes])} on a {scene.background} background"]
    while len(refs) < k:
        refs.append(short_caption(scene, rng))
    return refs[:k]


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, kind) triples that the scene answers unambiguously."""
    qs: list[tuple[str, str, str]] = []
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            qs.append((f"What color is the {s.kind}?", s.colour, "colour"))
        if colours.count(s.colour) == 1:
            qs.append((f"What shape is the {s.colour} object?", s.kind, "shape"))
        if sum(1 for t in scene.shapes if (t.kind, t.colour) == (s.kind, s.colour)) == 1:
            qs.append((f"Where is the {s.colour} {s.kind}?", s.region, "position"))
            qs.append((f"Is the {s.colour} {s.kind} large or small?", s.size, "size"))
    n = len(scene.shapes)
    qs.append(("How many shapes are there?", str(n), "count"))
    kind = rng.choice(SHAPES)
    qs.append((f"How many {plural(kind, 2)} are there?", str(kinds.count(kind)), "count"))
    present = rng.choice(scene.shapes)
    qs.append((f"Is there {article(present.colour)} {present.colour} {present.kind}?", "yes", "existence"))
    absent = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    if absent not in {(s.colour, s.kind) for s in scene.shapes}:
        qs.append((f"Is there {article(absent[0])} {absent[0]} {absent[1]}?", "no", "existence"))
    qs.append(("What color is the background?", scene.background, "background"))
    sq = stripes_question(scene)
    if sq:
        qs.append(sq)
    return qs


def stripes_question(scene: Scene) -> tuple[str, str, str] | None:
    """The colour of the scene's one striped shape (none where it has no or several striped shapes):
    the question that needs resolution and whose answer a model can learn to read off the image."""
    striped = [s for s in scene.shapes if s.striped]
    if len(striped) != 1:
        return None
    return ("What color is the striped shape?", striped[0].colour, "stripes")


def word_question(scene: Scene) -> tuple[str, str, str] | None:
    if not scene.word:
        return None
    return ("What word is written in the image?", scene.word, "word")


def text_document(rng: random.Random) -> str:
    """A text-only document about the world: facts, small stories and lists."""
    facts = [
        "A triangle has three corners and three sides.", "A square has four equal sides.",
        "A circle has no corners at all.", "A star has five points.", "A diamond looks like a square on its tip.",
        "Red and yellow paint mix into orange.", "Blue and red paint mix into purple.",
        "Yellow and blue paint mix into green.", "Large shapes are easy to see from far away.",
        "Small shapes and small printed words need a sharp picture to be read.",
        "Counting shapes is easier when they do not overlap.",
    ]
    kind = rng.random()
    if kind < 0.4:
        return " ".join(rng.sample(facts, k=rng.randint(3, 6)))
    if kind < 0.7:
        c, s, w = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(WORDS)
        n = rng.randint(2, 6)
        return (f"Once there was {article(c)} {c} {s} who lived near a {rng.choice(WORDS)}. Every day it met "
                f"{NUMBER_WORDS[n]} friends. One of them wrote the word \"{w}\" on a wall. The {s} "
                f"liked the word and said it {NUMBER_WORDS[rng.randint(1, 4)]} times.")
    items = rng.sample(WORDS, k=rng.randint(3, 6))
    return "A list of words: " + ", ".join(items) + ". " + " ".join(
        f"The word {w} has {len(w)} letters." for w in items)


def conversation(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """A multi-turn (question, answer) list for one image, in LLaVA's human/gpt roles."""
    turns: list[tuple[str, str]] = []
    pool = questions(scene, rng)
    wq = word_question(scene)
    if wq:
        pool.append(wq)
    rng.shuffle(pool)
    for q, a, _ in pool[: rng.randint(1, 3)]:
        if rng.random() < 0.6:
            turns.append((f"{q}\n{SHORT_ANSWER}", a))
        else:
            turns.append((q, f"The answer is {a}."))
    if rng.random() < 0.3:
        turns.append(("Describe the image in detail.", dense_caption(scene)))
    if rng.random() < 0.25:  # LLaVA's captioning prompt, as captioning is evaluated in chat format
        turns.insert(0, (CAPTION_PROMPT, short_caption(scene, rng)))
    return turns


FACT_QA = [
    ("How many corners does a triangle have?", "Three."), ("How many sides does a square have?", "Four."),
    ("How many corners does a circle have?", "None."), ("How many points does a star have?", "Five."),
    ("What do red and yellow paint make?", "Orange."), ("What do blue and red paint make?", "Purple."),
    ("What do yellow and blue paint make?", "Green."),
    ("What shape looks like a square standing on its tip?", "A diamond."),
    ("Why are small printed words hard to read?", "They need a sharp, high-resolution picture."),
]


def text_conversation(rng: random.Random) -> list[tuple[str, str]]:
    """A text-only conversation (no image) about the world's facts and words."""
    turns = []
    for _ in range(rng.randint(1, 3)):
        style = rng.random()
        if style < 0.5:
            turns.append(rng.choice(FACT_QA))
        elif style < 0.8:
            w = rng.choice(WORDS)
            turns.append((f"How many letters are in the word {w}?", f"{len(w)}."))
        else:
            w = rng.choice(WORDS)
            turns.append((f"Spell the word {w}.", "-".join(w) + "."))
    return turns
