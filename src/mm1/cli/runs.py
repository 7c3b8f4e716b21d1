"""`mm1 train`, `mm1 eval` and the commands that run whole recipes: quickstart, pipeline, ablate, sweep."""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from pathlib import Path

from mm1.cli.common import config_args, resolve_config
from mm1.config import ConfigError, apply_override


def _cmd_train(a: argparse.Namespace) -> int:
    from mm1.config import Stage
    from mm1.train.trainer import train

    overrides = list(a.overrides)
    if a.stage:
        overrides.append(f"train.stage={a.stage}")
    config_path = a.config
    if a.resume and not config_path and (Path(a.out) / "config.json").exists():
        config_path = str(Path(a.out) / "config.json")  # resume the run as it was configured
    cfg = resolve_config(a.recipe, config_path, overrides, pretrained=False)
    if a.resume and a.init_from:
        raise ConfigError("--resume and --init-from exclude each other: resume continues DIR's own run")
    if cfg.train.stage == Stage.SFT and not (a.init_from or a.resume):
        print("mm1: note: SFT without --init-from starts from random weights", file=sys.stderr)
    from mm1.train.trainer import NonFiniteError, StepFailedError

    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun:  # a rank that dies in C++ (SIGABRT, SIGSEGV) prints where its Python was
        faulthandler.enable()
    try:
        last = train(cfg, out=Path(a.out), resume=a.resume, init_from=a.init_from)
    except (NonFiniteError, StepFailedError) as err:  # the message says what happened and what to change
        if os.environ.get("RANK", "0") == "0":  # every rank stops with the same message: one says it
            print(f"mm1: error: {err}", file=sys.stderr)
        if torchrun:  # as below: the job is saved and the group left; skip the teardown
            sys.stderr.flush()
            os._exit(1)
        return 1
    if cfg.train.stage == Stage.CLIP and last["step"] >= cfg.train.steps:
        print(f"vision encoder written to {Path(a.out) / 'vision.safetensors'} (model.vision.init={a.out})")
    if cfg.train.stage == Stage.LM and last["step"] >= cfg.train.steps:
        print(f"decoder written to {Path(a.out) / 'decoder'} as a transformers folder (model.decoder.init={a.out})")
    if torchrun:
        # The run is saved and the process group left. A rank could still abort in interpreter teardown
        # ("terminate called without an active exception": a C++ thread destroyed at exit; about 1 in 30
        # two-process runs here, always after the last checkpoint), failing a finished job; skip teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from mm1.config import InferenceSettings, save, validate
    from mm1.eval.harness import evaluate, results_table, write_results
    from mm1.eval.tasks import get_task
    from mm1.files import check_writable
    from mm1.store.loading import describe_checkpoint, load_model

    check_writable(Path(a.out))  # before the model is loaded and the items decoded
    model, tok, cfg = load_model(a.checkpoint)
    overrides = [o if o.startswith("eval.") else f"eval.{o}" for o in a.overrides]
    for o in overrides:
        apply_override(cfg, o)
    # --tasks/--shots are shorthands for eval.tasks/eval.shots: unset, the checkpoint's eval settings (or
    # an eval.* key) stand; a flag and a key that disagree are refused rather than one silently winning.
    for flag, key in ((a.tasks, "tasks"), (a.shots, "shots")):
        if flag is None:
            continue
        given = [o.split("=", 1)[1] for o in overrides if o.startswith(f"eval.{key}=")]
        if given and given[-1] != flag:
            raise ConfigError(f"--{key} {flag} and eval.{key}={given[-1]} disagree: give one of them")
        setattr(cfg.eval, key, flag)
    validate(cfg)
    world = Path(a.world or cfg.data.root)
    tasks = [get_task(t.strip(), world=world) for t in cfg.eval.tasks.split(",") if t.strip()]
    evaluation = evaluate(model, tok, tasks, [int(s) for s in cfg.eval.shots.split(",")], cfg.eval,
                          settings=InferenceSettings.of(cfg))
    # the results name what they scored: the checkpoint (and step) and the config, saved beside them
    evaluation.results = {"checkpoint": describe_checkpoint(a.checkpoint),
                          "config": "config.json (beside this file)", **evaluation.results}
    save(cfg, Path(a.out) / "config.json")  # the checkpoint's config with the eval settings used
    write_results(evaluation, Path(a.out), tasks)
    print(f"prompt format: {evaluation.results['prompt']}")
    print(results_table(evaluation.results))
    print(f"results written to {Path(a.out) / 'results.json'}, predictions to {Path(a.out) / 'predictions.jsonl'}")
    return 0


def _cmd_quickstart(a: argparse.Namespace) -> int:
    from mm1.quickstart import run_quickstart

    run_quickstart(out=Path(a.out), overrides=a.overrides, seed=a.seed)
    return 0


def _cmd_pipeline(a: argparse.Namespace) -> int:
    from mm1.recipes import get_pipeline

    pipeline = get_pipeline(a.name, a.overrides)
    out = Path(a.out)
    only = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else None
    unknown = sorted(set(only or []) - set(pipeline.names))
    if unknown:
        raise ConfigError(f"--only: no stage {', '.join(unknown)} in pipeline '{a.name}' ({', '.join(pipeline.names)})")
    pipeline.prepare(out)
    timings = pipeline.run(out, only=only, jobs=a.jobs, on_stage=lambda i, s: print(
        f"[{i + 1}/{len(pipeline.stages)}] {s.name}: {s.config.train.steps} steps → {s.folder}"
        + (" (finished: skipped)" if s.done else "")))
    for name, seconds in timings.items():
        print(f"{name:18s} {seconds:7.0f} s")
    return 0


def _cmd_ablate(a: argparse.Namespace) -> int:
    import time

    from mm1.ablate.report import write_report
    from mm1.ablate.runner import run_ablation

    t0 = time.perf_counter()
    out = Path(a.out)
    only = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else None
    try:
        findings, scores, scale = run_ablation(out, quick=a.quick, only=only, jobs=a.jobs, seeds=a.seeds,
                                               overrides=tuple(a.overrides),
                                               grader=Path(a.grader) if a.grader else None)
    except ValueError as err:  # an unknown finding, or an output folder of other settings
        raise ConfigError(str(err)) from None
    verdicts = write_report(out, findings, scores, scale, time.perf_counter() - t0)
    for name, outcome in verdicts.items():
        print(f"{name:22s} {outcome}")
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_sweep(a: argparse.Namespace) -> int:
    from mm1.ablate.sweep import run_sweep

    fit = run_sweep(Path(a.out), quick=a.quick, jobs=a.jobs, overrides=tuple(a.overrides))
    print(f"fit: ln(lr) = {fit['a']:.4f} ln(N) + {fit['b']:.4f}   (MM1: -0.4214 ln(N) - 0.5535)")
    print(f"report: {Path(a.out) / 'sweep.md'}")
    return 0


def add_recipe_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for the recipe end to end and MM1's experiments."""
    p = sub.add_parser("quickstart", help="the whole recipe on the built-in synthetic world, in minutes",
                       description="synthesise → tokenizer → pre-train → SFT → few-shot eval → report")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for the tiny recipe")
    p.set_defaults(func=_cmd_quickstart, out_folder=True)

    p = sub.add_parser("pipeline", help="every training stage of a recipe in MM1's order (CLIP, LM, pre-training, "
                                        "SFT), each started from the earlier ones; finished stages are skipped",
                       description="tiny: CLIP → LM → pretrain → SFT on the synthetic world (`mm1 data synth` "
                                   "first); smol: CLIP → pretrain from SmolLM2 (and without the text-only data) → "
                                   "SFT. Each stage is an ordinary run folder OUT/<stage>.")
    p.add_argument("name", choices=["tiny", "smol"])
    p.add_argument("--out", required=True)
    p.add_argument("--only", help="comma-separated stages to run (the others must be finished where they hand "
                                  "something over)")
    p.add_argument("--jobs", type=int, default=1, help="stages that take nothing from each other run in this many "
                                                       "processes at once (each with its share of the cores)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every stage's recipe")
    p.set_defaults(func=_cmd_pipeline, out_folder=True)

    p = sub.add_parser("ablate", help="MM1's findings reproduced on the synthetic world, with seeds and intervals",
                       description="Runs the arms of each finding (resolution vs encoder size, image tokens, "
                                   "connector, caption and interleaved data, text-only data, MoE, quality "
                                   "filtering) as ordinary run "
                                   "folders under OUT/arms, reusing finished ones, and writes OUT/report.md.")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="2 seeds, short arms: under an hour on 2 CPU cores")
    p.add_argument("--only", help="comma-separated findings: resolution, image_tokens, connector, caption_zero_shot, "
                                  "interleaved_few_shot, text_only, moe, quality")
    p.add_argument("--jobs", type=int, default=1, help="arms run in this many processes at once")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: 2)")
    p.add_argument("--grader", help="an instruct LLM's folder (HF or mm1) that grades the crawl for the quality "
                                    "finding (full mode); without one that finding is not run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every arm's tiny recipe")
    p.set_defaults(func=_cmd_ablate, out_folder=True)

    p = sub.add_parser("sweep", help="MM1's learning-rate rule refitted: an LR grid over small decoder sizes",
                       description="Trains every (decoder size, learning rate) of a grid, takes the best rate per "
                                   "size and fits ln(lr) = a ln(N) + b beside MM1's (a = -0.4214, b = -0.5535).")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="3 sizes × 5 rates, short runs")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every run's tiny recipe")
    p.set_defaults(func=_cmd_sweep, out_folder=True)


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for training and evaluation runs."""
    p = sub.add_parser("train", help="pre-train or fine-tune (SFT) a model; torchrun-ready")
    config_args(p)
    p.add_argument("--stage", choices=["clip", "lm", "pretrain", "sft"],
                   help="shorthand for train.stage=... (clip pre-trains the image encoder alone, lm the decoder "
                        "alone on the text sources)")
    p.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (with its saved config.json)")
    p.add_argument("--init-from", help="checkpoint directory whose model weights start this run (e.g. SFT)")
    p.set_defaults(func=_cmd_train, out_folder=True)

    p = sub.add_parser("eval", help="few-shot evaluation (CIDEr, VQA accuracy, perplexity) of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or HF model folder")
    p.add_argument("--tasks", help="comma-separated: synth_caption, synth_vqa, synth_stripes, synth_words, "
                                    "coco_val2017, custom:FILE.jsonl, ppl:FILE (default: the checkpoint's eval.tasks)")
    p.add_argument("--shots", help="comma-separated shot counts (default: the checkpoint's eval.shots)")
    p.add_argument("--out", required=True)
    p.add_argument("--world", help="synthetic world directory (default: the run's data.root)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="eval settings, e.g. eval.limit=100")
    p.set_defaults(func=_cmd_eval)
