"""Evaluation: CIDEr-D against pycocoevalcap, VQA normalisation, prompts, baselines, results files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from mm1.config import InferenceSettings, PromptFormat
from mm1.data.template import CAPTION_PROMPT, SHORT_ANSWER
from mm1.eval.fewshot import build_prompt, demonstrations, prompt_text
from mm1.eval.harness import baseline, evaluate, results_table, write_results
from mm1.eval.metrics import cider_d, coco_tokenize, normalize_answer, vqa_accuracy
from mm1.eval.tasks import Metric, get_task
from mm1.serve.engine import Engine, LowRes

CANDIDATES = ["a man riding a horse on a beach", "two dogs play in the snow", "a plate of food with broccoli",
              "a red bus parked on the street", "a cat sitting on a laptop keyboard"]
REFERENCES = [
    ["a man rides a horse along the beach", "person on horseback at the seashore", "a horse and rider on sand"],
    ["two dogs playing in snow", "a pair of dogs running through the snow", "dogs play outside in winter"],
    ["a plate with broccoli and rice", "food on a white plate including broccoli", "a meal of chicken and broccoli"],
    ["a red double decker bus on a city street", "a bus parked by the curb", "red bus waiting on the road"],
    ["a cat lying on a keyboard", "a kitten sits on a laptop", "cat on top of a computer keyboard"],
]


def test_cider_matches_pycocoevalcap():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    gts = {i: [coco_tokenize(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [coco_tokenize(c)] for i, c in enumerate(CANDIDATES)}
    theirs, their_each = Cider().compute_score(gts, res)
    ours, our_each = cider_d(CANDIDATES, REFERENCES)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert our_each == pytest.approx(list(their_each), rel=1e-9)


def test_cider_on_coco_captions(shared):
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    rows = [json.loads(x) for x in (shared / "coco_mini" / "captions_all.jsonl").read_text().splitlines()][:40]
    cands = [r["captions"][0] for r in rows]
    refs = [r["captions"][1:] for r in rows]
    theirs, _ = Cider().compute_score({i: [coco_tokenize(x) for x in r] for i, r in enumerate(refs)},
                                      {i: [coco_tokenize(c)] for i, c in enumerate(cands)})
    assert cider_d(cands, refs)[0] == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize(("raw", "norm"), [
    ("Two", "2"), ("the Red.", "red"), ("yes!", "yes"), ("a dog", "dog"), ("dont", "don't"),
    ("whats that", "what's that"), ("youre right", "you're right"), ("shouldnt've", "shouldn't've"),
    ("Im here", "im here"),  # the official table's capitalised keys never match: kept as the tool has them
    ("top-left", "top left"), ("top -left", "top left"), ("3.5", "3.5"), ("1,000 dollars!", "1000 dollars"),
    ("  ten\tcats\n", "10 cats")])
def test_vqa_official_answer_processing(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_averages_leave_one_out_subsets():
    # Hand-computed, 10 annotators: leaving out a non-matching one leaves m matches, a matching one m-1.
    def ten(m):
        return ["red"] * m + ["blue"] * (10 - m)

    assert vqa_accuracy("red", ten(3)) == pytest.approx(0.9)  # (7·1 + 3·2/3) / 10, not 1.0
    assert vqa_accuracy("red", ten(2)) == pytest.approx(0.6)  # (8·2/3 + 2·1/3) / 10
    assert vqa_accuracy("red", ten(1)) == pytest.approx(0.3)  # (9·1/3 + 1·0) / 10
    assert vqa_accuracy("red", ten(4)) == pytest.approx(1.0)
    assert vqa_accuracy("The red.", ten(0)) == 0.0 and vqa_accuracy("Red!", ten(10)) == 1.0
    assert vqa_accuracy("the two", ["2"]) == 1.0 and vqa_accuracy("3", ["2"]) == 0.0  # one reference: exact


def _images(parts) -> int:
    return sum(isinstance(p, Image.Image | LowRes) for p in parts)


def test_prompts_follow_the_paper_format_and_never_use_the_query(world):
    task = get_task("synth_vqa", world=world)
    for i in range(10):
        assert task.test[i] not in demonstrations(task, i, 8, seed=0)
    four = build_prompt(task, 3, 4, seed=0)
    assert _images(four) == 5
    texts = [p for p in four if isinstance(p, str)]
    assert texts[-1] == f"Question: {task.test[3].question} Short answer:"
    assert texts[0].startswith("Question: ") and " Short answer: " in texts[0]
    zero = build_prompt(task, 3, 0, seed=0)
    assert _images(zero) == 1 and zero[0].count("Short answer:") == 2  # two text-only demos
    assert build_prompt(task, 3, 4, seed=0) == four  # reproducible
    cap = build_prompt(get_task("synth_caption", world=world), 0, 4, seed=0)
    assert cap[-1] == "Output:" and cap[1].startswith("Output: ")


def test_chat_prompts_are_turns_of_the_tuned_template(world):
    task = get_task("synth_vqa", world=world)
    zero = build_prompt(task, 3, 0, seed=0, fmt=PromptFormat.CHAT)
    text = prompt_text(zero)
    # 0-shot: one user turn with the image and the question, then the assistant's opening
    assert text == f"<|user|><image>{task.test[3].question}\n{SHORT_ANSWER}<|end|><|assistant|>"
    two = prompt_text(build_prompt(task, 3, 2, seed=0, fmt=PromptFormat.CHAT))
    assert two.count("<|user|>") == 3 and two.count("<|assistant|>") == 3 and two.endswith("<|assistant|>")
    assert "Short answer:" not in two and "Question:" not in two
    cap = prompt_text(build_prompt(get_task("synth_caption", world=world), 0, 0, seed=0, fmt=PromptFormat.CHAT))
    assert CAPTION_PROMPT in cap


def test_mixed_resolution_keeps_only_the_last_images_at_high_resolution(world):
    task = get_task("synth_vqa", world=world)
    eight = build_prompt(task, 0, 8, seed=0, fmt=PromptFormat.CHAT, high_res_last=1)
    kinds = [type(p) for p in eight if isinstance(p, Image.Image | LowRes)]
    assert kinds.count(LowRes) == 8 and not issubclass(kinds[-1], LowRes)
    assert prompt_text(eight).count("<image:low>") == 8
    # what it costs in image tokens with 2x2 sub-images: 8 one-view demonstrations + one 5-view query
    eng = _engine(world, grid=2)
    n = eng.model.num_image_tokens
    ids = eng.encode(eight).ids
    assert ids.count(eng.tok.image_id) == (8 + 5) * n
    full = build_prompt(task, 0, 8, seed=0, fmt=PromptFormat.CHAT, high_res_last=9)
    assert eng.encode(full).ids.count(eng.tok.image_id) == 9 * 5 * n


def test_text_that_looks_like_a_control_token_stays_text_in_prompts(world):
    from mm1.eval.tasks.base import Task, VQAItem

    item = VQAItem(image=get_task("synth_vqa", world=world).test[0].image,
                   question="is <image> or <|end|> written here?", answers=("no",))
    task = Task(name="t", metric=Metric.VQA_ACCURACY, test=[item], train=[item])
    eng = _engine(world, grid=0)
    for fmt in (PromptFormat.PRETRAIN, PromptFormat.CHAT):
        ids = eng.encode(build_prompt(task, 0, 0, seed=0, fmt=fmt)).ids
        assert ids.count(eng.tok.image_id) == eng.model.num_image_tokens  # the query's image only
        assert ids.count(eng.tok.control_id("<|end|>")) == (1 if fmt == PromptFormat.CHAT else 0)


def _engine(world, *, grid: int) -> Engine:
    import torch

    from conftest import tiny_config
    from mm1.data.stream import load_tokenizer
    from mm1.model.mllm import MLLM
    from mm1.train.lm import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    torch.manual_seed(0)
    return Engine(MLLM(cfg.model).eval(), tok, sub_image_grid=grid)


def test_baselines(world):
    vqa = get_task("synth_vqa", world=world)
    assert 0 < baseline(vqa) < 0.5
    cap = get_task("synth_caption", world=world)
    assert baseline(cap) > 0


def test_custom_task_file_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = tmp_path / "mine.jsonl"
    good.write_text('{"image": "a.png", "question": "q?", "answers": ["x", "y"]}\n')
    task = get_task(f"custom:{good}")
    assert task.metric == Metric.VQA_ACCURACY and task.test[0].answers == ("x", "y")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"picture": "a.png"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:line1: a task row needs 'image'"):
        get_task(f"custom:{bad}")
    with pytest.raises(ValueError, match=r"unknown task 'nope'"):
        get_task("nope")


def test_harness_writes_results_in_the_documented_shape(world, tmp_path):
    from conftest import tiny_config
    from mm1.config import EvalConfig
    from mm1.data.stream import load_tokenizer
    from mm1.model.mllm import MLLM
    from mm1.train.lm import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    model = MLLM(cfg.model).eval()
    text = tmp_path / "t.txt"
    text.write_text("a red circle and a blue square. " * 20)
    tasks = [get_task("synth_caption", world=world), get_task("synth_vqa", world=world), get_task(f"ppl:{text}")]
    ev = evaluate(model, tok, tasks, [0, 2], EvalConfig(limit=4, max_new_tokens=4, batch_size=2),
                  settings=InferenceSettings(PromptFormat.PRETRAIN), progress=False)
    res = ev.results
    assert res["prompt"] == "pretrain" and res["tasks"]["synth_vqa"]["prompt"] == "pretrain"
    assert set(res["tasks"]) == {"synth_caption", "synth_vqa", "ppl:t.txt"}
    assert set(res["tasks"]["synth_vqa"]["scores"]) == {"0", "2"}
    assert res["tasks"]["synth_caption"]["metric"] == "cider" and "baseline" in res["tasks"]["synth_vqa"]
    ppl = res["tasks"]["ppl:t.txt"]["scores"]["0"]
    assert 1 < ppl < 2 * cfg.model.decoder.vocab_size  # untrained: near uniform over the output vocabulary
    assert "| synth_vqa | vqa_accuracy |" in results_table(res)
    write_results(ev, tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2  # two image tasks, 4 items, 2 shot counts
    vqa = [r for r in rows if r["task"] == "synth_vqa" and r["shots"] == 2]
    for r in vqa:  # the score of each row is the prediction's against its references
        from mm1.eval.metrics import vqa_accuracy

        assert r["score"] == vqa_accuracy(r["prediction"], r["references"])
        assert r["prompt"].endswith(f"Question: {r['question']} Short answer:") and r["prompt"].count("<image>") == 3
    assert sum(r["score"] for r in vqa) / 4 == pytest.approx(res["tasks"]["synth_vqa"]["scores"]["2"])
    t = res["tasks"]["synth_vqa"]  # answers per shot count, and accuracy per question type, from the rows
    assert t["distinct_answers"]["2"] == len({r["prediction"] for r in vqa})
    kinds = {r["type"] for r in vqa}
    assert set(t["by_type"]["2"]) == kinds and all(
        t["by_type"]["2"][k] == pytest.approx(statistics.fmean(r["score"] for r in vqa if r["type"] == k))
        for k in kinds)
    with pytest.raises(ValueError, match=r"eval\.prompt=auto"):
        InferenceSettings(PromptFormat.AUTO)


def test_prompts_longer_than_the_context_are_counted_and_warned_about(world, caplog):
    """Many shots of many image tokens can outgrow a small model's context: the results say so."""
    from conftest import tiny_config
    from mm1.config import EvalConfig
    from mm1.data.stream import load_tokenizer
    from mm1.eval.fewshot import build_prompt
    from mm1.model.mllm import MLLM
    from mm1.serve.engine import Engine
    from mm1.train.lm import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    task = get_task("synth_vqa", world=world)
    engine = Engine(MLLM(cfg.model).eval(), tok)
    lengths = {k: [engine.prompt_length(build_prompt(task, i, k, seed=0, fmt=PromptFormat.PRETRAIN))
                   for i in range(4)] for k in (0, 4)}
    assert lengths[0] == [len(engine.encode(build_prompt(task, i, 0, seed=0, fmt=PromptFormat.PRETRAIN)).ids)
                          for i in range(4)]
    # a context between the longest 0-shot and the shortest 4-shot prompt: every 4-shot prompt is over
    cfg.model.decoder.max_seq_len = max(lengths[0]) + 1
    assert min(lengths[4]) > cfg.model.decoder.max_seq_len
    with caplog.at_level("WARNING", logger="mm1.eval"):
        res = evaluate(MLLM(cfg.model).eval(), tok, [task], [0, 4], EvalConfig(limit=4, max_new_tokens=2),
                       settings=InferenceSettings(PromptFormat.PRETRAIN), progress=False).results
    t = res["tasks"]["synth_vqa"]
    assert res["context"] == cfg.model.decoder.max_seq_len
    assert t["longest_prompt"] == {"0": max(lengths[0]), "4": max(lengths[4])} and t["over_context"] == {"4": 4}
    assert "synth_vqa 4-shot: 4 of 4 prompts are longer than the model's context" in caplog.text
    assert "synth_vqa 4-shot: 4 of 4 prompts longer than the context" in results_table(res)
    # a run that records its trained length is checked against that, not the position table
    cfg.model.decoder.max_seq_len = 4 * max(lengths[4])
    cfg.model.decoder.trained_context = max(lengths[0]) + 1
    res = evaluate(MLLM(cfg.model).eval(), tok, [task], [0, 4], EvalConfig(limit=4, max_new_tokens=2),
                   settings=InferenceSettings(PromptFormat.PRETRAIN), progress=False).results
    assert res["context"] == max(lengths[0]) + 1 and "trained on" in res["context_from"]
    assert res["tasks"]["synth_vqa"]["over_context"] == {"4": 4}


def test_answer_length_comes_from_the_references_and_hits_are_counted(world, tmp_path):
    """A task whose references are longer than a fixed cap gets a longer one; answers cut by it are counted."""
    import shutil

    import torch

    from conftest import tiny_config
    from mm1.config import EvalConfig
    from mm1.data.stream import load_tokenizer
    from mm1.eval.harness import generation_length
    from mm1.eval.tasks import CaptionItem
    from mm1.model.mllm import MLLM
    from mm1.train.lm import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    task = get_task("synth_caption", world=world)
    short = generation_length(task, task.test[:8], tok)
    lengths = [len(tok.encode(" " + c)) for it in [*task.train, *task.test[:8]] for c in it.captions]
    assert sum(n < short for n in lengths) >= 0.99 * len(lengths)  # 99% fit with room for the stop
    assert sum(n < short - 1 for n in lengths) < 0.99 * len(lengths)  # and no more room than that
    long_caption = " ".join(["a red circle and a blue square on a white background"] * 4)
    task.train = [CaptionItem(it.image, (long_caption,) * 5) for it in task.train]
    assert generation_length(task, task.test[:8], tok) == len(tok.encode(" " + long_caption)) + 1 > 16
    # an untrained model never ends its answer: every row runs into a 3-token cap, and the results say so
    resolve_model_config(cfg, len(tok), tok.image_id)
    torch.manual_seed(0)
    ev = evaluate(MLLM(cfg.model).eval(), tok, [get_task("synth_vqa", world=world)], [0],
                  EvalConfig(limit=3, max_new_tokens=3), settings=InferenceSettings(PromptFormat.PRETRAIN),
                  progress=False)
    t = ev.results["tasks"]["synth_vqa"]
    assert t["max_new_tokens"] == 3 and t["max_new_tokens_from"] == "eval.max_new_tokens"
    hits = sum(r["hit_limit"] for r in ev.predictions)
    assert t["hit_limit"] == {"0": hits}
    assert hits > 0 and any(r["prediction"].strip() for r in ev.predictions if r["hit_limit"])  # text kept
    assert f"{hits} of 3 answers ran into the limit" in results_table(ev.results)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_baseline_and_scores_use_the_same_items(world):
    """A baseline computed on a subset equals the baseline of a task that holds only that subset."""
    from mm1.eval.harness import scored_items
    from mm1.eval.tasks import Task

    for name in ("synth_vqa", "synth_caption"):
        task = get_task(name, world=world)
        items = scored_items(task, 5)
        assert items == task.test[:5] and scored_items(task, 0) == task.test
        subset = Task(task.name, task.metric, task.train, task.test[:5])
        assert baseline(task, items) == pytest.approx(baseline(subset))
    vqa = get_task("synth_vqa", world=world)
    from collections import Counter
    top = Counter(it.answers[0] for it in vqa.train).most_common(1)[0][0]  # what the baseline always answers
    yes, others = [it for it in vqa.test if it.answers[0] == top], [it for it in vqa.test if it.answers[0] != top]
    assert yes and others and baseline(vqa, yes) > baseline(vqa, others)


def test_prompt_format_follows_the_stage_unless_chosen(world):
    from conftest import tiny_config
    from mm1.config import Stage, apply_overrides
    cfg = tiny_config(world, "data.sub_image_grid=2")
    assert InferenceSettings.of(cfg) == InferenceSettings(PromptFormat.PRETRAIN, 0)  # the grid is SFT's only
    cfg.train.stage = Stage.SFT
    assert InferenceSettings.of(cfg) == InferenceSettings(PromptFormat.CHAT, 2)
    assert InferenceSettings.of(apply_overrides(cfg, ["eval.prompt=pretrain"])) == InferenceSettings(
        PromptFormat.PRETRAIN, 2)


def test_world_documents_never_hold_the_evaluation_templates(world):
    import pyarrow.parquet as pq

    from mm1.data.synth.pages import EVAL_TEMPLATES

    texts = [t for row in pq.read_table(world / "interleaved" / "docs.parquet").column("texts").to_pylist()
             for t in row if t]
    assert len(texts) > 100  # the pages are there, with their text
    docs = "".join(texts)
    assert not [t for t in EVAL_TEMPLATES if t in docs]


def test_coco_task_from_shared(shared):
    task = get_task("coco_val2017", shared=shared)
    assert len(task.test) == 159 and len(task.train) == 80 and Path(task.test[0].image).exists()


@pytest.mark.parametrize(("n", "window", "stride"), [(50, 16, 16), (50, 16, 5), (17, 16, 8), (2, 16, 16)])
def test_perplexity_windows_score_every_target_once(n, window, stride):
    from mm1.eval.perplexity import windows

    scored = []
    for begin, first in windows(n, window, stride):
        targets = range(first, min(begin + window, n - 1) + 1)
        assert begin + 1 <= first and len(targets) > 0  # context of at least the window's start
        scored += targets
    assert scored == list(range(1, n))


def test_perplexity_batched_with_stride_equals_a_plain_loop(world):
    import math

    import torch

    from mm1.eval.perplexity import perplexity

    eng = _engine(world, grid=0)
    model, tok = eng.model, eng.tok
    text = "a red circle and a blue square on a white background. " * 12
    ids = torch.tensor(tok.encode(text))
    window, stride = 32, 12
    # the protocol by hand: target t is scored in the first window that holds it, from that window's start
    nll, begin, done = 0.0, 0, 0
    while done < len(ids) - 1:
        chunk = ids[begin:begin + window + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens_BT=chunk[None, :-1]).logits_BTV[0].float(), -1)
        for j in range(len(chunk) - 1):
            if begin + j + 1 > done:
                nll -= float(logp[j, chunk[j + 1]])
        done, begin = begin + len(chunk) - 1, begin + stride
    expected = math.exp(nll / (len(ids) - 1))
    for batch_size in (1, 5):
        got = perplexity(model, tok, text, window=window, stride=stride, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-4)


def test_document_perplexity_scores_each_document_alone_with_its_end_of_text(world):
    """Separate documents are scored as pre-training packs them: each its own tokens then end of text,
    nothing of another document in context; batching and padding change nothing."""
    import math

    import torch

    from mm1.eval.perplexity import document_perplexity, perplexity

    eng = _engine(world, grid=0)
    model, tok = eng.model, eng.tok
    docs = ["a red circle.", "two blue squares and a small green star on a white background.", "the word sun"]
    nll, n = 0.0, 0
    for d in docs:
        ids = torch.tensor([*tok.encode(d), tok.eos_id])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens_BT=ids[None, :-1]).logits_BTV[0].float(), -1)
        nll -= float(logp[torch.arange(len(ids) - 1), ids[1:]].sum())
        n += len(ids) - 1
    for batch_size in (1, 2, 16):
        assert document_perplexity(model, tok, docs, batch_size=batch_size) == pytest.approx(math.exp(nll / n),
                                                                                            rel=1e-4)
    assert document_perplexity(model, tok, docs) != pytest.approx(perplexity(model, tok, "\n\n".join(docs),
                                                                             progress=False), rel=1e-3)
    with pytest.raises(ValueError, match="at least one document"):
        document_perplexity(model, tok, [])


def test_eval_cli_flags_and_keys_are_never_overridden_behind_the_users_back(world, tmp_path):
    """`eval.tasks=…` is not replaced by a --tasks default; a flag wins over the checkpoint's settings;
    a flag and a key that disagree are refused."""
    from conftest import tiny_config
    from mm1.cli import main
    from mm1.train.trainer import train

    run = tmp_path / "run"
    train(tiny_config(world, "model.decoder.depth=1", "model.vision.depth=1", "train.steps=1"), out=run)
    common = ["--checkpoint", str(run), "eval.limit=2", "eval.max_new_tokens=2"]

    def tasks_and_shots(out):
        res = json.loads((out / "results.json").read_text())["tasks"]
        return {name: sorted(t["scores"]) for name, t in res.items()}

    assert main(["eval", *common, "--out", str(tmp_path / "a"), "eval.tasks=synth_vqa", "eval.shots=0"]) == 0
    assert tasks_and_shots(tmp_path / "a") == {"synth_vqa": ["0"]}
    assert main(["eval", *common, "--out", str(tmp_path / "b"), "--tasks", "synth_caption", "--shots", "1"]) == 0
    assert tasks_and_shots(tmp_path / "b") == {"synth_caption": ["1"]}
    assert main(["eval", *common, "--out", str(tmp_path / "c"), "--tasks", "synth_caption",
                 "eval.tasks=synth_vqa"]) == 2


def test_a_custom_task_is_asked_as_its_data_and_eval_answers_what_generate_answers(world, tmp_path):
    """Fine-tuned on LLaVA conversations without LLaVA's short-answer sentence, a model is evaluated on the
    question alone (the custom task's default chat prompt), and `mm1 eval` scores exactly what
    `mm1 generate` answers on the same items; a sidecar or an eval key changes the prompt, recorded."""
    from conftest import tiny_config
    from mm1.config import EvalConfig
    from mm1.data.formats.llava import write_llava
    from mm1.data.template import SHORT_ANSWER
    from mm1.serve.chat import generate_once
    from mm1.serve.engine import Engine, GenerationConfig
    from mm1.store.loading import load_model
    from mm1.train.trainer import train

    vqa = get_task("synth_vqa", world=world)
    data = tmp_path / "mine"
    convs = [{"id": str(i), "image": it.image, "conversations": [
        {"from": "human", "value": f"<image>\n{it.question}"}, {"from": "gpt", "value": it.answers[0]}]}
        for i, it in enumerate(vqa.train)]
    write_llava(convs, data / "train.json")
    rows = [{"image": it.image, "question": it.question, "answers": list(it.answers)} for it in vqa.test[:6]]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # absolute image paths
    cfg = tiny_config(world, "model.decoder.depth=1", "model.vision.depth=1", "train.steps=3", "train.stage=sft",
                      f"data.sft_sources.sft.paths={data / 'train.json'}", "data.sft_sources.sft_text.weight=0",
                      "data.sub_image_grid=2")
    train(cfg, out=tmp_path / "sft")
    model, tok, run_cfg = load_model(tmp_path / "sft")
    task = get_task(f"custom:{data / 'test.jsonl'}")
    settings = InferenceSettings.of(run_cfg)
    assert settings == InferenceSettings(PromptFormat.CHAT, 2)
    ev = evaluate(model, tok, [task], [0], EvalConfig(limit=6, max_new_tokens=6), settings=settings, progress=False)
    t = ev.results["tasks"]["test"]
    assert t["prompt_template"] == "{question}" and t["prompts"]["chat"] == "{question}"
    engine = Engine.for_run(model, tok, run_cfg)
    for row, item in zip(ev.predictions, task.test, strict=True):
        assert SHORT_ANSWER not in row["prompt"] and row["prompt"].rstrip().count(item.question) == 1
        said = generate_once(engine, prompt=item.question, images=[item.image],
                             gen=GenerationConfig(max_new_tokens=6), raw=False)
        assert row["prediction"] == said.split("\n")[0].strip()
    # the prompt is task configuration: a sidecar file, then a run's key, replace it and are recorded
    (data / "test.prompts.json").write_text(json.dumps({"chat": "Q: {question}"}))
    task = get_task(f"custom:{data / 'test.jsonl'}")
    assert task.prompt_spec.chat == "Q: {question}"
    ev = evaluate(model, tok, [task], [0], EvalConfig(limit=2, max_new_tokens=2, chat_prompt="{question}?!"),
                  settings=InferenceSettings(PromptFormat.CHAT), progress=False)
    assert ev.results["tasks"]["test"]["prompt_template"] == "{question}?!"
    assert all(f"{r['question']}?!" in r["prompt"] for r in ev.predictions)
    from mm1.config import ConfigError

    with pytest.raises(ConfigError, match=r"task test: the chat prompt 'no question' needs '\{question\}'"):
        evaluate(model, tok, [task], [0], EvalConfig(limit=1, chat_prompt="no question"),
                 settings=InferenceSettings(PromptFormat.CHAT), progress=False)
    (data / "test.prompts.json").write_text('{"chat": 3}')
    with pytest.raises(Exception, match=r"test.prompts.json: a prompts file is"):
        get_task(f"custom:{data / 'test.jsonl'}")


def test_the_question_only_baseline_is_the_answer_prior_of_each_question_type():
    """A task whose answers follow from the question's first words: the majority baseline is low, the
    question-only baseline is what reading the question alone earns; an unseen type gets the overall majority."""
    from mm1.eval.harness import question_only_baseline
    from mm1.eval.tasks.base import Task, VQAItem

    def q(question: str, answer: str) -> VQAItem:
        return VQAItem(image="x.png", question=question, answers=(answer,))

    train = [q("How many shapes are there?", "2")] * 3 + [q("What color is the star?", "red")] * 2 + \
        [q("Is there a circle?", "yes")] * 4
    test = [q("How many shapes are here?", "2"), q("What color is the sky?", "red"), q("Is there a star?", "yes"),
            q("Where is the star?", "yes")]  # no training question starts "where is the": the overall majority
    task = Task(name="t", metric=Metric.VQA_ACCURACY, train=train, test=test)
    assert baseline(task) == pytest.approx(0.5)  # "yes" to everything
    assert question_only_baseline(task) == pytest.approx(1.0)
    assert question_only_baseline(task, test[:2]) == pytest.approx(1.0) and baseline(task, test[:2]) == 0.0
