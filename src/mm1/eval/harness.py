"""`mm1 eval`: few-shot evaluation of a checkpoint on captioning, VQA and perplexity tasks.

Writes `DIR/results.json` — `{"tasks": {NAME: {"metric", "baseline", "scores": {"0": S, ...}}}}` —
and `DIR/results.md`, a table with each task's baseline beside its scores. The baseline is what a
model that ignores the image would score: the majority training answer for VQA, the single most
frequent training caption for captioning, and the vocabulary size (a uniform guess) for perplexity.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from mm1.config import EvalConfig
from mm1.data.tokenizer import Tokenizer
from mm1.eval.fewshot import STOP, build_prompt
from mm1.eval.metrics import cider_d, normalize_answer, vqa_accuracy
from mm1.eval.tasks.base import Metric, Task
from mm1.model.mllm import MLLM
from mm1.serve.engine import Engine, GenerationConfig


def baseline(task: Task) -> float:
    pool = task.train or task.test
    if task.metric == Metric.VQA_ACCURACY:
        majority = Counter(normalize_answer(it.answers[0]) for it in pool).most_common(1)[0][0]
        return sum(vqa_accuracy(majority, list(it.answers)) for it in task.test) / len(task.test)
    if task.metric == Metric.CIDER:
        common = Counter(c for it in pool for c in it.captions).most_common(1)[0][0]
        return cider_d([common] * len(task.test), [list(it.captions) for it in task.test])[0]
    raise ValueError(task.metric)


def score(task: Task, predictions: list[str], items: list) -> float:
    if task.metric == Metric.VQA_ACCURACY:
        return sum(vqa_accuracy(p, list(it.answers)) for p, it in zip(predictions, items, strict=True)) / len(items)
    return cider_d(predictions, [list(it.captions) for it in items])[0]


@torch.inference_mode()
def perplexity(model: MLLM, tok: Tokenizer, text: str, *, max_tokens: int = 0, window: int = 0) -> float:
    """exp(mean NLL) over the text's tokens (the first `max_tokens` if set), in windows of `window`."""
    ids = tok.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    window = window or model.cfg.decoder.max_seq_len
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start:start + window + 1], device=dev)[None]
        if chunk.shape[1] < 2:
            break
        labels = chunk[:, 1:]
        out = model(tokens_BT=chunk[:, :-1], labels_BT=labels)
        nll += float(out.loss_sum)
        count += out.num_predicted
    return math.exp(nll / max(1, count))


def evaluate_task(engine: Engine, task: Task, shots: list[int], cfg: EvalConfig, progress: bool = True
                  ) -> dict[str, float]:
    if task.metric == Metric.PERPLEXITY:
        text = Path(task.text_path).read_text(encoding="utf-8", errors="replace")
        return {"0": perplexity(engine.model, engine.tok, text, max_tokens=cfg.ppl_tokens)}
    n = len(task.test) if cfg.limit <= 0 else min(cfg.limit, len(task.test))
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, stop=STOP)
    scores = {}
    for k in shots:
        preds: list[str] = []
        for start in tqdm(range(0, n, cfg.batch_size), desc=f"{task.name} {k}-shot", disable=not progress,
                          leave=False):
            idx = range(start, min(n, start + cfg.batch_size))
            prompts = [build_prompt(task, i, k, seed=cfg.seed) for i in idx]
            preds += engine.generate(prompts, gen)
        scores[str(k)] = score(task, preds, task.test[:n])
    return scores


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results))


def results_table(results: dict) -> str:
    shots = sorted({s for t in results["tasks"].values() for s in t["scores"]}, key=int)
    lines = ["| task | metric | baseline | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|---|---|" + "---|" * len(shots)]
    for name, t in results["tasks"].items():
        cells = [f"{t['scores'][s]:.3f}" if s in t["scores"] else "" for s in shots]
        lines.append(f"| {name} | {t['metric']} | {t['baseline']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(model: MLLM, tok: Tokenizer, tasks: list[Task], shots: list[int], cfg: EvalConfig,
             progress: bool = True, sub_image_grid: int = 0) -> dict:
    engine = Engine(model, tok, sub_image_grid=sub_image_grid)
    results: dict = {"tasks": {}}
    for task in tasks:
        base = float(model.cfg.decoder.vocab_size) if task.metric == Metric.PERPLEXITY else baseline(task)
        results["tasks"][task.name] = {"metric": task.metric.value, "baseline": base,
                                       "scores": evaluate_task(engine, task, shots, cfg, progress)}
    return results
