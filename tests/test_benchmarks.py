"""MM1's benchmarks from their official files: small fixtures written in each official schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mm1.eval.tasks import Metric, get_task
from mm1.eval.tasks.benchmarks import write_submission


def _image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path.name


def _vqa(root: Path, split: str, *, v2: bool) -> None:
    ids = [(1, 10), (2, 20)] if split == "val" else [(3, 30)]
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": f"{split}2014",
          "questions": [{"image_id": img, "question": f"what colour {qid}?", "question_id": qid} for img, qid in ids]}
    anns = {"info": {}, "license": {}, "data_subtype": f"{split}2014", "data_type": "mscoco", "annotations": [
        {"question_id": qid, "image_id": img, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
        for img, qid in ids]}
    prefix = "v2_" if v2 else ""
    (root / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps(qs))
    (root / f"{prefix}mscoco_{split}2014_annotations.json").write_text(json.dumps(anns))
    for img, _ in ids:
        _image(root / f"{split}2014" / f"COCO_{split}2014_{img:012d}.jpg")


def test_vqav2_and_okvqa_read_questions_annotations_and_coco_2014_images(tmp_path):
    for name, v2 in (("vqav2", True), ("okvqa", False)):
        root = tmp_path / name
        root.mkdir()
        _vqa(root, "val", v2=v2)
        _vqa(root, "train", v2=v2)
        task = get_task(f"{name}:{root}")
        assert task.metric == Metric.VQA_ACCURACY and len(task.test) == 2 and len(task.train) == 1
        item = task.test[0]
        assert item.id == 10 and item.answers == ("red",) * 10 and item.kind == "other"
        assert Path(item.image).name == "COCO_val2014_000000000001.jpg" and Path(item.image).exists()


def test_vizwiz_textvqa_coco_nocaps_textcaps(tmp_path):
    root = tmp_path / "vizwiz"
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "val.json").write_text(json.dumps([
        {"image": _image(root / "val" / "VizWiz_val_00000000.jpg"), "question": "what is this?",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10, "answer_type": "unanswerable",
         "answerable": 0}]))
    viz = get_task(f"vizwiz:{root}")
    assert viz.test[0].id == "VizWiz_val_00000000.jpg" and viz.train == [] and Path(viz.test[0].image).exists()

    root = tmp_path / "textvqa"
    root.mkdir()
    _image(root / "train_images" / "0054c91397f2fe05.jpg")
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
            {"question": "what brand?", "question_id": 34602, "image_id": "0054c91397f2fe05",
             "answers": ["nokia"] * 10, "image_classes": [], "flickr_original_url": "", "flickr_300k_url": "",
             "image_width": 8, "image_height": 8, "question_tokens": ["what", "brand"], "set_name": "val"}]}))
    tv = get_task(f"textvqa:{root}")
    assert tv.test[0].id == 34602 and tv.test[0].answers == ("nokia",) * 10 and Path(tv.test[0].image).exists()

    for name, ann, images in (("coco", "annotations/captions_val2017.json", "val2017"),
                              ("nocaps", "nocaps_val_4500_captions.json", "validation")):
        root = tmp_path / name
        (root / ann).parent.mkdir(parents=True, exist_ok=True)
        (root / ann).write_text(json.dumps({
            "images": [{"id": 7, "file_name": _image(root / images / "0007.jpg"), "domain": "in-domain"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "a red square."},
                            {"image_id": 7, "id": 2, "caption": "red."}]}))
        task = get_task(f"{name}:{root}")
        assert task.metric == Metric.CIDER and task.test[0].id == 7
        assert task.test[0].captions == ("a red square.", "red.")

    root = tmp_path / "textcaps"
    root.mkdir()
    _image(root / "train_images" / "abc.jpg")
    refs = ["a sign that says stop", "a stop sign"]
    (root / "TextCaps_0.1_val.json").write_text(json.dumps({"dataset_type": "val", "dataset_name": "textcaps", "data": [
        {"image_id": "abc", "image_path": "train/abc.jpg", "caption_str": c, "reference_strs": refs, "caption_id": i}
        for i, c in enumerate(refs)]}))
    tc = get_task(f"textcaps:{root}")
    assert len(tc.test) == 1 and tc.test[0].captions == tuple(refs) and tc.test[0].id == "abc"


def test_missing_and_malformed_benchmark_files_say_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vqav2: no items in .*v2_OpenEnded_mscoco_val2014_questions.json"):
        get_task(f"vqav2:{tmp_path}")
    (tmp_path / "TextVQA_0.5.1_val.json").write_text('{"data": [{"question": "q"}]}')
    with pytest.raises(Exception, match=r"TextVQA_0.5.1_val.json: not a TextVQA file \(KeyError"):
        get_task(f"textvqa:{tmp_path}")


def test_submissions_are_written_in_the_official_result_formats(tmp_path):
    root = tmp_path / "vqav2"
    root.mkdir()
    _vqa(root, "val", v2=True)
    task = get_task(f"vqav2:{root}")
    rows = [{"index": 0, "prediction": "red"}, {"index": 1, "prediction": "blue"}]
    path = write_submission(task, rows, tmp_path / "out" / "vqa.json")
    assert json.loads(path.read_text()) == [{"question_id": 10, "answer": "red"}, {"question_id": 20, "answer": "blue"}]
    from mm1.eval.tasks import CaptionItem, Task

    caps = Task("coco", Metric.CIDER, test=[CaptionItem("x.jpg", ("a",), id=7)])
    path = write_submission(caps, [{"index": 0, "prediction": "a dog"}], tmp_path / "cap.json")
    assert json.loads(path.read_text()) == [{"image_id": 7, "caption": "a dog"}]
    assert write_submission(Task("mine", Metric.CIDER, test=[CaptionItem("x.jpg", ("a",))]), [], tmp_path / "n") is None
