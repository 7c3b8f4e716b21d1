"""`mm1 serve`: a real server on 127.0.0.1, spoken to with the official `openai` client.

Every limit is checked before decoding and answered with an OpenAI-style 4xx; after each refused
request a good one still succeeds. Continuous batching gives every request what it would get
alone.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from mm1.config import apply_overrides
from mm1.data.template import ChatTemplate, user_turn
from mm1.data.tokenizer import train_bpe
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.serve.batching import Completion, ContinuousBatcher, Request
from mm1.serve.engine import Engine, GenerationConfig
from mm1.serve.requests import Limits

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

LIMITS = Limits(max_body_bytes=300_000, max_images=3, max_image_bytes=100_000, max_image_pixels=200 * 200,
                max_tokens=24, default_max_tokens=8)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    tok = train_bpe(["what colour is the circle? red circle blue square, a green star"] * 20, vocab_size=220)
    cfg = apply_overrides(get_recipe("tiny"), ["model.decoder.vocab_size=256", "model.decoder.depth=2",
                                               "model.decoder.max_seq_len=256"])
    cfg.model.image_token_id = tok.image_id
    model = MLLM(cfg.model).eval()
    with torch.no_grad():  # a wider spread than the default init, so that greedy outputs vary with the
        for p in model.decoder.parameters():  # whole context (a default one repeats one token, hiding cache bugs)
            if p.dim() == 2:
                p.normal_(0, 2 / p.shape[-1] ** 0.5)
    return Engine(model, tok)


@contextlib.contextmanager
def running(state):
    """The app of `state` served by uvicorn on a free port of 127.0.0.1, in a thread; yields its URL."""
    from mm1.serve.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(engine):
    from mm1.serve.server import ServerState

    state = ServerState(engine, ContinuousBatcher(engine, max_batch=4), LIMITS, model_name="tiny", api_key="sekrit")
    with running(state) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="sekrit", max_retries=0)


def png(size=(24, 24), colour=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def ask(client, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def good(client) -> None:
    out = ask(client, [image_part(png()), {"type": "text", "text": "what colour?"}], max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_text_and_usage(client, engine):
    out = ask(client, "what colour is the circle?", max_tokens=6)
    assert out.object == "chat.completion" and out.model == "tiny"
    prompt = ChatTemplate().render([user_turn("what colour is the circle?")], generation_prompt=True)
    assert out.usage.prompt_tokens == len(engine.encode(prompt).ids)
    assert out.usage.completion_tokens <= 6 and out.usage.total_tokens == out.usage.prompt_tokens + \
        out.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_output_equals_the_engine_alone(client, engine):
    """What `mm1 generate` prints (the engine on the chat-templated prompt) is what the server returns."""
    img = Image.open(io.BytesIO(png(colour=(0, 0, 255))))
    for content, images in [("what colour is the circle?", []), ("and this?", [img])]:
        parts = [image_part(png(colour=(0, 0, 255)))] * len(images) + [{"type": "text", "text": content}]
        served = ask(client, parts, max_tokens=12).choices[0].message.content
        prompt = ChatTemplate().render([user_turn(content, images)], generation_prompt=True)
        alone = engine.generate([prompt], GenerationConfig(max_new_tokens=12))[0]
        assert served == alone


def test_several_images_interleaved_with_text(client):
    parts = [{"type": "text", "text": "first"}, image_part(png()), {"type": "text", "text": "second"},
             image_part(png(colour=(0, 255, 0)))]
    with_images = ask(client, parts, max_tokens=4)
    text_only = ask(client, "firstsecond", max_tokens=4)
    assert with_images.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 * 16  # 16 tokens per image


def test_streaming_matches_the_whole_answer(client):
    whole = ask(client, "what colour is the circle?", max_tokens=10).choices[0].message.content
    chunks = list(ask(client, "what colour is the circle?", max_tokens=10, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_stop_strings_cut_the_answer(client):
    whole = ask(client, "red circle", max_tokens=16).choices[0].message.content
    if len(whole) < 4:
        pytest.skip(f"the random model answered too little to cut: {whole!r}")
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    cut = ask(client, "red circle", max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "red circle", max_tokens=16,
                                                                      stop=stop, stream=True) if c.choices)
    assert stop not in streamed and streamed.strip() == whole[: whole.index(stop)].strip()


def bomb() -> bytes:
    """A PNG of 5000 × 5000 pixels in a few kilobytes."""
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize(("content", "kw", "code"), [
    ([image_part(png())] * 4 + [{"type": "text", "text": "hi"}], {}, "too_many_images"),
    ([image_part(png((180, 180)) + bytes(120_000)), {"type": "text", "text": "hi"}], {}, "image_too_large"),
    ([image_part(bomb()), {"type": "text", "text": "hi"}], {}, "image_too_many_pixels"),
    ([image_part(png()[:60]), {"type": "text", "text": "hi"}], {}, "invalid_image"),  # truncated
    ([image_part(b"GIF89a this is not an image")], {}, "invalid_image"),
    ([image_part(b"just some text", "image/png")], {}, "invalid_image"),  # the bytes say what it is
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not base64@@@"}}], {}, "invalid_base64"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], {}, "url_not_allowed"),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], {}, "invalid_image_url"),
    ("hi", {"max_tokens": 25}, "max_tokens_exceeded"),
    ("circle " * 400, {}, "context_length_exceeded"),
    ("hi", {"temperature": 5}, "invalid_value"),
])
def test_each_limit_is_a_4xx_and_the_server_goes_on(client, content, kw, code):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, content, **kw)
    err = info.value.body
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error", err
    good(client)


def test_jpeg_declared_as_png_is_read_from_its_bytes(client):
    good_jpeg = png(fmt="JPEG")
    out = ask(client, [image_part(good_jpeg, "image/png"), {"type": "text", "text": "hi"}], max_tokens=2)
    assert out.usage.prompt_tokens > 16


def test_raw_http_errors_malformed_json_big_body_and_api_key(server, client):
    headers = {"Authorization": "Bearer sekrit", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server + "/v1/chat/completions", content=b"x" * 400_000, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server + "/v1/chat/completions", json={"messages": []}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/health").json()["status"] == "ok"
    good(client)


def test_continuous_batching_gives_each_request_what_it_gets_alone(engine):
    prompts = [ChatTemplate().render([user_turn(q)], generation_prompt=True)
               for q in ("red", "what colour is the circle?", "blue square, a green star", "a", "circle circle")]
    lengths = [3, 12, 7, 20, 5]
    alone = [engine.generate([p], GenerationConfig(max_new_tokens=n))[0] for p, n in zip(prompts, lengths, strict=True)]
    batcher = ContinuousBatcher(engine, max_batch=2)  # fewer rows than requests: rows are reused
    done: dict[int, Completion] = {}
    streamed: dict[int, str] = {i: "" for i in range(5)}

    def submit(i: int) -> None:
        batcher.submit(Request(engine.encode(prompts[i]), GenerationConfig(max_new_tokens=lengths[i]),
                               on_text=lambda t, i=i: streamed.__setitem__(i, streamed[i] + t),
                               on_done=lambda c, i=i: done.__setitem__(i, c)))

    submit(0)
    submit(1)
    steps = 0
    while batcher.busy:
        batcher.step()
        steps += 1
        if steps == 2:  # requests join while others are running
            for i in (2, 3, 4):
                submit(i)
        assert len(batcher.rows) <= 2
    assert [done[i].text for i in range(5)] == alone
    assert all(streamed[i].strip() == done[i].text for i in range(5))
    assert steps < sum(lengths)  # rows advanced together, not one request after another


def test_a_request_that_cannot_fit_is_refused_before_queueing(engine):
    batcher = ContinuousBatcher(engine, max_batch=1, max_len=32)
    long = engine.encode(ChatTemplate().render([user_turn("circle " * 40)], generation_prompt=True))
    with pytest.raises(ValueError, match="exceeds the context of 32 tokens"):
        batcher.submit(Request(long, GenerationConfig(max_new_tokens=4)))
    assert not batcher.busy


def test_images_first_moves_each_messages_images_before_its_text():
    """lmms-eval sends the text first; `--images-first` gives the model the placement it trained on."""
    from mm1.serve.requests import turns

    msgs = [{"role": "user", "content": [{"type": "text", "text": "what colour?"}, image_part(png()),
                                         {"type": "text", "text": "be brief"}]}]
    as_sent = turns(msgs, LIMITS)[0].parts
    moved = turns(msgs, LIMITS, images_first=True)[0].parts
    assert [type(p) is str for p in as_sent] == [True, False, True]
    assert [type(p) is str for p in moved] == [False, True, True] and moved[1:] == ("what colour?", "be brief")


HOSTILE = [  # (what, body or raw bytes, the status, a piece of the error message)
    ("JSON nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("a 5,000-digit integer", b'{"seed": ' + b"9" * 5000 + b"}", 400, "cannot be read"),
    ("an unpaired surrogate", {"messages": [{"role": "user", "content": "a \ud800 b"}]}, 400, "not valid Unicode"),
    ("a role given as a list", {"messages": [{"role": ["user"], "content": "hi"}]}, 400, "role must be one of"),
    ("seed 2**64", {"seed": 2**64, "messages": [{"role": "user", "content": "hi"}]}, 400, "'seed' must be"),
    ("seed -2**63-1", {"seed": -(2**63) - 1, "messages": [{"role": "user", "content": "hi"}]}, 400, "'seed' must"),
    ('"stream": "no"', {"stream": "no", "messages": [{"role": "user", "content": "hi"}]}, 400, "'stream' must be"),
    ("top_logprobs without logprobs", {"top_logprobs": 3, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "needs 'logprobs'"),
    ("top_logprobs 99", {"logprobs": True, "top_logprobs": 99, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "'top_logprobs' must be"),
    ("tools", {"tools": [{"type": "function"}], "messages": [{"role": "user", "content": "hi"}]}, 400,
     "'tools' is not"),
    ("response_format", {"response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "hi"}]},
     400, "'response_format' is not"),
    ("n=99", {"n": 99, "messages": [{"role": "user", "content": "hi"}]}, 400, "'n' must be an integer"),
    ("n=2 streamed", {"n": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "not supported with 'stream'"),
    ("a 2 MB body", {"messages": [{"role": "user", "content": "ab " * 700_000}]}, 413, "the limit is"),
    ("250 kB of text, under the body limit", {"messages": [{"role": "user", "content": "ab " * 80_000}]}, 400,
     "characters; at most"),  # refused before the tokenizer reads it
    # this fixture's tokenizer has 263 ids for a model of 256: "\x9b" encodes to id 256 (found by the fuzz test)
    ("text the model has no embedding for", {"messages": [{"role": "user", "content": "\x9b"}]}, 400,
     "does not have"),
]


@pytest.mark.parametrize(("what", "body", "status", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_request_gets_a_4xx_naming_what_is_wrong_and_the_server_serves_on(server, client, what, body,
                                                                                   status, message):
    import json as jsonlib

    raw = body if isinstance(body, bytes) else jsonlib.dumps(body).encode()
    r = httpx.post(server + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
    assert r.status_code == status, (what, r.text[:300])
    assert message in r.json()["error"]["message"], (what, r.text[:300])
    ok = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "red"}])
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_vanishing_temperature_or_top_p_is_greedy_not_a_crash(client, temperature):
    def ask(**kw):
        return client.chat.completions.create(model="tiny", max_tokens=6, seed=1,
                                              messages=[{"role": "user", "content": "red circle"}], **kw)

    greedy = ask(temperature=0).choices[0].message.content
    assert ask(temperature=temperature).choices[0].message.content == greedy
    assert ask(temperature=1.0, top_p=1e-300).choices[0].message.content == greedy


def test_a_post_that_is_not_json_is_415_and_the_key_covers_the_docs(server):
    r = httpx.post(server + "/v1/chat/completions", content=b'{"messages": []}', timeout=10,
                   headers={"Authorization": "Bearer sekrit", "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
        assert httpx.get(server + path, timeout=10).status_code == 401, path
    assert httpx.get(server + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("stage", ["admit", "prefill", "step", "callback"])
def test_one_requests_failure_is_its_own(engine, monkeypatch, stage):
    """A failure while admitting, prefilling, stepping or delivering one request ends that request with its
    error; the stream beside it finishes with the tokens it gets alone, and nothing is left waiting."""
    import mm1.serve.batching as batching

    good_prompt = ChatTemplate().render([user_turn("what colour is the circle?")], generation_prompt=True)
    alone = engine.generate([good_prompt], GenerationConfig(max_new_tokens=12))[0]
    bad_seed = 2**70 if stage == "admit" else 666
    if stage == "prefill":
        embed = engine.model.embed

        def failing_embed(tokens, images, **kw):
            if tokens.shape[0] == 1 and tokens[0, 0] == 7:  # the bad request alone (after the batched pass failed)
                raise RuntimeError("injected prefill failure")
            if any(row[0] == 7 for row in tokens):
                raise RuntimeError("injected prefill failure")
            return embed(tokens, images, **kw)

        monkeypatch.setattr(engine.model, "embed", failing_embed)
    if stage == "step":
        real_pick = batching.pick

        def failing_pick(logits, gen, generator):
            if gen.seed == 666:
                raise RuntimeError("injected sampling failure")
            return real_pick(logits, gen, generator)

        monkeypatch.setattr(batching, "pick", failing_pick)
    batcher = ContinuousBatcher(engine, max_batch=4)
    done: dict[str, Completion | BaseException] = {}

    def on_done(name):
        def record(result):
            done[name] = result
            if stage == "callback" and name == "bad":
                raise RuntimeError("the client's callback failed")
        return record

    good = Request(engine.encode(good_prompt), GenerationConfig(max_new_tokens=12), on_done=on_done("good"))
    bad_ids = engine.encode(ChatTemplate().render([user_turn("red")], generation_prompt=True))
    if stage == "prefill":
        bad_ids.ids[0] = 7
    bad = Request(bad_ids, GenerationConfig(max_new_tokens=12, seed=bad_seed, temperature=1.0),
                  on_done=on_done("bad"))
    batcher.submit(good)
    batcher.step()  # the good stream is running when the bad request arrives
    batcher.submit(bad)
    steps = 0
    while batcher.busy and steps < 100:
        batcher.step()
        steps += 1
    assert not batcher.busy and set(done) == {"good", "bad"}
    assert isinstance(done["good"], Completion) and done["good"].text == alone
    if stage != "callback":
        assert isinstance(done["bad"], Exception)


def test_every_redirect_hop_is_allow_listed_and_a_failed_fetch_says_only_that(engine):
    """A 302 from an allowed host to another one is not followed; refused and unreachable ports read the same."""
    import http.server

    from mm1.serve.requests import RequestError, parse_chat

    image = png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(image)
            else:  # a hop to a host the server does not allow (same machine, other name)
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_port}/img.png")
                self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_port
    limits = Limits(allowed_url_hosts=("127.0.0.1",), url_timeout_s=2)

    def ask(url: str):
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": "red?"}]}]}
        return parse_chat(body, engine, limits, ChatTemplate(), 256)

    try:
        assert len(ask(f"http://127.0.0.1:{port}/img.png").encoded.images) == 1
        messages = []
        for url in (f"http://127.0.0.1:{port}/redirect", "http://127.0.0.1:1/closed.png"):
            with pytest.raises(RequestError) as refused:
                ask(url)
            assert refused.value.code == "image_fetch_failed"
            messages.append(refused.value.message)
        assert messages == ["cannot fetch the image URL"] * 2  # nothing about why: no port probing
    finally:
        httpd.shutdown()


def test_refused_large_requests_leave_memory_where_it_was(server):
    """20 requests of 280 kB of text (under the body limit, over the character cap): refused before the
    tokenizer reads them, and the process's resident memory stays within 100 MB of where it was."""
    import json as jsonlib

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    raw = jsonlib.dumps({"messages": [{"role": "user", "content": "ab " * 93_000}]}).encode()
    headers = {"Authorization": "Bearer sekrit", "Content-Type": "application/json"}
    httpx.post(server + "/v1/chat/completions", content=raw, headers=headers, timeout=30)  # warm-up
    before = rss_mb()
    t0 = time.perf_counter()
    for _ in range(20):
        r = httpx.post(server + "/v1/chat/completions", content=raw, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert rss_mb() - before < 100
    assert time.perf_counter() - t0 < 20  # (tokenizing each would take seconds)


SLOW_SERVER = """
import sys, time, torch
from mm1.config import apply_overrides
from mm1.data.tokenizer import train_bpe
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.serve.batching import ContinuousBatcher
from mm1.serve.engine import Engine
from mm1.serve.requests import Limits
from mm1.serve.server import ServerState, serve

tok = train_bpe(["red circle blue square"] * 20, vocab_size=220)
cfg = apply_overrides(get_recipe("tiny"), ["model.decoder.vocab_size=256", "model.decoder.depth=1",
                                           "model.decoder.max_seq_len=512"])
cfg.model.image_token_id = tok.image_id
engine = Engine(MLLM(cfg.model).eval(), tok)
engine.stop_ids = set()  # no token ends a reply: only max_tokens does
batcher = ContinuousBatcher(engine, max_batch=2)
step = batcher.step
def slow_step():
    time.sleep(0.2)  # 400 tokens take 80 s: a request that will not finish on its own within the test
    step()
batcher.step = slow_step
serve(ServerState(engine, batcher, Limits(max_tokens=400), model_name="slow"), host="127.0.0.1",
      port=int(sys.argv[1]), grace_s=2.0)
print("exited cleanly", flush=True)
"""


@pytest.mark.slow
def test_sigterm_gives_running_requests_the_grace_then_ends_them_and_exits(tmp_path):
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "slow_server.py"
    script.write_text(SLOW_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        ended: list[str] = []

        def stream() -> None:
            body = {"model": "slow", "max_tokens": 400, "stream": True,
                    "messages": [{"role": "user", "content": "red"}]}
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        ended.append(line)
            except httpx.HTTPError as err:  # the connection closed at the end of the grace
                ended.append(f"closed: {type(err).__name__}")

        client = threading.Thread(target=stream)
        client.start()
        while not ended:
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        client.join(timeout=10)
        assert proc.returncode == 0 and "exited cleanly" in out, err[-2000:]
        assert 1.5 < time.monotonic() - t0 < 15  # waited for the grace, not for the request
        assert not client.is_alive()  # the client was not left waiting
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_request_that_fails_while_decoding_ends_alone_over_http(server, client, monkeypatch):
    """Through the real server: a request whose sampling fails gets an error (a final error chunk when
    streaming, a 5xx otherwise); a stream running beside it gives the text it gives alone."""
    import mm1.serve.batching as batching

    real_pick = batching.pick

    def failing_pick(logits, gen, generator):
        if gen.seed == 666:
            raise RuntimeError("injected sampling failure")
        return real_pick(logits, gen, generator)

    messages = [{"role": "user", "content": "what colour is the circle?"}]
    alone = client.chat.completions.create(model="tiny", max_tokens=20, messages=messages).choices[0].message.content
    monkeypatch.setattr(batching, "pick", failing_pick)
    result: dict[str, str] = {}

    def good_stream() -> None:
        parts = client.chat.completions.create(model="tiny", max_tokens=20, messages=messages, stream=True)
        result["good"] = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    thread = threading.Thread(target=good_stream)
    thread.start()
    headers = {"Authorization": "Bearer sekrit"}
    bad = {"model": "tiny", "max_tokens": 20, "seed": 666, "temperature": 1.0, "messages": messages}
    r = httpx.post(server + "/v1/chat/completions", json=bad, headers=headers, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    with httpx.stream("POST", server + "/v1/chat/completions", json=bad | {"stream": True}, headers=headers,
                      timeout=30) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert "injected sampling failure" in lines[-2] and lines[-1] == "data: [DONE]"
    thread.join(timeout=30)
    assert result["good"] == alone


@pytest.fixture()
def slow_server():
    """A server whose decoding steps take 50 ms and never stop on a token: one row, one waiting place,
    requests ended after 5 s (long enough that, on a loaded machine, the first request still holds
    its row when the third arrives)."""
    from mm1.serve.server import ServerState

    torch.manual_seed(0)
    tok = train_bpe(["red circle blue square"] * 20, vocab_size=220)
    cfg = apply_overrides(get_recipe("tiny"), ["model.decoder.vocab_size=256", "model.decoder.depth=1",
                                               "model.decoder.max_seq_len=512"])
    cfg.model.image_token_id = tok.image_id
    engine = Engine(MLLM(cfg.model).eval(), tok)
    engine.stop_ids = set()
    batcher = ContinuousBatcher(engine, max_batch=1)
    step = batcher.step

    def slow_step():
        time.sleep(0.05)
        step()

    batcher.step = slow_step
    limits = Limits(max_tokens=300, max_waiting=1, request_timeout_s=5.0)
    state = ServerState(engine, batcher, limits, model_name="slow")
    with running(state) as url:
        yield url, state


def _running(base: str) -> int:
    return httpx.get(base + "/health", timeout=5).json()["running"]


def _wait_for(cond, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_full_queue_is_429_with_retry_after_and_a_long_request_times_out(slow_server):
    base, _ = slow_server
    body = {"model": "slow", "max_tokens": 300, "messages": [{"role": "user", "content": "red"}]}
    results: list[httpx.Response] = []
    long = [threading.Thread(target=lambda: results.append(httpx.post(base + "/v1/chat/completions", json=body,
                                                                      timeout=30))) for _ in range(2)]
    for t in long:  # one takes the row, one the waiting place
        t.start()
        assert _wait_for(lambda: _running(base) == 1)
    assert _wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["waiting"] == 1)
    busy = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"
    for t in long:
        t.join(timeout=30)
    assert [r.status_code for r in results] == [504, 504]  # 300 tokens at 50 ms a step outlast 5 s
    assert results[0].json()["error"]["code"] == "timeout"
    assert _wait_for(lambda: _running(base) == 0)  # the timed-out rows were freed


def test_a_client_that_disconnects_mid_stream_frees_its_row(slow_server):
    base, _ = slow_server
    body = {"model": "slow", "max_tokens": 25, "stream": True, "messages": [{"role": "user", "content": "red"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first token arrived: go away
    assert _wait_for(lambda: _running(base) == 0, seconds=1.0)  # freed within a few steps, not 25


def test_metrics_in_the_prometheus_format(slow_server):
    base, _ = slow_server
    body = {"model": "slow", "max_tokens": 3, "messages": [{"role": "user", "content": "red"}]}
    assert httpx.post(base + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    text = httpx.get(base + "/metrics", timeout=5).text
    for line in ('mm1_requests_total{outcome="completed"} 1.0', "mm1_generated_tokens_total 3.0",
                 "mm1_requests_running 0.0", "mm1_time_to_first_token_seconds_count 1.0",
                 'mm1_model_info{model="slow"} 1.0'):
        assert line in text, line


def test_logprobs_are_the_models_own_and_n_choices_are_requests_with_consecutive_seeds(client, engine):
    """`logprobs`/`top_logprobs` against a full forward pass of the model over the prompt and the tokens
    so far; `n` choices equal separate requests seeded seed, seed + 1, ..."""
    messages = [{"role": "user", "content": "what colour is the circle?"}]
    resp = client.chat.completions.create(model="tiny", max_tokens=6, messages=messages, logprobs=True,
                                          top_logprobs=3, temperature=0)
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens >= 1
    ids = engine.encode(ChatTemplate().render([user_turn("what colour is the circle?")],
                                              generation_prompt=True)).ids
    with torch.no_grad():
        for entry in entries:
            lp_V = torch.log_softmax(engine.model(tokens_BT=torch.tensor([ids])).logits_BTV[0, -1].float(), -1)
            best = lp_V.topk(3)
            token = int(best.indices[0])  # greedy: the most likely token is the one chosen
            assert entry.token == engine.tok.decode([token]) and entry.bytes == list(entry.token.encode())
            assert entry.logprob == pytest.approx(float(lp_V[token]), abs=1e-4)
            assert [t.token for t in entry.top_logprobs] == [engine.tok.decode([int(i)]) for i in best.indices]
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
            ids = [*ids, token]
    streamed = client.chat.completions.create(model="tiny", max_tokens=6, messages=messages, logprobs=True,
                                              stream=True, temperature=0)
    got = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == pytest.approx([e.logprob for e in entries], abs=1e-6)  # streamed: the same, chunk by chunk

    def sample(seed: int, n: int = 1):
        return client.chat.completions.create(model="tiny", max_tokens=8, messages=messages, temperature=1.0,
                                              seed=seed, n=n)

    three = sample(5, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    alone = [sample(s) for s in (5, 6, 7)]
    assert [c.message.content for c in three.choices] == [a.choices[0].message.content for a in alone]
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)  # over the choices


def test_an_image_sent_again_is_not_encoded_again(client, engine, server):
    """A multi-turn chat resends its image with every turn: the encoder runs on it once (the cache's
    embeddings are the encoder's own), and /metrics counts the hits."""
    from mm1.serve.image_cache import ImageCache

    calls = []
    hook = engine.model.vision.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        image = image_part(png(colour=(10, 200, 30)))
        first = ask(client, [image, {"type": "text", "text": "what colour?"}], max_tokens=4)
        turns = [{"role": "user", "content": [image, {"type": "text", "text": "what colour?"}]},
                 {"role": "assistant", "content": first.choices[0].message.content or "x"},
                 {"role": "user", "content": [image, {"type": "text", "text": "and now?"}]}]
        hits = engine.image_cache.hits
        client.chat.completions.create(model="tiny", max_tokens=4, messages=turns)
    finally:
        hook.remove()
    assert calls == [1]  # the first request encoded it; the second (twice the same image) did not
    assert engine.image_cache.hits == hits + 2
    metrics = httpx.get(server + "/metrics", headers={"Authorization": "Bearer sekrit"}, timeout=5).text
    assert f"mm1_image_cache_hits {float(engine.image_cache.hits)}" in metrics
    cache = ImageCache(max_bytes=3 * 16 * 4)  # room for three embeddings of 4×4 floats
    images = torch.randn(5, 3, 8, 8)
    encode = lambda x: x[:, 0, :4, :4].clone()  # noqa: E731  (a stand-in encoder: one 4×4 "embedding" per image)
    assert torch.equal(cache.encode(images, encode), encode(images))
    assert len(cache.entries) == 3 and cache.bytes == 3 * 64  # bounded: the oldest two were evicted
    assert torch.equal(cache.encode(images[[4, 3]], encode), encode(images[[4, 3]])) and cache.hits == 2


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_their_pace(engine):
    """With rows decoding, a long prompt (several images) is prefilled 16 tokens a step between their
    steps; each running row still gains a token every step, and every request gives what it gives alone."""
    img = Image.open(io.BytesIO(png(colour=(0, 0, 255))))
    long_prompt = ChatTemplate().render([user_turn("what is in these?", [img, img, img])], generation_prompt=True)
    short = [ChatTemplate().render([user_turn(q)], generation_prompt=True) for q in ("red", "a green star")]
    gen = GenerationConfig(max_new_tokens=20)
    alone = [engine.generate([p], gen)[0] for p in [*short, long_prompt]]
    batcher = ContinuousBatcher(engine, max_batch=4, prefill_chunk=16)
    done: dict[int, Completion] = {}
    for i, p in enumerate(short):
        batcher.submit(Request(engine.encode(p), gen, on_done=lambda c, i=i: done.__setitem__(i, c)))
    batcher.step()  # the short ones run
    engine.stop_ids, stops = set(), engine.stop_ids  # (keep them running through the long prefill)
    try:
        batcher.submit(Request(engine.encode(long_prompt), gen, on_done=lambda c: done.__setitem__(2, c)))
        long_len = len(engine.encode(long_prompt).ids)
        chunked_steps = 0
        while batcher.rows and len(batcher.rows) < 3:
            before = [len(r.ids) for r in batcher.rows]
            batcher.step()
            if batcher.filling is not None:
                chunked_steps += 1
                assert [len(r.ids) for r in batcher.rows[:2]] == [b + 1 for b in before[:2]]  # their pace kept
    finally:
        engine.stop_ids = stops
    assert chunked_steps >= long_len // 16 - 1  # the prompt went in over many steps, not one
    while batcher.busy:
        batcher.step()
    assert done[2].text == alone[2]  # the chunked prompt decodes as it does alone


def test_long_and_short_prompts_admitted_in_one_step_all_finish(engine):
    """Rows decoding, then two long prompts (with images) and a short one arrive together: the long ones
    are chunked, the short one prefilled whole, in the same step (sorting them once compared rows by their
    fields, image tensors included, and failed the step: found by bench_serve.py's mixed load)."""
    img = Image.open(io.BytesIO(png(colour=(0, 0, 255))))
    long_prompt = ChatTemplate().render([user_turn("what is in these?", [img, img, img])], generation_prompt=True)
    short = ChatTemplate().render([user_turn("red")], generation_prompt=True)
    gen = GenerationConfig(max_new_tokens=6)
    batcher = ContinuousBatcher(engine, max_batch=6, prefill_chunk=16)
    done: list = []
    batcher.submit(Request(engine.encode(short), gen, on_done=done.append))
    batcher.step()  # one row decoding
    for p in (long_prompt, long_prompt, short):
        batcher.submit(Request(engine.encode(p), gen, on_done=done.append))
    while batcher.busy:
        batcher.step()
    assert len(done) == 4 and not [d for d in done if isinstance(d, BaseException)]


def test_requests_whose_admission_fails_end_with_the_error_and_running_rows_go_on(engine, monkeypatch):
    """A request taken off the queue must end whatever fails while it is placed (it once stayed open
    forever and its client hung); the rows already decoding are not touched."""
    short = ChatTemplate().render([user_turn("red")], generation_prompt=True)
    batcher = ContinuousBatcher(engine, max_batch=4, prefill_chunk=16)
    done: list = []
    batcher.submit(Request(engine.encode(short), GenerationConfig(max_new_tokens=6), on_done=done.append))
    batcher.step()

    def broken(row, running):
        raise RuntimeError("placing failed")

    monkeypatch.setattr(batcher, "_chunks", broken)
    batcher.submit(Request(engine.encode(short), GenerationConfig(max_new_tokens=6), on_done=done.append))
    batcher.step()
    assert [str(d) for d in done if isinstance(d, BaseException)] == ["placing failed"]
    while batcher.busy:
        batcher.step()
    assert len(done) == 2 and not isinstance(done[-1], BaseException)  # the running row finished
