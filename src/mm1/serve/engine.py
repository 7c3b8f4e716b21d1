"""The inference engine, apart from the model: multimodal prompts in, answers out.

The engine turns a prompt (text, template markup and images) into token ids and image tensors,
and its answers come from the one decoding loop, `mm1.serve.batching.ContinuousBatcher`: `complete`
submits a batch and steps it to its end, the server submits requests as they arrive. Rows are
right-padded and each keeps its own positions from 0, so every row decodes as it would alone.
Greedy decoding (what MM1's evaluation uses) or sampling with temperature and top-p; a row stops at
the end token or at any stop string. Scoring continuations (multiple-choice evaluation) is one
forward pass, no decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from mm1.config import Config, InferenceSettings
from mm1.data.images import sub_images, to_tensor
from mm1.data.packing import Tokenized, tokenize
from mm1.data.template import Control, Markup, Text, stop_token_ids
from mm1.data.tokenizer import Tokenizer
from mm1.model.decoder import KVCache
from mm1.model.mllm import MLLM
from mm1.serve.batching import SLOT_ROUND, ContinuousBatcher
from mm1.serve.generation import Completion, Encoded, GenerationConfig, Request
from mm1.serve.image_cache import ImageCache

__all__ = ["Answer", "Encoded", "Engine", "GenerationConfig", "LowRes", "Part"]


@dataclass(frozen=True)
class LowRes:
    """An image shown as one view even to a model that decomposes images into sub-images (MM1's
    mixed-resolution few-shot prompts keep demonstrations at low resolution)."""

    image: Image.Image


# A prompt is a list of text pieces (always encoded as text), control tokens and markup (from a
# template) and images, in order.
Part = str | Control | Markup | Image.Image | LowRes


@dataclass(frozen=True)
class Answer:
    """One row's answer: its text (cut at the first stop string), whether it ran into `max_new_tokens`
    instead of ending itself (an end token or a stop string), and the positions its prompt took."""
    text: str
    hit_limit: bool
    prompt_tokens: int


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
        # the image encoder and the prompt pass. The first call compiles for its shapes; a call with
        # other shapes recompiles once with dynamic shapes (torch's automatic dynamic), so rows joining
        # and leaving, or a chat whose prompt grows, do not recompile at every step.
        if compile:
            # decompose_mm_pass: a 1-row matmul (batch-1 decoding) becomes a fused multiply-reduce,
            # which streams the weights at ~2x the bandwidth of the BLAS call (measured here).
            opts = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}
            self.decode_fn = torch.compile(self.decode_step, options=opts)
            self._encode_fn = torch.compile(model.encode_images, options=opts)
            self.prefill_fn = torch.compile(self.prefill, options=opts)
        else:
            self.decode_fn, self._encode_fn, self.prefill_fn = self.decode_step, model.encode_images, self.prefill

    @classmethod
    def for_run(cls, model: MLLM, tok: Tokenizer, cfg: Config, **kwargs) -> Engine:
        """The engine a run's model is used with: images seen as the run was tuned to see them."""
        return cls(model, tok, sub_image_grid=InferenceSettings.of(cfg).sub_image_grid, **kwargs)

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

    def _left_padded(self, encoded: list[Encoded], T: int):
        """Rows right-aligned in T positions: tokens, positions from 0 per row, a causal mask that hides
        the padding (padding attends only to itself, so no row of the mask is empty), the image tensors."""
        B = len(encoded)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for i, e in enumerate(encoded):
            tokens[i, T - len(e.ids):] = torch.tensor(e.ids)
            valid[i, T - len(e.ids):] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = (torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        images = [im for e in encoded for im in e.images]
        return tokens, positions, mask[:, None], (torch.stack(images) if images else None)

    def prefill(self, embeds_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: torch.Tensor,
                k: list[torch.Tensor], v: list[torch.Tensor], slots_T: torch.Tensor) -> torch.Tensor:
        """The prompt pass of a batch of rows: fill cache slots `slots_T`; the hidden states [B, T, D]."""
        return self.model.decoder(embeds_BTD, positions_BT, mask, KVCache(k, v, slots_T)).hidden_BTD

    def decode_step(self, k: list[torch.Tensor], v: list[torch.Tensor], tokens_B1: torch.Tensor,
                    pos_B1: torch.Tensor, mask_B11S: torch.Tensor) -> torch.Tensor:
        """One token per row, each written at its own position `pos_B1` (= its cache slot): the next
        logits [B, V] (fp32). The caller's mask shows each row the slots written so far and this one."""
        x = self.model.decoder.embed(tokens_B1)
        hidden = self.model.decoder(x, pos_B1, mask_B11S, KVCache(k, v, pos_B1)).hidden_BTD
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
        return [c.ids for c in self.run(prompts, cfg)]

    @torch.inference_mode()
    def run(self, prompts: list[list[Part]], cfg: GenerationConfig) -> list[Completion]:
        """Decode the prompts as one batch in the decoding loop, to the end of every row."""
        encoded = [self.encode(p) for p in prompts]
        if cfg.max_new_tokens <= 0:
            return [Completion("", len(e.ids), 0, "length") for e in encoded]
        # Round the cache up so that compiled steps see few distinct shapes.
        max_len = -(-(max(len(e.ids) for e in encoded) + cfg.max_new_tokens) // SLOT_ROUND) * SLOT_ROUND
        batcher = ContinuousBatcher(self, max_batch=len(encoded), max_len=max_len, prefill_chunk=0)
        done: list[Completion | BaseException | None] = [None] * len(encoded)
        for i, e in enumerate(encoded):
            batcher.submit(Request(e, cfg, on_done=partial(done.__setitem__, i)))
        while batcher.busy:
            batcher.step()
        for result in done:
            if isinstance(result, BaseException):
                raise result
        return done

    def generate(self, prompts: list[list[Part]], cfg: GenerationConfig | None = None) -> list[str]:
        return [c.text for c in self.complete(prompts, cfg)]

    def complete(self, prompts: list[list[Part]], cfg: GenerationConfig | None = None) -> list[Answer]:
        """Like `generate`, also saying which rows were cut by the length limit (evaluation counts them)."""
        return [Answer(c.text, c.finish_reason == "length", c.prompt_tokens)
                for c in self.run(prompts, cfg or GenerationConfig())]

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

    def _forward(self, rows: list[Encoded], T: int, *, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (fp32) of the rows, right-aligned in T positions (left-padded); with
        `last_only`, [B, V] of the last position only (the vocabulary projection of the others is skipped)."""
        tokens, positions, mask, images = self._left_padded(rows, T)
        dev = self.device
        embeds = self.model.embed(tokens.to(dev), None if images is None else images.to(dev, self.dtype),
                                  encode_images=self.encode_images)
        hidden = self.model.decoder(embeds, positions.to(dev), mask.to(dev)).hidden_BTD
        if last_only:
            return self.model.decoder.lm_head(hidden[:, -1]).float()
        return self.model.decoder.lm_head(hidden).float()

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[list[Part]], texts: list[str]) -> list[list[float]]:
        """For each prompt, log p(text | prompt) of each text that is one token after it (a grade, a
        label), every prompt in one left-padded pass: [len(prompts)][len(texts)]."""
        rows, picks = [], []
        for prompt in prompts:
            base, continuations = self._continuations(prompt, texts)
            for ids, text in zip(continuations, texts, strict=True):
                if len(ids) != 1:
                    raise ValueError(f"the continuation {text!r} is not one token after the prompt: score it "
                                     f"with continuation_logprobs")
            rows.append(base)
            picks.append([ids[0] for ids in continuations])
        logp_BV = torch.log_softmax(self._forward(rows, max(len(r.ids) for r in rows), last_only=True), dim=-1)
        return [[float(logp_BV[i, j]) for j in ids] for i, ids in enumerate(picks)]

    @torch.inference_mode()
    def continuation_logprobs(self, prompt: list[Part], texts: list[str]) -> list[float]:
        """log p(text | prompt) for each text, summed over its tokens, in one batch."""
        return self._scored(prompt, texts)[0]

    def _continuations(self, prompt: list[Part], texts: list[str]) -> tuple[Encoded, list[list[int]]]:
        """The prompt encoded (its images as tensors once: every continuation shares them) and each text's
        own token ids after it, checked to leave the prompt's tokens as they are: a text that changes how
        the prompt's end is tokenized cannot be scored after it."""
        base = self.encode(prompt)
        n = len(base.ids)
        out = []
        for text in texts:
            full = self._tokenize(_continued(prompt, text))[0].tokens.tolist()
            if len(full) <= n or full[:n] != base.ids:
                raise ValueError(f"the continuation {text!r} changes how the prompt's end is tokenized: "
                                 f"it cannot be scored after it")
            out.append(full[n:])
        return base, out

    def _scored(self, prompt: list[Part], texts: list[str]) -> tuple[list[float], int]:
        """`continuation_logprobs`, and the prompt's length in positions."""
        base, continuations = self._continuations(prompt, texts)
        n = len(base.ids)
        rows = [Encoded(base.ids + ids, base.images) for ids in continuations]
        if all(len(r.ids) == n + 1 for r in rows):  # one token each: one pass of the prompt scores them all
            logp_V = torch.log_softmax(self._forward([base], n, last_only=True)[0], dim=-1)
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
