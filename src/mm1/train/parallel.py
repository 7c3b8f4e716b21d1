"""Distributed training, applied from outside the model (as in torchtitan).

`torchrun --nproc_per_node=N -m mm1 train ...` sets RANK / WORLD_SIZE; `init_distributed` joins the
process group (NCCL on GPU, gloo on CPU) and `parallelize` wraps the model:
- DDP: replicated weights, averaged gradients;
- FSDP2 (`fully_shard`): the vision encoder (and the CLIP stage's text encoder) as one unit each,
  each decoder block as its own unit, then the root (connector, embeddings, head);
- optional activation checkpointing of each decoder block (and ViT block);
- optional `torch.compile` of each such block (`train.compile`; regional, as torchtitan does: one
  compiled graph serves every layer, and parameter names are unchanged).
Nothing in `mm1.model` knows about any of this.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from mm1.config import ParallelKind, Precision, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank and device."""
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
        torch.set_float32_matmul_precision("high")  # TF32 for what stays fp32 (as torchtitan does)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # On GPUs, NCCL for CUDA tensors and gloo beside it for anything on the CPU (a stop flag, a
        # metric): a CPU tensor handed to an NCCL-only group fails at the first step. device_id binds
        # the NCCL communicator to this rank's GPU at once (no guessing, no lazy init on the first call).
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local, device)


def shutdown_distributed() -> None:
    """Leave the process group (a process that exits still holding one can abort at interpreter exit:
    "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def set_collective_timeout(seconds: float) -> None:
    """How long a rank waits in a collective for its peers from now on (as torchtitan does: start-up,
    with its loading and compiling, keeps the backend's longer default)."""
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), None)


def all_reduce_sum(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum over ranks, reduced on `device` (the training device: an NCCL-only group has no CPU
    backend); the result stays there."""
    x = x.to(device) if device is not None else x
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Inside, backward passes sync gradients across ranks only if `enabled`: gradient accumulation
    syncs once, on its last micro-batch (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not dist.is_initialized():
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:  # one process per model copy is not distributed data parallel: nothing to sync
        yield


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (a stop request seen by one rank stops them all at the
    same step, each saving its part of the checkpoint)."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)]), device).item() > 0)


def settle(model: nn.Module) -> None:
    """After a step abandoned part-way: gradients dropped and every FSDP2 unit back to its shards (the
    step may have left some gathered), so that the weights can be saved."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    model.zero_grad(set_to_none=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place and keeps the names)."""
    return getattr(model, "module", model)


def _blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of the MLLM (decoder layers, ViT blocks) or of the CLIP stage's model."""
    names = ("decoder.layers", "vision.blocks", "text.blocks")
    return [model.get_submodule(n) for n in names if _has(model, n)]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _checkpoint_blocks(model: nn.Module) -> None:
    for container in _blocks(model):
        for i, block in enumerate(container):
            container[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def mixed_precision(train: TrainConfig, device: torch.device):
    """FSDP2's policy: bf16 parameters and fp32 gradient reduction when the run computes in bf16 (bf16, or
    auto on a GPU), none (fp32 throughout) otherwise: train.precision=fp32 is honoured under FSDP too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = train.precision == Precision.BF16 or (train.precision == Precision.AUTO and device.type == "cuda")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None


def parallel_kind(train: TrainConfig, info: DistInfo) -> ParallelKind:
    """How the model is spread over the job's processes: `train.parallel`, FSDP2 under torchrun when unset.
    One process without a process group wraps nothing; with one (a test forcing NCCL on one GPU), the
    chosen wrapper runs over it."""
    if info.world_size == 1 and not dist.is_initialized():
        return ParallelKind.NONE
    if train.parallel == ParallelKind.NONE:
        return ParallelKind.FSDP if info.world_size > 1 else ParallelKind.NONE
    return train.parallel


def parallelize(model: nn.Module, train: TrainConfig, info: DistInfo) -> nn.Module:
    if train.activation_checkpointing:
        _checkpoint_blocks(model)
    if train.compile:
        for container in _blocks(model):
            for block in container:
                block.compile()
    kind = parallel_kind(train, info)
    if kind == ParallelKind.FSDP and train.parallel == ParallelKind.NONE and info.is_main:  # ddp replicates
        print(f"train.parallel is unset under torchrun ({info.world_size} processes): using fsdp", flush=True)
    if kind == ParallelKind.NONE:
        return model
    if kind == ParallelKind.DDP:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(train, info.device)
    kw = {"mp_policy": mp} if mp else {}
    for name in ("vision", "text"):  # the image encoder; the CLIP stage's text encoder
        if _has(model, name):
            fully_shard(model.get_submodule(name), **kw)
    if _has(model, "decoder.layers"):
        for layer in model.decoder.layers:
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model
