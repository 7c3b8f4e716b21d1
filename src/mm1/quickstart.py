"""`mm1 quickstart`: the whole MM1 recipe on the embedded synthetic world, in minutes on 2 CPU cores.

synthesise the world → train the tokenizer → prepare (tokenize and pack) every source → CLIP-pre-train
the image encoder → pre-train the tiny MLLM on the 45:45:10 mixture → SFT on conversations → few-shot
evaluation (0/4/8 shots) after each stage → `report.md`,
`results.json` and PNG plots in the output folder. Each finished stage is reused when the command
is run again with the same settings, so an interrupted quickstart picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mm1.config import Config, apply_overrides, to_dict
from mm1.data.prepare import prepare
from mm1.data.sources import iter_texts
from mm1.data.stream import load_tokenizer
from mm1.data.synth.writer import write_world
from mm1.data.tokenizer import train_tokenizer
from mm1.eval.harness import evaluate, write_results
from mm1.eval.tasks import get_task
from mm1.recipes import get_recipe
from mm1.recipes.tiny import tiny_clip, tiny_sft
from mm1.report import read_metrics, write_report
from mm1.serve.loading import load_model
from mm1.train import checkpoint as ckpt
from mm1.train.clip import train_clip
from mm1.train.trainer import train

STEPS = 7


def _world(cfg: Config, root: Path, seed: int) -> Path:
    meta = root / "world.json"
    want = {"seed": seed, "sizes": to_dict(cfg)["data"]["synth"]}
    if meta.exists():
        have = json.loads(meta.read_text())
        if have.get("seed") == seed and have.get("sizes") == want["sizes"] and (root / "tokenizer.json").exists():
            return root
    write_world(root, seed=seed, sizes=cfg.data.synth, progress=True)
    train_tokenizer(iter_texts(cfg), vocab_size=cfg.model.decoder.vocab_size, out=root / "tokenizer.json")
    return root


def _finished(run: Path, steps: int) -> bool:
    last = ckpt.latest(run)
    return last is not None and ckpt.load_meta(last)["step"] >= steps


def _clip(cfg: Config, out: Path) -> Path:
    weights = out / "vision.safetensors"
    if not weights.exists():
        train_clip(cfg, out)
    return weights


def run_quickstart(*, out: Path, overrides: list[str], seed: int = 0, clip_overrides: tuple[str, ...] = (),
                   sft_overrides: tuple[str, ...] = ()) -> dict:
    """`overrides` apply to every stage; `clip_overrides` / `sft_overrides` to one stage only."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={out / 'world'}", *overrides])
    print(f"[1/{STEPS}] synthetic world → {cfg.data.root}")
    world = _world(cfg, Path(cfg.data.root), seed)
    timings["world + tokenizer"] = time.perf_counter() - t0

    t = time.perf_counter()
    clip_cfg = apply_overrides(tiny_clip(cfg), list(clip_overrides))
    sft = apply_overrides(tiny_sft(cfg), list(sft_overrides))
    print(f"[2/{STEPS}] prepare: tokenize and pack every source → {Path(cfg.data.root) / 'prepared'}")
    tok = load_tokenizer(cfg)
    for stage_cfg in (clip_cfg, cfg, sft):
        prepare(stage_cfg, stage_cfg.train.stage, tok)
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[3/{STEPS}] CLIP pre-training of the image encoder → {out / 'clip'}")
    cfg.model.vision_init = str(_clip(clip_cfg, out / "clip"))
    sft.model.vision_init = cfg.model.vision_init
    timings["clip"] = time.perf_counter() - t

    runs = {"pretrain": (cfg, out / "pretrain", None), "sft": (sft, out / "sft", out / "pretrain")}
    for i, (stage, (stage_cfg, run_dir, init)) in enumerate(runs.items(), start=4):
        t = time.perf_counter()
        print(f"[{i}/{STEPS}] {stage}: {stage_cfg.train.steps} steps → {run_dir}")
        if not _finished(run_dir, stage_cfg.train.steps):
            resume = ckpt.latest(run_dir) is not None
            train(stage_cfg, out=run_dir, resume=resume,
                  init_from=None if resume or init is None else str(ckpt.latest(init)))
        timings[stage] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[6/{STEPS}] few-shot evaluation on held-out scenes")
    tasks = [get_task(name, world=world) for name in cfg.eval.tasks.split(",")]
    shots = [int(s) for s in cfg.eval.shots.split(",")]
    results = {}
    for stage in runs:
        model, tok, _ = load_model(out / stage)
        results[stage] = evaluate(model, tok, tasks, shots, cfg.eval)
        write_results(results[stage], out / f"eval_{stage}")
    timings["evaluation"] = time.perf_counter() - t

    print(f"[7/{STEPS}] report")
    # MM1's few-shot evaluation is of the pre-trained model; the SFT model's scores are kept beside it.
    final = results["pretrain"] | {"stages": results}
    (out / "results.json").write_text(json.dumps(final, indent=2) + "\n")
    timings["total"] = time.perf_counter() - t0
    notes = [f"Learned: {line}" for line in learned_summary(results)] + [
        "",
        "Few-shot prompts use MM1's pre-training evaluation format (`<image>Output:` / `Question: … Short "
        "answer:`); the SFT model was tuned to the chat template, so it usually scores lower on them. "
        "`synth_words` needs the printed words, which are barely legible at the tiny recipe's 64 px "
        "(MM1: resolution matters most): expect chance level here.",
    ]
    report = write_report(out, results=results, timings=timings, notes=notes,
                          metrics={s: read_metrics(out / s / "metrics.jsonl") for s in runs})
    print("\n".join(notes))
    print(f"report: {report}\nresults: {out / 'results.json'}")
    return final


def learned_summary(results: dict[str, dict]) -> list[str]:
    """One line per task: the best score over stages and shots against the no-image baseline."""
    lines = []
    names = {n for r in results.values() for n in r["tasks"]}
    for name in sorted(names):
        best = max(((s, st, r["tasks"][name]["scores"][s]) for st, r in results.items() if name in r["tasks"]
                    for s in r["tasks"][name]["scores"]), key=lambda x: x[2])
        base = next(r["tasks"][name]["baseline"] for r in results.values() if name in r["tasks"])
        lines.append(f"{name}: best {best[2]:.3f} ({best[0]}-shot after {best[1]}) vs baseline {base:.3f}")
    return lines
