"""`mm1 train --stage clip`: contrastive pre-training of the image encoder on the caption data.

MM1's image encoder is a ViT trained with a CLIP loss before multimodal pre-training. This stage
produces one for recipes that have no pretrained encoder: `DIR/vision.safetensors`, which the MLLM
loads through `model.vision_init=DIR/vision.safetensors`. Pairs come from the prepared caption
sources (each prepared caption document is one image and its caption), mixed by their weights;
pair p of the run is a pure function of p, so batches are a pure function of the step.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mm1.config import Config, Stage, save
from mm1.data.errors import ImageError
from mm1.data.images import to_tensor
from mm1.data.mixture import Mixture
from mm1.data.prepared import PreparedSource, open_prepared
from mm1.data.sources import stage_sources
from mm1.data.stream import load_tokenizer, step_loader
from mm1.data.tokenizer import Tokenizer
from mm1.model.clip import CLIP
from mm1.train.metrics import RunLogger
from mm1.train.optim import build_optimizer, lr_at, param_groups, resolve_lr

MAX_TEXT = 64


class CaptionPairs:
    """Image-caption batches of the CLIP stage as a pure function of the step (`make`)."""

    def __init__(self, cfg: Config, tok: Tokenizer) -> None:
        self.sources: list[PreparedSource] = list(open_prepared(cfg, Stage.CLIP, tok).values())
        weights = [s.weight for s in stage_sources(cfg, Stage.CLIP).values()]
        self.mixture = Mixture([s.num_documents for s in self.sources], weights, seed=cfg.data.seed)
        self.batch, self.size, self.eos = cfg.train.batch_size, cfg.model.vision.image_size, tok.eos_id

    def pair(self, p: int) -> tuple[torch.Tensor, list[int]] | None:
        s, _, d = self.mixture.locate(p)
        tokens, loss, refs = self.sources[s].document(d)
        text = [int(t) for t in tokens[loss > 0] if t != self.eos][:MAX_TEXT]
        if not refs or not text:  # the tail of a caption split across sequences
            return None
        try:
            return to_tensor(refs[0].load(), self.size), text
        except ImageError:
            return None

    def make(self, step: int) -> dict:
        pairs = [x for p in range(step * self.batch, (step + 1) * self.batch) if (x := self.pair(p)) is not None]
        L = max(len(t) for _, t in pairs)
        tokens = torch.zeros(len(pairs), L, dtype=torch.long)
        valid = torch.zeros(len(pairs), L, dtype=torch.bool)
        for i, (_, t) in enumerate(pairs):
            tokens[i, : len(t)] = torch.from_numpy(np.asarray(t, dtype=np.int64))
            valid[i, : len(t)] = True
        return {"step": step, "images": torch.stack([im for im, _ in pairs]), "ids": tokens, "valid": valid}


def train_clip(cfg: Config, out: Path) -> Path:
    """Train the CLIP image encoder per `cfg.train` (stage clip); returns the vision weights' path."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg)
    data = CaptionPairs(cfg, tok)
    save(cfg, out / "config.json")
    model = CLIP(cfg.model.vision, vocab=len(tok))
    # No LLM here: the rule's N is the CLIP model's own size (our choice; see docs/paper.md).
    lr = resolve_lr(cfg.train.optimizer, sum(p.numel() for p in model.parameters()))
    groups = param_groups(model, lr=lr, weight_decay=cfg.train.optimizer.weight_decay,
                          components=cfg.train.components)
    opt = build_optimizer(groups, cfg.train.optimizer, lr)
    steps = cfg.train.steps
    loader = step_loader(data.make, start=0, stop=steps, num_workers=cfg.data.num_workers)
    logger = RunLogger(out, cfg.train.logging, total_steps=steps, start_step=0, enabled=True, run_config={},
                       desc="clip")
    t0, seen = time.perf_counter(), 0
    try:
        for batch in loader:
            step = batch["step"]
            cur = lr_at(step, peak=lr, total_steps=steps, schedule=cfg.train.schedule)
            for g in opt.param_groups:
                g["lr"] = cur * g["lr_mult"]
            res = model(batch["images"], batch["ids"], batch["valid"])
            res.loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.optimizer.grad_clip or 1e9))
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(batch["images"])
            logger.step()
            if (step + 1) % cfg.train.logging.every == 0 or step + 1 == steps:
                now = time.perf_counter()
                logger.log({"step": step + 1, "loss": res.loss.item(), "lr": cur, "grad_norm": grad_norm,
                            "tokens_per_s": seen / (now - t0), "clip_accuracy": res.accuracy})
                t0, seen = now, 0
    finally:
        logger.close()
    path = out / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in model.vision.state_dict().items()}, str(path))
    return path
