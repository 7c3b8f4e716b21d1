"""What a training stage supplies to the one training loop: its model, its batches and its loss.

`mm1.train.trainer.Trainer` runs every stage the same way (ranks, micro-batches, precision, the
learning-rate rule and schedule, clipping, checkpoints and exact resume, stop agreement, logging);
an objective says what is trained on what: `LMObjective` (`mm1.train.lm`: next-token loss of the
MLLM on packed sequences, pre-training and SFT) and `CLIPObjective` (`mm1.train.clip`: the image
encoder's contrastive loss, negatives gathered across ranks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StepMetrics:
    """One optimizer step as all ranks saw it together."""

    loss: float
    count: int  # what throughput is measured in (`Objective.unit`): tokens, or images
    flops: float  # training FLOPs of the step, for MFU
    extra: dict[str, float] = field(default_factory=dict)  # logged as they are (per-source losses, ...)


class Objective(Protocol):
    """What a training stage supplies to the one Trainer: its model, its batches and its loss."""
    unit: str  # "tokens" or "images": logged as `<unit>_per_s`

    def build(self) -> nn.Module:
        """The model, freshly drawn, on the default device (`mm1.train.build` builds it on the meta
        device to shard it before it has memory)."""

    def load_start(self, model: nn.Module) -> None:
        """Copy the run's starting weights (pre-trained parts, `--init-from`) into a whole `model` built
        by `build`, where there are any (a part without keeps the model's own random draw)."""

    def rule_parameters(self) -> int:
        """N of MM1's learning-rate rule for this model."""

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Any:
        """The batch of `step` on `rank`: a pure function of its arguments."""

    def loader(self, *, start: int, stop: int, rank: int, world_size: int, num_workers: int) -> Iterable[Any]:
        """This rank's batches of steps start..stop-1, in order."""

    def begin_step(self, batch: Any, *, accum: int, device: torch.device) -> list[Any]:
        """Start a step (normalisers over ranks); returns its `accum` micro-batches."""

    def loss(self, model: nn.Module, micro: Any) -> torch.Tensor:
        """The micro-batch's loss to call backward on (the wrapped model runs it)."""

    def end_step(self) -> StepMetrics:
        """The step's metrics, reduced over ranks."""

    def finish(self, model: nn.Module, out: Path, *, is_main: bool, completed: bool,
               skipped: dict[str, int]) -> None:
        """After the loop (completed: the last step was reached): write what the stage produces."""
