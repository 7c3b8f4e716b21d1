"""What one generation asks for and what it gives back: the types shared by the decoding core
(`mm1.serve.batching`), the engine in front of it (`mm1.serve.engine`) and the server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationConfig:
    """Decoding settings for one request: length, temperature, top-p, stop strings, seed."""
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    logprobs: bool = False  # report each chosen token's log-probability (the model's, before temperature)
    top_logprobs: int = 0  # and this many most likely alternatives at each position
    ignore_eos: bool = False  # run to max_new_tokens whatever the model says (warm-ups, benchmarks)


def pick(logits_BV: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> torch.Tensor:
    """Next token per row [B]: greedy at temperature 0, else sampled with temperature and top-p."""
    if cfg.temperature <= 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


@dataclass
class Encoded:
    """A prompt as token ids and the preprocessed image tensors it refers to."""
    ids: list[int]
    images: list[torch.Tensor]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    """What a finished request produced: its text, token counts and why it stopped."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length" (max_new_tokens reached)
    logprobs: list[TokenLogprob] | None = None  # when asked for: one per generated token
    ids: list[int] = field(default_factory=list)  # the generated token ids (the end token not included)


@dataclass
class Request:
    """One generation: an encoded prompt, its settings, and where its text goes.

    `on_text` receives each new piece of text as it becomes final (never text that could still
    turn out to start a stop string); `on_done` receives the completion, or the error that ended
    the request.
    """

    encoded: Encoded
    gen: GenerationConfig
    on_text: Callable[[str], None] = lambda _: None
    on_done: Callable[[Completion | BaseException], None] = lambda _: None
    # when logprobs are asked for: the entries of the tokens whose text the next `on_text` carries
    on_logprobs: Callable[[list[TokenLogprob]], None] = lambda _: None
    cancelled: threading.Event = field(default_factory=threading.Event)
