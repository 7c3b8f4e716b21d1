"""Few-shot prompts in the two formats a model can be evaluated in.

The words come from the task (`Task.prompt_spec`: task configuration, recorded with the scores);
the layout is fixed here.

Pre-training format, as MM1 and OpenFlamingo write it: `<image>Output: caption` per demonstration,
the query ending in `<image>Output:`; VQA as `<image>Question: q Short answer: a`. 0-shot adds two
text-only demonstrations (MM1 §5.1).

Chat format, for a fine-tuned model, in the chat template it was tuned with: each demonstration is
an earlier user turn (its image and the task's chat prompt) answered by the assistant, and the query
is the last user turn (built-in tasks: LLaVA-1.5's prompts, "Provide a one-sentence caption …",
"… Answer the question using a single word or phrase."; a custom VQA file: the question alone).

Demonstrations carry their images and are drawn reproducibly from the task's train split (seeded by
the query's index, never the query itself). With sub-image decomposition, MM1's mixed-resolution
few-shot keeps only the last `high_res_last` images at high resolution; the others are one view.
"""

from __future__ import annotations

import random

from PIL import Image

from mm1.config import PromptFormat
from mm1.data.images import load_image
from mm1.data.records import Role, Turn
from mm1.data.template import ChatTemplate, Control, Markup, Text, user_turn
from mm1.eval.tasks.base import CaptionItem, PromptSpec, Task, references
from mm1.serve.engine import LowRes, Part

STOP = {PromptFormat.PRETRAIN: ["\n", "Output:", "Question:"], PromptFormat.CHAT: ["\n"]}


def _question(item) -> str | None:
    return None if isinstance(item, CaptionItem) else item.question


def _pretrain(item, spec: PromptSpec, with_answer: bool, *, image: bool = True) -> list[Part]:
    parts: list[Part] = [load_image(item.image)] if image else []
    ask = spec.ask("pretrain", _question(item))
    parts.append(f"{ask} {references(item)[0]}\n" if with_answer else ask)
    return parts


def _chat_turns(item, spec: PromptSpec, with_answer: bool) -> list[Turn]:
    turns = [user_turn(spec.ask("chat", _question(item)), [load_image(item.image)])]
    if with_answer:
        turns.append(Turn(Role.ASSISTANT, (references(item)[0],)))
    return turns


def demonstrations(task: Task, query_index: int, shots: int, *, seed: int) -> list:
    pool = task.train or task.test
    rng = random.Random(f"{task.name}-{seed}-{query_index}")
    candidates = [i for i in range(len(pool)) if task.train or i != query_index]
    picks = rng.sample(candidates, k=min(max(shots, 2), len(candidates)))
    return [pool[i] for i in picks]


def build_prompt(task: Task, query_index: int, shots: int, *, seed: int, fmt: PromptFormat = PromptFormat.PRETRAIN,
                 high_res_last: int | None = None, template: ChatTemplate | None = None) -> list[Part]:
    query, spec = task.test[query_index], task.prompt_spec
    demos = demonstrations(task, query_index, shots, seed=seed)
    if fmt == PromptFormat.CHAT:
        turns = [t for d in demos[:shots] for t in _chat_turns(d, spec, True)] + _chat_turns(query, spec, False)
        parts: list[Part] = (template or ChatTemplate()).render(turns, generation_prompt=True)
    else:
        parts = []
        for d in demos[:2] if shots == 0 else demos[:shots]:
            parts += _pretrain(d, spec, True, image=shots > 0)
        parts = _merge_text([*parts, *_pretrain(query, spec, False)])
    return parts if high_res_last is None else mixed_resolution(parts, high_res_last)


def mixed_resolution(parts: list[Part], high_res_last: int) -> list[Part]:
    """All images but the last `high_res_last` shown at low resolution (one view)."""
    image_at = [i for i, p in enumerate(parts) if isinstance(p, Image.Image)]
    low = set(image_at[: max(0, len(image_at) - high_res_last)])
    return [LowRes(p) if i in low else p for i, p in enumerate(parts)]


def prompt_text(parts: list[Part]) -> str:
    """A prompt as readable text (for predictions.jsonl): images as `<image>` / `<image:low>`."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Text | Markup):
            out.append(p.text)
        elif isinstance(p, Control):
            out.append(p.token)
        else:
            out.append("<image:low>" if isinstance(p, LowRes) else "<image>")
    return "".join(out)


def _merge_text(parts: list[Part]) -> list[Part]:
    out: list[Part] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        else:
            out.append(p)
    return out
