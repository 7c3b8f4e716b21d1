"""OpenAI chat requests → prompts, with every limit checked before any decoding.

A server that decodes first and checks after can be knocked over by one request (a 20 000 × 20 000
PNG of a few kilobytes, a prompt of a million tokens), so everything here happens before a request
reaches the engine: the body's size (checked by the server before parsing), the JSON's shape, the
number of images, each image's bytes, its format recognised from the bytes (not from the declared
type), its pixel count read from the header before decoding, the prompt's length in tokens and
`max_tokens`. Remote images are refused unless their host is allow-listed, then fetched with a
timeout and a byte cap; `file://` URLs and local paths are always refused. Every violation is a
`RequestError` carrying an HTTP status and an OpenAI-style error body.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

from mm1.data.errors import ImageError
from mm1.data.images import decode_image
from mm1.data.records import Role, Turn
from mm1.data.template import ChatTemplate
from mm1.serve.engine import Encoded, Engine, GenerationConfig

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(kw_only=True)
class Limits:
    """What one request may ask for. Defaults suit a single-GPU research server."""

    max_body_bytes: int = 20_000_000
    max_images: int = 8
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 25_000_000  # e.g. 5000 × 5000
    max_prompt_tokens: int = 0  # 0: the model's context minus max_tokens
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 64
    allowed_url_hosts: tuple[str, ...] = ()  # hosts whose http(s) image URLs may be fetched
    url_timeout_s: float = 10.0
    max_n: int = 8  # choices per request (each takes a row)
    max_waiting: int = 256  # requests queued for a row; beyond it, 429 with Retry-After
    request_timeout_s: float = 600.0  # a request still running after this is ended (504, or an error chunk)
    # a prompt's text is capped before it is tokenized: the context times this many characters a token
    # (BPE averages about 4 on English; 16 leaves room for any real text and bounds the tokenizer's work)
    max_chars_per_token: int = 16


# below this a temperature (or top_p) is greedy decoding: 1e-300 would overflow the softmax to inf/nan
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
# OpenAI fields this server does not implement: refused by name rather than silently ignored
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
               "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
               "prediction": (None,)}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and what was wrong, OpenAI-style."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated chat request, ready for the engine."""

    encoded: Encoded
    gen: GenerationConfig
    n: int = 1  # choices: n requests with seeds seed, seed + 1, ...
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def _require(ok: bool, message: str, param: str, code: str = "invalid_value", status: int = 400) -> None:
    if not ok:
        raise RequestError(status, message, param=param, code=code)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    _require(isinstance(value, bool), f"'{key}' must be true or false, got {value!r}", key)
    return value


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    _require(isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi,
             f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", key)
    return float(value)


def generation(body: dict, limits: Limits) -> GenerationConfig:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    _require(isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1,
             f"'{key}' must be a positive integer, got {max_tokens!r}", key)
    _require(max_tokens <= limits.max_tokens, f"'{key}' is {max_tokens}; this server allows at most "
             f"{limits.max_tokens}", key, "max_tokens_exceeded")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    _require(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
             "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    seed = body.get("seed", 0)
    _require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)
                              and SEED_RANGE[0] <= seed <= SEED_RANGE[1]),
             f"'seed' must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", "seed")
    logprobs = _bool(body, "logprobs")
    top = body.get("top_logprobs") or 0
    _require(type(top) is int and 0 <= top <= MAX_TOP_LOGPROBS, f"'top_logprobs' must be an integer in "
             f"[0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    _require(logprobs or not top, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    for key, fine in UNSUPPORTED.items():
        _require(key not in body or body[key] in fine, f"'{key}' is not supported by this server",
                 key, "unsupported_parameter")
    temperature, top_p = _number(body, "temperature", 0, 2, 1.0), _number(body, "top_p", 0, 1, 1.0)
    if temperature < MIN_TEMPERATURE or 0 < top_p < MIN_TOP_P:
        temperature = 0.0  # both leave one token standing: greedy, without dividing by almost nothing
    return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0, stop=stop,
                            seed=seed or 0, logprobs=logprobs, top_logprobs=top)


def _image_bytes(url: str, param: str, limits: Limits) -> bytes:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        _require(header.endswith(";base64") and bool(payload), "image data URLs must be base64: "
                 "data:image/png;base64,...", param, "invalid_image_url")
        _require(len(payload) * 3 // 4 <= limits.max_image_bytes + 3, f"image is larger than "
                 f"{limits.max_image_bytes:,} bytes", param, "image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data URL is not valid base64", param=param, code="invalid_base64") from None
    parsed = urllib.parse.urlparse(url)
    _require(parsed.scheme in ("http", "https"), f"image URL scheme '{parsed.scheme or url[:16]}' is refused: "
             "send images as data URLs", param, "invalid_image_url")
    _require(parsed.hostname in limits.allowed_url_hosts, f"remote image URLs are refused (host "
             f"'{parsed.hostname}' is not allow-listed): send images as data URLs", param, "url_not_allowed")
    return _fetch(url, param, limits)


class _AllowListedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to an allow-listed host over http(s): every hop is checked, not the first."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.hosts = hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlparse(newurl)
        if target.scheme not in ("http", "https") or target.hostname not in self.hosts:
            raise urllib.error.URLError("redirect to a host that is not allow-listed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, param: str, limits: Limits) -> bytes:
    """GET an allow-listed URL with a timeout, reading at most max_image_bytes. A failure says only that
    it failed: "refused" against "timed out" would let a client map ports on the server's network."""
    opener = urllib.request.build_opener(_AllowListedRedirects(limits.allowed_url_hosts))
    try:
        with opener.open(url, timeout=limits.url_timeout_s) as resp:
            data = resp.read(limits.max_image_bytes + 1)
    except (OSError, ValueError):
        raise RequestError(400, "cannot fetch the image URL", param=param, code="image_fetch_failed") from None
    _require(len(data) <= limits.max_image_bytes, f"image at URL is larger than {limits.max_image_bytes:,} bytes",
             param, "image_too_large")
    return data


def _image(part: dict, param: str, limits: Limits) -> Image.Image:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    _require(isinstance(url, str) and bool(url), "an image_url part needs image_url.url", param)
    data = _image_bytes(url, param, limits)
    try:
        return decode_image(data, where=param, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                            formats=FORMATS)
    except ImageError as err:
        code = {"image file too large": "image_too_large", "image has too many pixels": "image_too_many_pixels"}
        raise RequestError(400, str(err), param=param, code=code.get(err.reason, "invalid_image")) from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}


def turns(messages: object, limits: Limits, *, images_first: bool = False) -> list[Turn]:
    """OpenAI messages → turns, text and images in the order given, or with each message's images moved
    before its text (`images_first`: where mm1's template put them in training; clients such as
    lmms-eval send the text first)."""
    _require(isinstance(messages, list) and bool(messages), "'messages' must be a non-empty list", "messages")
    out, images = [], []
    for m, msg in enumerate(messages):
        where = f"messages[{m}]"
        _require(isinstance(msg, dict) and isinstance(msg.get("role"), str) and msg["role"] in ROLES,
                 f"{where}.role must be one of {sorted(ROLES)}", f"{where}.role")
        content = msg.get("content")
        content = [{"type": "text", "text": content}] if isinstance(content, str) else content
        _require(isinstance(content, list), f"{where}.content must be a string or a list of parts", where)
        parts: list = []
        for p, part in enumerate(content):
            param = f"{where}.content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                _require(isinstance(part.get("text"), str), f"{param}.text must be a string", param)
                _require(_encodable(part["text"]), f"{param}.text is not valid Unicode text (an unpaired "
                         "surrogate?)", param, "invalid_text")
                parts.append(part["text"])
            elif kind == "image_url":
                _require(ROLES[msg["role"]] != Role.ASSISTANT, "images are accepted in user and system messages",
                         param)
                _require(len(images) < limits.max_images, f"more than {limits.max_images} images in one request",
                         param, "too_many_images")
                images.append(_image(part, param, limits))
                parts.append(images[-1])
            else:
                raise RequestError(400, f"{param}: unsupported part type {kind!r} (use 'text' or 'image_url')",
                                   param=param)
        if images_first:
            parts = [p for p in parts if not isinstance(p, str)] + [p for p in parts if isinstance(p, str)]
        out.append(Turn(ROLES[msg["role"]], tuple(parts)))
    _require(out[-1].role != Role.ASSISTANT, "the last message must be from the user (or system)", "messages")
    return out


def parse_chat(body: object, engine: Engine, limits: Limits, template: ChatTemplate, context: int, *,
               images_first: bool = False) -> ChatRequest:
    """Validate a /v1/chat/completions body and encode its prompt; raises RequestError."""
    _require(isinstance(body, dict), "the request body must be a JSON object", "body")
    gen = generation(body, limits)
    stream = _bool(body, "stream")
    n = body.get("n", 1)
    n = 1 if n is None else n
    _require(type(n) is int and 1 <= n <= limits.max_n, f"'n' must be an integer in [1, {limits.max_n}]", "n")
    _require(n == 1 or not stream, "'n' above 1 is not supported with 'stream': true", "n", "unsupported_value")
    options = body.get("stream_options") or {}
    _require(isinstance(options, dict), "'stream_options' must be an object", "stream_options")
    include_usage = _bool(options, "include_usage")
    model = body.get("model", "")
    _require(isinstance(model, str), "'model' must be a string", "model")
    history = turns(body.get("messages"), limits, images_first=images_first)
    chars = sum(len(p) for t in history for p in t.parts if isinstance(p, str))
    _require(chars <= context * limits.max_chars_per_token, f"the prompt's text is {chars:,} characters; at most "
             f"{context * limits.max_chars_per_token:,} are read for this model's context of {context} tokens",
             "messages", "context_length_exceeded")  # checked before the tokenizer spends any time on it
    encoded = engine.encode(template.render(history, generation_prompt=True))
    allowed = min(limits.max_prompt_tokens or context, context - gen.max_new_tokens)
    _require(len(encoded.ids) <= allowed, f"the prompt is {len(encoded.ids)} tokens (images included); at most "
             f"{allowed} fit with max_tokens={gen.max_new_tokens} in this model's context of {context}",
             "messages", "context_length_exceeded")
    vocab = engine.model.cfg.decoder.vocab_size
    beyond = next((i for i in encoded.ids if i >= vocab), None)  # a tokenizer with more ids than the model
    _require(beyond is None, f"the prompt's text encodes to token id {beyond}, which this model's vocabulary of "
             f"{vocab} does not have (its tokenizer knows more ids than the model)", "messages", "unsupported_value")
    return ChatRequest(encoded, gen, n=n, stream=stream, include_usage=include_usage, model=model)
