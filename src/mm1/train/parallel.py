"""Distributed training, applied from outside the model (as in torchtitan).

`torchrun --nproc_per_node=N -m mm1 train ...` sets RANK / WORLD_SIZE; `init_distributed` joins the
process group (NCCL on GPU, gloo on CPU) and `parallelize` wraps the model:
- DDP: replicated weights, averaged gradients;
- FSDP2 (`fully_shard`): the vision encoder as one unit, each decoder block as its own unit,
  then the root (connector, embeddings, head);
- optional activation checkpointing of each decoder block (and ViT block).
Nothing in `mm1.model` knows about any of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from mm1.config import ParallelKind, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group if there is one; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _checkpoint_blocks(model: nn.Module) -> None:
    for container in (model.decoder.layers, model.vision.blocks):
        for i, block in enumerate(container):
            container[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def parallelize(model: nn.Module, train: TrainConfig, info: DistInfo) -> nn.Module:
    if train.activation_checkpointing:
        _checkpoint_blocks(model)
    kind = train.parallel
    if info.world_size == 1 or kind == ParallelKind.NONE:
        if info.world_size > 1:
            raise ValueError("running under torchrun needs train.parallel=ddp or train.parallel=fsdp")
        return model
    if kind == ParallelKind.DDP:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if info.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp else {}
    fully_shard(model.vision, **kw)
    for layer in model.decoder.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model
