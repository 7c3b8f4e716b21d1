"""`mm1 sweep`: MM1's learning-rate rule refitted, as the paper made it, on small decoders.

MM1 chose its peak learning rate by a grid search over LLM sizes (9M to 1.2B) and a linear fit in
log space, ln η = a·ln N + b with a = −0.4214, b = −0.5535. This runs that experiment at the
synthetic world's scale: for each decoder size, the tiny recipe is pre-trained at a grid of
learning rates (multiples of the rule's own value at that size), every run from the same CLIP
encoder and from its size's text-only LM stage (MM1's sweep, like its ablations, starts from
pre-trained LLMs) for the same steps; the validation loss (held-out captions given their image, and held-out
text, averaged) picks the best rate per size, refined by a parabola through the best point and
its neighbours in log rate; a least-squares line through (ln N, ln η*) is the fit. N is the rule's
(`lr_rule_parameters`: the dense decoder, embeddings included). Our sizes are below the paper's
range (about 0.5M to 4M parameters), so the fit says how the rule extrapolates down, not whether it
holds at its own scale. Every run is an ordinary run folder under DIR/runs, reused when present.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mm1.ablate.findings import ARMS, Arm
from mm1.ablate.runner import (
    Scale,
    base_config,
    claim_run,
    clip_config,
    clip_job,
    held_out_losses,
    job_setup,
    lm_config,
    lm_job,
    run_jobs,
)
from mm1.config import apply_overrides, from_saved, to_dict

PAPER_A, PAPER_B = -0.4214, -0.5535
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # × the rule's learning rate at each size


@dataclass(frozen=True)
class Size:
    """One decoder size of the learning-rate sweep (width and depth; heads and FFN follow)."""
    width: int
    depth: int

    @property
    def overrides(self) -> tuple[str, ...]:
        heads = max(2, self.width // 32)
        ffn = max(64, round(self.width * 8 / 3 / 64) * 64)
        return (f"model.decoder.width={self.width}", f"model.decoder.depth={self.depth}",
                f"model.decoder.heads={heads}", f"model.decoder.kv_heads={heads}", f"model.decoder.ffn_hidden={ffn}")


QUICK_SIZES = (Size(96, 2), Size(144, 3), Size(192, 4))
FULL_SIZES = (Size(64, 2), Size(96, 2), Size(144, 3), Size(192, 4), Size(256, 6), Size(320, 8))


def sweep_job(cfg_dict: dict, out: str, threads: int) -> dict:
    """Train one (size, rate) and write its validation loss to scores.json."""
    from mm1.store.loading import load_model
    from mm1.train.trainer import train_or_resume

    job_setup(threads)
    cfg, folder = from_saved(cfg_dict), Path(out)
    train_or_resume(cfg, folder)
    model, tok, _ = load_model(folder)
    held_out = held_out_losses(model, tok, cfg)
    captions, text = held_out["val_loss"], math.log(held_out["text_ppl"])
    scores = {"caption_loss": captions, "text_loss": text, "val_loss": (captions + text) / 2,
              "lr": cfg.train.optimizer.lr}
    (folder / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def lm_folder(out: Path, size: Size) -> Path:
    return out / "lm" / f"w{size.width}_d{size.depth}"


def best_log_lr(points: list[tuple[float, float]]) -> float:
    """ln of the best rate: the minimum of a parabola through the best (ln lr, loss) and its two
    neighbours, kept within them; the best grid point itself at an edge of the grid."""
    points = sorted(points)
    i = min(range(len(points)), key=lambda k: points[k][1])
    if i == 0 or i == len(points) - 1:
        return points[i][0]
    (x0, y0), (x1, y1), (x2, y2) = points[i - 1:i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    return min(max(-b / (2 * a), x0), x2) if a > 0 else x1


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y = a x + b."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return a, my - a * mx


def run_sweep(out: Path, *, quick: bool, jobs: int = 1, overrides: tuple[str, ...] = (), scale: Scale | None = None,
              sizes: tuple[Size, ...] | None = None, log=print) -> dict:
    """Run (or reuse) the grid and fit; writes DIR/sweep.md, sweep.png, sweep.json; returns the fit."""
    from mm1.data.prepare import prepare
    from mm1.data.stream import load_tokenizer
    from mm1.data.synth.writer import ensure_world
    from mm1.model.mllm import lr_rule_parameters
    from mm1.train.optim import mm1_learning_rate

    t0 = time.perf_counter()
    scale = scale or Scale(1, 100 if quick else 200, 8 if quick else 16, 60 if quick else 100, 60 if quick else 100)
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    threads = max(1, 2 // max(1, jobs))
    world = out / "world"
    base = base_config(world, scale, workers=2 if jobs <= 1 else 1, overrides=overrides)
    ensure_world(base, world, seed=0)
    tok = load_tokenizer(base)
    clip_dir = out / "clip"
    clip_cfg = clip_config(base, ARMS["base"], 0, scale)
    claim_run(clip_dir, clip_cfg)
    prepare(clip_cfg, clip_cfg.train.stage, tok, progress=False)
    prepare(base, base.train.stage, tok, progress=False)
    lms = {size: lm_config(base, Arm(f"w{size.width}_d{size.depth}", size.overrides), 0, scale) for size in sizes}
    for size, lm_cfg in lms.items():
        claim_run(lm_folder(out, size), lm_cfg)
        prepare(lm_cfg, lm_cfg.train.stage, tok, progress=False)
    run_jobs([(clip_job, to_dict(clip_cfg), str(clip_dir), threads)]
             + [(lm_job, to_dict(c), str(lm_folder(out, size)), threads) for size, c in lms.items()],
             jobs, "CLIP/LM stage", log)
    runs, grid = [], {}
    for size in sizes:
        sized = apply_overrides(from_saved(to_dict(base)), list(size.overrides))
        sized.model.decoder.init = str(lm_folder(out, size))
        n = lr_rule_parameters(sized.model)
        grid[size] = n
        for f in FACTORS:
            lr = mm1_learning_rate(n) * f
            cfg = apply_overrides(from_saved(to_dict(sized)), [f"train.optimizer.lr={lr!r}"])
            cfg.model.vision.init, cfg.recipe = str(clip_dir), f"sweep:w{size.width}:x{f}"
            folder = out / "runs" / f"w{size.width}_d{size.depth}_x{f}"
            claim_run(folder, cfg)
            if not (folder / "scores.json").exists():
                runs.append((sweep_job, to_dict(cfg), str(folder), threads))
    log(f"sweep: {len(sizes)} sizes × {len(FACTORS)} rates, {len(runs)} to run, {scale.steps} steps each")
    run_jobs(runs, jobs, "sweep run", log)
    table, best = [], {}
    for size, n in grid.items():
        pts = []
        for f in FACTORS:
            file = out / "runs" / f"w{size.width}_d{size.depth}_x{f}" / "scores.json"
            if file.exists():
                s = json.loads(file.read_text())
                pts.append((math.log(s["lr"]), s["val_loss"]))
        if len(pts) >= 2:
            best[size] = best_log_lr(pts)
        table.append((size, n, pts))
    if len(best) < 2:
        raise RuntimeError("sweep: fewer than two sizes finished; no line to fit")
    a, b = fit_line([math.log(grid[s]) for s in best], list(best.values()))
    fit = {"a": a, "b": b, "paper_a": PAPER_A, "paper_b": PAPER_B,
           "best": {f"{s.width}x{s.depth}": {"N": grid[s], "lr": math.exp(v)} for s, v in best.items()},
           "minutes": (time.perf_counter() - t0) / 60}
    _write(out, table, best, grid, fit)
    return fit


def _write(out: Path, table, best, grid, fit) -> None:
    lines = ["# mm1 sweep: the learning-rate rule refitted", "",
             f"Validation loss (held-out captions and text) after each run; best rate per size from a parabola "
             f"in log rate. Fit: ln η = {fit['a']:.4f} ln N + {fit['b']:.4f} (MM1: {PAPER_A} ln N {PAPER_B}). "
             f"{fit['minutes']:.1f} minutes.", "",
             "| decoder | N | " + " | ".join(f"{f}× rule" for f in FACTORS) + " | best η | rule η |",
             "|---|---|" + "---|" * (len(FACTORS) + 2)]
    for size, n, pts in table:
        losses = {round(math.exp(x) / math.exp(PAPER_A * math.log(n) + PAPER_B), 4): y for x, y in pts}
        cells = [f"{losses[f]:.3f}" if f in losses else "—" for f in FACTORS]
        chosen = f"{math.exp(best[size]):.2e}" if size in best else "—"
        rule = math.exp(PAPER_A * math.log(n) + PAPER_B)
        lines.append(f"| {size.width}×{size.depth} | {n:,} | " + " | ".join(cells) + f" | {chosen} | {rule:.2e} |")
    lines += ["", "![sweep](sweep.png)"]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps(fit, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ns = [grid[s] for s in best]
    ax.scatter(ns, [math.exp(v) for v in best.values()], label="best η (this sweep)", zorder=3)
    xs = [min(ns) * 0.7, max(ns) * 1.4]
    ax.plot(xs, [math.exp(fit["a"] * math.log(x) + fit["b"]) for x in xs], label="fit")
    ax.plot(xs, [math.exp(PAPER_A * math.log(x) + PAPER_B) for x in xs], "--", label="MM1's rule")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (decoder parameters)")
    ax.set_ylabel("peak learning rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
