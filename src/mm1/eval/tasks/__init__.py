"""Evaluation tasks: the synthetic world's splits, COCO-mini, user files and perplexity.

`get_task("synth_vqa", world=...)`, `get_task("coco_val2017")`, `get_task("custom:PATH")` and
`get_task("ppl:PATH")` all return a `Task`; see docs/evaluation.md for the custom file format.
"""

from mm1.eval.tasks.base import CaptionItem, Metric, Task, VQAItem
from mm1.eval.tasks.registry import get_task

__all__ = ["CaptionItem", "Metric", "Task", "VQAItem", "get_task"]
