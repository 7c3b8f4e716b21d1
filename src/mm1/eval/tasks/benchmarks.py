"""MM1's benchmarks read from their official files, as distributed (nothing is downloaded).

`get_task("vqav2:ROOT")` reads the folder the way the benchmark ships it; the layouts below name the
files. The test split is the official validation split; demonstrations (MM1's few-shot protocol)
come from the official training split when its files are in ROOT too, otherwise from the other
validation items (NoCaps has no training split). Each item keeps its official id, so predictions can
be written in the evaluation servers' submission formats (`write_submission`).

| name | files in ROOT (val; train likewise) | images |
|---|---|---|
| `vqav2` | `v2_OpenEnded_mscoco_val2014_questions.json`, `v2_mscoco_val2014_annotations.json` | `val2014/` |
| `okvqa` | `OpenEnded_mscoco_val2014_questions.json`, `mscoco_val2014_annotations.json` | `val2014/` |
| `vizwiz` | `Annotations/val.json` | `val/` |
| `textvqa` | `TextVQA_0.5.1_val.json` | `train_images/<image_id>.jpg` (val uses train images) |
| `coco` | `annotations/captions_val2017.json` (COCO caption format) | `val2017/` |
| `nocaps` | `nocaps_val_4500_captions.json` (COCO caption format) | `validation/` |
| `textcaps` | `TextCaps_0.1_val.json` (TextVQA-like, not COCO format) | `train_images/<image_id>.jpg` |

VQAv2 and OK-VQA images are COCO 2014's, named `COCO_val2014_%012d.jpg`. VQA sets are scored with
the official accuracy (VizWiz and TextVQA use the same formula), captioning sets with CIDEr-D.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.coco import read_coco_captions
from mm1.eval.tasks.base import CaptionItem, Metric, Task, VQAItem

Items = list[CaptionItem] | list[VQAItem]


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RecordError(str(path), "cannot read this benchmark file", f"{type(err).__name__}: {err}") from None


def _bad(path: Path, what: str, err: Exception) -> RecordError:
    return RecordError(str(path), f"not {what}", f"{type(err).__name__}: {err}")


def read_vqa(questions: Path, annotations: Path, images: Path, split: str) -> list[VQAItem]:
    """VQAv2 / OK-VQA: a questions file and an annotations file (10 answers each), COCO 2014 images."""
    qs, anns = _load(questions), _load(annotations)
    try:
        by_id = {a["question_id"]: a for a in anns["annotations"]}  # type: ignore[index]
        items = []
        for q in qs["questions"]:  # type: ignore[index]
            a = by_id[q["question_id"]]
            items.append(VQAItem(str(images / f"COCO_{split}2014_{q['image_id']:012d}.jpg"), str(q["question"]),
                                 tuple(str(x["answer"]) for x in a["answers"]), str(a.get("answer_type", "")),
                                 id=q["question_id"]))
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(questions, "a VQA questions file with its annotations", err) from None
    return items


def read_vizwiz(path: Path, images: Path) -> list[VQAItem]:
    data = _load(path)
    try:
        return [VQAItem(str(images / r["image"]), str(r["question"]), tuple(str(a["answer"]) for a in r["answers"]),
                        str(r.get("answer_type", "")), id=r["image"]) for r in data]  # type: ignore[union-attr]
    except (KeyError, TypeError) as err:
        raise _bad(path, "a VizWiz annotations file", err) from None


def read_textvqa(path: Path, images: Path) -> list[VQAItem]:
    data = _load(path)
    try:
        return [VQAItem(str(images / f"{r['image_id']}.jpg"), str(r["question"]), tuple(str(a) for a in r["answers"]),
                        id=r["question_id"]) for r in data["data"]]  # type: ignore[index]
    except (KeyError, TypeError) as err:
        raise _bad(path, "a TextVQA file", err) from None


def read_coco(path: Path, images: Path) -> list[CaptionItem]:
    return [CaptionItem(c.image, c.captions, id=int(c.key)) for c in read_coco_captions(path, images)]


def read_textcaps(path: Path, images: Path) -> list[CaptionItem]:
    """TextCaps: one row per caption, each with every reference of its image (`reference_strs`)."""
    data = _load(path)
    try:
        seen: dict[str, CaptionItem] = {}
        for r in data["data"]:  # type: ignore[index]
            if r["image_id"] not in seen:
                refs = r.get("reference_strs") or [r["caption_str"]]
                seen[r["image_id"]] = CaptionItem(str(images / f"{r['image_id']}.jpg"), tuple(map(str, refs)),
                                                  id=r["image_id"])
    except (KeyError, TypeError) as err:
        raise _bad(path, "a TextCaps file", err) from None
    return list(seen.values())


def _vqa_split(prefix: str) -> Callable[[Path, str], tuple[Path, Items]]:
    q = "v2_OpenEnded_mscoco_{s}2014_questions.json" if prefix else "OpenEnded_mscoco_{s}2014_questions.json"
    a = "v2_mscoco_{s}2014_annotations.json" if prefix else "mscoco_{s}2014_annotations.json"

    def read(root: Path, split: str) -> tuple[Path, Items]:
        first = root / q.format(s=split)
        return first, (read_vqa(first, root / a.format(s=split), root / f"{split}2014", split)
                       if first.exists() else [])
    return read


def _single(file: str, images: str, reader: Callable[[Path, Path], Items]) -> Callable[[Path, str], tuple[Path, Items]]:
    def read(root: Path, split: str) -> tuple[Path, Items]:
        path = root / file.format(s=split)
        return path, (reader(path, root / images.format(s=split)) if path.exists() else [])
    return read


# name → (metric, reader of one split, its validation and training split names)
BENCHMARKS: dict[str, tuple[Metric, Callable[[Path, str], tuple[Path, Items]], str, str]] = {
    "vqav2": (Metric.VQA_ACCURACY, _vqa_split("v2"), "val", "train"),
    "okvqa": (Metric.VQA_ACCURACY, _vqa_split(""), "val", "train"),
    "vizwiz": (Metric.VQA_ACCURACY, _single("Annotations/{s}.json", "{s}", read_vizwiz), "val", "train"),
    "textvqa": (Metric.VQA_ACCURACY, _single("TextVQA_0.5.1_{s}.json", "train_images", read_textvqa), "val", "train"),
    "coco": (Metric.CIDER, _single("annotations/captions_{s}2017.json", "{s}2017", read_coco), "val", "train"),
    "nocaps": (Metric.CIDER, _single("nocaps_{s}_4500_captions.json", "validation", read_coco), "val", "train"),
    "textcaps": (Metric.CIDER, _single("TextCaps_0.1_{s}.json", "train_images", read_textcaps), "val", "train"),
}


def benchmark_task(name: str, root: Path) -> Task:
    """The benchmark `name` read from `root` (its official layout; see the module docstring)."""
    metric, read, test_split, train_split = BENCHMARKS[name]
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: {root} is not a folder (the benchmark's files as distributed)")
    where, test = read(root, test_split)
    if not test:
        raise FileNotFoundError(f"{name}: no items in {where} (expected the official {test_split} files in {root})")
    _, train = read(root, train_split)
    return Task(name, metric, list(train), list(test))


def write_submission(task: Task, predictions: list[dict], path: Path) -> Path | None:
    """The predictions of one shot count in the official result format: VQA `[{"question_id", "answer"}]`,
    captioning `[{"image_id", "caption"}]`; None when the task's items carry no official ids."""
    items = task.test
    if not items or items[0].id is None:
        return None
    if task.metric == Metric.VQA_ACCURACY:
        key = "image" if task.name == "vizwiz" else "question_id"  # VizWiz identifies a question by its image
        rows = [{key: items[r["index"]].id, "answer": r["prediction"]} for r in predictions]
    else:
        rows = [{"image_id": items[r["index"]].id, "caption": r["prediction"]} for r in predictions]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows) + "\n")
    return path
