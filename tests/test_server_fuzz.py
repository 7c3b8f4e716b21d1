"""`mm1 serve` fuzzed: property-based requests (hypothesis) against a real server on 127.0.0.1.

Two kinds of body: arbitrary JSON (any shape, any types, deep or wide), and chat requests whose every
field is drawn from valid, borderline and wrong values. Whatever arrives, the server answers within a
time bound with a 2xx or a 4xx carrying an OpenAI-style error, never a 5xx, and still answers a good
request afterwards. Bounded to about a minute.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_server import client, engine, server  # noqa: E402,F401  (the same real server)

TIME_BOUND_S = 20.0


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                        max_leaves=30)
ODD = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))
TEXT = st.one_of(st.text(max_size=60), st.sampled_from(["<image>", "<|user|>", "\ud800", "a" * 5000, ""]))
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, ODD)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.one_of(st.just(_png()), st.text(max_size=30),
                                                 st.sampled_from(["data:image/png;base64,!!", "file:///etc/passwd",
                                                                  "http://127.0.0.1:1/x.png"]))}), ODD)}),
    st.dictionaries(st.text(max_size=8), ODD, max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), ODD),
                                 "content": st.one_of(TEXT, st.lists(PART, max_size=4), ODD)})
CHAT = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), ODD)},
    optional={"model": ODD, "max_tokens": st.one_of(st.integers(-5, 40), ODD), "temperature": st.one_of(
        st.floats(min_value=0, max_value=3), ODD), "top_p": st.one_of(st.floats(min_value=0, max_value=1.5), ODD),
        "seed": st.one_of(st.integers(-(2**65), 2**65), ODD), "stop": st.one_of(st.lists(st.text(max_size=5),
                                                                                       max_size=6), ODD),
        "stream": ODD, "stream_options": ODD, "n": ODD, "logprobs": ODD, "tools": ODD,
        "response_format": ODD, "max_completion_tokens": ODD})

seen: dict[int, int] = {}


def _post(base: str, body: object) -> httpx.Response:
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/chat/completions", content=raw, timeout=TIME_BOUND_S,
                   headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
    assert time.perf_counter() - t0 < TIME_BOUND_S
    seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert r.status_code < 500, (body, r.text[:500])
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    return r


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(ANY_JSON, CHAT))
def test_no_request_gets_a_5xx_or_hangs(server, body):  # noqa: F811
    _post(server, body)


@pytest.mark.slow
def test_the_server_still_serves_after_the_fuzzing(server, client):  # noqa: F811
    ok = client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "red"}])
    assert ok.choices[0].finish_reason in ("stop", "length")
    print(f"fuzzed requests by status: {dict(sorted(seen.items()))}")
