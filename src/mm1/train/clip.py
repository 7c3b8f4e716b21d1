"""`mm1 train --stage clip`: contrastive pre-training of the image encoder on the caption data.

MM1's image encoder is a ViT trained with a CLIP loss before multimodal pre-training. This stage
produces one for recipes that have no pretrained encoder: `DIR/vision.safetensors`, which the MLLM
loads through `model.vision_init=DIR/vision.safetensors`. Batches are a pure function of the step
(records drawn through a one-source `Mixture`), and the stage logs like the main trainer.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mm1.config import Config, Stage, save
from mm1.data.images import ImageError, to_tensor
from mm1.data.loader import load_tokenizer, step_loader
from mm1.data.mixture import Mixture
from mm1.data.sample import ImageRef, RecordError, Text
from mm1.data.sources import SourceData, open_sources
from mm1.data.tokenizer import Tokenizer
from mm1.model.clip import CLIP
from mm1.train.metrics import RunLogger
from mm1.train.optim import build_optimizer, lr_at, param_groups, resolve_lr

MAX_TEXT = 64


class CaptionBatches:
    """Image-caption batches as a pure function of the step (`make`)."""

    def __init__(self, source: SourceData, tok: Tokenizer, *, batch: int, size: int, seed: int) -> None:
        self.source, self.tok, self.batch, self.size = source, tok, batch, size
        self.mixture = Mixture([len(source)], [1.0], seed=seed)

    def make(self, step: int) -> dict:
        images, texts = [], []
        for _, rec in self.mixture.positions(step * self.batch, (step + 1) * self.batch):
            try:
                sample = self.source.load(rec)
                image = next(s for s in sample.segments if isinstance(s, ImageRef)).load()
            except (RecordError, ImageError, StopIteration):
                continue
            images.append(to_tensor(image, self.size))
            texts.append(" ".join(s.text for s in sample.segments if isinstance(s, Text)))
        ids = [x[:MAX_TEXT] for x in self.tok.encode_batch(texts)]
        L = max(len(x) for x in ids)
        tokens = torch.zeros(len(ids), L, dtype=torch.long)
        valid = torch.zeros(len(ids), L, dtype=torch.bool)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x)
            valid[i, : len(x)] = True
        return {"step": step, "images": torch.stack(images), "ids": tokens, "valid": valid}


def train_clip(cfg: Config, out: Path) -> Path:
    """Train the CLIP image encoder per `cfg.train` (stage clip); returns the vision weights' path."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg)
    save(cfg, out / "config.json")
    caption = open_sources(cfg.data, Stage.PRETRAIN)["caption"]
    model = CLIP(cfg.model.vision, vocab=len(tok))
    n_params = sum(p.numel() for p in model.parameters())
    lr, wd = resolve_lr(cfg.train.optimizer, n_params)
    groups = param_groups(model, lr=lr, weight_decay=wd, components=cfg.train.components)
    opt = build_optimizer(groups, cfg.train.optimizer, lr)
    steps = cfg.train.steps
    data = CaptionBatches(caption, tok, batch=cfg.train.batch_size, size=cfg.model.vision.image_size,
                          seed=cfg.data.seed)
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
