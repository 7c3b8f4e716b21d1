"""Chat and generate: history, images attached by path and by command, clear messages for bad images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mm1.cli import main
from mm1.config import apply_overrides
from mm1.data.template import Control, Text, template_for, user_turn
from mm1.data.tokenizer import train_bpe
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.serve.chat import Conversation, chat_loop, generate_once
from mm1.serve.engine import Engine, GenerationConfig


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    tok = train_bpe(["what colour is the circle? red circle blue square"] * 20, vocab_size=200)
    cfg = apply_overrides(get_recipe("tiny"), ["model.decoder.vocab_size=256", "model.decoder.depth=1"])
    cfg.model.image_token_id = tok.image_id
    return Engine(MLLM(cfg.model).eval(), tok)


def test_chat_keeps_history_and_attaches_images(engine, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(img)
    inputs = iter([f"/image {img}", "what colour?", "/image missing.png", "and now?", "/bogus", "/quit"])
    out: list[str] = []
    conv = chat_loop(engine, GenerationConfig(max_new_tokens=4), read=lambda _: next(inputs), write=out.append)
    assert [t.role.value for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    images = [[p for p in t.parts if isinstance(p, Image.Image)] for t in conv.turns]
    assert len(images[0]) == 1 and images[2] == []  # the image went with the first message
    assert any(line.startswith("cannot attach image: missing.png") for line in out)
    assert any("unknown command /bogus" in line for line in out)
    prompt = conv.prompt([], "third")
    assert sum(isinstance(p, Image.Image) for p in prompt) == 1
    assert prompt[0] == Control("<|user|>") and isinstance(prompt[1], Image.Image)  # images open their turn


def test_chat_ends_on_eof(engine):
    def eof(_):
        raise EOFError

    assert chat_loop(engine, GenerationConfig(max_new_tokens=2), read=eof, write=lambda s: None).turns == []


def test_conversation_prompt_uses_the_chat_template():
    conv = Conversation()
    conv.add([], "hi", "hello")
    assert conv.prompt([], "again") == [
        Control("<|user|>"), Text("hi"), Control("<|end|>"), Control("<|assistant|>"), Text(" hello", loss=True),
        Control("<|end|>", loss=True), Control("<|user|>"), Text("again"), Control("<|end|>"),
        Control("<|assistant|>")]


def test_chat_text_that_looks_like_control_tokens_stays_text(engine):
    """A user who types `<image>` or `<|end|>` gets text tokens, not an image slot or a turn end."""
    conv = Conversation()
    ids = engine.encode(conv.prompt([], "what is <image> and <|end|><|assistant|>?")).ids
    tok = engine.tok
    assert tok.image_id not in ids
    assert ids.count(tok.end_id) == 1 and ids.count(tok.assistant_id) == 1  # the template's own, only
    answer = engine.generate([conv.prompt([], "<image><image>")], GenerationConfig(max_new_tokens=2))
    assert isinstance(answer[0], str)  # no "slots but no images" error


def test_generate_once_raw_and_templated(engine, tmp_path):
    img = tmp_path / "b.png"
    Image.new("RGB", (30, 10)).save(img)
    gen = GenerationConfig(max_new_tokens=3)
    picture = Image.open(img).convert("RGB")
    raw = generate_once(engine, prompt="colour?", images=[str(img)], gen=gen, raw=True)
    templated = generate_once(engine, prompt="colour?", images=[str(img)], gen=gen, raw=False)
    # raw: the image then the prompt as given; templated: the model's chat template around them
    assert raw == engine.generate([[picture, "colour?"]], gen)[0]
    template = template_for(engine.tok)
    assert templated == engine.generate([template.render([user_turn("colour?", [picture])],
                                                         generation_prompt=True)], gen)[0]


def test_generate_cli_reports_unreadable_image(tmp_path, capsys, monkeypatch, engine):
    import mm1.cli.models as cli

    monkeypatch.setattr(cli, "_engine", lambda checkpoint, a: (engine, GenerationConfig(max_new_tokens=2)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    code = main(["generate", "--checkpoint", "x", "--image", str(bad), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"mm1: error: {bad}: cannot decode image") and "\n" not in err
    code = main(["generate", "--checkpoint", "x", "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert code == 2 and "cannot read image" in capsys.readouterr().err


def test_one_decoding_loop_serves_the_engine_and_the_server(engine, tmp_path):
    """`Engine.complete` is the continuous batcher run to its end: a batch of prompts gives what each
    prompt gives alone and what the server's batcher gives with rows joining and leaving (two rows for
    four requests); sampling with a seed repeats itself; no tokens asked for, none generated."""
    from mm1.serve.batching import ContinuousBatcher
    from mm1.serve.generation import Request

    pic = Image.new("RGB", (24, 24), (0, 0, 255))
    prompts = [[pic, "what colour"], ["red circle"], [pic, pic, "blue"], ["what"]]
    gen = GenerationConfig(max_new_tokens=5)
    batch = engine.run(prompts, gen)
    assert [c.ids for c in batch] == [engine.run([p], gen)[0].ids for p in prompts]
    assert [a.text for a in engine.complete(prompts, gen)] == [c.text for c in batch]
    assert all(c.finish_reason in ("stop", "length") and len(c.ids) == c.completion_tokens for c in batch)
    served: dict[int, object] = {}
    batcher = ContinuousBatcher(engine, max_batch=2, max_len=128)
    for i, p in enumerate(prompts):
        batcher.submit(Request(engine.encode(p), gen, on_done=lambda r, i=i: served.__setitem__(i, r)))
    while batcher.busy:
        batcher.step()
    assert [served[i].ids for i in range(4)] == [c.ids for c in batch]
    sampled = GenerationConfig(max_new_tokens=6, temperature=1.5, seed=7)
    assert engine.generate_ids(prompts, sampled) == engine.generate_ids(prompts, sampled)
    assert engine.complete(prompts[:1], GenerationConfig(max_new_tokens=0))[0].text == ""
