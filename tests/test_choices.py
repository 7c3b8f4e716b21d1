"""Multiple-choice answers: a VQA item with choices is answered by the choice the model finds most likely."""

import json

import pytest
import torch

from mm1.config import EvalConfig, InferenceSettings, PromptFormat
from mm1.data.errors import RecordError
from mm1.eval.fewshot import build_prompt
from mm1.eval.harness import evaluate
from mm1.eval.tasks import get_task
from mm1.serve.engine import Engine


@pytest.fixture(scope="module")
def model_and_tok(world):
    from conftest import tiny_config
    from mm1.data.stream import load_tokenizer
    from mm1.model.mllm import MLLM
    from mm1.train.lm import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    torch.manual_seed(0)
    return MLLM(cfg.model).eval(), tok


def test_a_continuation_s_log_probability_is_its_tokens_under_one_plain_forward(world, model_and_tok):
    model, tok = model_and_tok
    engine = Engine(model, tok)
    task = get_task("synth_stripes", world=world)
    prompt = build_prompt(task, 0, 1, seed=0)
    got = engine.continuation_logprobs(prompt, [" red", " purple", " green"])
    for text, value in zip([" red", " purple", " green"], got, strict=True):
        whole = engine.encode([*prompt[:-1], prompt[-1] + text])
        n = engine.prompt_length(prompt)
        ids = torch.tensor([whole.ids])
        with torch.inference_mode():
            x = model.embed(ids, torch.stack(whole.images))
            hidden = model.decoder(x, torch.arange(ids.shape[1])[None]).hidden_BTD
            logp = torch.log_softmax(model.decoder.lm_head(hidden).float(), -1)
        want = sum(float(logp[0, t - 1, whole.ids[t]]) for t in range(n, len(whole.ids)))
        assert value == pytest.approx(want, abs=1e-4)  # left padding beside longer rows changes nothing
    # one token each takes one pass of the prompt; a longer choice beside it, the batch of whole rows: same value
    mixed = engine.continuation_logprobs(prompt, [" red", " red star and a blue circle"])
    assert mixed[0] == pytest.approx(got[0], abs=1e-4) and mixed[1] < mixed[0]
    picked = engine.choose([prompt], [("red", "purple", "green")], " ")[0].text
    assert picked == ("red", "purple", "green")[max(range(3), key=got.__getitem__)]


def test_a_task_with_choices_is_answered_by_ranking_and_says_so(world, model_and_tok):
    model, tok = model_and_tok
    ev = evaluate(model, tok, [get_task("synth_stripes", world=world)], [0, 1], EvalConfig(limit=4),
                  settings=InferenceSettings(PromptFormat.PRETRAIN), progress=False)
    entry = ev.results["tasks"]["synth_stripes"]
    assert entry["answered_by"].startswith("the most likely of each item's choices")
    assert entry["max_new_tokens"] == 0 and not any(r["hit_limit"] for r in ev.predictions)
    task = get_task("synth_stripes", world=world)
    choices = {i: set(it.choices) for i, it in enumerate(task.test)}
    assert all(r["prediction"] in choices[r["index"]] for r in ev.predictions)  # always one of the item's choices
    assert entry["baseline"] == pytest.approx(sum(1 / len(it.choices) for it in task.test[:4]) / 4)  # chance
    assert entry["scores"]["0"] == sum(r["score"] for r in ev.predictions if r["shots"] == 0) / 4


def test_a_task_file_whose_answer_is_not_a_choice_is_refused(tmp_path):
    rows = [{"image": "a.png", "question": "What color?", "answers": ["red"], "choices": ["blue", "green"]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"t.jsonl:line1.*the answer 'red' is not among its choices"):
        get_task(f"custom:{tmp_path / 't.jsonl'}")


def test_next_token_scores_match_continuation_scores_and_refuse_longer_texts(world, model_and_tok):
    model, tok = model_and_tok
    engine = Engine(model, tok)
    task = get_task("synth_stripes", world=world)
    prompts = [build_prompt(task, i, 0, seed=0) for i in range(3)]
    with torch.inference_mode():
        batched = engine.next_token_logprobs(prompts, [" red", " green"])
        for prompt, row in zip(prompts, batched, strict=True):  # one left-padded pass = each prompt alone
            assert row == pytest.approx(engine.continuation_logprobs(prompt, [" red", " green"]), abs=1e-4)
        with pytest.raises(ValueError, match="is not one token after the prompt"):
            engine.next_token_logprobs(prompts, [" red star and a blue circle"])
