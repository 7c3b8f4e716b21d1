"""Adafactor with an absolute learning rate, as MM1's SFT uses it (AdaFactor, learning rate 1e-5).

Shazeer & Stern (2018): the second moment of a matrix is kept as row and column means of g²
(factored over the last two dimensions; vectors keep the full moment), with decay
β2(t) = 1 − t^(−0.8), and each update is clipped to RMS ≤ d = 1. The step is

    θ ← θ − η_t · U_t            (U_t: the clipped, optionally momentum-averaged update)
    θ ← θ − η_t · wd · θ         (decoupled weight decay, as AdamW's)

with η_t the *scheduled learning rate itself*. `torch.optim.Adafactor` (like the paper's default)
instead takes `lr` as a relative step: min(lr, 1/√t) times the parameter's RMS, which for weights
initialised at std 0.02 makes a learning rate of 1e-5 about 50× smaller. MM1 trained with AXLearn's
Adafactor configured for absolute steps; this is that form.
"""

from __future__ import annotations

import torch


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018): factored second moments, update clipping, decoupled weight decay."""

    def __init__(self, params, *, lr: float, beta1: float = 0.0, decay_rate: float = 0.8, eps: float = 1e-30,
                 clip_threshold: float = 1.0, weight_decay: float = 0.0) -> None:
        if lr < 0 or not 0 <= beta1 < 1:
            raise ValueError(f"bad Adafactor settings: lr={lr}, beta1={beta1}")
        defaults = {"lr": lr, "beta1": beta1, "decay_rate": decay_rate, "eps": eps,
                    "clip_threshold": clip_threshold, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        g = p.grad.float()
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.ndim >= 2:
                state["row"] = torch.zeros(g.shape[:-1], device=g.device)
                state["col"] = torch.zeros((*g.shape[:-2], g.shape[-1]), device=g.device)
            else:
                state["v"] = torch.zeros_like(g)
            if group["beta1"] > 0:
                state["m"] = torch.zeros_like(g)
        state["step"] += 1
        beta2 = 1.0 - state["step"] ** (-group["decay_rate"])
        g2 = g * g + group["eps"]
        if p.ndim >= 2:
            row, col = state["row"], state["col"]
            row.mul_(beta2).add_(g2.mean(-1), alpha=1 - beta2)
            col.mul_(beta2).add_(g2.mean(-2), alpha=1 - beta2)
            # v = row·col / mean(row), formed as Shazeer & Stern's code does: row normalised first, so that
            # a (near-)zero gradient, whose moments are ~eps = 1e-30, does not underflow to 0 (1e-60) and divide
            u = g * (row / row.mean(-1, keepdim=True)).rsqrt()[..., :, None] * col.rsqrt()[..., None, :]
        else:
            u = g / state["v"].mul_(beta2).add_(g2, alpha=1 - beta2).sqrt()
        u = u / (u.square().mean().sqrt() / group["clip_threshold"]).clamp(min=1.0)
        if group["beta1"] > 0:
            u = state["m"].mul_(group["beta1"]).add_(u, alpha=1 - group["beta1"])
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(u.to(p.dtype), alpha=-lr)
