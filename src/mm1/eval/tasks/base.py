"""What a task is: a metric, a train split for demonstrations and a test split of queries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class VQAItem:
    """A VQA query: an image, a question and its accepted answers."""
    image: str
    question: str
    answers: tuple[str, ...]


@dataclass
class Task:
    """An evaluation task: its metric, demonstration items, query items (or a text file for perplexity)."""
    name: str
    metric: Metric
    # demonstrations are drawn from `train`, never from the query set
    train: list[CaptionItem | VQAItem] = field(default_factory=list)
    test: list[CaptionItem | VQAItem] = field(default_factory=list)
    text_path: str = ""  # perplexity tasks only
