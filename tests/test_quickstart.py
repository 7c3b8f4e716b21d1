"""The main job end to end, shrunk: every stage runs and the report, results and plots are written."""

from __future__ import annotations

import json

from mm1.quickstart import learned_summary, run_quickstart

SMALL = ["data.synth.captions=300", "data.synth.interleaved=60", "data.synth.text=60", "data.synth.sft=80",
         "data.synth.sft_text=40",
         "data.synth.eval_scenes=10", "data.synth.image_size=64", "train.steps=4", "train.batch_size=4",
         "data.packing.seq_len=128", "data.packing.max_images=4", "data.num_workers=0", "eval.limit=4",
         "eval.shots=0,1", "eval.max_new_tokens=4", "train.logging.progress=false", "train.logging.every=1",
         "train.logging.tensorboard=false"]


def test_quickstart_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "qs"
    final = run_quickstart(out=out, overrides=SMALL, clip_overrides=("train.steps=3", "train.batch_size=8"),
                           lm_overrides=("train.steps=3",), sft_overrides=("train.steps=3",))
    for name in ("report.md", "results.json", "loss_per_source.png", "scores_vs_shots.png", "clip/vision.safetensors",
                 "pretrain/config.json", "sft/metrics.jsonl", "eval_sft/results.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(final))
    vqa = saved["tasks"]["synth_vqa"]
    assert vqa["metric"] == "vqa_accuracy" and set(vqa["scores"]) == {"0", "1"} and "baseline" in vqa
    assert set(saved["stages"]) == {"pretrain", "sft", "sft_one_view"}
    stages = saved["stages"]
    assert (stages["pretrain"]["prompt"], stages["sft"]["prompt"]) == ("pretrain", "chat")
    assert set(stages["sft_one_view"]["tasks"]) == {"synth_words"}
    assert set(stages["sft_one_view"]["tasks"]["synth_words"]["scores"]) == {"0"}
    rows = [json.loads(x) for x in (out / "eval_sft" / "predictions.jsonl").read_text().splitlines()]
    query = next(r for r in rows if r["task"] == "synth_vqa" and r["shots"] == 1)["prompt"]
    assert query.count("<image:low>") == 1 and query.count("<image>") == 1  # mixed resolution
    report = (out / "report.md").read_text()
    assert "| synth_caption | cider |" in report and "loss_per_source.png" in report
    sft_cfg = json.loads((out / "sft" / "config.json").read_text())
    assert sft_cfg["train"]["stage"] == "sft" and sft_cfg["model"]["vision"]["init"].endswith("clip")
    # MM1's order: the multimodal stages start from the text-only LM stage's decoder
    assert (out / "lm" / "decoder" / "config.json").exists()
    for stage in ("pretrain", "sft"):
        assert json.loads((out / stage / "config.json").read_text())["model"]["decoder"]["init"] == str(out / "lm")
    lm_steps = [json.loads(x)["step"] for x in (out / "lm" / "metrics.jsonl").read_text().splitlines()]
    # a second run reuses every finished stage
    again = run_quickstart(out=out, overrides=SMALL, clip_overrides=("train.steps=3", "train.batch_size=8"),
                           lm_overrides=("train.steps=3",), sft_overrides=("train.steps=3",))
    assert again["stages"]["sft"] == final["stages"]["sft"]
    assert [json.loads(x)["step"] for x in (out / "lm" / "metrics.jsonl").read_text().splitlines()] == lm_steps


def test_the_summary_never_calls_a_score_at_or_below_the_baseline_learned():
    def res(score, base):
        return {"prompt": "pretrain", "tasks": {"t": {"metric": "cider", "baseline": base, "scores": {"0": score}}}}

    assert learned_summary({"pretrain": res(0.9, 0.3)})[0] == "t: best 0.900 (0-shot, pretrain) vs baseline 0.300: " \
        "3.0× the baseline"
    assert learned_summary({"pretrain": res(0.05, 0.035)})[0].endswith("+0.015 over the baseline")
    below = learned_summary({"pretrain": res(0.010, 0.035)})[0]
    assert below.endswith("not above the baseline") and "learned" not in below.lower()
