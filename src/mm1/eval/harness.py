"""`mm1 eval`: few-shot evaluation of a checkpoint on captioning, VQA and perplexity tasks.

Writes `DIR/results.json` — `{"prompt": F, "tasks": {NAME: {"metric", "baseline", "prompt",
"scores": {"0": S, ...}}}}` —, `DIR/results.md`, a table with each task's baseline beside its
scores, and `DIR/predictions.jsonl`: every item at every shot count with the exact prompt, the
prediction, the references and its score, so a surprising score can be looked into. The baseline
is what a model that ignores the image would score: the majority training answer for VQA, the
single most frequent training caption for captioning, and the vocabulary size (a uniform guess)
for perplexity. The prompt format F is `chat` for a fine-tuned model and `pretrain` otherwise,
unless `eval.prompt` says which. Each task also records its longest prompt per shot count
(`longest_prompt`, image tokens included) and, where prompts are longer than the model's context
(`model.decoder.max_seq_len`: positions it was never trained on), how many (`over_context`), with
a warning: many shots of many image tokens can outgrow a small model's context.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mm1.config import EvalConfig, PromptFormat
from mm1.data.template import template_for
from mm1.data.tokenizer import Tokenizer
from mm1.eval.fewshot import STOP, build_prompt, prompt_text
from mm1.eval.metrics import cider_d, normalize_answer, vqa_accuracy
from mm1.eval.perplexity import perplexity
from mm1.eval.tasks.base import CaptionItem, Metric, Task
from mm1.model.mllm import MLLM
from mm1.serve.engine import Engine, GenerationConfig

log = logging.getLogger("mm1.eval")


def baseline(task: Task) -> float:
    pool = task.train or task.test
    if task.metric == Metric.VQA_ACCURACY:
        majority = Counter(normalize_answer(it.answers[0]) for it in pool).most_common(1)[0][0]
        return sum(vqa_accuracy(majority, list(it.answers)) for it in task.test) / len(task.test)
    if task.metric == Metric.CIDER:
        common = Counter(c for it in pool for c in it.captions).most_common(1)[0][0]
        return cider_d([common] * len(task.test), [list(it.captions) for it in task.test])[0]
    raise ValueError(task.metric)


def item_scores(task: Task, predictions: list[str], items: list) -> list[float]:
    """Each prediction's score: VQA accuracy, or its CIDEr-D (idf over the whole evaluated set)."""
    if task.metric == Metric.VQA_ACCURACY:
        return [vqa_accuracy(p, list(it.answers)) for p, it in zip(predictions, items, strict=True)]
    return cider_d(predictions, [list(it.captions) for it in items])[1]


@dataclass
class Evaluation:
    """`results` as results.json holds them; `predictions`: one row per item, shot count and task."""

    results: dict
    predictions: list[dict] = field(default_factory=list)


def _prediction_row(task: Task, shots: int, index: int, prompt: list, prompt_tokens: int, prediction: str,
                    item_score: float) -> dict:
    item = task.test[index]
    refs = {"references": list(item.captions)} if isinstance(item, CaptionItem) else {
        "question": item.question, "references": list(item.answers)}
    return {"task": task.name, "shots": shots, "index": index, "image": item.image, **refs,
            "prompt": prompt_text(prompt), "prompt_tokens": prompt_tokens, "prediction": prediction,
            "score": item_score}


def evaluate_task(engine: Engine, task: Task, shots: list[int], cfg: EvalConfig, fmt: PromptFormat,
                  progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    if task.metric == Metric.PERPLEXITY:
        text = Path(task.text_path).read_text(encoding="utf-8", errors="replace")
        ppl = perplexity(engine.model, engine.tok, text, max_tokens=cfg.ppl_tokens, window=cfg.ppl_window,
                         stride=cfg.ppl_stride, batch_size=cfg.batch_size, progress=progress, desc=task.name)
        return {"0": ppl}, []
    n = len(task.test) if cfg.limit <= 0 else min(cfg.limit, len(task.test))
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, stop=STOP[fmt])
    high_res_last = cfg.high_res_last if engine.grid else None
    template = template_for(engine.tok)
    scores, rows = {}, []
    for k in shots:
        preds, prompts = [], []
        for start in tqdm(range(0, n, cfg.batch_size), desc=f"{task.name} {k}-shot", disable=not progress,
                          leave=False):
            batch = [build_prompt(task, i, k, seed=cfg.seed, fmt=fmt, high_res_last=high_res_last, template=template)
                     for i in range(start, min(n, start + cfg.batch_size))]
            preds += engine.generate(batch, gen)
            prompts += batch
        per_item = item_scores(task, preds, task.test[:n])
        scores[str(k)] = sum(per_item) / n
        rows += [_prediction_row(task, k, i, prompts[i], engine.prompt_length(prompts[i]), preds[i], per_item[i])
                 for i in range(n)]
    return scores, rows


def write_results(evaluation: Evaluation, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(evaluation.results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(evaluation.results))
    with (out / "predictions.jsonl").open("w") as f:
        for row in evaluation.predictions:
            f.write(json.dumps(row) + "\n")


def results_table(results: dict) -> str:
    shots = sorted({s for t in results["tasks"].values() for s in t["scores"]}, key=int)
    lines = ["| task | metric | baseline | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|---|---|" + "---|" * len(shots)]
    for name, t in results["tasks"].items():
        cells = [f"{t['scores'][s]:.3f}" if s in t["scores"] else "" for s in shots]
        lines.append(f"| {name} | {t['metric']} | {t['baseline']:.3f} | " + " | ".join(cells) + " |")
    for name, t in results["tasks"].items():
        for s, count in t.get("over_context", {}).items():
            lines.append(f"\n{name} {s}-shot: {count} prompt(s) longer than the model's context of "
                         f"{results['context']} positions (longest {t['longest_prompt'][s]})")
    return "\n".join(lines) + "\n"


def _lengths(rows: list[dict], context: int) -> dict:
    """The longest prompt per shot count and, where any exceed the context, how many do."""
    longest: dict[str, int] = {}
    over: dict[str, int] = {}
    for r in rows:
        k = str(r["shots"])
        longest[k] = max(longest.get(k, 0), r["prompt_tokens"])
        if r["prompt_tokens"] > context:
            over[k] = over.get(k, 0) + 1
    return {"longest_prompt": longest, **({"over_context": over} if over else {})}


def evaluate(model: MLLM, tok: Tokenizer, tasks: list[Task], shots: list[int], cfg: EvalConfig, *,
             fmt: PromptFormat, progress: bool = True, sub_image_grid: int = 0) -> Evaluation:
    """Every task at every shot count, prompted in `fmt` (resolve AUTO first: `resolve_prompt_format`)."""
    if fmt == PromptFormat.AUTO:
        raise ValueError("resolve eval.prompt=auto to chat or pretrain first (mm1.serve.loading)")
    engine = Engine(model, tok, sub_image_grid=sub_image_grid)
    context = model.cfg.decoder.max_seq_len
    evaluation = Evaluation({"prompt": fmt.value, "context": context, "tasks": {}})
    for task in tasks:
        base = float(model.cfg.decoder.vocab_size) if task.metric == Metric.PERPLEXITY else baseline(task)
        scores, rows = evaluate_task(engine, task, shots, cfg, fmt, progress)
        evaluation.results["tasks"][task.name] = {"metric": task.metric.value, "baseline": base,
                                                  "prompt": fmt.value, "scores": scores}
        if rows:
            evaluation.results["tasks"][task.name] |= _lengths(rows, context)
        for k, count in evaluation.results["tasks"][task.name].get("over_context", {}).items():
            log.warning("%s %s-shot: %d of %d prompts are longer than the model's context of %d positions",
                        task.name, k, count, sum(r["shots"] == int(k) for r in rows), context)
        evaluation.predictions += rows
    return evaluation
