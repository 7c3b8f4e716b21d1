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
    assert set(stages["sft_one_view"]["tasks"]) == {"synth_stripes"}
    assert set(stages["sft_one_view"]["tasks"]["synth_stripes"]["scores"]) == {"0"}
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
    _sft_model_exports_to_transformers(out, tmp_path)
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
    vqa = res(0.31, 0.09)
    vqa["tasks"]["t"]["question_only_baseline"] = 0.28  # VQA: the question's form alone earns most of it
    assert learned_summary({"pretrain": vqa})[0].endswith("3.4× the baseline; question only 0.280: +0.030 over it")
    vqa["tasks"]["t"]["question_only_baseline"] = 0.33
    assert learned_summary({"pretrain": vqa})[0].endswith("not above it (answered from the question alone)")


def _sft_model_exports_to_transformers(out, tmp_path) -> None:
    """The quickstart's SFT model (sub-images, mm1's chat template) through `mm1 export --hf`: transformers,
    with mm1 off its path, prepares mm1's ids for a chat turn with an image and generates mm1's tokens."""
    import pytest

    pytest.importorskip("transformers")
    import torch
    from PIL import Image

    from hf_loader import mm1_prompt, run_transformers
    from mm1.cli import main
    from mm1.config import InferenceSettings
    from mm1.serve.engine import Engine, GenerationConfig
    from mm1.store.loading import load_model

    assert main(["export", "--hf", "--checkpoint", str(out / "sft"), "--out", str(tmp_path / "hf")]) == 0
    image = sorted((out / "world" / "tasks" / "synth_vqa" / "images").glob("*.png"))[0]
    question = "What color is the big shape?"
    hf = run_transformers([{"name": "sft", "folder": str(tmp_path / "hf"), "images": [str(image)],
                            "text": question, "chat": True}], tmp_path)["sft"]
    model, tok, cfg = load_model(out / "sft")
    assert InferenceSettings.of(cfg).sub_image_grid == 2
    prompt = mm1_prompt(question, [Image.open(image).convert("RGB")], chat=True, tok=tok)
    engine = Engine(model, tok, sub_image_grid=2)
    encoded = engine.encode(prompt)
    assert hf["prompt"].tolist() == encoded.ids and hf["tokens_per_image"] == 5 * cfg.model.connector.num_tokens
    with torch.no_grad():
        logits = model(tokens_BT=torch.tensor([encoded.ids]), images_NCHW=torch.stack(encoded.images),
                       return_logits=True).logits_BTV[0]
    assert (logits - hf["logits"]).abs().max() <= 1e-4
    ids = engine.generate_ids([prompt], GenerationConfig(max_new_tokens=12))[0]
    assert hf["ids"].tolist()[: len(ids)] == ids


def test_the_fine_tuned_model_is_not_evaluated_past_its_context():
    """Its 8-shot chat prompts are all longer than the 384 positions it was trained on: it is evaluated at
    0 and 4 shots, the pre-trained model at every count, the one-view arm at 0."""
    from mm1.quickstart import ARMS

    arms = {arm.name: arm for arm in ARMS}
    assert arms["pretrain"].shots_of([0, 4, 8]) == [0, 4, 8]
    assert arms["sft"].shots_of([0, 4, 8]) == [0, 4]
    assert arms["sft_one_view"].shots_of([0, 4, 8]) == [0]
    assert arms["sft"].shots_of([8]) == [8]  # nothing allowed: the first count asked, not nothing
