"""`mm1 ablate` and `mm1 sweep`: the statistics, the verdicts, arm reuse and the report, on a tiny setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mm1.ablate.findings import ARMS, FINDINGS, Claim, Finding, Metric, select
from mm1.ablate.runner import Scale, run_ablation
from mm1.ablate.stats import diff_interval, mean_interval, pooled_sd, spearman, t975, verdict
from mm1.ablate.sweep import best_log_lr, fit_line

TINY = Scale(seeds=2, steps=2, batch_size=2, clip_steps=2, eval_limit=2, lm_steps=2)
SMALL_WORLD = ("data.synth.captions=300", "data.synth.interleaved=60", "data.synth.text=60", "data.synth.sft=20",
               "data.synth.sft_text=10", "data.synth.eval_scenes=10", "data.synth.image_size=64",
               "data.packing.seq_len=320", "data.packing.max_images=4", "data.num_workers=0", "eval.max_new_tokens=3",
               "data.prepare.workers=1", "data.synth.junk=20")


def test_intervals_against_hand_computed_values():
    sd, df = pooled_sd([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]])
    assert df == 3 and sd == pytest.approx(math.sqrt((2 + 0 + 2) / 3))
    iv = mean_interval([1.0, 3.0], sd, df)
    assert iv.mean == 2.0 and iv.half == pytest.approx(3.182 * sd / math.sqrt(2))
    d = diff_interval([5.0, 7.0], [1.0, 3.0], sd, df)
    assert d.mean == 4.0 and d.half == pytest.approx(3.182 * sd * 1.0)
    assert t975(1) == 12.706 and t975(100) == 1.96 and math.isinf(t975(0))
    assert math.isinf(mean_interval([1.0], *pooled_sd([[1.0]])).half)  # one seed: no interval
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize(("a", "b", "outcome"), [
    ([10.0, 10.2], [5.0, 5.2], "reproduced"), ([5.0, 5.2], [10.0, 10.2], "not reproduced"),
    ([5.0, 9.0], [4.0, 8.0], "inconclusive")])
def test_ordered_claims(a, b, outcome):
    f = Finding("x", "a beats b", ("a", "b"), Metric("m"))
    sd, df = pooled_sd([a, b])
    assert verdict(f, {"a": a, "b": b}, sd, df).outcome == outcome


def test_a_claim_of_no_difference_needs_intervals_inside_the_margin():
    f = Finding("c", "no difference", ("ref", "x"), Metric("m"), Claim.EQUIVALENT, margin=0.2)
    close = {"ref": [1.0, 1.01], "x": [1.02, 1.03]}
    assert verdict(f, close, *pooled_sd(list(close.values()))).outcome == "reproduced"
    far = {"ref": [1.0, 1.01], "x": [2.0, 2.01]}
    assert verdict(f, far, *pooled_sd(list(far.values()))).outcome == "not reproduced"
    noisy = {"ref": [1.0, 1.5], "x": [1.1, 0.6]}
    assert verdict(f, noisy, *pooled_sd(list(noisy.values()))).outcome == "inconclusive"


def test_every_finding_of_the_issue_is_there_with_a_metric_fixed_in_advance():
    names = [f.name for f in FINDINGS]
    assert names == ["resolution", "image_tokens", "connector", "caption_zero_shot", "interleaved_few_shot",
                     "text_only", "moe", "quality"]
    assert "quality" not in {f.name for f in select(None, quick=True)[0]}  # full mode only
    _, arms = select(None, quick=True)
    assert {a.name for a in arms} == {"base", "res128", "vit_big", "tok4", "c_abstractor", "attn_pool",
                                     "cap100", "cap0", "text0", "moe"}
    quick_tokens = select(["image_tokens"], quick=True)[0][0]
    assert quick_tokens.arms == ("base", "tok4")  # 16 > 4 at the base context, where both fit
    assert "dense_eqtime" in {a.name for a in select(None, quick=False)[1]}  # beside MoE, in the full mode
    full, full_arms = select(["image_tokens"], quick=False)
    assert full[0].arms == ("tok64_long", "tok16_long")
    assert {a.name for a in full_arms} == set(full[0].arms)
    by_name = {f.name: f for f in FINDINGS}
    assert by_name["resolution"].metric.key == "synth_stripes@mean"  # a task that needs resolution
    assert by_name["text_only"].metric.key == "text_ppl_vs_lm"  # relative to the LM stage
    assert by_name["connector"].claim == Claim.EQUIVALENT and by_name["connector"].margin == 0.15
    assert by_name["moe"].beside == (("moe", "dense_eqtime"),)
    assert Scale.of(True) == Scale(2, 150, 8, 100, 100, 100) and Scale.of(False) == Scale(2, 400, 8, 100, 200, 200)
    with pytest.raises(ValueError, match="unknown finding"):
        select(["nope"], quick=True)


def test_sweep_fit_recovers_a_known_line():
    # losses with their minimum at ln lr = a ln N + b for a = -0.5, b = -1: the fit finds the line
    a, b = -0.5, -1.0
    best = []
    for n in (1e5, 1e6, 1e7):
        opt = a * math.log(n) + b
        pts = [(opt + d, (d - 0.1) ** 2) for d in (-1.4, -0.7, 0.0, 0.7, 1.4)]
        best.append(best_log_lr(pts))
    got_a, got_b = fit_line([math.log(n) for n in (1e5, 1e6, 1e7)], best)
    assert got_a == pytest.approx(a, abs=1e-6) and got_b == pytest.approx(b + 0.1, abs=1e-6)  # the parabola's 0.1
    assert best_log_lr([(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]) == 0.0  # at the grid's edge: the edge


def test_ablate_runs_arms_as_run_folders_reuses_them_and_reports(tmp_path):
    from mm1.ablate.report import write_report

    out = tmp_path / "abl"
    first: list[str] = []
    findings, scores, scale = run_ablation(out, quick=True, only=["text_only"], overrides=SMALL_WORLD, scale=TINY,
                                           log=first.append)
    assert sum(line.startswith("arm ") and " done: " in line for line in first) == 4  # each arm's end is told
    assert any(line.startswith("arm 4/4 done: ") for line in first)
    assert set(scores) == {"base", "text0"} and all(len(v) == 2 for v in scores.values())
    run = out / "arms" / "text0" / "seed_1"
    cfg = json.loads((run / "pretrain" / "config.json").read_text())
    assert cfg["data"]["sources"]["text"]["weight"] == 0 and cfg["train"]["seed"] == 1 and cfg["data"]["seed"] == 1
    assert cfg["model"]["vision"]["init"].endswith("seed_1")  # its own seed's CLIP encoder
    s = scores["text0"][0]
    assert cfg["model"]["decoder"]["init"] == str(out / "lm" / ARMS["text0"].decoder_key / "seed_1")  # its LM stage
    for key in ("synth_caption@0", "synth_caption@8", "synth_vqa@0", "synth_vqa@8", "synth_stripes@mean", "val_loss",
                "text_ppl", "text_ppl_vs_lm", "synth_vqa@gain", "train_s", "tokens_per_s"):
        assert key in s and math.isfinite(s[key]), key
    # its evaluation is kept as `mm1 eval` keeps it: the scores trace back to every prompt and answer
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["tasks"]["synth_caption"]["scores"]["0"] == pytest.approx(s["synth_caption@0"])
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {(r["task"], r["shots"]) for r in rows} == {(t, k) for t in ("synth_caption", "synth_vqa", "synth_stripes")
                                                       for k in (0, 8)}
    lm = out / "lm" / ARMS["base"].decoder_key / "seed_0"
    assert s["lm_text_ppl"] > 0 and json.loads((lm / "scores.json").read_text())["text_ppl"] > 0
    assert ARMS["text0"].decoder_key == ARMS["base"].decoder_key  # one LM stage for both arms of a seed
    # a second call reuses every finished arm and stage: nothing is trained again
    stamp = (run / "scores.json").stat().st_mtime_ns
    lm_stamp = (lm / "metrics.jsonl").stat().st_mtime_ns
    lines = []
    again = run_ablation(out, quick=True, only=["text_only"], overrides=SMALL_WORLD, scale=TINY, log=lines.append)
    assert (run / "scores.json").stat().st_mtime_ns == stamp and again[1] == scores
    assert any("(4 done)" in line for line in lines) and (lm / "metrics.jsonl").stat().st_mtime_ns == lm_stamp
    verdicts = write_report(out, findings, scores, scale, wall_s=60.0)
    report = (out / "report.md").read_text()
    assert verdicts["text_only"] in ("reproduced", "not reproduced", "inconclusive")
    assert "text-only data preserves text ability" in report and "95% interval" in report
    assert (out / "text_only.png").exists() and "val loss" in report
    # a call whose every job failed still writes its report, saying so
    (tmp_path / "none").mkdir()
    assert set(write_report(tmp_path / "none", findings, {}, scale, wall_s=1.0).values()) == {"not run"}
    # the same folder with other settings is refused, not mixed
    with pytest.raises(ValueError, match=r"other settings \(.*train.steps: 2 here, 3 asked"):
        run_ablation(out, quick=True, only=["text_only"], overrides=SMALL_WORLD,
                     scale=Scale(2, 3, 2, 2, 2, 2), log=lambda s: None)
    with pytest.raises(ValueError, match=r"other settings \(.*eval.max_new_tokens: 3 here, 4 asked"):  # an override
        run_ablation(out, quick=True, only=["text_only"], overrides=(*SMALL_WORLD, "eval.max_new_tokens=4"),
                     scale=TINY, log=lambda s: None)


def test_sweep_runs_a_grid_as_run_folders_and_fits_a_line(tmp_path):
    from mm1.ablate.sweep import FACTORS, Size, run_sweep

    out = tmp_path / "sweep"
    sizes = (Size(32, 1), Size(64, 2))
    fit = run_sweep(out, quick=True, overrides=SMALL_WORLD, scale=TINY, sizes=sizes, log=lambda s: None)
    assert math.isfinite(fit["a"]) and math.isfinite(fit["b"]) and set(fit["best"]) == {"32x1", "64x2"}
    lrs = {json.loads((out / "runs" / f"w64_d2_x{f}" / "scores.json").read_text())["lr"] for f in FACTORS}
    assert len(lrs) == len(FACTORS)  # each run trained at its own rate
    cfg = json.loads((out / "runs" / "w64_d2_x1.0" / "config.json").read_text())
    assert cfg["model"]["decoder"]["width"] == 64 and cfg["model"]["decoder"]["depth"] == 2
    report = (out / "sweep.md").read_text()
    assert "-0.4214" in report and "| 64×2 |" in report and (out / "sweep.png").exists()
    assert "—" not in report.split("| 64×2 |")[1].splitlines()[0]  # every rate of the grid has its loss


def test_a_worker_stops_when_its_ablate_process_is_killed(tmp_path):
    """`kill` reaches only the parent; its workers must not train on into the run folders."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, time\n"
        "from mm1.ablate.runner import job_setup\n"
        "def child(q):\n    job_setup(0)\n    import os\n    q.put(os.getpid())\n    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n    q = ctx.Queue()\n    ctx.Process(target=child, args=(q,)).start()\n"
        "    print(q.get(), flush=True)\n    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, 9)
    pytest.fail("the worker outlived its killed parent")


def test_a_perplexity_is_summarised_on_the_log_scale():
    """One arm's perplexity of thousands must not widen every other arm's interval (seen: ± 3052)."""
    from mm1.ablate.report import _cell

    scores = {"a": [{"text_ppl": 4.0, "val_loss": 1.0}, {"text_ppl": 9.0, "val_loss": 3.0}],
              "b": [{"text_ppl": 2000.0, "val_loss": 2.0}, {"text_ppl": 8000.0, "val_loss": 2.0}]}
    sd = math.sqrt((math.log(9 / 4) ** 2 + math.log(4) ** 2) / 4)  # pooled over a and b, 2 degrees of freedom
    factor = math.exp(4.303 * sd / math.sqrt(2))
    assert _cell(scores, "a", "text_ppl") == f"6.000 ×/÷ {factor:.2f}"  # the geometric mean of 4 and 9
    assert _cell(scores, "b", "text_ppl").startswith("4000.000 ×/÷ ")
    assert _cell(scores, "a", "val_loss") == f"2.000 ± {4.303 * 1.0 / math.sqrt(2):.3f}"  # pooled sd 1
    assert _cell(scores, "x", "val_loss") == "—"


def test_an_arm_whose_prompts_outgrow_its_context_is_flagged_beside_its_finding():
    """64 image tokens × 9 images of an 8-shot prompt exceed a small decoder's context: the report says so."""
    from mm1.ablate.findings import FINDINGS
    from mm1.ablate.report import _context_caveats

    finding = next(f for f in FINDINGS if f.name == "image_tokens")
    ok = {"context": 512, "over_context": {}}
    scores = {"tok16_long": [ok, ok], "tok64_long": [{"context": 512, "over_context": {"synth_vqa@8": 100}},
                                                    {"context": 512, "over_context": {"synth_vqa@8": 97}}]}
    lines = _context_caveats(finding, scores, 100)
    assert lines == ["- caveat: tok64_long's prompts are longer than its context of 512 positions in VQA 8-shot 100 "
                     "of 100 (positions it never trained on; those scores measure that too)"]
    assert _context_caveats(finding, {"tok16_long": [ok], "tok64_long": [ok]}, 100) == []
    assert _context_caveats(finding, {"tok16_long": [{"synth_vqa@0": 0.1}]}, 100) == []  # scores of earlier versions


def test_a_finding_whose_judged_prompts_outgrow_the_context_is_not_judged():
    from mm1.ablate.report import NOT_JUDGED, judge

    finding = select(["image_tokens"], quick=True)[0][0]  # two arms, judged on caption 0-shot
    key = finding.metric.key

    def arm(value: float, over: dict) -> dict:
        return {key: value, "context": 384, "over_context": over}

    hi, lo = finding.arms
    fine = {hi: [arm(0.5, {}), arm(0.51, {}), arm(0.52, {})], lo: [arm(0.2, {}), arm(0.21, {}), arm(0.22, {})]}
    assert judge(finding, fine).outcome == "reproduced"
    overflow = {hi: [arm(0.5, {key: 3}), *fine[hi][1:]], lo: fine[lo]}
    assert judge(finding, overflow).outcome == NOT_JUDGED
    # prompts of another metric past the context leave this one judged (and flagged beside it)
    other = {hi: [arm(0.5, {"synth_vqa@8": 3}), *fine[hi][1:]], lo: fine[lo]}
    assert judge(finding, other).outcome == "reproduced"
    # a mean over shot counts is not judged when any of its shot counts outgrew the context
    words = next(f for f in FINDINGS if f.name == "resolution")
    mean = {a: [{"synth_stripes@mean": v, "over_context": {"synth_stripes@8": 2} if a == "res128" else {}}
                for v in (0.3, 0.31)] for a in words.arms}
    assert judge(words, mean).outcome == NOT_JUDGED


def test_an_arm_whose_prompts_would_outgrow_its_context_is_refused_before_training(tmp_path):
    """Nine 64-token images of an 8-shot prompt do not fit 320 positions: that arm is refused, a 4-token one runs."""
    from mm1.ablate.findings import Arm
    from mm1.ablate.runner import arm_pipeline, base_config, over_context
    from mm1.data.stream import load_tokenizer
    from mm1.data.synth.writer import ensure_world

    base = base_config(tmp_path / "world", TINY, workers=0, overrides=SMALL_WORLD)
    ensure_world(base, tmp_path / "world", seed=0)
    tok = load_tokenizer(base)

    def check(tokens: int) -> list[str]:
        stages = arm_pipeline(tmp_path, base, Arm("a", (f"model.connector.num_tokens={tokens}",)), 0, TINY).resolve(
            tmp_path / "a")
        return over_context(stages[2].config, stages[1].config, tok)

    too_long = check(64)
    assert too_long and all("past its context of 320" in line for line in too_long)
    assert any(line.startswith("synth_caption 8-shot prompts reach ") for line in too_long)
    assert check(16) == []  # the same arm at 16 tokens fits


def test_a_setting_added_after_a_run_was_made_at_its_default_does_not_refuse_the_run(tmp_path):
    """A spec saved before mm1 grew a setting holds no value for it: at its default it is the same run."""
    from mm1.ablate.runner import claim_run
    from mm1.config import to_dict
    from mm1.recipes import get_recipe

    cfg = get_recipe("tiny")
    saved = to_dict(cfg)
    del saved["data"]["sources"]["caption"]["weight"], saved["model"]["decoder"]["trained_context"]
    (tmp_path / "spec.json").write_text(json.dumps(saved))
    cfg.data.sources["caption"].weight = 1.0  # the schema's default
    claim_run(tmp_path, cfg)  # accepted
    cfg.model.decoder.trained_context = 77  # not the default: another run
    with pytest.raises(ValueError, match="trained_context: 0 here, 77 asked"):
        claim_run(tmp_path, cfg)


def test_every_arm_trains_the_same_steps_and_the_larger_encoder_has_twice_the_parameters():
    """MM1 compares at equal steps: every arm (the resolution finding's included) trains the scale's steps,
    warm-up and checkpoint with them; `vit_big` is the base ViT with twice its parameters, as ViT-L to ViT-H."""
    from mm1.ablate.runner import arm_config, base_config
    from mm1.model.vision import VisionEncoder

    base = base_config(Path("world"), TINY, workers=0)
    for name, arm in ARMS.items():
        train = arm_config(base, arm, 0).train
        assert train.steps == TINY.steps, name
        assert train.checkpoint.every == train.steps and train.schedule.warmup_steps == max(1, train.steps // 10)
    size = {name: sum(p.numel() for p in VisionEncoder(arm_config(base, ARMS[name], 0).model.vision).parameters())
            for name in ("base", "vit_big", "res128")}
    assert 1.9 < size["vit_big"] / size["base"] < 2.1
    assert size["res128"] / size["base"] < 1.2  # a larger patch embedding only


def test_the_quality_finding_grades_the_crawl_and_trains_on_what_the_filter_keeps(tmp_path):
    """Without a grader the quality finding is reported as not run and none of its arms train; with one
    (here the LM stage of the first call: any model with a chat template grades), the crawl is graded,
    the filter's drop list leaves its lowest third out of the filtered arm's data only, and both arms run."""
    from mm1.ablate.findings import CRAWL_KEEP
    from mm1.ablate.report import write_report

    out, one = tmp_path / "abl", Scale(seeds=1, steps=2, batch_size=2, clip_steps=2, eval_limit=2, lm_steps=2)
    lines: list[str] = []
    findings, scores, scale = run_ablation(out, quick=False, only=["quality", "text_only"], overrides=SMALL_WORLD,
                                           scale=one, log=lines.append)
    assert any("quality finding is not run" in line for line in lines)
    assert set(scores) == {"base", "text0"} and not (out / "arms" / "crawl_raw").exists()
    assert write_report(out, findings, scores, scale, wall_s=1.0)["quality"] == "not run"
    grader = out / "lm" / ARMS["base"].decoder_key / "seed_0"
    findings, scores, scale = run_ablation(out, quick=False, only=["quality"], overrides=SMALL_WORLD, scale=one,
                                           grader=grader, log=lines.append)
    assert set(scores) == {"crawl_raw", "crawl_filtered"}
    drops = json.loads((out / "world" / "quality" / "interleaved.json").read_text())
    pages = 60 + 20  # the small world's good pages and junk ones (SMALL_WORLD)
    assert drops["records"] == pages and drops["dropped"] == pages - round(CRAWL_KEEP * pages)
    stats = {arm: json.loads((out / "arms" / arm / "seed_0" / "pretrain" / "data_stats.json").read_text())
             for arm in ("crawl_raw", "crawl_filtered")}
    assert "low quality" in json.dumps(stats["crawl_filtered"]) and "low quality" not in json.dumps(stats["crawl_raw"])
    assert any(line.startswith("ablate: the crawl graded by") for line in lines)
    assert write_report(out, findings, scores, scale, wall_s=1.0)["quality"] != "not run"
