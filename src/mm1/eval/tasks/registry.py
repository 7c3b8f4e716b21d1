"""Resolving a task name to a `Task`, reading its files with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.coco import read_caption_jsonl, read_coco_captions
from mm1.data.sources import shared_data_dir
from mm1.eval.tasks.base import CAPTION_PROMPTS, CUSTOM_VQA_PROMPTS, CaptionItem, Metric, PromptSpec, Task, VQAItem
from mm1.eval.tasks.benchmarks import BENCHMARKS, benchmark_task

SYNTH_TASKS = ("synth_caption", "synth_vqa", "synth_words", "synth_stripes")


def read_items(path: Path) -> tuple[Metric, list]:
    """A task file: JSONL rows of `{"image", "captions"}` or `{"image", "question", "answers"}` (and an
    optional `"type"` of the question, by which scores are also broken down, and optional `"choices"`:
    then the answer is the choice the model finds most likely, not generated text).

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
                choices = tuple(str(c) for c in row.get("choices") or ())
                item = VQAItem(image, str(row["question"]), tuple(str(a) for a in answers), str(row.get("type", "")),
                               choices=choices)
                kind = Metric.VQA_ACCURACY
                if choices and item.answers[0] not in choices:
                    raise RecordError(f"{path}:line{n}", f"the answer {item.answers[0]!r} is not among its choices "
                                      f"{list(choices)}")
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


def read_prompts(path: Path, default: PromptSpec, *, vqa: bool) -> PromptSpec:
    """A custom task's prompts from its sidecar `NAME.prompts.json` (`{"chat": …, "pretrain": …}`, either
    key optional), else `default`."""
    if not path.exists():
        return default
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or set(data) - {"chat", "pretrain"} or not all(
                isinstance(v, str) for v in data.values()):
            raise ValueError("expected an object with string fields 'chat' and/or 'pretrain'")
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise RecordError(str(path), "a prompts file is {\"chat\": \"…{question}…\", \"pretrain\": \"…\"}",
                          str(err)) from None
    spec = PromptSpec(chat=data.get("chat", default.chat), pretrain=data.get("pretrain", default.pretrain))
    try:
        spec.check(vqa=vqa, where=str(path))
    except ValueError as err:
        raise RecordError(str(path), str(err)) from None
    return spec


def _custom(path: Path) -> Task:
    metric, test = read_items(path)
    train_path = path.with_name(path.name.replace(".jsonl", ".train.jsonl"))
    train = read_items(train_path)[1] if train_path.exists() and train_path != path else []
    vqa = metric == Metric.VQA_ACCURACY
    prompts = read_prompts(path.with_name(path.name.replace(".jsonl", ".prompts.json")),
                           CUSTOM_VQA_PROMPTS if vqa else CAPTION_PROMPTS, vqa=vqa)
    return Task(path.stem, metric, train, test, prompts=prompts)


def get_task(spec: str, *, world: Path | None = None, shared: Path | None = None) -> Task:
    name, _, root = spec.partition(":")
    if name in BENCHMARKS and root:
        return benchmark_task(name, Path(root))
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
                     f"custom:PATH.jsonl, ppl:PATH or a benchmark folder ({', '.join(f'{b}:DIR' for b in BENCHMARKS)})")


__all__ = ["get_task", "read_caption_jsonl", "read_items"]
