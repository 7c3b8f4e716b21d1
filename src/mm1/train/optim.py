"""The paper's learning-rate rule, the warm-up + cosine schedule, and optimizer construction.

MM1 (Section 3.4) chose its peak learning rate by a grid search on small models and a linear fit
in log space: η(N) = exp(−0.4214·ln N − 0.5535) for N parameters, with weight decay λ = 0.1·η.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mm1.config import ComponentConfig, OptimizerConfig, OptimizerKind, ScheduleConfig

LR_SLOPE = -0.4214
LR_INTERCEPT = -0.5535


def mm1_learning_rate(num_params: float) -> float:
    """Peak learning rate for a model of `num_params` parameters (MM1's extrapolated rule)."""
    if num_params <= 0:
        raise ValueError(f"num_params must be positive, got {num_params}")
    return math.exp(LR_SLOPE * math.log(num_params) + LR_INTERCEPT)


def mm1_weight_decay(lr: float) -> float:
    """MM1 ties weight decay to the peak learning rate: λ = 0.1·η."""
    return 0.1 * lr


def resolve_lr(opt: OptimizerConfig, num_params: int) -> tuple[float, float]:
    """The (peak lr, weight decay) a run uses: explicit values win, else the paper's rule."""
    lr = opt.lr if opt.lr > 0 else mm1_learning_rate(num_params)
    wd = opt.weight_decay if opt.weight_decay >= 0 else mm1_weight_decay(lr)
    return lr, wd


def lr_at(step: int, *, peak: float, total_steps: int, schedule: ScheduleConfig) -> float:
    """Linear warm-up to `peak`, then cosine decay to `final_lr_fraction·peak` at `total_steps`."""
    warm = schedule.warmup_steps
    floor = schedule.final_lr_fraction * peak
    if warm > 0 and step < warm:
        return peak * (step + 1) / warm
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def _component(name: str) -> str:
    return name.split(".", 1)[0]


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, components: ComponentConfig
) -> list[dict]:
    """Parameter groups per component (vision / connector / decoder), decay only on matrices.

    Frozen components get `requires_grad=False` and no group; each group's `lr_mult` is read by
    the scheduler, so multipliers survive a resume.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        comp = _component(name)
        if getattr(components, f"{comp}_frozen", False):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        groups.setdefault((comp, p.ndim >= 2), []).append(p)
    out = []
    for (comp, decay), params in sorted(groups.items()):
        mult = getattr(components, f"{comp}_lr_mult", 1.0)
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr": lr * mult, "lr_mult": mult, "name": f"{comp}.{'decay' if decay else 'no_decay'}"})
    return out


def build_optimizer(groups: list[dict], opt: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    if opt.kind == OptimizerKind.ADAMW:
        return torch.optim.AdamW(groups, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if opt.kind == OptimizerKind.ADAFACTOR:
        return torch.optim.Adafactor(groups, lr=lr, beta2_decay=-0.8, eps=(None, 1e-3))
    raise ValueError(f"unknown optimizer {opt.kind}")
