"""The ablation report: per finding, its arms' scores with 95% intervals over seeds, the comparison
it is judged on, and a verdict; validation loss beside the few-shot scores; one PNG per finding.

The tables follow the paper's: one row per arm, columns for 0- and 8-shot captioning and VQA, with
the validation loss and held-out text perplexity next to them (MM1 found that loss does not predict
few-shot scores: the report gives the rank correlation across arms) and each arm's wall time.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mm1.ablate.findings import Claim, Finding
from mm1.ablate.runner import ARM_METRICS, SHOTS, Scale
from mm1.ablate.stats import Interval, Verdict, diff_interval, judged, mean_interval, pooled_sd, spearman, t975, verdict

COLUMNS = {"synth_caption@0": "caption 0-shot", "synth_caption@8": "caption 8-shot", "synth_vqa@0": "VQA 0-shot",
           "synth_vqa@8": "VQA 8-shot", "synth_stripes@0": "stripes 0-shot", "synth_stripes@8": "stripes 8-shot",
           "synth_stripes@mean": "stripes (0+8)/2", "synth_caption@gain": "caption 8−0", "synth_vqa@gain": "VQA 8−0",
           "val_loss": "val loss", "text_ppl": "text ppl", "lm_text_ppl": "LM stage text ppl",
           "text_ppl_vs_lm": "text ppl ÷ LM's"}


def _values(scores: dict[str, list[dict]], arm: str, key: str) -> list[float]:
    return [s[key] for s in scores.get(arm, []) if key in s]


NOT_JUDGED = "not judged: prompts past the trained context"


def evaluated_keys(key: str) -> list[str]:
    """The evaluations (`task@shots`) a metric is made of: a mean or gain over shot counts is made of each."""
    task, _, shots = key.partition("@")
    return [f"{task}@{k}" for k in SHOTS] if shots in ("mean", "gain") else [key]


def over_context_arms(finding: Finding, scores: dict[str, list[dict]]) -> list[str]:
    """The finding's arms with any prompt of the judged metric longer than the context the arm was
    trained on: their score measures untrained positions as much as the change under test."""
    keys = evaluated_keys(finding.metric.key)
    return [a for a in finding.arms
            if any(s.get("over_context", {}).get(k, 0) for s in scores.get(a, []) for k in keys)]


def judged_spread(finding: Finding, scores: dict[str, list[dict]]) -> tuple[float, int]:
    """The seed spread of the finding's metric on its judged scale, pooled over every arm."""
    return pooled_sd([judged(finding, _values(scores, a, finding.metric.key)) for a in scores])


def judge(finding: Finding, scores: dict[str, list[dict]]) -> Verdict | None:
    """The verdict of one finding, its spread pooled over every arm's seeds on the judged scale; a finding
    whose arms' judged prompts outgrow their context is not judged."""
    if any(len(scores.get(a, [])) == 0 for a in finding.arms):
        return None
    if over_context_arms(finding, scores):
        return Verdict(NOT_JUDGED, ())
    key = finding.metric.key
    sd, df = judged_spread(finding, scores)
    return verdict(finding, {a: judged(finding, _values(scores, a, key)) for a in finding.arms}, sd, df)


# spread by a factor, not by an amount: summarised on the log scale
GEOMETRIC = {"text_ppl", "lm_text_ppl", "text_ppl_vs_lm"}


def _cell(scores: dict[str, list[dict]], arm: str, key: str) -> str:
    """An arm's mean ± the half-width of its 95% interval, the spread pooled over every arm; a
    perplexity as its geometric mean ×/÷ a factor (one arm's 8000 would otherwise widen every arm's)."""
    if not scores.get(arm):
        return "—"
    if key not in GEOMETRIC:
        return str(mean_interval(_values(scores, arm, key), *pooled_sd([_values(scores, a, key) for a in scores])))
    logs = {a: [math.log(v) for v in _values(scores, a, key)] for a in scores}
    iv = mean_interval(logs[arm], *pooled_sd(list(logs.values())))
    spread = f" ×/÷ {math.exp(iv.half):.2f}" if math.isfinite(iv.half) else " (one seed)"
    return f"{math.exp(iv.mean):.3f}{spread}"


def _arm_table(finding: Finding, scores: dict[str, list[dict]]) -> list[str]:
    keys = [*ARM_METRICS, *(k for k in finding.columns if k not in ARM_METRICS)]
    head = "| arm | " + " | ".join(COLUMNS[k] + (" ◆" if k == finding.metric.key else "") for k in keys)
    lines = [head + " | tokens/s | minutes |", "|---|" + "---|" * (len(keys) + 2)]
    for arm in finding.all_arms:
        cells = [_cell(scores, arm, k) for k in keys]
        runs = scores.get(arm, [])
        minutes = statistics.fmean((s["train_s"] + s["eval_s"]) / 60 for s in runs) if runs else 0
        speed = _values(scores, arm, "tokens_per_s")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {statistics.fmean(speed) if speed else 0:.0f} "
                     f"| {minutes:.1f} |")
    return lines


def _context_caveats(finding: Finding, scores: dict[str, list[dict]], items: int) -> list[str]:
    """Arms whose prompts outgrew their context (many shots of many image tokens): said beside the table."""
    lines = []
    for arm in finding.arms:
        over: dict[str, int] = {}
        for s in scores.get(arm, []):
            for key, n in s.get("over_context", {}).items():
                over[key] = max(over.get(key, 0), n)
        if over:
            what = ", ".join(f"{COLUMNS.get(k, k)} {n} of {items}" for k, n in sorted(over.items()))
            lines.append(f"- caveat: {arm}'s prompts are longer than its context of {scores[arm][0]['context']} "
                         f"positions in {what} (positions it never trained on; those scores measure that too)")
    return lines


def _comparison(finding: Finding, v: Verdict, scores: dict[str, list[dict]]) -> list[str]:
    scale = ("log " if finding.metric.log else "") + COLUMNS[finding.metric.key]
    sign = " (lower is better: the difference is of minus it)" if finding.metric.lower_is_better else ""
    lines = []
    for a, b, d in v.comparisons:
        lines.append(f"- {a} − {b} on {scale}{sign}: {d}  (95% interval {d.low:.3f} to {d.high:.3f})")
    if finding.claim == Claim.EQUIVALENT:
        lines.append(f"- margin of equivalence: ±{v.margin:.3f} ({finding.margin:.0%} of {finding.arms[0]})")
    for a, b in finding.beside:
        d = _difference(finding, scores, a, b)
        if d is None:
            continue
        speed = [statistics.fmean(_values(scores, x, "tokens_per_s") or [math.nan]) for x in (a, b)]
        lines.append(f"- beside it, not judged: {a} − {b} on {scale}: {d}  (95% interval {d.low:.3f} to "
                     f"{d.high:.3f}); training speed {speed[0]:.0f} vs {speed[1]:.0f} tokens/s")
    return lines


def _difference(finding: Finding, scores: dict[str, list[dict]], a: str, b: str) -> Interval | None:
    """The difference a − b on the finding's judged scale, the spread pooled over every arm."""
    key = finding.metric.key
    if not _values(scores, a, key) or not _values(scores, b, key):
        return None
    sd, df = judged_spread(finding, scores)
    return diff_interval(judged(finding, _values(scores, a, key)), judged(finding, _values(scores, b, key)), sd, df)


def seed_spread(findings: list[Finding], scores: dict[str, list[dict]], verdicts: dict[str, Verdict | None],
                reference: str = "base") -> list[str]:
    """Per judged metric: the reference arm's spread over its seeds, the pooled spread, the 95% half-width
    of a difference of two arms at this many seeds, and half the smallest effect called reproduced on it
    (the half-width should be at most that: docs/results/ablate)."""
    lines = ["| judged metric | base arm: seeds, sd | pooled sd (df) | 95% half-width of a difference | "
             "smallest reproduced effect / 2 |", "|---|---|---|---|---|"]
    for key in dict.fromkeys(f.metric.key for f in findings):
        finding = next(f for f in findings if f.metric.key == key)
        base = judged(finding, _values(scores, reference, key))
        sd, df = judged_spread(finding, scores)
        n = statistics.fmean(len(v) for v in scores.values()) if scores else 0
        half = t975(df) * sd * math.sqrt(2 / n) if df and n else math.inf
        effects = [abs(d.mean) for f in findings if f.metric.key == key and (v := verdicts.get(f.name))
                   and v.outcome == "reproduced" for _, _, d in v.comparisons]
        base_sd = f"{len(base)}, {statistics.stdev(base):.3f}" if len(base) > 1 else f"{len(base)}, —"
        target = f"{min(effects) / 2:.3f}" if effects else "— (none reproduced)"
        scale = ("log " if finding.metric.log else "") + COLUMNS[key]
        lines.append(f"| {scale} | {base_sd} | {sd:.3f} ({df}) | {half:.3f} | {target} |")
    return lines


def plot_finding(finding: Finding, scores: dict[str, list[dict]], out: Path) -> Path:
    key = finding.metric.key
    arms = [a for a in finding.all_arms if scores.get(a)]
    geometric = key in GEOMETRIC
    scale = math.log if geometric else float
    spread = pooled_sd([[scale(v) for v in _values(scores, a, key)] for a in scores])
    ivs = [mean_interval([scale(v) for v in _values(scores, a, key)], *spread) for a in arms]
    back = math.exp if geometric else float
    heights = [back(iv.mean) for iv in ivs]
    errs = [[h - back(iv.low) if math.isfinite(iv.half) else 0 for h, iv in zip(heights, ivs, strict=True)],
            [back(iv.high) - h if math.isfinite(iv.half) else 0 for h, iv in zip(heights, ivs, strict=True)]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(arms), 3.2))
    ax.bar(arms, heights, yerr=errs, capsize=6, color="#4c72b0")
    if geometric:
        ax.set_yscale("log")
    for i, arm in enumerate(arms):
        ax.scatter([i] * len(scores[arm]), _values(scores, arm, key), color="black", s=12, zorder=3)
    ax.set_ylabel(COLUMNS[key])
    ax.set_title(finding.statement, fontsize=9)
    fig.tight_layout()
    path = out / f"{finding.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, findings: list[Finding], scores: dict[str, list[dict]], scale: Scale,
                 wall_s: float) -> dict:
    """DIR/report.md, DIR/<finding>.png and DIR/verdicts.json; returns the verdicts by finding."""
    arm_minutes = sum(s["train_s"] + s["eval_s"] for runs in scores.values() for s in runs) / 60
    lines = ["# mm1 ablate: MM1's findings on the synthetic world", "",
             f"{scale.seeds} seeds per arm, {scale.steps} steps of {scale.batch_size} sequences per arm (equal "
             f"steps and tokens), each from a text-only "
             f"LM stage ({scale.lm_steps} steps) and a CLIP stage "
             f"({scale.clip_steps} steps) of its shapes and seed; {scale.eval_limit} held-out items per task. "
             f"This call took {wall_s / 60:.1f} minutes (finished arms and stages are reused); the arms' own "
             f"training and evaluation add up to {arm_minutes:.1f} job-minutes. Scores are means ± the half-width "
             "of a 95% interval over seeds (the seed spread pooled over all arms); ◆ marks the metric a finding "
             "is judged on, fixed before the runs "
             "(`mm1.ablate.findings`). The world is small and regular: a verdict here says what this scale shows, "
             "not what MM1's scale does.", "", "| finding | verdict |", "|---|---|"]
    verdicts, sections, judged_verdicts = {}, [], {}
    for f in findings:
        v = judge(f, scores)
        verdicts[f.name] = v.outcome if v else "not run"
        lines.append(f"| {f.statement} | **{verdicts[f.name]}** |")
        judged_verdicts[f.name] = v
        sections += ["", f"## {f.statement}", "", f"Judged on {COLUMNS[f.metric.key]}: {f.why}", "",
                     *_arm_table(f, scores), "",
                     *_context_caveats(f, scores, scale.eval_limit)]
        if v is not None:
            plot = plot_finding(f, scores, out)
            sections += [*_comparison(f, v, scores), "", f"Verdict: **{v.outcome}**.", "",
                         f"![{f.name}]({plot.name})"]
    lines += sections
    lines += ["", "## Seed spread", "", "Each judged metric's spread over seeds (on the scale it is judged on) "
              "against the effects this report calls reproduced on it.", "",
              *seed_spread(findings, scores, judged_verdicts)]
    arms = sorted(scores)
    loss = [statistics.fmean(_values(scores, a, "val_loss")) for a in arms]
    for key in ("synth_caption@0", "synth_vqa@8") if len(arms) >= 3 else ():  # a rank needs arms to rank
        rho = spearman([-x for x in loss], [statistics.fmean(_values(scores, a, key)) for a in arms])
        lines.append(f"\nRank correlation across arms of (−validation loss) with {COLUMNS[key]}: {rho:.2f} "
                     f"({len(arms)} arms).")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=2) + "\n")
    return verdicts
