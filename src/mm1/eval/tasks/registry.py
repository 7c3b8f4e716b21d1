"""Resolving a task name to a `Task`, reading its files with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.coco import read_caption_jsonl, read_coco_captions
from mm1.data.sources import shared_data_dir
from mm1.eval.tasks.base import CaptionItem, Metric, Task, VQAItem

SYNTH_TASKS = ("synth_caption", "synth_vqa", "synth_words")


def read_items(path: Path) -> tuple[Metric, list]:
    """A task file: JSONL rows of `{"image", "captions"}` or `{"image", "question", "answers"}`.

    Image paths are relative to the file's folder. The metric follows from the fields.
    """
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    items, metric = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = str(path.parent / row["image"])
            if "question" in row:
                answers = row.get("answers") or [row["answer"]]
                item, kind = VQAItem(image, str(row["question"]), tuple(str(a) for a in answers)), Metric.VQA_ACCURACY
            else:
                caps = row.get("captions") or [row["caption"]]
                item, kind = CaptionItem(image, tuple(str(c) for c in caps)), Metric.CIDER
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RecordError(f"{path}:line{n}", "a task row needs 'image' and 'captions' (or 'caption'), or "
                              "'image', 'question' and 'answers'", f"{type(err).__name__}: {err}") from None
        if metric not in (None, kind):
            raise RecordError(f"{path}:line{n}", "captioning and VQA rows mixed in one task file")
        metric = kind
        items.append(item)
    if metric is None:
        raise RecordError(str(path), "task file has no rows")
    return metric, items


def _synth(name: str, world: Path) -> Task:
    folder = world / "tasks" / name
    metric, test = read_items(folder / "test.jsonl")
    _, train = read_items(folder / "train.jsonl")
    return Task(name, metric, train, test)


def _coco(shared: Path) -> Task:
    root = shared / "coco_mini"
    if not root.exists():
        raise FileNotFoundError(f"COCO-mini not found at {root} (needs ../shared/data beside the checkout)")
    ann = root / "annotations"
    to_items = lambda xs: [CaptionItem(x.image, x.captions) for x in xs]  # noqa: E731
    return Task("coco_val2017", Metric.CIDER,
                to_items(read_coco_captions(ann / "captions_train2017.json", root / "train2017")),
                to_items(read_coco_captions(ann / "captions_val2017_full5000.json", root / "val2017")))


def _custom(path: Path) -> Task:
    metric, test = read_items(path)
    train_path = path.with_name(path.name.replace(".jsonl", ".train.jsonl"))
    train = read_items(train_path)[1] if train_path.exists() and train_path != path else []
    return Task(path.stem, metric, train, test)


def get_task(spec: str, *, world: Path | None = None, shared: Path | None = None) -> Task:
    if spec in SYNTH_TASKS:
        if world is None:
            raise ValueError(f"task {spec} needs the synthetic world's directory")
        return _synth(spec, world)
    if spec == "coco_val2017":
        return _coco(shared or shared_data_dir())
    if spec.startswith("ppl:"):
        path = Path(spec[4:])
        if not path.exists():
            raise FileNotFoundError(f"perplexity text {path} does not exist")
        return Task(f"ppl:{path.name}", Metric.PERPLEXITY, text_path=str(path))
    if spec.startswith("custom:"):
        return _custom(Path(spec[7:]))
    if spec.endswith(".jsonl"):
        return _custom(Path(spec))
    raise ValueError(f"unknown task '{spec}': use one of {', '.join(SYNTH_TASKS)}, coco_val2017, "
                     "custom:PATH.jsonl or ppl:PATH")


__all__ = ["get_task", "read_caption_jsonl", "read_items"]
