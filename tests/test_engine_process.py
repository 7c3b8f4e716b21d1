"""`mm1 serve`'s engine process (`mm1.serve.engine_process`): the model in a spawned process of its own.

Through a real server on 127.0.0.1 and the `openai` client: the answers are the in-process engine's; a
client that goes away frees its row in the engine; an engine process that dies ends the requests it held
with an error and a new one takes the next requests.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from mm1.serve.batching import Request
from mm1.serve.engine import Engine, GenerationConfig
from mm1.serve.engine_process import EngineDiedError, EngineSpec, RemoteBatcher
from mm1.serve.requests import Limits

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

LIMITS = Limits(max_tokens=200, default_max_tokens=8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random model (wide enough that its greedy text depends on the whole context), written as `mm1 export`
    writes it, and the in-process engine over the same weights."""
    from mm1.config import apply_overrides
    from mm1.data.tokenizer import train_bpe
    from mm1.model.mllm import MLLM
    from mm1.recipes import get_recipe
    from mm1.store.hf import export

    torch.manual_seed(0)
    tok = train_bpe(["what colour is the circle? red circle blue square, a green star"] * 20, vocab_size=220)
    cfg = apply_overrides(get_recipe("tiny"), [f"model.decoder.vocab_size={len(tok)}", "model.decoder.depth=2",
                                               "model.decoder.max_seq_len=256"])
    cfg.model.image_token_id = tok.image_id
    model = MLLM(cfg.model).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 / p.shape[-1] ** 0.5)
    folder = tmp_path_factory.mktemp("engine_process") / "model"
    export(model, cfg, folder)
    tok.save(folder / "tokenizer.json")
    return folder, Engine(model, tok)


@pytest.fixture(scope="module")
def remote(exported):
    folder, _ = exported
    batcher = RemoteBatcher(EngineSpec(str(folder), threads=1, max_batch=4, plain_weights=False))
    yield batcher
    batcher.end_all(RuntimeError("the test is over"))


@pytest.fixture(scope="module")
def server(exported, remote):
    from mm1.serve.server import ServerState
    from test_server import running

    _, engine = exported
    with running(ServerState(engine, remote, LIMITS, model_name="tiny")) as url:
        yield url


def _until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_answers_through_the_engine_process_are_the_engines_own(exported, server):
    import base64
    import io

    from PIL import Image

    _, engine = exported
    client = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour is the circle?"}]
    out = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0,
                                         messages=[{"role": "user", "content": content}])
    from mm1.data.template import template_for, user_turn

    picture = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    prompt = template_for(engine.tok).render([user_turn("what colour is the circle?", [picture])],
                                             generation_prompt=True)
    alone = engine.complete([prompt], GenerationConfig(max_new_tokens=12))[0]
    assert out.choices[0].message.content == alone.text and out.usage.prompt_tokens == alone.prompt_tokens
    stream = client.chat.completions.create(model="tiny", max_tokens=12, stream=True, temperature=0,
                                            messages=[{"role": "user", "content": content}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == alone.text
    two = client.chat.completions.create(model="tiny", max_tokens=6, n=2, temperature=1.0, seed=3,
                                         messages=[{"role": "user", "content": "red circle"}])
    assert len(two.choices) == 2
    import httpx

    assert _until(lambda: "mm1_image_cache_misses 1.0" in httpx.get(server + "/metrics").text)  # reported


def _encoded():
    from mm1.serve.engine import Encoded

    return Encoded([5, 6, 7, 8], [])


def test_a_cancelled_request_frees_its_row_in_the_engine(remote, server):
    ended = []  # (the server's worker runs `remote.run`: it forwards the cancellation)
    req = Request(_encoded(), GenerationConfig(max_new_tokens=200), on_done=ended.append)
    remote.submit(req)
    assert _until(lambda: remote.running() == 1 or ended)
    req.cancelled.set()
    assert _until(lambda: remote.running() == 0 and remote.queued() == 0 and not remote.open)


def test_an_engine_process_that_dies_ends_its_requests_and_a_new_one_serves(remote, server):
    ended: list = []  # (the server's worker runs `remote.run`: it notices the death and restarts the engine)
    req = Request(_encoded(), GenerationConfig(max_new_tokens=200), on_done=ended.append)
    old = remote.proc.pid
    remote.submit(req)
    os.kill(old, signal.SIGKILL)
    assert _until(lambda: bool(ended))
    assert isinstance(ended[0], EngineDiedError) and "exited" in str(ended[0])
    assert _until(lambda: remote.proc is not None and remote.proc.pid != old and remote.proc.is_alive())
    client = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)
    out = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "red"}])
    assert out.choices[0].finish_reason in ("stop", "length")


def test_an_engine_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="could not start: FileNotFoundError"):
        RemoteBatcher(EngineSpec(str(tmp_path / "nothing here"), threads=1))


def test_requests_that_do_not_fit_are_refused_before_they_leave(remote):
    done: list = []
    with pytest.raises(ValueError, match="exceeds the context"):
        remote.submit(Request(_encoded(), GenerationConfig(max_new_tokens=10_000), on_done=done.append))
    assert not done
