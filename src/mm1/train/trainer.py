"""One trainer for every stage of MM1 (CLIP, pre-training, SFT), from 2 CPU cores to many GPUs.

The loop: a step batch of `train.batch_size` samples (split over ranks and micro-batches), the
stage's loss (`mm1.train.objective`: next-token loss normalised over the whole step's predicted
tokens, or the contrastive loss of the CLIP stage), gradients synced once per step and clipped,
AdamW (or Adafactor) with the paper's LR rule, warm-up and cosine decay. Checkpoints are atomic and
resume exactly: the data is a pure function of the step, and model, optimizer and RNG states are
restored bit for bit. A stop request (SIGTERM, Ctrl-C) on any rank stops every rank at the same step;
so does an out-of-memory error on any rank, each saving the last step they all completed
(`mm1.train.failstop`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from torch.distributed.tensor import DTensor

from mm1.config import Config, ConfigError, OnNonFinite, Precision, Stage, save, to_dict
from mm1.data.stream import load_tokenizer
from mm1.model.size import check_fits
from mm1.store.pretrained import resolve_pretrained
from mm1.train import checkpoint as ckpt
from mm1.train.build import build_model
from mm1.train.failstop import Decision, FailureChannel, PeerFailedError, Report, decide
from mm1.train.metrics import RunLogger, default_peak_flops
from mm1.train.objective import Objective
from mm1.train.optim import build_optimizer, lr_at, param_groups, resolve_lr
from mm1.train.parallel import (
    DistInfo,
    any_rank,
    gradient_sync,
    init_distributed,
    set_collective_timeout,
    settle,
    shutdown_distributed,
    unwrap,
)


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left untouched."""


class StepFailedError(RuntimeError):
    """A rank failed inside a step (out of memory); every rank stopped, saving what they all held."""


@dataclass
class StepResult:
    """What one optimizer step reports: loss, gradient norm, tokens or images, FLOPs, extras."""
    loss: float
    grad_norm: float
    count: int  # tokens (real, not padding) or images of the step, all ranks: see `Objective.unit`
    flops: float
    extra: dict[str, float] = field(default_factory=dict)
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


def autocast(cfg: Config, device: torch.device):
    bf16 = cfg.train.precision == Precision.BF16 or (cfg.train.precision == Precision.AUTO and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def make_objective(cfg: Config, tok, *, world_size: int, fresh: bool, init_from: str | None) -> Objective:
    if cfg.train.stage == Stage.CLIP:
        from mm1.train.clip import CLIPObjective

        return CLIPObjective(cfg, tok, world_size=world_size)
    from mm1.train.lm import LMObjective

    return LMObjective(cfg, tok, world_size=world_size, fresh=fresh, init_from=init_from)


def same_tokenizer(tok, run: Path, cfg: Config) -> None:
    """Refuse to continue (or start from) a run whose model was trained with another tokenizer: the same
    vocabulary size would let it run, on ids that mean other words."""
    from mm1.store.transformers import read_tokenizer

    saved = run / "tokenizer.json"
    if saved.exists() and read_tokenizer(run).fingerprint != tok.fingerprint:
        where = cfg.data.tokenizer or f"{cfg.data.root}/tokenizer.json"
        raise ConfigError(f"data.tokenizer: {where} is not the tokenizer {run} was trained with ({saved}); "
                          f"point data.tokenizer at {saved} to go on from it")


class Trainer:
    """The training loop of every stage: `Trainer(cfg, out).run()`; the stage's `Objective` says what."""

    def __init__(self, cfg: Config, out: Path, *, resume: bool = False, init_from: str | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.info: DistInfo = init_distributed()
        torch.manual_seed(cfg.train.seed)
        if not resume:  # a resumed run's saved config is resolved already (its folders may be gone)
            resolve_pretrained(cfg)
        self.tok = load_tokenizer(cfg)
        if resume:
            same_tokenizer(self.tok, out, cfg)
        elif init_from:
            source = Path(init_from)  # an export's folder holds its tokenizer; a checkpoint's run does
            same_tokenizer(self.tok, source if (source / "mm1_config.json").exists() else ckpt.resolve(source)[0],
                           cfg)
        # a config handed over with 100,000 layers is refused here, before anything is allocated
        check_fits(cfg, training=True, world_size=self.info.world_size, device=self.info.device.type)
        self.objective = make_objective(cfg, self.tok, world_size=self.info.world_size, fresh=not resume,
                                        init_from=init_from)
        self.lr = resolve_lr(cfg.train.optimizer, self.objective.rule_parameters())
        if self.info.is_main:
            save(cfg, out / "config.json")
            self.tok.save(out / "tokenizer.json")  # the run is self-contained for eval and chat
        ckpt.clean_partial(out)
        last = ckpt.latest(out) if resume else None
        # whole, or (FSDP2 over ranks) sharded from the meta device; the starting weights unless a
        # checkpoint's come next (a job resubmitted before its first checkpoint starts where a new one does)
        self.model = build_model(self.objective, cfg.train, self.info, components=cfg.train.components,
                                 load_start=last is None)
        groups = param_groups(unwrap(self.model), lr=self.lr, weight_decay=cfg.train.optimizer.weight_decay,
                              components=cfg.train.components)
        self.optimizer = build_optimizer(groups, cfg.train.optimizer, self.lr)
        self.start_step = 0
        if resume and last is None:
            if self.info.is_main:
                print(f"--resume: no complete checkpoint in {out / 'checkpoints'} yet; starting at step 0",
                      flush=True)
        elif last is not None:
            if self.info.is_main:  # the one path that unpickles: say so
                print(f"--resume: reading {last}'s distributed checkpoint (torch's metadata is a pickle: "
                      f"resume only runs you made)", flush=True)
            self.start_step = ckpt.load(last, self.model, self.optimizer)["step"]
        self.per_rank = cfg.train.batch_size // self.info.world_size
        micro = cfg.train.micro_batch_size or self.per_rank
        if self.per_rank % micro:
            raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {self.per_rank}")
        self.accum = self.per_rank // micro
        # What a failed step leaves to save: the steps completed, whether one was caught inside its
        # optimizer step, and the RNG state the step began with (mm1.train.failstop).
        self.channel = FailureChannel.for_job(watch=self.info.device.type == "cuda")
        self.completed = self.start_step
        self._in_optimizer_step = False
        self._rng_at_step: dict | None = None
        # the step's FLOPs are the job's (every rank's tokens): MFU divides them by the job's peak
        self.peak_flops = (cfg.train.logging.peak_flops or default_peak_flops(self.info.device)) * self.info.world_size

    # ------------------------------------------------------------------ one step
    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, peak=self.lr, total_steps=self.cfg.train.steps, schedule=self.cfg.train.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def train_step(self, batch) -> StepResult:
        device = self.info.device
        micros = self.objective.begin_step(batch, accum=self.accum, device=device)
        for i, micro in enumerate(micros):
            # Gradients are synced across ranks once per step, in the last micro-batch's backward.
            with gradient_sync(self.model, i == self.accum - 1):
                with autocast(self.cfg, device):
                    loss = self.objective.loss(self.model, micro.to(device))
                loss.backward()
        clip = self.cfg.train.optimizer.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)  # FSDP2: sharded
        m = self.objective.end_step()
        result = StepResult(m.loss, grad_norm, m.count, m.flops, m.extra)
        if not (math.isfinite(m.loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.train.on_non_finite == OnNonFinite.STOP:
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(m.loss) else 'gradient'} at step {batch.step + 1} "
                    f"(loss={m.loss}, grad_norm={grad_norm}); the last good checkpoint is kept. "
                    "Lower train.optimizer.lr or set train.on_non_finite=skip.")
            result.skipped = True
            return result
        if self.channel is not None and self.channel.peer_failed.is_set():
            # NCCL: the watcher aborted this step's collectives, so these gradients are not sums of anything.
            raise PeerFailedError(f"a peer failed during step {batch.step + 1}")
        self._in_optimizer_step = True
        self.optimizer.step()
        self._in_optimizer_step = False
        self.optimizer.zero_grad(set_to_none=True)
        return result

    # ------------------------------------------------------------------ the loop
    def _meta(self, step: int) -> dict:
        return {"data_state": {"next_step": step, "seed": self.cfg.data.seed}, "lr_peak": self.lr,
                "recipe": self.cfg.recipe, "stage": self.cfg.train.stage.value}

    def save(self, step: int, rng: dict | None = None) -> Path:
        return ckpt.save(self.out, step, self.model, self.optimizer, self._meta(step), self.cfg.train.checkpoint,
                         rng=rng)

    def _should_save(self, step: int) -> bool:
        c = self.cfg.train.checkpoint
        return step % c.every == 0 or (c.keep_log_spaced and step & (step - 1) == 0 and step < c.every)

    def run(self) -> dict:
        cfg, info, unit = self.cfg, self.info, self.objective.unit
        steps = cfg.train.steps
        logger = RunLogger(self.out, cfg.train.logging, total_steps=steps, start_step=self.start_step,
                           enabled=info.is_main, run_config=to_dict(cfg), desc=f"{cfg.train.stage.value}",
                           rate=f"{unit}_per_s")
        loader = self.objective.loader(start=self.start_step, stop=steps, rank=info.rank,
                                       world_size=info.world_size, num_workers=cfg.data.num_workers)
        skipped: dict[str, int] = {}
        last = {"step": self.start_step}
        window_t, window_count, window_flops = time.perf_counter(), 0, 0.0
        step = self.start_step
        failed: tuple[int, bool] | None = None  # (the step that failed, whether out of memory here)
        self.model.train()
        try:
            with _Interrupt() as stop:
                for batch in loader:
                    step = batch.step
                    try:
                        lr = self._set_lr(step)
                        self._rng_at_step = ckpt.rng_state()
                        res = self.train_step(batch)
                        self.completed = step = step + 1
                        if step == self.start_step + 1:  # start-up (loading, compiling) may take longer
                            set_collective_timeout(cfg.train.collective_timeout_s)
                        for k, v in batch.skipped.items():
                            skipped[k] = skipped.get(k, 0) + v
                        window_count += res.count
                        window_flops += res.flops
                        logger.step()
                        if step % cfg.train.logging.every == 0 or step == steps:
                            now = time.perf_counter()
                            seconds = max(1e-9, now - window_t)
                            last = {"step": step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                                    f"{unit}_per_s": window_count / seconds,
                                    "mfu": window_flops / seconds / self.peak_flops, **res.extra,
                                    "skipped_step": res.skipped, "data_skipped": sum(skipped.values())}
                            logger.log(last)
                            window_t, window_count, window_flops = now, 0, 0.0
                        if self._should_save(step) or step == steps:
                            self.save(step)
                        if self._stop_agreed(stop.requested):  # every rank stops at the same step
                            path = self.save(step)
                            logger.write(f"interrupted: saved {path}; continue with --resume")
                            break
                    except RuntimeError as err:
                        if not self._is_step_failure(err):
                            raise
                        # Only what it was: the error's traceback holds the abandoned step's activations.
                        failed = (batch.step, isinstance(err, torch.OutOfMemoryError))
                        break
                if failed is not None:
                    self._fail_stop(*failed)
        finally:
            logger.close()
            failing = sys.exc_info()[1] is not None
            try:
                self.objective.finish(unwrap(self.model), self.out, is_main=info.is_main, completed=step >= steps,
                                      skipped=skipped)
            except OSError as err:  # (a full disk) when the run is failing already: that first error is the news
                if not failing:
                    raise
                print(f"also: the run's summary was not written ({err})", file=sys.stderr)
        return last

    # ------------------------------------------------------------------ a failed step
    def _stop_agreed(self, requested: bool) -> bool:
        agreed = any_rank(requested, self.info.device)
        if self.channel is not None and self.channel.peer_failed.is_set():
            raise PeerFailedError("a peer failed at the end of a step")  # NCCL: that all-reduce was aborted
        return agreed

    def _is_step_failure(self, err: RuntimeError) -> bool:
        """An out-of-memory error here, or any error of a step that a peer has posted a failure for
        (its collectives aborted or timed out); anything else is not ours to handle."""
        if isinstance(err, torch.OutOfMemoryError):
            return True
        if isinstance(err, NonFiniteError):  # every rank raises it together: nothing to agree on
            return False
        return self.channel is not None and (isinstance(err, PeerFailedError) or self.channel.posted(wait_s=5.0))

    def _fail_stop(self, step: int, oom: bool) -> NoReturn:
        """Step `step + 1` failed on some rank: every rank saves the last step they all completed
        (unless one was caught half-way through its optimizer step) and stops; see mm1.train.failstop."""
        own = None
        if oom:
            own = (f"out of memory in step {step + 1} with {self.per_rank} sequences per rank in {self.accum} "
                   f"micro-batches of {self.cfg.data.packing.seq_len} tokens")
            if self.channel is not None:
                print(f"[rank {self.info.rank}] {own}; stopping every rank", file=sys.stderr, flush=True)
                self.channel.post(f"rank {self.info.rank}: {own}")
        settle(self.model)
        report = Report(self.info.rank, self.completed, self._in_optimizer_step, own)
        reports = [report] if self.channel is None else self.channel.regroup(report)
        decision = decide(reports)
        saved = None
        if decision.step is not None and decision.step > self.start_step:
            saved = self.save(decision.step, rng=self._rng_at_step)
        raise StepFailedError(self._failure_message(decision, saved))

    def _failure_message(self, decision: Decision, saved: Path | None) -> str:
        last = ckpt.latest(self.out)
        who = "every rank" if self.info.world_size > 1 else "the run"
        if saved is not None:
            where = f"{who} stopped after step {decision.step} and saved {saved}"
        elif decision.step is not None:
            where = f"{who} stopped after step {decision.step}, the step it started from"
        else:
            where = ("the ranks do not hold one completed step (a rank was inside its optimizer step), so "
                     f"nothing new was saved; the last checkpoint is {last or 'none (the run starts over)'}")
        return (f"{decision.why}. {where[0].upper()}{where[1:]}. Lower train.micro_batch_size or "
                "data.packing.seq_len, then run the same command with --resume.")


def train(cfg: Config, *, out: Path, resume: bool = False, init_from: str | None = None) -> dict:
    """Train per `cfg` into `out`; returns the last logged metrics."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return Trainer(cfg, out, resume=resume, init_from=init_from).run()
    finally:
        shutdown_distributed()


def train_or_resume(cfg: Config, out: Path, init_from: Path | None = None) -> dict | None:
    """One stage of a pipeline run again: skipped when `out` has reached `train.steps`, resumed when it
    has a checkpoint, started (from `init_from`'s latest checkpoint, if given) otherwise."""
    last = ckpt.latest(out)
    if last is not None and ckpt.load_meta(last)["step"] >= cfg.train.steps:
        return None
    init = None if last is not None or init_from is None else str(ckpt.latest(init_from))
    return train(cfg, out=out, resume=last is not None, init_from=init)
