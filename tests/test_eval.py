"""Evaluation: CIDEr-D against pycocoevalcap, VQA normalisation, prompts, baselines, results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm1.eval.fewshot import build_prompt, demonstrations, is_image
from mm1.eval.harness import baseline, evaluate, results_table
from mm1.eval.metrics import cider_d, coco_tokenize, normalize_answer, vqa_accuracy
from mm1.eval.tasks import Metric, get_task

CANDIDATES = ["a man riding a horse on a beach", "two dogs play in the snow", "a plate of food with broccoli",
              "a red bus parked on the street", "a cat sitting on a laptop keyboard"]
REFERENCES = [
    ["a man rides a horse along the beach", "person on horseback at the seashore", "a horse and rider on sand"],
    ["two dogs playing in snow", "a pair of dogs running through the snow", "dogs play outside in winter"],
    ["a plate with broccoli and rice", "food on a white plate including broccoli", "a meal of chicken and broccoli"],
    ["a red double decker bus on a city street", "a bus parked by the curb", "red bus waiting on the road"],
    ["a cat lying on a keyboard", "a kitten sits on a laptop", "cat on top of a computer keyboard"],
]


def test_cider_matches_pycocoevalcap():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    gts = {i: [coco_tokenize(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [coco_tokenize(c)] for i, c in enumerate(CANDIDATES)}
    theirs, their_each = Cider().compute_score(gts, res)
    ours, our_each = cider_d(CANDIDATES, REFERENCES)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert our_each == pytest.approx(list(their_each), rel=1e-9)


def test_cider_on_coco_captions(shared):
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    rows = [json.loads(x) for x in (shared / "coco_mini" / "captions_all.jsonl").read_text().splitlines()][:40]
    cands = [r["captions"][0] for r in rows]
    refs = [r["captions"][1:] for r in rows]
    theirs, _ = Cider().compute_score({i: [coco_tokenize(x) for x in r] for i, r in enumerate(refs)},
                                      {i: [coco_tokenize(c)] for i, c in enumerate(cands)})
    assert cider_d(cands, refs)[0] == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize(("raw", "norm"), [
    ("Two", "2"), ("the Red.", "red"), ("yes!", "yes"), ("a dog", "dog"), ("dont", "don't"),
    ("whats that", "what's that"), ("youre right", "you're right"), ("shouldnt've", "shouldn't've"),
    ("Im here", "im here"),  # the official table's capitalised keys never match: kept as the tool has them
    ("top-left", "top left"), ("top -left", "top left"), ("3.5", "3.5"), ("1,000 dollars!", "1000 dollars"),
    ("  ten\tcats\n", "10 cats")])
def test_vqa_official_answer_processing(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_averages_leave_one_out_subsets():
    # Hand-computed, 10 annotators: leaving out a non-matching one leaves m matches, a matching one m-1.
    def ten(m):
        return ["red"] * m + ["blue"] * (10 - m)

    assert vqa_accuracy("red", ten(3)) == pytest.approx(0.9)  # (7·1 + 3·2/3) / 10, not 1.0
    assert vqa_accuracy("red", ten(2)) == pytest.approx(0.6)  # (8·2/3 + 2·1/3) / 10
    assert vqa_accuracy("red", ten(1)) == pytest.approx(0.3)  # (9·1/3 + 1·0) / 10
    assert vqa_accuracy("red", ten(4)) == pytest.approx(1.0)
    assert vqa_accuracy("The red.", ten(0)) == 0.0 and vqa_accuracy("Red!", ten(10)) == 1.0
    assert vqa_accuracy("the two", ["2"]) == 1.0 and vqa_accuracy("3", ["2"]) == 0.0  # one reference: exact


def test_prompts_follow_the_paper_format_and_never_use_the_query(world):
    task = get_task("synth_vqa", world=world)
    for i in range(10):
        assert task.test[i] not in demonstrations(task, i, 8, seed=0)
    four = build_prompt(task, 3, 4, seed=0)
    assert sum(map(is_image, four)) == 5
    texts = [p for p in four if isinstance(p, str)]
    assert texts[-1] == f"Question: {task.test[3].question} Short answer:"
    assert texts[0].startswith("Question: ") and " Short answer: " in texts[0]
    zero = build_prompt(task, 3, 0, seed=0)
    assert sum(map(is_image, zero)) == 1 and zero[0].count("Short answer:") == 2  # two text-only demos
    assert build_prompt(task, 3, 4, seed=0) == four  # reproducible
    cap = build_prompt(get_task("synth_caption", world=world), 0, 4, seed=0)
    assert cap[-1] == "Output:" and cap[1].startswith("Output: ")


def test_baselines(world):
    vqa = get_task("synth_vqa", world=world)
    assert 0 < baseline(vqa) < 0.5
    cap = get_task("synth_caption", world=world)
    assert baseline(cap) > 0


def test_custom_task_file_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = tmp_path / "mine.jsonl"
    good.write_text('{"image": "a.png", "question": "q?", "answers": ["x", "y"]}\n')
    task = get_task(f"custom:{good}")
    assert task.metric == Metric.VQA_ACCURACY and task.test[0].answers == ("x", "y")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"picture": "a.png"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:line1: a task row needs 'image'"):
        get_task(f"custom:{bad}")
    with pytest.raises(ValueError, match=r"unknown task 'nope'"):
        get_task("nope")


def test_harness_writes_results_in_the_documented_shape(world, tmp_path):
    from conftest import tiny_config
    from mm1.config import EvalConfig
    from mm1.data.stream import load_tokenizer
    from mm1.model.mllm import MLLM
    from mm1.train.trainer import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    model = MLLM(cfg.model).eval()
    text = tmp_path / "t.txt"
    text.write_text("a red circle and a blue square. " * 20)
    tasks = [get_task("synth_caption", world=world), get_task("synth_vqa", world=world), get_task(f"ppl:{text}")]
    res = evaluate(model, tok, tasks, [0, 2], EvalConfig(limit=4, max_new_tokens=4, batch_size=2), progress=False)
    assert set(res["tasks"]) == {"synth_caption", "synth_vqa", "ppl:t.txt"}
    assert set(res["tasks"]["synth_vqa"]["scores"]) == {"0", "2"}
    assert res["tasks"]["synth_caption"]["metric"] == "cider" and "baseline" in res["tasks"]["synth_vqa"]
    ppl = res["tasks"]["ppl:t.txt"]["scores"]["0"]
    assert 1 < ppl < 2 * cfg.model.decoder.vocab_size  # untrained: near uniform over the output vocabulary
    assert "| synth_vqa | vqa_accuracy |" in results_table(res)


def test_coco_task_from_shared(shared):
    task = get_task("coco_val2017", shared=shared)
    assert len(task.test) == 159 and len(task.train) == 80 and Path(task.test[0].image).exists()
