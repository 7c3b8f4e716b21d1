"""`mm1 ablate`: every arm of every finding as an ordinary run folder, then their scores.

Each arm and seed is a `Pipeline` (`mm1.recipes.pipeline`) in MM1's order: a CLIP stage and a
text-only LM stage, each shared by the arms of the same vision tower or decoder shape, then the arm's
multimodal pre-training started from both. Layout of the output folder (each piece reused when
`mm1 ablate` runs again with the same settings):

    DIR/world/                              the synthetic world and its tokenizer
    DIR/clip/<vision key>/seed_<s>/         a CLIP stage per vision tower and seed (spec.json: its config)
    DIR/lm/<decoder key>/seed_<s>/          an LM stage per decoder shape and seed; scores.json: its text ppl
    DIR/arms/<arm>/seed_<s>/spec.json       the arm's resolved config (a rerun of other settings is refused)
    DIR/arms/<arm>/seed_<s>/pretrain/       its pre-training run (config, metrics, checkpoints)
    DIR/arms/<arm>/seed_<s>/scores.json     its scores, validation loss, perplexity and wall times
    DIR/report.md, DIR/*.png                written by `mm1.ablate.report`

Every arm trains for the same steps and tokens (MM1 compares at equal steps) and is scored the same
way: captioning, VQA and word reading at 0 and 8 shots on held-out scenes, the loss of held-out
captions, and the perplexity of held-out text beside its LM stage's. Before anything trains, an arm
whose 8-shot prompts would run past the context it trains is refused. Jobs run in `jobs` processes,
each with its share of the CPU cores (or on the GPU when there is one); a job that fails is reported
and the others go on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import astuple, dataclass
from pathlib import Path

from mm1.ablate.findings import ARMS, CRAWL_KEEP, QUALITY, Arm, Finding, select
from mm1.config import Config, apply_overrides, from_saved, to_dict
from mm1.recipes.pipeline import Handoff, Pipeline, PipelineStage, ResolvedStage
from mm1.system import available_cores

TASKS = ("synth_caption", "synth_vqa", "synth_stripes")
SHOTS = (0, 8)
ARM_METRICS = ("synth_caption@0", "synth_caption@8", "synth_vqa@0", "synth_vqa@8", "synth_stripes@mean", "val_loss",
               "text_ppl_vs_lm")


@dataclass(frozen=True)
class Scale:
    """How big each arm is. Full: 2 seeds, 400 steps of 8 sequences, all 200 held-out items per task (the
    world's evaluation scenes), LM stages of 200 steps: in the 3-seed run of 200 steps
    (docs/results/ablate/earlier/full_3seeds_2026-12-07) the seed spread of captioning came from seeds whose
    captions collapsed to one sentence, and no arm trained 400 steps collapsed; 400 steps for every arm are
    paid for with a third seed. Quick: 2 seeds, 150 steps, 100 items, LM stages of 100 steps, no arm reported
    beside a finding without judging it, and no 64-token arm, hence no 1024-position arm (image tokens: 16
    against 4 at the base context): an hour on 2 cores with --jobs 2."""

    seeds: int
    steps: int
    batch_size: int
    clip_steps: int
    eval_limit: int
    lm_steps: int = 100

    @classmethod
    def of(cls, quick: bool, seeds: int | None = None) -> Scale:
        scale = cls(2, 150, 8, 100, 100, 100) if quick else cls(2, 400, 8, 100, 200, 200)
        return cls(seeds or scale.seeds, *astuple(scale)[1:])


def base_config(world: Path, scale: Scale, *, workers: int, overrides: tuple[str, ...] = ()) -> Config:
    """The tiny recipe at this scale (every arm starts from it), then the user's overrides."""
    from mm1.recipes import get_recipe

    return apply_overrides(get_recipe("tiny"), [
        f"data.root={world}", f"train.steps={scale.steps}", f"train.batch_size={scale.batch_size}",
        f"train.schedule.warmup_steps={max(1, scale.steps // 10)}", f"train.checkpoint.every={scale.steps}",
        "train.checkpoint.keep_log_spaced=false", "train.logging.progress=false", "train.logging.tensorboard=false",
        f"data.num_workers={workers}", f"eval.limit={scale.eval_limit}", "eval.shots=0,8", *overrides])


def arm_config(base: Config, arm: Arm, seed: int) -> Config:
    """The arm's config; every arm keeps the base's learning rate (the MoE arm's narrower experts would
    otherwise change the rule's N), so that arms differ in what the finding names only."""
    from mm1.model.mllm import lr_rule_parameters
    from mm1.train.optim import resolve_lr

    lr = resolve_lr(base.train.optimizer, lr_rule_parameters(base.model))
    cfg = apply_overrides(from_saved(to_dict(base)), [*arm.overrides, f"train.seed={seed}", f"data.seed={seed}",
                                                      f"train.optimizer.lr={lr!r}"])
    cfg.recipe = f"ablate:{arm.name}"
    return cfg


def _stage_seed(seed: int, steps: int) -> list[str]:
    return [f"train.seed={seed}", f"data.seed={seed}", f"train.steps={steps}", f"train.checkpoint.every={steps}",
            f"train.schedule.warmup_steps={max(1, steps // 10)}"]


def clip_config(base: Config, arm: Arm, seed: int, scale: Scale) -> Config:
    from mm1.recipes.tiny import tiny_clip

    cfg = apply_overrides(tiny_clip(from_saved(to_dict(base))),
                          [*arm.vision_overrides, *_stage_seed(seed, scale.clip_steps)])
    cfg.recipe = f"ablate:clip:{arm.vision_key}"
    return cfg


LM_MAX_SEQ_LEN = 1024  # every arm's position limit fits under it (RoPE: the limit shapes no weight)


def lm_config(base: Config, arm: Arm, seed: int, scale: Scale) -> Config:
    """The arm's text-only LM stage: the tiny recipe's, with the arm's decoder shape (dense: an MoE arm
    is upcycled from it) and the base's data and batch (an arm's own sequence length is its own), so
    that arms of one decoder shape share it."""
    from mm1.recipes.tiny import tiny_lm

    cfg = apply_overrides(tiny_lm(from_saved(to_dict(base))), [
        *arm.decoder_overrides, f"model.decoder.max_seq_len={LM_MAX_SEQ_LEN}", *_stage_seed(seed, scale.lm_steps)])
    cfg.recipe = f"ablate:lm:{arm.decoder_key}"
    return cfg


def arm_pipeline(out: Path, base: Config, arm: Arm, seed: int, scale: Scale) -> Pipeline:
    """CLIP and LM stages (shared by arms of the same shapes) → the arm's multimodal pre-training."""
    return Pipeline((
        PipelineStage("clip", clip_config(base, arm, seed, scale)),
        PipelineStage("lm", lm_config(base, arm, seed, scale)),
        PipelineStage("pretrain", arm_config(base, arm, seed), ((Handoff.VISION, "clip"), (Handoff.DECODER, "lm"))),
    ), folders={"clip": out / "clip" / arm.vision_key / f"seed_{seed}",
                "lm": out / "lm" / arm.decoder_key / f"seed_{seed}"})


def trained_context(cfg: Config, lm: Config) -> int:
    """The context the arm's decoder will have trained: its LM stage's sequences and its own, within its
    position table (as `record_trained_context` will record it)."""
    return min(max(lm.data.packing.seq_len, cfg.data.packing.seq_len), cfg.model.decoder.max_seq_len)


def over_context(cfg: Config, lm: Config, tok) -> list[str]:
    """The evaluations of an arm whose longest prompt would run past its trained context, said in words."""
    from mm1.eval.harness import longest_prompts
    from mm1.eval.tasks import get_task

    context, world = trained_context(cfg, lm), Path(cfg.data.root)
    found = []
    for name in TASKS:
        longest = longest_prompts(get_task(name, world=world), list(SHOTS), cfg.eval, tok,
                                  image_tokens=cfg.model.connector.num_tokens)
        found += [f"{name} {k}-shot prompts reach {n} positions" for k, n in longest.items() if n > context]
    return [f"{f}, past its context of {context}" for f in found]


# ----------------------------------------------------------------------------- jobs (run in worker processes)


def job_setup(threads: int) -> None:
    """A job's set-up in its process: its share of the cores, and, in a worker, an exit with its parent."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if mp.parent_process() is not None:
        _exit_with_parent()


def _exit_with_parent() -> None:
    """A worker whose `mm1 ablate` was killed (Ctrl-C reaches every process; a `kill` only the parent)
    stops too, instead of training on into folders that a rerun will write."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def clip_job(cfg_dict: dict, out: str, threads: int) -> str:
    from mm1.train.trainer import train_or_resume

    job_setup(threads)
    train_or_resume(from_saved(cfg_dict), Path(out))
    return out


def held_out_text_ppl(model, tok, cfg: Config) -> float:
    """Perplexity of the world's held-out text documents, each scored on its own as pre-training packs
    it (not as one stream: `mm1.eval.perplexity`)."""
    from mm1.eval.perplexity import document_perplexity

    text = (Path(cfg.data.root) / "tasks" / "synth_text" / "test.txt").read_text()
    return document_perplexity(model, tok, [d for d in text.split("\n\n") if d.strip()])


def lm_job(cfg_dict: dict, out: str, threads: int) -> str:
    """Train one LM stage (or resume it) and write the perplexity of held-out text to its scores.json:
    the text ability its arms start from."""
    from mm1.store.loading import load_model
    from mm1.train.trainer import train_or_resume

    job_setup(threads)
    cfg, folder = from_saved(cfg_dict), Path(out)
    train_or_resume(cfg, folder)
    if not (folder / "scores.json").exists():
        model, tok, _ = load_model(folder)
        ppl = held_out_text_ppl(model, tok, cfg)
        (folder / "scores.json").write_text(json.dumps({"text_ppl": ppl}, indent=2) + "\n")
    return out


def held_out_losses(model, tok, cfg: Config) -> dict[str, float]:
    """The validation loss of held-out captions (given their image) and the perplexity of held-out text,
    also over that of the LM stage the arm started from."""
    from mm1.eval.perplexity import caption_loss
    from mm1.eval.tasks import get_task

    captions = get_task("synth_caption", world=Path(cfg.data.root)).test[: cfg.eval.limit]
    ppl = held_out_text_ppl(model, tok, cfg)
    losses = {"val_loss": caption_loss(model, tok, captions), "text_ppl": ppl}
    lm_scores = Path(cfg.model.decoder.init) / "scores.json" if cfg.model.decoder.init else None
    if lm_scores and lm_scores.exists():
        lm = json.loads(lm_scores.read_text())["text_ppl"]
        losses |= {"lm_text_ppl": lm, "text_ppl_vs_lm": ppl / lm}
    return losses


def arm_scores(results: dict) -> dict:
    """An evaluation's scores by `task@shots`, with the mean over shot counts and the few-shot gain."""
    scores = {f"{name}@{s}": v for name, t in results["tasks"].items() for s, v in t["scores"].items()}
    for name, t in results["tasks"].items():
        values = t["scores"]
        scores[f"{name}@mean"] = statistics.fmean(values.values())
        scores[f"{name}@gain"] = values[str(max(SHOTS))] - values[str(min(SHOTS))]
    return scores


def arm_job(cfg_dict: dict, out: str, threads: int) -> dict:
    """Pre-train one arm (or resume it), score it, write scores.json; returns the scores.

    The evaluation is written as `mm1 eval` writes it (eval/results.json, eval/predictions.jsonl with
    every prompt and answer), so an arm's scores can be read back to what the model said."""
    from mm1.config import InferenceSettings, PromptFormat
    from mm1.eval.harness import evaluate, write_results
    from mm1.eval.tasks import get_task
    from mm1.store.loading import load_model
    from mm1.train.trainer import train_or_resume

    job_setup(threads)
    cfg, folder = from_saved(cfg_dict), Path(out)
    t0 = time.perf_counter()
    train_or_resume(cfg, folder / "pretrain")
    t1 = time.perf_counter()
    model, tok, _ = load_model(folder / "pretrain")
    world = Path(cfg.data.root)
    tasks = [get_task(n, world=world) for n in TASKS]
    evaluation = evaluate(model, tok, tasks, list(SHOTS), cfg.eval, settings=InferenceSettings(PromptFormat.PRETRAIN),
                          progress=False)
    write_results(evaluation, folder / "eval")
    results = evaluation.results
    scores = arm_scores(results) | held_out_losses(model, tok, cfg)
    steps = [json.loads(line) for line in (folder / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    scores |= {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps if "tokens_per_s" in r),
               "baselines": {name: t["baseline"] for name, t in results["tasks"].items()},
               "context": results["context"],  # prompts longer than this reach untrained positions
               "over_context": {f"{name}@{k}": n for name, t in results["tasks"].items()
                                for k, n in t.get("over_context", {}).items()}}
    (folder / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


# ----------------------------------------------------------------------------- the whole ablation


@dataclass(frozen=True)
class ArmRun:
    """One arm trained with one seed: its pipeline's stages, the last an ordinary run folder of its own."""
    arm: Arm
    seed: int
    folder: Path
    stages: tuple[ResolvedStage, ...]  # clip, lm, pretrain

    @property
    def scores_file(self) -> Path:
        return self.folder / "scores.json"

    def stage(self, name: str) -> ResolvedStage:
        return next(s for s in self.stages if s.name == name)


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _generic(key: str) -> str:
    """A leaf key with a source's name replaced by `*` (sources are named by the recipe)."""
    parts = key.split(".")
    return ".".join("*" if i > 0 and parts[i - 1] in ("sources", "sft_sources") else p for i, p in enumerate(parts))


def _schema_defaults() -> dict:
    from mm1.config import SourceConfig, SourceKind

    defaults = {_generic(k): v for k, v in _leaves(json.loads(json.dumps(to_dict(Config())))).items()}
    source = json.loads(json.dumps(to_dict(SourceConfig(kind=SourceKind.TEXT))))
    for group in ("sources", "sft_sources"):
        defaults |= {f"data.{group}.*.{k}": v for k, v in _leaves(source).items()}
    return defaults


def claim_run(folder: Path, cfg: Config) -> None:
    """Record the config a reused folder (a CLIP stage, a sweep run) is for, or refuse one that holds a
    run of other settings: resuming it would silently continue another experiment."""
    spec, spec_file = to_dict(cfg), folder / "spec.json"
    if spec_file.exists():
        have, want = _leaves(json.loads(spec_file.read_text())), _leaves(json.loads(json.dumps(spec)))
        defaults = _schema_defaults()
        # a setting added to mm1 after the run was made, at its default, is the run's own setting
        have |= {k: defaults[_generic(k)] for k in want.keys() - have.keys() if _generic(k) in defaults}
        diff = [f"{k}: {have.get(k)} here, {want.get(k)} asked" for k in sorted(have.keys() | want.keys())
                if have.get(k) != want.get(k)]
        if diff:
            raise ValueError(f"{folder} holds a run of other settings ({'; '.join(diff[:4])}); use another --out")
        return
    folder.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")


def run_jobs(jobs: list[tuple], workers: int, what: str, log) -> list:
    """Run (function, args...) jobs in `workers` processes (in this one when 1); each job's end is
    logged with the count and the time so far (a quick ablation runs for most of an hour); failures
    are reported and the other jobs go on."""
    results: list = []
    ended, t0 = 0, time.perf_counter()

    def collect(job: tuple, get) -> None:
        nonlocal ended
        ended += 1
        try:
            results.append(get())
            state = "done"
        except Exception as err:  # one failed arm must not lose the others
            state = f"failed: {type(err).__name__}: {err}"
        log(f"{what} {ended}/{len(jobs)} {state}: {job[2]} ({time.perf_counter() - t0:.0f} s)")

    if workers <= 1:
        for job in jobs:
            collect(job, lambda job=job: job[0](*job[1:]))
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(job[0], *job[1:]): job for job in jobs}
        for done in as_completed(futures):
            collect(futures[done], done.result)
    return results


def grade_crawl(cfg: Config, grader: Path, log) -> None:
    """The quality finding's filter: an instruct LLM grades a sample of the crawl (reused while the grader
    and the crawl's files are the same), a classifier learns the grades and the lowest third of the crawl
    goes on the drop list that the filtered arm's `data.sources.interleaved.quality=true` honours
    (`mm1 data grade`, `mm1 data filter`)."""
    from mm1.data.quality import (
        GradeSettings,
        filter_source,
        grade_source,
        grades_file,
        quality_file,
        read_grades,
        source_files,
        write_grades,
    )
    from mm1.files import write_json

    path = grades_file(cfg, "interleaved")
    head = read_grades(path)[0] if path.exists() else {}
    if head.get("grader") != str(grader) or head.get("files") != source_files(cfg, "interleaved"):
        settings = GradeSettings()
        log(f"ablate: {grader} grades {settings.sample} pages of the crawl, once per rubric "
            f"({len(settings.rubrics)}; on 2 CPU cores about a quarter of an hour for a 135M grader)")
        # a bar where someone watches; a log file gets the line above and the one after
        graded = grade_source(cfg, "interleaved", grader, settings, progress=sys.stderr.isatty())
        write_grades(graded, path)
        head = read_grades(path)[0]
    result = filter_source(cfg, "interleaved", keep=CRAWL_KEEP, progress=False)
    write_json(quality_file(cfg, "interleaved"), result.to_dict())
    log(f"ablate: the crawl graded by {grader} (rubric agreement {head.get('agreement')}); the classifier's "
        f"held-out Spearman {result.heldout_spearman:.2f}; {result.dropped} of {result.records} pages dropped")


def run_ablation(out: Path, *, quick: bool, only: list[str] | None = None, jobs: int = 1, seeds: int | None = None,
                 overrides: tuple[str, ...] = (), scale: Scale | None = None, grader: Path | None = None,
                 log=print) -> tuple[list[Finding], dict[str, list[dict]], Scale]:
    """Run (or reuse) every arm the chosen findings need; returns the findings, each arm's per-seed
    scores, and the scale they ran at. `overrides` apply to every arm (e.g. the world's sizes). The
    quality finding's arms run only with a `grader` (reported as not run otherwise)."""
    from mm1.data.prepare import prepare
    from mm1.data.stream import load_tokenizer
    from mm1.data.synth.writer import ensure_world

    findings, arms = select(only, quick=quick)
    quality = any(f.name == QUALITY.name for f in findings)
    if quality and grader is None:
        log("ablate: the quality finding is not run: its crawl needs a grader (--grader, an instruct LLM's folder)")
        arms = [a for a in arms if a.name not in QUALITY.all_arms]
    scale = scale or Scale.of(quick, seeds)
    threads = max(1, available_cores() // max(1, jobs))
    world = out / "world"
    # one loader process per job whatever --jobs is: an arm's spec (and so its reuse) must not depend on it
    base = base_config(world, scale, workers=1, overrides=overrides)
    ensure_world(base, world, seed=0, progress=True)
    tok = load_tokenizer(base)
    if quality and grader is not None:  # before any preparation: the filtered arm's data leave out its drops
        grade_crawl(arm_config(base, ARMS["crawl_raw"], 0), grader, log)
    runs = []
    for arm in arms:
        for seed in range(scale.seeds):
            folder = out / "arms" / arm.name / f"seed_{seed}"
            stages = tuple(arm_pipeline(out, base, arm, seed, scale).resolve(folder))
            runs.append(ArmRun(arm, seed, folder, stages))
    refused = {}
    for r in runs:
        claim_run(r.folder, r.stage("pretrain").config)  # a folder of other settings is refused before anything runs
        if r.arm.name not in refused and (why := over_context(r.stage("pretrain").config, r.stage("lm").config, tok)):
            refused[r.arm.name] = why
    for name, why in refused.items():
        log(f"ablate: arm {name} refused, it is not run: {'; '.join(why)}")
    runs = [r for r in runs if r.arm.name not in refused]
    todo = [r for r in runs if not r.scores_file.exists()]
    shared: dict[Path, ResolvedStage] = {}
    for r in todo:  # data is prepared here, once per spec, before any job (jobs must not race to write it)
        for stage in r.stages:
            if stage.name != "pretrain" and stage.folder not in shared:
                claim_run(stage.folder, stage.config)
                shared[stage.folder] = stage
            prepare(stage.config, stage.config.train.stage, tok, progress=False)
    clips = [s for s in shared.values() if s.name == "clip"]
    lms = [s for s in shared.values() if s.name == "lm"]
    log(f"ablate: {len(findings)} findings, {len(arms) - len(refused)} arms × {scale.seeds} seeds "
        f"({len(runs) - len(todo)} done), {len(clips)} CLIP and {len(lms)} LM stages; {scale.steps} steps of "
        f"{scale.batch_size} sequences per arm; {jobs} job(s)")
    t0 = time.perf_counter()
    run_jobs([(clip_job, to_dict(s.config), str(s.folder), threads) for s in clips]
             + [(lm_job, to_dict(s.config), str(s.folder), threads) for s in lms], jobs, "CLIP/LM stage", log)
    log(f"ablate: CLIP and LM stages done in {time.perf_counter() - t0:.0f} s")
    run_jobs([(arm_job, to_dict(r.stage("pretrain").config), str(r.folder), threads) for r in todo], jobs, "arm", log)
    scores: dict[str, list[dict]] = {}
    for r in runs:
        if r.scores_file.exists():
            scores.setdefault(r.arm.name, []).append(json.loads(r.scores_file.read_text()))
        else:
            log(f"ablate: {r.folder} has no scores (its job failed); it is left out of the report")
    return findings, scores, scale
