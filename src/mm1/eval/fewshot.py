"""Few-shot prompts as MM1 and OpenFlamingo write them.

Captioning: `<image>Output: caption` per demonstration, the query ending in `<image>Output:`.
VQA: `<image>Question: q Short answer: a`, the query ending in `Short answer:`.
Demonstrations carry their images and are drawn reproducibly from the task's train split (seeded by
the query's index, never the query itself); 0-shot adds two text-only demonstrations (MM1 §5.1).
"""

from __future__ import annotations

import random

from PIL import Image

from mm1.data.images import load_image
from mm1.eval.tasks.base import CaptionItem, Task, VQAItem
from mm1.serve.engine import Part

STOP = ["\n", "Output:", "Question:", "<|endoftext|>"]


def _format(item, with_answer: bool, *, image: bool = True) -> list[Part]:
    parts: list[Part] = [load_image(item.image)] if image else []
    if isinstance(item, CaptionItem):
        parts.append(f"Output: {item.captions[0]}\n" if with_answer else "Output:")
    else:
        parts.append(f"Question: {item.question} Short answer: {item.answers[0]}\n" if with_answer
                     else f"Question: {item.question} Short answer:")
    return parts


def demonstrations(task: Task, query_index: int, shots: int, *, seed: int) -> list:
    pool = task.train or task.test
    rng = random.Random(f"{task.name}-{seed}-{query_index}")
    candidates = [i for i in range(len(pool)) if task.train or i != query_index]
    picks = rng.sample(candidates, k=min(max(shots, 2), len(candidates)))
    return [pool[i] for i in picks]


def build_prompt(task: Task, query_index: int, shots: int, *, seed: int) -> list[Part]:
    query = task.test[query_index]
    demos = demonstrations(task, query_index, shots, seed=seed)
    parts: list[Part] = []
    if shots == 0:
        for d in demos[:2]:
            parts += _format(d, True, image=False)
    else:
        for d in demos[:shots]:
            parts += _format(d, True)
    parts += _format(query, False)
    return _merge_text(parts)


def _merge_text(parts: list[Part]) -> list[Part]:
    out: list[Part] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        else:
            out.append(p)
    return out


def is_image(p: Part) -> bool:
    return isinstance(p, Image.Image)


__all__ = ["STOP", "VQAItem", "build_prompt", "demonstrations", "is_image"]
