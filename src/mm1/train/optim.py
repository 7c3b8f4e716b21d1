"""The paper's learning-rate rule, the warm-up + cosine schedule, and optimizer construction.

MM1 (Section 3.4) chose its peak learning rate by a grid search over LLM sizes (9M to 1.2B) and a
linear fit in log space: η(N) = exp(−0.4214·ln N − 0.5535), N the LLM's parameters
(`mm1.model.mllm.lr_rule_parameters`: the decoder, MoE layers counted as their dense FFN), with
weight decay λ = 0.1·η.

MM1 trained with AXLearn, whose AdamW decay is decoupled from the learning rate: each step
shrinks a weight by λ (times the schedule), not by η·λ. `torch.optim.AdamW` multiplies its
`weight_decay` by the scheduled learning rate, so λ = 0.1·η is `weight_decay = 0.1` there
(`train.optimizer.weight_decay`, a fraction of the learning rate). Passing 0.1·η instead would
shrink weights by 0.1·η² per step: nothing.
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


def resolve_lr(opt: OptimizerConfig, rule_params: int) -> float:
    """The peak learning rate a run uses: an explicit `lr` wins, else the paper's rule at N."""
    return opt.lr if opt.lr > 0 else mm1_learning_rate(rule_params)


def describe(opt: OptimizerConfig, schedule: ScheduleConfig, rule_params: int) -> list[str]:
    """What `mm1 config show` prints about the optimisation: lines starting `learning rate:` and `weight decay:`."""
    lr = resolve_lr(opt, rule_params)
    source = ("set by train.optimizer.lr" if opt.lr > 0 else
              f"MM1's rule exp(-0.4214 ln N - 0.5535) at N = {rule_params:,} decoder parameters, "
              "MoE layers counted as their dense FFN")
    return [
        f"learning rate: {lr:.3g} peak ({source}); {opt.kind.value}, warm-up {schedule.warmup_steps} steps, "
        f"cosine decay to {schedule.final_lr_fraction:g} of the peak",
        f"weight decay: {opt.weight_decay:g} x learning rate = {opt.weight_decay * lr:.3g} per step at the peak, "
        "decoupled (weights shrink by weight_decay x the scheduled lr, not by the gradient step; MM1: 0.1 x lr)",
    ]


def lr_at(step: int, *, peak: float, total_steps: int, schedule: ScheduleConfig) -> float:
    """Linear warm-up to `peak`, then cosine decay to `final_lr_fraction·peak` at `total_steps`."""
    warm = schedule.warmup_steps
    floor = schedule.final_lr_fraction * peak
    if warm > 0 and step < warm:
        return peak * (step + 1) / warm
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


WRAPPERS = ("module", "_orig_mod", "_checkpoint_wrapped_module")  # DDP, torch.compile, checkpointing


def _component(name: str) -> str:
    """The component a parameter belongs to (`vision`, `connector`, `decoder`; the CLIP stage has
    its own). A wrapper's prefix is refused: it would silently match no component's settings."""
    comp = name.split(".", 1)[0]
    if comp in WRAPPERS:
        raise ValueError(f"parameter '{name}' is seen through a wrapper: build parameter groups from the "
                         "unwrapped model (mm1.train.parallel.unwrap)")
    return comp


def freeze(model: nn.Module, components: ComponentConfig) -> None:
    """requires_grad=False on frozen components; before any wrapping (DDP's reducer and FSDP2's
    sharded parameters take requires_grad from the model as it is when wrapped)."""
    for name, p in model.named_parameters():
        if getattr(components, f"{_component(name)}_frozen", False):
            p.requires_grad_(False)


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, components: ComponentConfig
) -> list[dict]:
    """Parameter groups per component (vision / connector / decoder), decay only on matrices.

    `model` is the unwrapped model (names start with a component; `mm1.train.parallel.unwrap`).
    Frozen components (see `freeze`) get no group; each group's `lr_mult` is read by the
    scheduler, so multipliers survive a resume.
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
    """AdamW (decay decoupled, a fraction of the lr) or Adafactor with an absolute learning rate."""
    if opt.kind == OptimizerKind.ADAMW:
        return torch.optim.AdamW(groups, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if opt.kind == OptimizerKind.ADAFACTOR:
        from mm1.train.adafactor import Adafactor

        return Adafactor(groups, lr=lr, beta1=opt.beta1)
    raise ValueError(f"unknown optimizer {opt.kind}")
