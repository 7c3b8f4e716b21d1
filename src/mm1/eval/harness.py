"""`mm1 eval`: few-shot evaluation of a checkpoint on captioning, VQA and perplexity tasks.

Writes `DIR/results.json`, `DIR/results.md` (a table with each task's baseline beside its scores,
and the settings behind them) and `DIR/predictions.jsonl`: every item at every shot count with the
exact prompt, the prediction, whether it ran into the length limit, the references and its score,
so a surprising score can be looked into.

Three settings change what a score means, so each is decided here in one way and recorded:
- **The items**: the first `eval.limit` test items. Scores, the baseline (what a model that ignores
  the image and the question scores: the majority training answer for VQA, the most frequent training
  caption for captioning, the vocabulary size for perplexity), for VQA the question-only baseline (the
  answer prior of each question's type: what a model that reads the question but not the image scores)
  and CIDEr-D's document frequencies are all over exactly these (`items` of `test_items`).
- **The answer length**: `eval.max_new_tokens`, or by default per task from its references (99% of
  them fit, plus the stop), with the count of answers that ran into it per shot count (`hit_limit`;
  over 1% is a warning): a cap that cuts captions short raises CIDEr and hides few-shot dips.
- **The context**: the longest sequence the model was trained on (`model.decoder.trained_context`,
  recorded by the trainer; the position table for older runs). Each task records its longest prompt
  per shot count and how many prompts run past the context (`over_context`), with a warning.

The prompt format is `chat` for a fine-tuned model and `pretrain` otherwise, unless `eval.prompt`
says which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mm1.config import ConfigError, EvalConfig, InferenceSettings, PromptFormat
from mm1.data.packing import tokenize
from mm1.data.template import Text, template_for
from mm1.data.tokenizer import Tokenizer
from mm1.eval.fewshot import STOP, build_prompt, prompt_text
from mm1.eval.metrics import cider_d, normalize_answer, vqa_accuracy
from mm1.eval.perplexity import perplexity
from mm1.eval.tasks.base import CaptionItem, Metric, PromptSpec, Task, references
from mm1.eval.tasks.benchmarks import write_submission
from mm1.files import write_json, write_text
from mm1.model.mllm import MLLM
from mm1.serve.engine import Answer, Engine, GenerationConfig

log = logging.getLogger("mm1.eval")
HIT_LIMIT_WARN = 0.01  # a share of answers that ran into max_new_tokens above which a task is warned about


def scored_items(task: Task, limit: int) -> list:
    """The test items a run scores: the first `limit` of the split (all with `limit <= 0`). Scores,
    baselines and CIDEr-D's document frequencies are all computed over exactly these."""
    return task.test if limit <= 0 else task.test[:limit]


def baseline(task: Task, items: list | None = None) -> float:
    """What a model that ignores the image scores on `items` (default: the whole test split): the majority
    answer, the most frequent caption, or, where items are answered by choosing, chance among the choices."""
    items = task.test if items is None else items
    pool = task.train or task.test
    if task.ranks_choices:  # a model that cannot tell an item's choices apart: chance among them
        return sum(vqa_accuracy(it.answers[0], list(it.answers)) / len(it.choices) for it in items) / len(items)
    if task.metric == Metric.VQA_ACCURACY:
        majority = Counter(normalize_answer(it.answers[0]) for it in pool).most_common(1)[0][0]
        return sum(vqa_accuracy(majority, list(it.answers)) for it in items) / len(items)
    if task.metric == Metric.CIDER:
        common = Counter(c for it in pool for c in it.captions).most_common(1)[0][0]
        return cider_d([common] * len(items), [list(it.captions) for it in items])[0]
    raise ValueError(task.metric)


QUESTION_TYPE_WORDS = 3  # "what color is", "how many shapes", "is there a": VQAv2's question types are such prefixes


def _question_type(question: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", question.lower())[:QUESTION_TYPE_WORDS])


def question_only_baseline(task: Task, items: list | None = None) -> float:
    """What a model that reads the question but not the image scores on a VQA task: each question answered
    with the majority training answer of the questions that start with the same three words (the answer
    prior of its question type), or the overall majority where none does. A model near this score answers
    from the question's form alone, whatever it scores against `baseline`."""
    items = task.test if items is None else items
    pool = task.train or task.test
    by_type: dict[str, Counter] = {}
    for it in pool:
        by_type.setdefault(_question_type(it.question), Counter())[normalize_answer(it.answers[0])] += 1
    overall = Counter(normalize_answer(it.answers[0]) for it in pool).most_common(1)[0][0]

    def guess(question: str) -> str:
        prior = by_type.get(_question_type(question))
        return prior.most_common(1)[0][0] if prior else overall

    return sum(vqa_accuracy(guess(it.question), list(it.answers)) for it in items) / len(items)


def generation_length(task: Task, items: list, tok: Tokenizer, *, share: float = 0.99) -> int:
    """New tokens enough for `share` of the task's references (its demonstrations' and the scored
    items'), counted in the model's tokenizer as they follow a space, plus one for the token or
    string that ends the answer: a cap below that would cut answers the references say are right."""
    refs = [r for it in [*task.train, *items] for r in references(it)]
    lengths = sorted(len(tok.encode(" " + r)) for r in refs)
    return lengths[min(len(lengths) - 1, math.ceil(share * len(lengths)) - 1)] + 1


def item_scores(task: Task, predictions: list[str], items: list) -> list[float]:
    """Each prediction's score: VQA accuracy, or its CIDEr-D (idf over the scored items' references)."""
    if task.metric == Metric.VQA_ACCURACY:
        return [vqa_accuracy(p, list(it.answers)) for p, it in zip(predictions, items, strict=True)]
    return cider_d(predictions, [list(it.captions) for it in items])[1]


@dataclass
class Evaluation:
    """`results` as results.json holds them; `predictions`: one row per item, shot count and task."""

    results: dict
    predictions: list[dict] = field(default_factory=list)


def _prediction_row(task: Task, shots: int, index: int, prompt: list, answer: Answer, item_score: float) -> dict:
    item = task.test[index]
    refs = {"references": list(item.captions)} if isinstance(item, CaptionItem) else {
        "question": item.question, "references": list(item.answers), **({"type": item.kind} if item.kind else {})}
    return {"task": task.name, "shots": shots, "index": index, "image": item.image, **refs,
            "prompt": prompt_text(prompt), "prompt_tokens": answer.prompt_tokens, "prediction": answer.text,
            "hit_limit": answer.hit_limit, "score": item_score}


@dataclass
class TaskRun:
    """One task's scores by shot count, its prediction rows, and the answer length it was decoded with."""

    scores: dict[str, float]
    rows: list[dict]
    max_new_tokens: int = 0


def evaluate_task(engine: Engine, task: Task, shots: list[int], cfg: EvalConfig, fmt: PromptFormat,
                  progress: bool = True) -> TaskRun:
    if task.metric == Metric.PERPLEXITY:
        text = Path(task.text_path).read_text(encoding="utf-8", errors="replace")
        ppl = perplexity(engine.model, engine.tok, text, max_tokens=cfg.ppl_tokens, window=cfg.ppl_window,
                         stride=cfg.ppl_stride, batch_size=cfg.batch_size, progress=progress, desc=task.name)
        return TaskRun({"0": ppl}, [])
    items = scored_items(task, cfg.limit)
    n = len(items)
    length = 0 if task.ranks_choices else cfg.max_new_tokens or generation_length(task, items, engine.tok)
    gen = GenerationConfig(max_new_tokens=length, stop=STOP[fmt])
    # a ranked answer follows the prompt as a demonstration's does: after a space in the pretrain format
    prefix = " " if fmt == PromptFormat.PRETRAIN else ""
    high_res_last = cfg.high_res_last if engine.grid else None
    template = template_for(engine.tok)
    scores, rows = {}, []
    for k in shots:
        answers: list[Answer] = []
        prompts: list = []
        bar = tqdm(total=n, desc=f"{task.name} {k}-shot", unit="item", disable=not progress, leave=False)
        for start in range(0, n, cfg.batch_size):
            batch = [build_prompt(task, i, k, seed=cfg.seed, fmt=fmt, high_res_last=high_res_last, template=template)
                     for i in range(start, min(n, start + cfg.batch_size))]
            if task.ranks_choices:
                answers += engine.choose(batch, [items[i].choices for i in range(start, start + len(batch))], prefix)
            else:
                answers += engine.complete(batch, gen)
            prompts += batch
            bar.update(len(batch))
        bar.close()
        per_item = item_scores(task, [a.text for a in answers], items)
        scores[str(k)] = sum(per_item) / n
        # the prompt lengths come from the decoding pass: each prompt is tokenized once
        rows += [_prediction_row(task, k, i, prompts[i], answers[i], per_item[i]) for i in range(n)]
    return TaskRun(scores, rows, length)


def write_results(evaluation: Evaluation, out: Path, tasks: list[Task] = ()) -> None:
    """results.json, results.md, predictions.jsonl; for benchmark tasks (items with official ids) also
    `submissions/TASK_Kshot.json` in the evaluation server's format."""
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for k in sorted({r["shots"] for r in evaluation.predictions if r["task"] == task.name}):
            rows = [r for r in evaluation.predictions if r["task"] == task.name and r["shots"] == k]
            write_submission(task, rows, out / "submissions" / f"{task.name}_{k}shot.json")
    # predictions first, results last: a results.json is only there once what it summarises is
    write_text(out / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in evaluation.predictions))
    write_text(out / "results.md", results_table(evaluation.results))
    write_json(out / "results.json", evaluation.results)


def results_table(results: dict) -> str:
    shots = sorted({s for t in results["tasks"].values() for s in t["scores"]}, key=int)
    lines = ["| task | metric | items | baseline | question only | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|---|---|---|---|" + "---|" * len(shots)]
    for name, t in results["tasks"].items():
        cells = [f"{t['scores'][s]:.3f}" if s in t["scores"] else "" for s in shots]
        items = f"{t['items']} of {t['test_items']}" if "items" in t else ""
        blind = f"{t['question_only_baseline']:.3f}" if "question_only_baseline" in t else ""
        lines.append(f"| {name} | {t['metric']} | {items} | {t['baseline']:.3f} | {blind} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n" + "".join(f"\n{line}\n" for line in settings_notes(results))


def settings_notes(results: dict) -> list[str]:
    """What a reader needs to trust or question each number: the items scored, the answer length and
    how many answers ran into it, the context and how many prompts ran past it."""
    context = results.get("context")
    lines = []
    if context is not None:
        lines.append(f"Context: {context} positions ({results.get('context_from', 'recorded')}); "
                     "prompts longer than that reach positions the model never trained on.")
    for name, t in results["tasks"].items():
        if "items" not in t:
            continue
        lines.append(f"{name}: the first {t['items']} of {t['test_items']} test items (scores, baseline and "
                     f"CIDEr-D's document frequencies all over these); answers up to {t['max_new_tokens']} new "
                     f"tokens ({t['max_new_tokens_from']}).")
        for s, count in t.get("hit_limit", {}).items():
            if count:
                flag = (" — over 1%: read them in predictions.jsonl (`hit_limit`); answers that repeat themselves "
                        "run into any limit, real answers cut short call for a larger eval.max_new_tokens"
                        if count > HIT_LIMIT_WARN * t["items"] else "")
                lines.append(f"{name} {s}-shot: {count} of {t['items']} answers ran into the limit{flag}.")
        for s, types in t.get("by_type", {}).items():
            lines.append(f"{name} {s}-shot: {t['distinct_answers'][s]} distinct answers; by question type: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in types.items()) + ".")
        for s, count in t.get("over_context", {}).items():
            lines.append(f"{name} {s}-shot: {count} of {t['items']} prompts longer than the context of {context} "
                         f"positions (longest {t['longest_prompt'][s]}).")
    return lines


def _lengths(rows: list[dict], context: int) -> dict:
    """The longest prompt per shot count, how many prompts exceed the context and how many answers hit the
    length limit (both by shot count, zeros kept: a count of 0 is a fact worth reading)."""
    longest: dict[str, int] = {}
    over: dict[str, int] = {}
    hits: dict[str, int] = {}
    for r in rows:
        k = str(r["shots"])
        longest[k] = max(longest.get(k, 0), r["prompt_tokens"])
        over[k] = over.get(k, 0) + (r["prompt_tokens"] > context)
        hits[k] = hits.get(k, 0) + bool(r["hit_limit"])
    return {"longest_prompt": longest, "over_context": {k: v for k, v in over.items() if v}, "hit_limit": hits}


def answer_spread(rows: list[dict]) -> dict:
    """Per shot count, how many distinct answers the model gave and, where the items have question
    types, the accuracy per type: a model that gives one answer to every question shows here even when
    its mean equals a baseline."""
    shots = sorted({r["shots"] for r in rows})
    distinct = {str(k): len({r["prediction"] for r in rows if r["shots"] == k}) for k in shots}
    by_type: dict[str, dict[str, float]] = {}
    for k in shots:
        kinds: dict[str, list[float]] = {}
        for r in rows:
            if r["shots"] == k and r.get("type"):
                kinds.setdefault(r["type"], []).append(r["score"])
        if kinds:
            by_type[str(k)] = {t: sum(v) / len(v) for t, v in sorted(kinds.items())}
    return {"distinct_answers": distinct, **({"by_type": by_type} if by_type else {})}


def context_of(model: MLLM) -> tuple[int, str]:
    """The context prompts are checked against, and where it comes from."""
    dec = model.cfg.decoder
    if dec.trained_context:
        return dec.context, f"the longest sequence it was trained on: {dec.trained_context}"
    return dec.context, "the decoder's position table; this run does not record its trained length"


def with_run_prompts(task: Task, cfg: EvalConfig) -> Task:
    """The task with this run's prompt overrides (`eval.chat_prompt`, `eval.pretrain_prompt`) in place
    of its own, checked: a VQA prompt must place `{question}`."""
    if task.metric == Metric.PERPLEXITY or not (cfg.chat_prompt or cfg.pretrain_prompt):
        return task
    own = task.prompt_spec
    spec = PromptSpec(chat=cfg.chat_prompt or own.chat, pretrain=cfg.pretrain_prompt or own.pretrain)
    try:
        spec.check(vqa=task.metric == Metric.VQA_ACCURACY, where=f"task {task.name}")
    except ValueError as err:
        raise ConfigError(f"eval.chat_prompt / eval.pretrain_prompt: {err}") from None
    return dataclasses.replace(task, prompts=spec)


def longest_prompts(task: Task, shots: list[int], cfg: EvalConfig, tok: Tokenizer, *, image_tokens: int,
                    fmt: PromptFormat = PromptFormat.PRETRAIN) -> dict[int, int]:
    """The longest prompt (in positions, `image_tokens` per image at one view) of the scored items at each
    shot count, without a model: what an experiment checks against a context before training for it."""
    task = with_run_prompts(task, cfg)
    longest = {}
    for k in shots:
        lengths = [len(tokenize([Text(p) if isinstance(p, str) else p for p in
                                 build_prompt(task, i, k, seed=cfg.seed, fmt=fmt)], tok, image_tokens=image_tokens,
                                end_of_text=False).tokens)
                   for i in range(len(scored_items(task, cfg.limit)))]
        longest[k] = max(lengths, default=0)
    return longest


def evaluate(model: MLLM, tok: Tokenizer, tasks: list[Task], shots: list[int], cfg: EvalConfig, *,
             settings: InferenceSettings, progress: bool = True) -> Evaluation:
    """Every task at every shot count, prompted and shown images as `settings` say (a run's own:
    `InferenceSettings.of(cfg)`)."""
    fmt = settings.prompt_format
    engine = Engine(model, tok, sub_image_grid=settings.sub_image_grid)
    context, context_from = context_of(model)
    evaluation = Evaluation({"prompt": fmt.value, "context": context, "context_from": context_from, "tasks": {}})
    tasks = [with_run_prompts(t, cfg) for t in tasks]  # every prompt checked before any decoding
    for task in tasks:
        run = evaluate_task(engine, task, shots, cfg, fmt, progress)
        entry: dict = {"metric": task.metric.value, "prompt": fmt.value, "scores": run.scores}
        if task.metric == Metric.PERPLEXITY:
            entry["baseline"] = float(model.cfg.decoder.vocab_size)
        else:
            spec = task.prompt_spec
            entry["prompt_template"] = spec.chat if fmt == PromptFormat.CHAT else spec.pretrain
            entry["prompts"] = dataclasses.asdict(spec)
            items = scored_items(task, cfg.limit)
            entry |= {"baseline": baseline(task, items), "items": len(items), "test_items": len(task.test),
                      "max_new_tokens": run.max_new_tokens,
                      "max_new_tokens_from": "eval.max_new_tokens" if cfg.max_new_tokens else
                      "99% of the references fit, plus the stop", **_lengths(run.rows, context)}
            if task.ranks_choices:  # how the answers were given is part of the score's meaning
                entry |= {"answered_by": "the most likely of each item's choices (no generation)",
                          "max_new_tokens_from": "none: answers are ranked choices"}
            if task.metric == Metric.VQA_ACCURACY:
                entry |= answer_spread(run.rows) | {"question_only_baseline": question_only_baseline(task, items)}
            _warn(task.name, entry, context)
        evaluation.results["tasks"][task.name] = entry
        evaluation.predictions += run.rows
    return evaluation


def _warn(name: str, entry: dict, context: int) -> None:
    n = entry["items"]
    for k, count in entry["over_context"].items():
        log.warning("%s %s-shot: %d of %d prompts are longer than the model's context of %d positions",
                    name, k, count, n, context)
    for k, count in entry["hit_limit"].items():
        if count > HIT_LIMIT_WARN * n:
            log.warning("%s %s-shot: %d of %d answers ran into max_new_tokens=%d, longer than the references: "
                        "read them in predictions.jsonl (a model that repeats itself runs into any limit; real "
                        "answers cut short call for a larger eval.max_new_tokens)", name, k, count, n,
                        entry["max_new_tokens"])
