"""The inference engine, apart from the model: KV-cache decoding of batches of multimodal prompts.

Prompts of different lengths are left-padded into one batch; padding is masked out of attention
and positions start at 0 on each row, so every row decodes exactly as it would alone. One prefill
pass fills the pre-allocated KV cache, then each step feeds one token per row. Greedy decoding
(what MM1's evaluation uses) or sampling with temperature and top-p; a row stops at the end
token or at any stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from mm1.data.images import sub_images, to_tensor
from mm1.data.packing import Tokenized, tokenize
from mm1.data.template import Control, Markup, Text, stop_token_ids
from mm1.data.tokenizer import Tokenizer
from mm1.model.decoder import KVCache
from mm1.model.mllm import MLLM
from mm1.serve.image_cache import ImageCache


@dataclass(frozen=True)
class LowRes:
    """An image shown as one view even to a model that decomposes images into sub-images (MM1's
    mixed-resolution few-shot prompts keep demonstrations at low resolution)."""

    image: Image.Image


# A prompt is a list of text pieces (always encoded as text), control tokens and markup (from a
# template) and images, in order.
Part = str | Control | Markup | Image.Image | LowRes


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


@dataclass(frozen=True)
class Answer:
    """One row's answer: its text (cut at the first stop string), whether it ran into `max_new_tokens`
    instead of ending itself (an end token or a stop string), and the positions its prompt took."""
    text: str
    hit_limit: bool
    prompt_tokens: int


@dataclass
class Encoded:
    """A prompt as token ids and the preprocessed image tensors it refers to."""
    ids: list[int]
    images: list[torch.Tensor]


class Engine:
    """Inference apart from the model: prompt encoding, prefill and decoding with a KV cache."""

    def __init__(self, model: MLLM, tok: Tokenizer, *, sub_image_grid: int = 0, compile: bool = False,
                 image_cache_bytes: int = 256 * 2**20) -> None:
        self.model = model.eval()
        self.image_cache = ImageCache(image_cache_bytes)  # each distinct image is encoded once
        self.grid = sub_image_grid  # models fine-tuned with sub-image decomposition see images the same way
        self.tok = tok
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.image_size, self.norm = model.cfg.vision.image_size, model.cfg.vision.norm
        # The end of text, and what ends an assistant turn in the model's chat template.
        self.stop_ids = set(stop_token_ids(tok))
        # Padding is masked out, so any id will do, but it must be one the embedding has: an HF
        # decoder's vocabulary may lack the special tokens our tokenizer adds.
        self.pad_id = tok.pad_id if tok.pad_id < model.cfg.decoder.vocab_size else 0
        # Opt-in torch.compile (C++ wrapper: no Python launch overhead per kernel) of the per-token step,
        # the image encoder and the prefill pass. The first call compiles for its shapes; a call with
        # other shapes recompiles once with dynamic shapes (torch's automatic dynamic), so a chat whose
        # prompt grows does not recompile at every turn. Measured on 2 CPU cores with the tiny model
        # (batch 1 / 16): a step takes 0.3 / 1.5-1.9 ms compiled vs 1.2 / 2.7 ms eager.
        if compile:
            # decompose_mm_pass: a 1-row matmul (batch-1 decoding) becomes a fused multiply-reduce,
            # which streams the weights at ~2x the bandwidth of the BLAS call (measured here).
            opts = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}
            self._step_fn = torch.compile(self._step, options=opts)
            self._encode_fn = torch.compile(model.encode_images, options=opts)
            self._prefill_fn = torch.compile(self._prefill, options=opts)
        else:
            self._step_fn, self._encode_fn, self._prefill_fn = self._step, model.encode_images, self._prefill

    def encode_images(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] → [N, tokens, D], images seen before taken from the cache."""
        return self.image_cache.encode(images_NCHW, self._encode_fn)

    def views(self, image: Image.Image | LowRes) -> list[Image.Image]:
        """The views the model sees of an image: the overview and crops of sub-image decomposition."""
        if isinstance(image, LowRes) or not self.grid:
            return [image.image if isinstance(image, LowRes) else image]
        return sub_images(image, self.image_size, self.grid, self.norm)

    def _tokenize(self, prompt: list[Part]) -> tuple[Tokenized, dict[int, list[Image.Image]]]:
        """The prompt's tokens (image blocks sized by the views each image gets) and those views."""
        segments = [Text(p) if isinstance(p, str) else p for p in prompt]
        views = {id(p): self.views(p) for p in prompt if isinstance(p, Image.Image | LowRes)}
        t = tokenize(segments, self.tok, image_tokens=self.model.num_image_tokens,
                     views_per_image=lambda img: len(views[id(img)]), end_of_text=False)
        return t, views

    def prompt_length(self, prompt: list[Part]) -> int:
        """How many positions the prompt takes, image tokens included (no image is turned into a tensor)."""
        return len(self._tokenize(prompt)[0].tokens)

    def encode(self, prompt: list[Part]) -> Encoded:
        t, views = self._tokenize(prompt)
        images = [to_tensor(v, self.image_size, self.norm) for img in t.images for v in views[id(img)]]
        return Encoded(t.tokens.tolist(), images)

    def _prefill_inputs(self, encoded: list[Encoded], T: int, max_len: int):
        B = len(encoded)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        valid = torch.zeros(B, max_len, dtype=torch.bool)  # per cache slot: holds a real token
        for i, e in enumerate(encoded):
            tokens[i, T - len(e.ids):] = torch.tensor(e.ids)
            valid[i, T - len(e.ids):T] = True
        positions = (valid[:, :T].long().cumsum(1) - 1).clamp(min=0)
        # The prompt pass attends over its own T slots; padding attends only to itself, so no row of
        # the mask is empty.
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (causal & valid[:, None, :T]) | torch.eye(T, dtype=torch.bool)
        images = [im for e in encoded for im in e.images]
        return tokens, valid, positions, mask[:, None], (torch.stack(images) if images else None)

    def _prefill(self, embeds_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: torch.Tensor,
                 k: list[torch.Tensor], v: list[torch.Tensor], slots_T: torch.Tensor) -> torch.Tensor:
        """The prompt pass: fill cache slots `slots_T`, return the last position's logits."""
        hidden = self.model.decoder(embeds_BTD, positions_BT, mask, KVCache(k, v, slots_T)).hidden_BTD
        return self._last_logits(hidden)

    def _step(self, k: list[torch.Tensor], v: list[torch.Tensor], tokens_B1: torch.Tensor, pos_B1: torch.Tensor,
              slot_1: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
        """One decoding step with static shapes: write slot `slot_1`, return next-token logits.

        The bookkeeping is done in place here (mark the slot valid, advance the positions) so that
        the Python loop around it launches nothing else.
        """
        valid_BS.index_fill_(1, slot_1, True)
        x = self.model.decoder.embed(tokens_B1)
        hidden = self.model.decoder(x, pos_B1, valid_BS[:, None, None, :], KVCache(k, v, slot_1)).hidden_BTD
        pos_B1.add_(1)
        return self._last_logits(hidden)

    def _last_logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] (fp32) from the last position."""
        h_BD = hidden_BTD[:, -1]
        if torch.compiler.is_compiling() and h_BD.shape[0] == 1:
            w_VD = self.model.decoder.lm_head.weight
            # A 1-row matmul against the (often largest) weight: inductor's fused multiply-reduce
            # streams it ~2x faster than the BLAS call, and its mm pass only does so up to 2048 wide
            # (a threshold it reads once, at import, so it cannot be raised per compile).
            return (w_VD * h_BD[:, None, :]).sum(-1).float()
        return self.model.decoder.lm_head(h_BD).float()

    def generate_ids(self, prompts: list[list[Part]], cfg: GenerationConfig) -> list[list[int]]:
        return [ids for ids, _, _ in self._decode(prompts, cfg)]

    @torch.inference_mode()
    def _decode(self, prompts: list[list[Part]], cfg: GenerationConfig) -> list[tuple[list[int], bool, int]]:
        """Each row's generated ids, whether it ended itself (end token or stop string), and its prompt's
        length in positions (image tokens included)."""
        encoded = [self.encode(p) for p in prompts]
        B, T = len(encoded), max(len(e.ids) for e in encoded)
        # Round the cache up so that compiled steps see few distinct shapes.
        max_len = -(-(T + cfg.max_new_tokens) // 64) * 64
        tokens, valid, positions, mask, images = self._prefill_inputs(encoded, T, max_len)
        dev = self.device
        cache = self.model.new_cache(B, max_len)
        embeds = self.model.embed(tokens.to(dev), None if images is None else images.to(dev, self.dtype),
                                  encode_images=self.encode_images)
        logits = self._prefill_fn(embeds, positions.to(dev), mask.to(dev), cache.k, cache.v,
                                  torch.arange(T, device=dev))
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        valid = valid.to(dev)
        pos = positions[:, -1:].to(dev) + 1
        slots = [torch.tensor([s], device=dev) for s in range(T, T + cfg.max_new_tokens)]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for slot in slots:
            # greedy picks on the device (B ids come back, not B × V logits); sampling uses the seeded CPU generator
            nxt = pick(logits if cfg.temperature <= 0 else logits.cpu(), cfg, gen)
            self._record(nxt, out, done, cfg)
            if all(done) or slot is slots[-1]:
                break
            logits = self._step_fn(cache.k, cache.v, nxt.to(dev)[:, None], pos, slot, valid)
        return list(zip(out, done, [len(e.ids) for e in encoded], strict=True))

    def _record(self, nxt: torch.Tensor, out: list[list[int]], done: list[bool], cfg: GenerationConfig) -> None:
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in self.stop_ids:
                done[i] = True
                continue
            out[i].append(t)
            if cfg.stop and any(s in self.tok.decode(out[i][-8:]) for s in cfg.stop):
                done[i] = True

    def generate(self, prompts: list[list[Part]], cfg: GenerationConfig | None = None) -> list[str]:
        return [c.text for c in self.complete(prompts, cfg)]

    def complete(self, prompts: list[list[Part]], cfg: GenerationConfig | None = None) -> list[Answer]:
        """Like `generate`, also saying which rows were cut by the length limit (evaluation counts them)."""
        cfg = cfg or GenerationConfig()
        return [Answer(_cut(self.tok.decode(ids), cfg.stop), not ended, length)
                for ids, ended, length in self._decode(prompts, cfg)]

    @torch.inference_mode()
    def choose(self, prompts: list[list[Part]], choices: list[tuple[str, ...]], prefix: str = "") -> list[Answer]:
        """For each prompt, the choice whose text (after `prefix`) the model finds most likely after it: the
        sum of its tokens' log-probabilities (multiple-choice scoring, as lm-evaluation-harness's `acc`)."""
        out = []
        for prompt, options in zip(prompts, choices, strict=True):
            logp, length = self._scored(prompt, [prefix + c for c in options])
            best = max(range(len(options)), key=logp.__getitem__)
            out.append(Answer(options[best], False, length))
        return out

    def _forward(self, rows: list[Encoded], T: int) -> torch.Tensor:
        """Logits [B, T, V] (fp32) of the rows, right-aligned in T positions (left-padded)."""
        tokens, _, positions, mask, images = self._prefill_inputs(rows, T, T)
        dev = self.device
        embeds = self.model.embed(tokens.to(dev), None if images is None else images.to(dev, self.dtype),
                                  encode_images=self.encode_images)
        hidden = self.model.decoder(embeds, positions.to(dev), mask.to(dev)).hidden_BTD
        return self.model.decoder.lm_head(hidden).float()

    @torch.inference_mode()
    def continuation_logprobs(self, prompt: list[Part], texts: list[str]) -> list[float]:
        """log p(text | prompt) for each text, summed over its tokens, in one batch."""
        return self._scored(prompt, texts)[0]

    def _scored(self, prompt: list[Part], texts: list[str]) -> tuple[list[float], int]:
        """`continuation_logprobs`, and the prompt's length in positions."""
        base = self.encode(prompt)  # its ids, and its images as tensors: once, every continuation shares them
        n = len(base.ids)
        rows = [Encoded(self._tokenize(_continued(prompt, t))[0].tokens.tolist(), base.images) for t in texts]
        for row, text in zip(rows, texts, strict=True):
            if len(row.ids) <= n or row.ids[:n] != base.ids:
                raise ValueError(f"the continuation {text!r} changes how the prompt's end is tokenized: "
                                 f"it cannot be scored after it")
        if all(len(r.ids) == n + 1 for r in rows):  # one token each: one pass of the prompt scores them all
            logp_V = torch.log_softmax(self._forward([base], n)[0, -1], dim=-1)
            return [float(logp_V[r.ids[n]]) for r in rows], n
        T = max(len(r.ids) for r in rows)
        logp_BTV = torch.log_softmax(self._forward(rows, T), dim=-1)
        dev = self.device
        scores = []
        for i, row in enumerate(rows):  # rows are right-aligned: the continuation ends at T
            k = len(row.ids) - n
            at = torch.arange(T - k, T, device=dev)
            scores.append(float(logp_BTV[i, at - 1, torch.tensor(row.ids[n:], device=dev)].sum()))
        return scores, n


def _continued(prompt: list[Part], text: str) -> list[Part]:
    """`prompt` with `text` after it (joined to a final plain-text part, as a demonstration's answer is)."""
    if prompt and isinstance(prompt[-1], str):
        return [*prompt[:-1], prompt[-1] + text]
    return [*prompt, text]


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        if s in text:
            text = text[: text.index(s)]
    return text.strip()
