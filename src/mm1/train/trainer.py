"""One trainer for MM1 pre-training and SFT, from 2 CPU cores to many GPUs.

The loop: a step batch of `train.batch_size` sequences (split over ranks and micro-batches), loss
summed over predicted tokens and divided by their count over the *whole* step (all micro-batches,
all ranks), MoE aux losses added, gradients clipped, AdamW (or Adafactor) with the paper's LR rule,
warm-up and cosine decay. Checkpoints are atomic and resume exactly: the data stream is a pure
function of the step, and model, optimizer and RNG states are restored bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mm1.config import Config, ConfigError, OnNonFinite, Precision, save, to_dict
from mm1.data.packing import IGNORE
from mm1.data.stats import DataStats
from mm1.data.stream import Batch, DataStream, load_tokenizer, make_loader
from mm1.model.mllm import MLLM, lr_rule_parameters, upcycle_from_dense
from mm1.train import checkpoint as ckpt
from mm1.train.metrics import RunLogger, default_peak_flops
from mm1.train.optim import build_optimizer, freeze, lr_at, param_groups, resolve_lr
from mm1.train.parallel import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    gradient_sync,
    init_distributed,
    parallelize,
    shutdown_distributed,
    unwrap,
)


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # real (non-padding) tokens in the step, all ranks
    images: int  # images in the step, all ranks (views after sub-image decomposition)
    predicted: int
    source_loss: dict[str, float]
    aux: dict[str, float]
    skipped: bool = False


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag so the loop can save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C as usual
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def resolve_model_config(cfg: Config, vocab: int, image_id: int) -> None:
    dec = cfg.model.decoder
    if dec.vocab_size < vocab:
        raise ConfigError(f"model.decoder.vocab_size: {dec.vocab_size} is smaller than the tokenizer's {vocab} tokens")
    cfg.model.image_token_id = image_id


def init_weights(model: MLLM, cfg: Config, path: Path) -> None:
    """Start from a checkpoint's weights (strict about names). A dense checkpoint into an MoE model is
    upcycled; position tables trained at another resolution are interpolated (SFT at 672 px from a
    378-px pre-training checkpoint)."""
    from mm1.config import load
    from mm1.model.weights import fit_position_tables, load_strict

    run, ck = ckpt.resolve(path)
    source = MLLM(load(run / "config.json").model)
    ckpt.load_model_weights(ck, source)
    state = fit_position_tables(source.state_dict(), model)
    if cfg.model.moe.num_experts and not source.cfg.moe.num_experts:
        upcycle_from_dense(model, state)
    else:
        load_strict(model, state, what=f"weights from {ck}")


def load_vision(model: MLLM, path: Path) -> None:
    """Start the image encoder from CLIP pre-training (strict: every tensor must match; the position
    table is interpolated when the resolutions differ)."""
    from safetensors.torch import load_file

    from mm1.model.weights import fit_position_tables, load_strict

    if not path.exists():
        raise ConfigError(f"model.vision_init: {path} does not exist (train it with `mm1 train --stage clip`)")
    state = fit_position_tables(load_file(str(path)), model.vision)
    load_strict(model.vision, state, what=f"vision encoder from {path}")


def autocast(cfg: Config, device: torch.device):
    bf16 = cfg.train.precision == Precision.BF16 or (cfg.train.precision == Precision.AUTO and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def step_flops(cfg: Config, *, tokens: int, images: int) -> float:
    """Training FLOPs of a step: 6 per parameter use (forward + backward) for the decoder's matmuls
    on every token (experts: top-k only), the ViT's and connector's on every patch, and causal
    attention's 6·L·d·T per token (T: the packed sequence length)."""
    m, d = cfg.model, cfg.model.decoder
    per_layer_attn = d.width * (2 * d.width + 2 * d.kv_heads * (d.width // d.heads))
    ffn = 3 * d.width * d.ffn_hidden
    moe_layers = d.depth // m.moe.every if m.moe.num_experts else 0
    decoder = d.depth * per_layer_attn + (d.depth - moe_layers) * ffn + moe_layers * m.moe.top_k * ffn
    decoder += d.vocab_size * d.width  # the output head
    v = m.vision
    patches = (v.image_size // v.patch_size) ** 2
    vit = v.depth * (4 * v.width**2 + 2 * v.width * int(v.width * v.mlp_ratio))
    attention = 6 * d.depth * d.width * cfg.data.packing.seq_len
    return tokens * (6 * decoder + attention) + images * patches * 6 * vit


class Trainer:
    def __init__(self, cfg: Config, out: Path, *, resume: bool = False, init_from: str | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.info: DistInfo = init_distributed()
        torch.manual_seed(cfg.train.seed)
        self.tok = load_tokenizer(cfg)
        resolve_model_config(cfg, len(self.tok), self.tok.image_id)
        self.stats = DataStats()
        self.stream = DataStream(cfg, self.tok, stats=self.stats)  # first: missing data fails before any work
        self.lr = resolve_lr(cfg.train.optimizer, lr_rule_parameters(cfg.model))
        if self.info.is_main:
            save(cfg, out / "config.json")
            self.tok.save(out / "tokenizer.json")  # the run is self-contained for eval and chat
        self.model = MLLM(cfg.model).to(self.info.device)
        if cfg.model.vision_init and not resume and not init_from:
            load_vision(self.model, Path(cfg.model.vision_init))
        if init_from:
            init_weights(self.model, cfg, Path(init_from))
        freeze(self.model, cfg.train.components)  # before wrapping: DDP and FSDP2 read requires_grad then
        self.model = parallelize(self.model, cfg.train, self.info)
        groups = param_groups(unwrap(self.model), lr=self.lr, weight_decay=cfg.train.optimizer.weight_decay,
                              components=cfg.train.components)
        self.optimizer = build_optimizer(groups, cfg.train.optimizer, self.lr)
        self.start_step = 0
        ckpt.clean_partial(out)
        if resume:
            last = ckpt.latest(out)
            if last is None:  # a preempted job resubmitted before its first checkpoint: start over
                if self.info.is_main:
                    print(f"--resume: no complete checkpoint in {out / 'checkpoints'} yet; starting at step 0",
                          flush=True)
            else:
                self.start_step = ckpt.load(last, self.model, self.optimizer)["step"]
        self.per_rank = cfg.train.batch_size // self.info.world_size
        micro = cfg.train.micro_batch_size or self.per_rank
        if self.per_rank % micro:
            raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {self.per_rank}")
        self.accum = self.per_rank // micro
        self.peak_flops = cfg.train.logging.peak_flops or default_peak_flops(
            torch.cuda.get_device_name() if self.info.device.type == "cuda" else "cpu", torch.get_num_threads())

    # ------------------------------------------------------------------ one step
    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, peak=self.lr, total_steps=self.cfg.train.steps, schedule=self.cfg.train.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def train_step(self, batch: Batch) -> StepResult:
        device = self.info.device
        predicted = all_reduce_sum(torch.tensor([(batch.labels_BT != IGNORE).sum().item()], dtype=torch.float64),
                                   device)
        total_pred = max(1.0, float(predicted.item()))
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        S = len(self.stream.names)
        src_sum = torch.zeros(S, device=device)
        src_cnt = torch.zeros(S, device=device)
        aux_acc: dict[str, float] = {}
        for i, micro in enumerate(batch.split(self.accum)):
            micro = micro.to(device)
            # Gradients are synced across ranks once per step, in the last micro-batch's backward.
            with gradient_sync(self.model, i == self.accum - 1):
                with autocast(self.cfg, device):
                    out = self.model(**micro.model_inputs(), num_sources=S, vision_always=self.info.world_size > 1)
                # Normalise by the step's predicted tokens over all ranks; DDP/FSDP average gradients over
                # ranks, so multiply by the world size to get the sum-then-divide of one big batch.
                loss = out.loss_sum * (self.info.world_size / total_pred)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss / self.accum
                    self._collect_moe(out, aux_acc)
                loss.backward()
            loss_sum += out.loss_sum.detach().double()
            src_sum += out.source_loss_sum_S
            src_cnt += out.source_count_S
        clip = self.cfg.train.optimizer.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        reduced = all_reduce_sum(torch.cat([loss_sum.float().reshape(1), src_sum, src_cnt]), device)
        loss_val = float(reduced[0]) / total_pred
        tokens, images = (int(x) for x in all_reduce_sum(torch.tensor(
            [int((batch.doc_ids_BT >= 0).sum()), sum(batch.images_per_row)]), device))
        source_loss = {self.stream.names[i]: float(reduced[1 + i] / reduced[1 + S + i])
                       for i in range(S) if reduced[1 + S + i] > 0}
        result = StepResult(loss_val, grad_norm, tokens, images, int(total_pred), source_loss,
                            {k: v / self.accum for k, v in aux_acc.items()})
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.train.on_non_finite == OnNonFinite.STOP:
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(loss_val) else 'gradient'} at step {batch.step + 1} "
                    f"(loss={loss_val}, grad_norm={grad_norm}); the last good checkpoint is kept. "
                    "Lower train.optimizer.lr or set train.on_non_finite=skip.")
            result.skipped = True
            return result
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    @staticmethod
    def _collect_moe(out, acc: dict[str, float]) -> None:
        n = len(out.moe_stats)
        lb = sum(s.load_balance_loss.item() for s in out.moe_stats) / n
        z = sum(s.z_loss.item() for s in out.moe_stats) / n
        acc["moe_load_balance"] = acc.get("moe_load_balance", 0.0) + lb
        acc["moe_z_loss"] = acc.get("moe_z_loss", 0.0) + z
        share = torch.stack([s.expert_share_E for s in out.moe_stats]).mean(0)
        for e, v in enumerate(share.tolist()):
            acc[f"expert_share.{e}"] = acc.get(f"expert_share.{e}", 0.0) + v

    # ------------------------------------------------------------------ the loop
    def _meta(self, step: int) -> dict:
        return {"data_state": {"next_step": step, "seed": self.cfg.data.seed}, "lr_peak": self.lr,
                "recipe": self.cfg.recipe, "stage": self.cfg.train.stage.value}

    def save(self, step: int) -> Path:
        return ckpt.save(self.out, step, self.model, self.optimizer, self._meta(step), self.cfg.train.checkpoint)

    def _should_save(self, step: int) -> bool:
        c = self.cfg.train.checkpoint
        return step % c.every == 0 or (c.keep_log_spaced and step & (step - 1) == 0 and step < c.every)

    def run(self) -> dict:
        cfg, info = self.cfg, self.info
        steps = cfg.train.steps
        logger = RunLogger(self.out, cfg.train.logging, total_steps=steps, start_step=self.start_step,
                           enabled=info.is_main, run_config=to_dict(cfg), desc=f"{cfg.train.stage.value}")
        loader = make_loader(self.stream, start=self.start_step, stop=steps, rank=info.rank,
                             world_size=info.world_size, num_workers=cfg.data.num_workers)
        skipped: dict[str, int] = {}
        last = {"step": self.start_step}
        window_t, window_tokens, window_flops = time.perf_counter(), 0, 0.0
        step = self.start_step
        self.model.train()
        try:
            with _Interrupt() as stop:
                for batch in loader:
                    step = batch.step
                    lr = self._set_lr(step)
                    try:
                        res = self.train_step(batch)
                    except torch.OutOfMemoryError:
                        raise RuntimeError(
                            f"out of memory at step {step} with {self.per_rank} sequences per rank in "
                            f"{self.accum} micro-batches of {cfg.data.packing.seq_len} tokens; lower "
                            "train.micro_batch_size or data.packing.seq_len") from None
                    for k, v in batch.skipped.items():
                        skipped[k] = skipped.get(k, 0) + v
                    window_tokens += res.tokens
                    window_flops += step_flops(cfg, tokens=res.tokens, images=res.images)
                    step += 1
                    logger.step()
                    if step % cfg.train.logging.every == 0 or step == steps:
                        now = time.perf_counter()
                        tps = window_tokens / max(1e-9, now - window_t)
                        mfu = window_flops / max(1e-9, now - window_t) / self.peak_flops
                        last = {"step": step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                                "tokens_per_s": tps, "mfu": mfu,
                                **{f"loss.{k}": v for k, v in res.source_loss.items()}, **res.aux,
                                **{f"epochs.{k}": v for k, v in self.stream.epochs(step - 1).items()},
                                "skipped_step": res.skipped, "data_skipped": sum(skipped.values())}
                        logger.log(last)
                        window_t, window_tokens, window_flops = now, 0, 0.0
                    if self._should_save(step) or step == steps:
                        self.save(step)
                    if any_rank(stop.requested, info.device):  # every rank stops at the same step
                        path = self.save(step)
                        logger.write(f"interrupted: saved {path}; continue with --resume")
                        break
        finally:
            logger.close()
            if info.is_main:
                stats = {"prepared": self.stream.manifests(), "at_load": self.stats.to_dict(),
                         "skipped_in_batches": skipped}
                (self.out / "data_stats.json").write_text(json.dumps(stats, indent=2))
        return last


def train(cfg: Config, *, out: Path, resume: bool = False, init_from: str | None = None) -> dict:
    """Train per `cfg` into `out`; returns the last logged metrics."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return Trainer(cfg, out, resume=resume, init_from=init_from).run()
    finally:
        shutdown_distributed()
