"""Interleaved documents of the synthetic world, laid out as web pages are: galleries, quizzes, stories.

Each page picks its own style (how it captions a picture, how it writes a question and its
answer) and keeps it, as a real page does, so a model learns to continue the pattern a document
sets up: the skill few-shot prompting relies on. The evaluation templates (`Output:`,
`Question: … Short answer:`) are never among the styles, so few-shot scores measure that skill
rather than a format planted in pre-training. Page lengths are heavy-tailed (one picture to eight).
"""

from __future__ import annotations

import random

from mm1.data.synth import language as lang
from mm1.data.synth.scene import COLOURS, SHAPES, WORDS, Scene, sample_scene

EVAL_TEMPLATES = ("Output:", "Question:", "Short answer:")  # never written into a page

# Pages label their captions and answers as real pages do, each page with its own words ("Photo 3:",
# "Q: … A: …", "Riddle | … Solution | …"): drawn per page from these lists, so that what a model
# learns is to continue a page's own pattern, whatever its words, and not one memorised template.
CAPTION_LABELS = ("Photo", "Picture", "Image", "Figure", "Fig.", "Caption", "Alt text", "Description", "Drawing",
                  "Snapshot", "Scene", "View", "Print", "Sketch", "Title", "Label", "Summary", "Shown", "Content",
                  "Subject", "Exhibit", "Plate", "Panel", "Card", "Slide", "Entry", "Art", "Shot", "Frame", "Note")
QUESTION_LABELS = ("Q", "Ask", "Query", "Puzzle", "Quiz", "Riddle", "Task", "Problem", "Test", "Check", "Clue",
                   "Challenge", "Prompt", "Asked", "Our question", "Reader asks", "Poll", "Survey", "Exam")
ANSWER_LABELS = ("A", "Answer", "Reply", "Solution", "Response", "Result", "Key", "Verdict", "Correct answer",
                 "Quick reply", "Brief answer", "In short", "One word", "Final answer", "Says", "Guess", "Solved",
                 "Our answer", "Truth", "Short reply")
# Many pages use words of their own that say nothing of the role ("Kiwi 3: a red star"): the label is
# only a pattern to continue, which is what a few-shot prompt's unfamiliar words are to a model.
WORD_LABELS = tuple(w.capitalize() for w in """
    apple anchor arrow autumn badge basket beacon bell berry blossom bottle breeze bridge brook bubble cabin
    candle canvas canyon castle cedar chalk cherry cider cloud clover comet coral cotton crayon crystal daisy
    delta desert dragon dream drum eagle echo ember falcon feather fern field flame flint forest fossil fountain
    garden garnet ginger glacier globe grape harbor harvest hazel helmet honey horizon island ivory jade jasmine
    jewel journal kettle kiwi ladder lagoon lantern lemon lily linen lotus magnet maple marble meadow melody
    mint mirror mosaic nectar needle nickel oasis ocean olive orbit orchid otter paddle palette paper pebble
    pepper petal piano pillow pine planet plum pond poppy prism quartz quill rainbow raven reef ribbon river
    robin saddle saffron sail salt satin shell silk silver slate sparrow spice spruce stone summit sunset
    thistle thunder timber topaz tulip velvet violet walnut willow window winter zephyr
    alpha beta gamma delta one two item part line row cell box mark tag key ref no ex
    """.split())  # noqa: SIM905 (a word list reads better as prose)
SEPARATORS = (":", ":", ":", " -", " |")  # mostly a colon, as on most pages
CAPTION_STYLES = ("{C}.", "In this picture: {c}.", "Here you can see {c}.", "[{c}]")  # unlabelled ones


def caption_style(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(CAPTION_STYLES)
    number = " {n}" if rng.random() < 0.25 else ""
    label = rng.choice(WORD_LABELS if rng.random() < 0.5 else CAPTION_LABELS)
    return f"{label}{number}{rng.choice(SEPARATORS)} {{c}}"


def qa_style(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(("{q} -> {a}", "{q}\n{a}", "{q} (answer: {a})"))
    sep = rng.choice(SEPARATORS)
    ask, say = (WORD_LABELS, WORD_LABELS) if rng.random() < 0.4 else (QUESTION_LABELS, ANSWER_LABELS)
    first = rng.choice(ask)
    second = rng.choice([w for w in say if w != first] if rng.random() < 0.5 else ANSWER_LABELS)
    return f"{first}{sep} {{q}} {second}{sep} {{a}}"


TITLES = {"gallery": ["My picture collection.", "Some shapes I drew today.", "Gallery of shapes.", "New prints!"],
          "quiz": ["Quiz time!", "Test your eyes.", "How well do you look?", "A puzzle for every picture."]}
IMAGES_PER_PAGE = (1, 1, 2, 2, 2, 3, 3, 4, 5, 6, 8)

Part = str | int  # text, or the index of the page's image


def images_on_page(rng: random.Random) -> int:
    return rng.choice(IMAGES_PER_PAGE)


def _gallery(scenes: list[Scene], rng: random.Random) -> list[Part]:
    style, dense = caption_style(rng), rng.random() < 0.1
    parts: list[Part] = [rng.choice(TITLES["gallery"])] if rng.random() < 0.7 else []
    for k, s in enumerate(scenes):
        c = lang.dense_caption(s).rstrip(".") if dense else lang.short_caption(s, rng)
        parts += [k, style.format(n=k + 1, c=c, C=c[0].upper() + c[1:])]
    return parts


def _quiz(scenes: list[Scene], rng: random.Random) -> list[Part]:
    style = qa_style(rng)
    parts: list[Part] = [rng.choice(TITLES["quiz"])] if rng.random() < 0.7 else []
    n = 0
    for k, s in enumerate(scenes):
        parts.append(k)
        pool = lang.questions(s, rng) + ([lang.word_question(s)] if s.word else [])
        for q, a, _ in rng.sample(pool, k=min(len(pool), rng.randint(1, 3))):
            n += 1
            parts.append(style.format(n=n, q=q, a=a))
    return parts


def _story(scenes: list[Scene], rng: random.Random) -> list[Part]:
    parts: list[Part] = []
    for k, s in enumerate(scenes):
        parts.append(k)
        if k == 0:
            parts.append(f"The first picture shows {lang.short_caption(s, rng)}.")
            continue
        prev = len(scenes[k - 1].shapes)
        more = "more" if len(s.shapes) > prev else "fewer" if len(s.shapes) < prev else "as many"
        parts.append(f"Compared with the previous picture, this one has {more} shapes"
                     f"{'' if more == 'as many' else ' than it'}: {lang.short_caption(s, rng)}.")
    return parts


def _loose(scenes: list[Scene], rng: random.Random) -> list[Part]:
    return [p for k in range(len(scenes)) for p in (k, lang.text_document(rng))]


def web_page(scenes: list[Scene], rng: random.Random) -> list[Part]:
    """A page about `scenes`: text pieces and image indices in reading order."""
    kind = rng.random()
    layout = _gallery if kind < 0.45 else _quiz if kind < 0.8 else _story if kind < 0.95 else _loose
    return layout(scenes, rng)


# World knowledge in questions and answers, for the text-only lists below: what the world's prose says.
SIDES = {"triangle": "three", "square": "four", "diamond": "four", "circle": "no"}
MIXES = {("red", "yellow"): "orange", ("blue", "red"): "purple", ("yellow", "blue"): "green"}


def _fact_qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.35:
        shape = rng.choice(list(SIDES))
        return f"How many sides does a {shape} have?", SIDES[shape]
    if kind < 0.6:
        (a, b), c = rng.choice(list(MIXES.items()))
        return f"What do {a} and {b} paint make?", c
    if kind < 0.85:
        w = rng.choice(WORDS)
        return f"How many letters are in the word {w}?", str(len(w))
    word, answer = (rng.choice(list(COLOURS)), "color") if rng.random() < 0.5 else (rng.choice(SHAPES), "shape")
    return f"Is {word} a color or a shape?", answer


def labelled_list(rng: random.Random) -> str:
    """A text-only list, one labelled line per item in the list's own words, as web text has them:
    descriptions of pictures ("Print 3: two red stars") or questions and answers ("Q: … A: four").

    MM1 starts from an LLM that has read the web, so a prompt of labelled lines (its 0-shot prompt is
    two text-only "Output: <caption>" lines before the image) is a pattern its decoder knows before
    any image. The world's prose never lays text out so, and a decoder pre-trained on it alone met
    the pattern first in the interleaved pages: an arm without them (caption data only) could not
    show what captions teach (docs/results/ablate/earlier/full_3seeds_2026-12-07/README.md). The
    evaluation's own words are never used (`EVAL_TEMPLATES`)."""
    n = rng.randint(2, 6)
    if rng.random() < 0.5:
        style = caption_style(rng)
        lines = [style.format(n=k + 1, c=(c := lang.short_caption(sample_scene(rng), rng)), C=c[0].upper() + c[1:])
                 for k in range(n)]
    else:
        style = qa_style(rng)
        lines = [style.format(n=k + 1, q=q, a=a) for k, (q, a) in enumerate(_fact_qa(rng) for _ in range(n))]
    return "\n".join(lines)


def text_page(rng: random.Random) -> str:
    """A text-only document of the world: prose (`language.text_document`) or, one in four, a labelled list."""
    return labelled_list(rng) if rng.random() < 0.25 else lang.text_document(rng)
