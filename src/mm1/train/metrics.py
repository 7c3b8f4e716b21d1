"""Run logging: a progress bar, `metrics.jsonl`, TensorBoard, and W&B when configured.

Every logged step becomes one JSON object in `DIR/metrics.jsonl` (step, loss, lr, grad_norm,
tokens_per_s (images_per_s in the CLIP stage), mfu, per-source losses, MoE aux losses and expert
shares, skipped data), the same
scalars go to TensorBoard under `DIR/tensorboard/`, and to W&B when `train.logging.wandb_project`
is set (offline mode works without a network). Only rank 0 writes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mm1.config import LoggingConfig

# dense bf16, from the data sheets; the most specific name first (an "H100 PCIe" is not an SXM H100)
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
                  "A100": 312e12}


def default_peak_flops(device: torch.device) -> float:
    """MFU's denominator: the data sheet's dense bf16 peak for a known GPU, else a measured matmul rate.

    A CPU has no data sheet figure we could look up, and the VMs we run on change from day to day
    (a fixed constant once gave MFU 0.89 on a faster one), so on a CPU, and on a GPU not in the
    table, the peak is the best rate of a few large matmuls on this device with this thread count:
    MFU is then the share of what this machine's BLAS reaches, measured once per process (~0.2 s).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return measured_matmul_flops(str(device), torch.bfloat16, torch.get_num_threads())
    return measured_matmul_flops(str(device), torch.float32, torch.get_num_threads())


@functools.cache
def measured_matmul_flops(device: str, dtype: torch.dtype, threads: int, n: int = 2048) -> float:
    """The best FLOP/s of three n×n×n matmuls after a warm-up (`threads` is part of the cache key)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    a @ b
    sync()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def keep_rows_up_to(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their earlier rows (and a line cut short
    by a kill), so that metrics.jsonl holds one row per step. Written to a temporary name, then renamed."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger:
    """Training metrics of the main rank to metrics.jsonl, TensorBoard, W&B and a progress bar."""

    def __init__(self, out: Path, cfg: LoggingConfig, *, total_steps: int, start_step: int, enabled: bool,
                 run_config: dict, desc: str = "train", rate: str = "tokens_per_s") -> None:
        self.enabled, self.rate = enabled, rate
        self.cfg = cfg
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            keep_rows_up_to(out / "metrics.jsonl", start_step)
        self.jsonl = (out / "metrics.jsonl").open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("train.logging.wandb_project is set but wandb is not installed "
                                   "(pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(out),
                                    config=run_config, resume="allow")
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not cfg.progress,
                        dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k.replace(".", "/"), v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.bar is not None:
            rate = {self.rate.replace("_per_s", "/s"): f"{record[self.rate]:.0f}"}  # tokens/s or images/s
            self.bar.set_postfix({"loss": f"{record['loss']:.3f}", **rate, "lr": f"{record['lr']:.1e}"}, refresh=False)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
