"""`mm1 ablate`: every arm of every finding as an ordinary run directory, then their scores.

Layout of the output folder (each piece reused when `mm1 ablate` runs again with the same settings):

    DIR/world/                              the synthetic world and its tokenizer
    DIR/clip/<vision key>/seed_<s>/         a CLIP stage per vision tower and seed (spec.json: its config)
    DIR/arms/<arm>/seed_<s>/spec.json       the arm's resolved config (a rerun of other settings is refused)
    DIR/arms/<arm>/seed_<s>/pretrain/       its pre-training run (config, metrics, checkpoints)
    DIR/arms/<arm>/seed_<s>/scores.json     its scores, validation loss, perplexity and wall times
    DIR/report.md, DIR/*.png                written by `mm1.ablate.report`

Every arm trains for the same steps and batch (equal samples, as MM1 compares at equal steps) and
is scored the same way: captioning and VQA at 0 and 8 shots on held-out scenes, the loss of
held-out captions, and the perplexity of held-out text. Jobs run in `jobs` processes, each with its
share of the CPU cores (or on the GPU when there is one); a job that fails is reported and the
others go on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from mm1.ablate.findings import Arm, Finding, arm_overrides, select
from mm1.config import Config, apply_overrides, from_saved, to_dict

ARM_METRICS = ("synth_caption@0", "synth_caption@8", "synth_vqa@0", "synth_vqa@8", "val_loss", "text_ppl")


@dataclass(frozen=True)
class Scale:
    """How big each arm is: the quick mode fits in an hour on 2 CPU cores, the full one in a few (README: measured).

    The full mode adds a seed, the 64-token arm and evaluation items, not a bigger batch: seeds and
    items are what narrow the intervals, and the arms stay comparable with the quick mode's.
    """

    seeds: int
    steps: int
    batch_size: int
    clip_steps: int
    eval_limit: int

    @classmethod
    def of(cls, quick: bool, seeds: int | None = None) -> Scale:
        scale = cls(2, 200, 8, 60, 60) if quick else cls(3, 200, 8, 100, 100)
        return cls(seeds or scale.seeds, scale.steps, scale.batch_size, scale.clip_steps, scale.eval_limit)


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
    cfg = apply_overrides(from_saved(to_dict(base)), [*arm_overrides(arm), f"train.seed={seed}", f"data.seed={seed}",
                                                      f"train.optimizer.lr={lr!r}"])
    cfg.recipe = f"ablate:{arm.name}"
    return cfg


def clip_config(base: Config, arm: Arm, seed: int, scale: Scale) -> Config:
    from mm1.recipes.tiny import tiny_clip

    cfg = apply_overrides(tiny_clip(from_saved(to_dict(base))), [
        *arm.vision_overrides, f"train.seed={seed}", f"data.seed={seed}", f"train.steps={scale.clip_steps}",
        f"train.checkpoint.every={scale.clip_steps}", f"train.schedule.warmup_steps={max(1, scale.clip_steps // 10)}"])
    cfg.recipe = f"ablate:clip:{arm.vision_key}"
    return cfg


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


def held_out_losses(model, tok, cfg: Config) -> dict[str, float]:
    """The validation loss of held-out captions (given their image) and the perplexity of held-out text."""
    from mm1.eval.perplexity import caption_loss, perplexity
    from mm1.eval.tasks import get_task

    world = Path(cfg.data.root)
    captions = get_task("synth_caption", world=world).test[: cfg.eval.limit]
    text = (world / "tasks" / "synth_text" / "test.txt").read_text()
    return {"val_loss": caption_loss(model, tok, captions),
            "text_ppl": perplexity(model, tok, text, window=cfg.data.packing.seq_len, progress=False)}


def arm_job(cfg_dict: dict, out: str, threads: int) -> dict:
    """Pre-train one arm (or resume it), score it, write scores.json; returns the scores.

    The evaluation is written as `mm1 eval` writes it (eval/results.json, eval/predictions.jsonl with
    every prompt and answer), so an arm's scores can be read back to what the model said."""
    from mm1.config import PromptFormat
    from mm1.eval.harness import evaluate, write_results
    from mm1.eval.tasks import get_task
    from mm1.serve.loading import load_model
    from mm1.train.trainer import train_or_resume

    job_setup(threads)
    cfg, folder = from_saved(cfg_dict), Path(out)
    t0 = time.perf_counter()
    train_or_resume(cfg, folder / "pretrain")
    t1 = time.perf_counter()
    model, tok, _ = load_model(folder / "pretrain")
    world = Path(cfg.data.root)
    tasks = [get_task(n, world=world) for n in ("synth_caption", "synth_vqa")]
    evaluation = evaluate(model, tok, tasks, [0, 8], cfg.eval, fmt=PromptFormat.PRETRAIN, progress=False)
    write_results(evaluation, folder / "eval")
    results = evaluation.results
    scores = {f"{name}@{s}": v for name, t in results["tasks"].items() for s, v in t["scores"].items()}
    scores |= held_out_losses(model, tok, cfg)
    scores |= {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1,
               "baselines": {name: t["baseline"] for name, t in results["tasks"].items()},
               "context": results["context"],  # prompts longer than this reach untrained positions
               "over_context": {f"{name}@{k}": n for name, t in results["tasks"].items()
                                for k, n in t.get("over_context", {}).items()}}
    (folder / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


# ----------------------------------------------------------------------------- the whole ablation


@dataclass(frozen=True)
class ArmRun:
    """One arm trained with one seed: an ordinary run folder holding its config, checkpoints and scores."""
    arm: Arm
    seed: int
    folder: Path

    @property
    def scores_file(self) -> Path:
        return self.folder / "scores.json"


def clip_folder(out: Path, arm: Arm, seed: int) -> Path:
    return out / "clip" / arm.vision_key / f"seed_{seed}"


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def claim_run(folder: Path, cfg: Config) -> None:
    """Record the config a reused folder (a CLIP stage, a sweep run) is for, or refuse one that holds a
    run of other settings: resuming it would silently continue another experiment."""
    spec, spec_file = to_dict(cfg), folder / "spec.json"
    if spec_file.exists():
        have, want = _leaves(json.loads(spec_file.read_text())), _leaves(json.loads(json.dumps(spec)))
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


def run_ablation(out: Path, *, quick: bool, only: list[str] | None = None, jobs: int = 1, seeds: int | None = None,
                 overrides: tuple[str, ...] = (), scale: Scale | None = None,
                 log=print) -> tuple[list[Finding], dict[str, list[dict]], Scale]:
    """Run (or reuse) every arm the chosen findings need; returns the findings, each arm's per-seed
    scores, and the scale they ran at. `overrides` apply to every arm (e.g. the world's sizes)."""
    from mm1.data.prepare import prepare
    from mm1.data.stream import load_tokenizer
    from mm1.data.synth.writer import ensure_world

    findings, arms = select(only, quick=quick)
    scale = scale or Scale.of(quick, seeds)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    world = out / "world"
    base = base_config(world, scale, workers=2 if jobs <= 1 else 1, overrides=overrides)
    ensure_world(base, world, seed=0, progress=True)
    tok = load_tokenizer(base)
    runs = [ArmRun(a, s, out / "arms" / a.name / f"seed_{s}") for a in arms for s in range(scale.seeds)]
    configs = {r: arm_config(base, r.arm, r.seed) for r in runs}
    for r, cfg in configs.items():
        cfg.model.vision.init = str(clip_folder(out, r.arm, r.seed))
        claim_run(r.folder, cfg)  # a folder of other settings is refused before anything runs
    todo = [r for r in runs if not r.scores_file.exists()]
    clips: dict[tuple[str, int], tuple[Arm, Path]] = {}
    for r in todo:  # data is prepared here, once per spec, before any job (jobs must not race to write it)
        clips.setdefault((r.arm.vision_key, r.seed), (r.arm, clip_folder(out, r.arm, r.seed)))
        prepare(configs[r], base.train.stage, tok, progress=False)
    for (_, seed), (arm, folder) in clips.items():
        clip_cfg = clip_config(base, arm, seed, scale)
        claim_run(folder, clip_cfg)
        prepare(clip_cfg, clip_cfg.train.stage, tok, progress=False)
    log(f"ablate: {len(findings)} findings, {len(arms)} arms × {scale.seeds} seeds ({len(runs) - len(todo)} done), "
        f"{len(clips)} CLIP stages; {scale.steps} steps of {scale.batch_size} sequences per arm; {jobs} job(s)")
    t0 = time.perf_counter()
    run_jobs([(clip_job, to_dict(clip_config(base, arm, seed, scale)), str(d), threads)
               for (_, seed), (arm, d) in clips.items()], jobs, "CLIP stage", log)
    log(f"ablate: CLIP stages done in {time.perf_counter() - t0:.0f} s")
    run_jobs([(arm_job, to_dict(configs[r]), str(r.folder), threads) for r in todo], jobs, "arm", log)
    scores: dict[str, list[dict]] = {}
    for r in runs:
        if r.scores_file.exists():
            scores.setdefault(r.arm.name, []).append(json.loads(r.scores_file.read_text()))
        else:
            log(f"ablate: {r.folder} has no scores (its job failed); it is left out of the report")
    return findings, scores, scale
