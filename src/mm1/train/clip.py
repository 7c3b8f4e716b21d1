"""`mm1 train --stage clip`: contrastive pre-training of the image encoder on the caption data.

MM1's image encoder is a ViT trained with a CLIP loss before multimodal pre-training. This stage
produces one for recipes that have no pretrained encoder: `DIR/vision.safetensors`, which the MLLM
loads through `model.vision.init=DIR`. It runs through the same `Trainer` as every stage (ranks,
micro-batches, precision, checkpoints and exact resume); this module is its objective.

Pairs come from the prepared caption sources (each prepared caption document is one image and its
caption), mixed by their weights; pair p of the run is a pure function of p. Each rank holds an
equal share of a step's pairs (a pair that cannot be used, such as the tail of a caption split
across sequences, stays as a masked-out row, so every rank's tensors have the same shape).

The loss is the symmetric InfoNCE of CLIP with negatives from *every* rank: image and caption
embeddings are all-gathered with their gradients (`torch.distributed.nn.functional.all_gather`), each
rank scores its own images against all captions and its own captions against all images, and the
sum over ranks is divided by the number of pairs in the whole micro-batch — the loss of one big
batch. With gradient accumulation each micro-batch is its own contrastive problem (its negatives are
that micro-batch's, on all ranks) and the step's loss is their mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mm1.config import Config, Stage
from mm1.data.errors import ImageError
from mm1.data.images import to_tensor
from mm1.data.mixture import Mixture
from mm1.data.prepared import PreparedSource, open_prepared
from mm1.data.sources import stage_sources
from mm1.data.stream import step_loader
from mm1.data.tokenizer import Tokenizer
from mm1.model.clip import CLIP, CLIPEmbeddings
from mm1.store.pretrained import CLIP_WEIGHTS, load_vision_weights
from mm1.train.flops import vision_forward_flops
from mm1.train.objective import StepMetrics
from mm1.train.parallel import all_reduce_sum

MAX_TEXT = 64


@dataclass
class PairBatch:
    """One rank's image-caption pairs of a step; `real_N` is False for rows that hold no pair."""

    step: int
    images_NCHW: torch.Tensor
    ids_NL: torch.Tensor
    valid_NL: torch.Tensor
    real_N: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)

    def split(self, n: int) -> list[PairBatch]:
        N = len(self.real_N)
        if N % n:
            raise ValueError(f"{N} pairs do not split into {n} micro-batches")
        size = N // n
        return [PairBatch(self.step, self.images_NCHW[i:i + size], self.ids_NL[i:i + size],
                          self.valid_NL[i:i + size], self.real_N[i:i + size]) for i in range(0, N, size)]

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.step, self.images_NCHW.to(device), self.ids_NL.to(device), self.valid_NL.to(device),
                         self.real_N.to(device), self.skipped)


class CaptionPairs:
    """Image-caption batches of the CLIP stage as a pure function of (step, rank, world size)."""

    def __init__(self, cfg: Config, tok: Tokenizer) -> None:
        self.sources: list[PreparedSource] = list(open_prepared(cfg, Stage.CLIP, tok).values())
        weights = [s.weight for s in stage_sources(cfg, Stage.CLIP).values()]
        self.mixture = Mixture([s.num_documents for s in self.sources], weights, seed=cfg.data.seed)
        self.batch, self.size, self.eos = cfg.train.batch_size, cfg.model.vision.image_size, tok.eos_id
        self.norm = cfg.model.vision.norm

    def pair(self, p: int) -> tuple[torch.Tensor, list[int]] | None:
        s, _, d = self.mixture.locate(p)
        tokens, loss, refs = self.sources[s].document(d)
        text = [int(t) for t in tokens[loss > 0] if t != self.eos][:MAX_TEXT]
        if not refs or not text:  # the tail of a caption split across sequences
            return None
        try:
            return to_tensor(refs[0].load(), self.size, self.norm), text
        except ImageError:
            return None

    def make(self, step: int, rank: int = 0, world_size: int = 1) -> PairBatch:
        if self.batch % world_size:
            raise ValueError(f"batch size {self.batch} does not divide over {world_size} ranks")
        per_rank = self.batch // world_size
        first = step * self.batch + rank * per_rank
        pairs = [self.pair(p) for p in range(first, first + per_rank)]
        L = max((len(x[1]) for x in pairs if x is not None), default=1)
        images = torch.zeros(per_rank, 3, self.size, self.size)
        tokens = torch.zeros(per_rank, L, dtype=torch.long)
        valid = torch.zeros(per_rank, L, dtype=torch.bool)
        valid[:, 0] = True  # a masked-out row still attends to one token (no empty softmax)
        for i, x in enumerate(pairs):
            if x is not None:
                images[i] = x[0]
                tokens[i, : len(x[1])] = torch.from_numpy(np.asarray(x[1], dtype=np.int64))
                valid[i, : len(x[1])] = True
        real = torch.tensor([x is not None for x in pairs])
        missing = int((~real).sum())
        return PairBatch(step, images, tokens, valid, real, {"caption/no usable pair": missing} if missing else {})


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order, with gradients flowing back to each rank's own rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def contrastive_sums(emb: CLIPEmbeddings, real_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum over this rank's pairs of the two cross-entropies, pairs in the whole micro-batch, this rank's
    pairs whose caption ranks first). Negatives are every rank's; rows that hold no pair are masked out."""
    img_all, txt_all, real_all = _gather(emb.image_ND), _gather(emb.text_ND), _gather(real_N)
    N = len(real_N)
    offset = dist.get_rank() * N if dist.is_initialized() else 0
    target = torch.arange(offset, offset + N, device=real_N.device)
    hide = torch.where(real_all, 0.0, float("-inf"))  # columns of masked rows: never a candidate
    i2t = emb.logit_scale * emb.image_ND @ txt_all.t() + hide
    t2i = emb.logit_scale * emb.text_ND @ img_all.t() + hide
    ce = F.cross_entropy(i2t, target, reduction="none") + F.cross_entropy(t2i, target, reduction="none")
    total = ce[real_N].sum()
    correct = ((i2t.argmax(1) == target) & real_N).sum()
    return total, real_all.sum(), correct


class CLIPObjective:
    """The image encoder's CLIP loss on caption pairs; writes `vision.safetensors` when done."""

    unit = "images"

    def __init__(self, cfg: Config, tok: Tokenizer, *, world_size: int) -> None:
        self.cfg, self.world = cfg, world_size
        self.pairs = CaptionPairs(cfg, tok)
        self.vocab = len(tok)
        with torch.device("meta"):  # shapes only: what the LR rule and FLOPs are counted from
            self.shape = self.build()
        self.names: list[str] = []

    def build(self) -> CLIP:
        return CLIP(self.cfg.model.vision, vocab=self.vocab)

    def load_start(self, model: CLIP) -> None:
        if self.cfg.model.vision.init:  # continue from a pre-trained tower
            load_vision_weights(model.vision, self.cfg.model.vision.init)

    def rule_parameters(self) -> int:
        # No LLM here: the rule's N is the CLIP model's own size (our choice; see docs/paper.md).
        return sum(p.numel() for p in self.shape.parameters())

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> PairBatch:
        return self.pairs.make(step, rank, world_size)

    def loader(self, *, start: int, stop: int, rank: int, world_size: int, num_workers: int):
        return step_loader(partial(self.batch, rank=rank, world_size=world_size), start=start, stop=stop,
                           num_workers=num_workers)

    def begin_step(self, batch: PairBatch, *, accum: int, device: torch.device) -> list[PairBatch]:
        self.accum, self.device = accum, device
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # mean loss share, pairs, correct
        self.text_tokens = int(batch.valid_NL[batch.real_N].sum())
        return batch.split(accum)

    def loss(self, model: nn.Module, micro: PairBatch) -> torch.Tensor:
        total, pairs, correct = contrastive_sums(model(micro.images_NCHW, micro.ids_NL, micro.valid_NL), micro.real_N)
        pairs = pairs.clamp(min=1)
        # Each rank's share of the micro-batch's mean loss; DDP/FSDP average gradients over ranks.
        loss = total / (2 * pairs) * (self.world / self.accum)
        self.sums += torch.stack([total.detach() / (2 * pairs) / self.accum, micro.real_N.sum().to(total.dtype),
                                  correct.to(total.dtype)]).double()
        return loss

    def end_step(self) -> StepMetrics:
        loss, pairs, correct = all_reduce_sum(self.sums.clone(), self.device).tolist()
        tokens = int(all_reduce_sum(torch.tensor([self.text_tokens]), self.device).item())
        text_params = sum(p.numel() for n, p in self.shape.text.named_parameters() if not n.startswith("embed"))
        flops = pairs * 3 * vision_forward_flops(self.cfg) + 6 * tokens * text_params
        return StepMetrics(loss=loss, count=int(pairs), flops=flops, extra={"clip_accuracy": correct / max(1, pairs)})

    def finish(self, model: nn.Module, out: Path, *, is_main: bool, completed: bool,
               skipped: dict[str, int]) -> None:
        """The trained image encoder as `out/vision.safetensors` (gathered from every rank's shards)."""
        if not completed:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main:
            vision = {k.removeprefix("vision."): v.contiguous() for k, v in full.items() if k.startswith("vision.")}
            from mm1.files import atomic_path

            with atomic_path(out / CLIP_WEIGHTS) as tmp:
                save_file(vision, str(tmp))
