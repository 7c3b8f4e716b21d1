"""The quickstart report: markdown tables plus PNG plots of what the model learned.

`loss_per_source.png` shows the training loss of each data source over steps (pre-training then
SFT); `scores_vs_shots.png` shows each task's score against the number of shots, with the
no-image baseline dashed. Both are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mm1.eval.harness import results_table
from mm1.files import write_text


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(stages: dict[str, list[dict]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage, rows in stages.items():
        if not rows:
            continue
        keys = sorted({k for r in rows for k in r if k.startswith("loss.")})
        for k in keys:
            pts = [(offset + r["step"], r[k]) for r in rows if r.get(k) is not None]
            ax.plot(*zip(*pts, strict=True), label=f"{stage}: {k[5:]}")
        offset += rows[-1]["step"]
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("training loss per data source")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_scores(results: dict[str, dict], out: Path) -> Path:
    names = sorted({n for r in results.values() for n, t in r["tasks"].items() if t["metric"] != "perplexity"})
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for stage, res in results.items():
            t = res["tasks"].get(name)
            if t is None:
                continue
            shots = sorted(t["scores"], key=int)
            ax.plot([int(s) for s in shots], [t["scores"][s] for s in shots], marker="o", label=stage)
        base = next(r["tasks"][name]["baseline"] for r in results.values() if name in r["tasks"])
        ax.axhline(base, linestyle="--", color="gray", label="baseline (no image)")
        metric = next(r["tasks"][name]["metric"] for r in results.values() if name in r["tasks"])
        ax.set_title(name)
        ax.set_xlabel("shots")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out: Path, *, results: dict[str, dict], metrics: dict[str, list[dict]], timings: dict[str, float],
                 notes: list[str]) -> Path:
    plot_losses(metrics, out / "loss_per_source.png")
    plot_scores(results, out / "scores_vs_shots.png")
    lines = ["# mm1 quickstart report", "",
             "The tiny MM1 recipe on the embedded synthetic world: pre-training on the 45:45:10 mixture, "
             "SFT on conversations, then few-shot evaluation on held-out scenes.", ""]
    for arm, res in results.items():
        lines += [f"## Few-shot evaluation: {arm} ({res['prompt']} prompts)", "", results_table(res)]
    lines += ["![scores against shots](scores_vs_shots.png)", "", "## Training", "",
              "![loss per source](loss_per_source.png)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", *notes, ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
