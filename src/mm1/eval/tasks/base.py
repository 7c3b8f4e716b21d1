"""What a task is: a metric, its prompts, a train split for demonstrations and a test split of queries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mm1.data.template import CAPTION_PROMPT, SHORT_ANSWER


class Metric(str, enum.Enum):
    """How a task is scored."""
    CIDER = "cider"
    VQA_ACCURACY = "vqa_accuracy"
    PERPLEXITY = "perplexity"


@dataclass(frozen=True)
class CaptionItem:
    """A captioning query: an image and its reference captions."""
    image: str
    captions: tuple[str, ...]
    id: int | str | None = None  # the benchmark's own image id, for its submission format


@dataclass(frozen=True)
class VQAItem:
    """A VQA query: an image, a question and its accepted answers."""
    image: str
    question: str
    answers: tuple[str, ...]
    kind: str = ""  # the question's type ("colour", "count", VQAv2's answer_type …): scores are also given per type
    id: int | str | None = None  # the benchmark's own question id, for its submission format
    choices: tuple[str, ...] = ()  # where given, the answer is the choice the model finds most likely


@dataclass(frozen=True)
class PromptSpec:
    """How a task asks, per prompt format: part of the task's definition, recorded with every score.

    `chat` is the user turn (after the image) and `pretrain` the line after the image, each with
    `{question}` where a VQA item's question goes (a captioning prompt has none). A demonstration in
    the pretrain format is that line followed by ` ANSWER` and a newline; in the chat format it is an
    earlier user turn answered by the assistant.
    """

    chat: str
    pretrain: str

    def ask(self, fmt: str, question: str | None) -> str:
        template = self.chat if fmt == "chat" else self.pretrain
        return template if question is None else template.replace("{question}", question)

    def check(self, *, vqa: bool, where: str) -> None:
        """A VQA prompt must place the question; a captioning prompt has none to place."""
        for fmt, template in (("chat", self.chat), ("pretrain", self.pretrain)):
            if vqa != ("{question}" in template):
                need = "needs '{question}'" if vqa else "has no question to place: drop '{question}'"
                raise ValueError(f"{where}: the {fmt} prompt {template!r} {need}")


# Built-in tasks keep LLaVA-1.5's chat prompts (lmms-eval's post_prompt for VQAv2/TextVQA), which the
# synthetic world's SFT conversations use too, and MM1's pre-training formats.
VQA_PROMPTS = PromptSpec(chat="{question}\n" + SHORT_ANSWER, pretrain="Question: {question} Short answer:")
CAPTION_PROMPTS = PromptSpec(chat=CAPTION_PROMPT, pretrain="Output:")
# A user's own VQA data is asked as it was written: no sentence the data never had.
CUSTOM_VQA_PROMPTS = PromptSpec(chat="{question}", pretrain=VQA_PROMPTS.pretrain)


def references(item: CaptionItem | VQAItem) -> tuple[str, ...]:
    """What an item accepts: its reference captions, or its VQA answers (the first is a demonstration's)."""
    return item.captions if isinstance(item, CaptionItem) else item.answers


@dataclass
class Task:
    """An evaluation task: its metric, prompts, demonstration items, query items (or a text file for
    perplexity)."""
    name: str
    metric: Metric
    # demonstrations are drawn from `train`, never from the query set
    train: list[CaptionItem | VQAItem] = field(default_factory=list)
    test: list[CaptionItem | VQAItem] = field(default_factory=list)
    text_path: str = ""  # perplexity tasks only
    prompts: PromptSpec | None = None  # None: the default of its metric (VQA_PROMPTS or CAPTION_PROMPTS)

    @property
    def ranks_choices(self) -> bool:
        """Whether the task is answered by ranking each item's choices (every query has them) instead of
        by generating: a closed-set reading of what the model knows, free of answer-format failures."""
        return bool(self.test) and all(isinstance(it, VQAItem) and it.choices for it in self.test)

    @property
    def prompt_spec(self) -> PromptSpec:
        if self.prompts is not None:
            return self.prompts
        return VQA_PROMPTS if self.metric == Metric.VQA_ACCURACY else CAPTION_PROMPTS
