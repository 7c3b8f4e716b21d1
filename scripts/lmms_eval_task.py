"""Write an mm1 VQA task as an lmms-eval task folder, to score `mm1 serve` with lmms-eval's OpenAI model.

    python scripts/lmms_eval_task.py --task custom:data/test.jsonl --out runs/lmms_task [--limit 100]
        [--max-new-tokens 16] [--name mm1_vqa] [--world DIR]

The folder holds `NAME.yaml` (for `--include_path`), `utils.py` and `data.jsonl`: the task's first
`--limit` test items in VQAv2's layout (10 answers per question; a question with fewer references
has them repeated to 10, which leaves the official accuracy of a one-reference question an exact
match, as mm1's is). The question is asked with the task's chat prompt (its `{question}` template
split into lmms-eval's `pre_prompt`/`post_prompt`), scored with lmms-eval's own VQAv2 processing,
after cutting the answer at its first line break as `mm1 eval`'s chat format does (lmms-eval's
OpenAI model sends no stop strings). `generation_kwargs.max_new_tokens` is set, since lmms-eval
otherwise asks for 1024 tokens. docs/evaluation.md gives the lmms-eval command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm1.eval.harness import scored_items
from mm1.eval.tasks import Metric, get_task

UTILS = '''"""Written by mm1's scripts/lmms_eval_task.py: an mm1 VQA task for lmms-eval (VQAv2 layout and scoring)."""

from PIL import Image

from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, result):
    # mm1's chat-format answers end at the first line break (lmms-eval's OpenAI model sends no stop)
    return vqav2_process_results_val(doc, [result[0].split("\\n")[0]])
'''


def write_task(task_spec: str, out: Path, *, name: str, limit: int, max_new_tokens: int,
               world: Path | None = None) -> Path:
    task = get_task(task_spec, world=world)
    if task.metric != Metric.VQA_ACCURACY:
        raise SystemExit(f"{task_spec}: only VQA tasks are written for lmms-eval here")
    pre, _, post = task.prompt_spec.chat.partition("{question}")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "data.jsonl").open("w") as f:
        for i, it in enumerate(scored_items(task, limit)):
            answers = [it.answers[k % len(it.answers)] for k in range(max(10, len(it.answers)))]
            f.write(json.dumps({"question_id": i, "question": it.question, "image": str(Path(it.image).resolve()),
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k, a in enumerate(answers)]}) + "\n")
    yaml = "\n".join([
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    validation: {json.dumps(str((out / 'data.jsonl').resolve()))}", "test_split: validation",
        "output_type: generate_until", "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text", 'doc_to_target: "answer"', "generation_kwargs:",
        f"  max_new_tokens: {max_new_tokens}", "  temperature: 0", "process_results: !function utils.process_results",
        "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true",
        "lmms_eval_specific_kwargs:", "  default:", f"    pre_prompt: {json.dumps(pre)}",
        f"    post_prompt: {json.dumps(post)}", "metadata:", "  - version: 0.0", ""])
    (out / f"{name}.yaml").write_text(yaml)
    (out / "utils.py").write_text(UTILS)
    return out / f"{name}.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, help="an mm1 VQA task: custom:FILE.jsonl, synth_vqa, vqav2:DIR, …")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="mm1_vqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--world", help="the synthetic world, for synth_* tasks")
    a = ap.parse_args()
    path = write_task(a.task, Path(a.out), name=a.name, limit=a.limit, max_new_tokens=a.max_new_tokens,
                      world=Path(a.world) if a.world else None)
    print(f"lmms-eval task written: {path} (--include_path {path.parent} --tasks {a.name})")


if __name__ == "__main__":
    main()
