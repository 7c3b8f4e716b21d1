"""The model a run trains, on its device and wrapped, with its starting weights: whole, or sharded
without ever being whole on a device.

One process or DDP: the objective's model is built whole on the CPU, its starting weights (pre-trained
parts, `--init-from`) loaded, moved to the device and wrapped. FSDP2 across ranks builds it as
torchtitan does: on the meta device (shapes, no memory), sharded by `parallelize`, given memory with
`to_empty` (each rank its shard only) and its derived buffers recomputed (`reset_all`); its starting
values are then read on rank 0's CPU (the random draw of one process with the run's seed, with the
starting weights loaded into it) and scattered into every rank's shard, one tensor at a time
(`distribute_tensor`; torch's `set_model_state_dict(broadcast_from_rank0=True)` builds a second set of
shards before it copies them in, twice a rank's share at its peak). So a 30B model's ranks hold their share on
the GPU; only rank 0's host memory holds the whole model, once, while it starts. Drawing on rank 0 (as
torchtitan's seed checkpoint does) makes a run start from the same weights whatever its world size.
"""

from __future__ import annotations

import torch
from torch import nn

from mm1.config import ComponentConfig, ParallelKind, TrainConfig
from mm1.model.init import reset_all
from mm1.train.objective import Objective
from mm1.train.optim import freeze
from mm1.train.parallel import DistInfo, parallel_kind, parallelize


def shards(train: TrainConfig, info: DistInfo) -> bool:
    """Whether this run shards its model (FSDP2 over more than one process)."""
    return parallel_kind(train, info) == ParallelKind.FSDP


def build_model(objective: Objective, train: TrainConfig, info: DistInfo, *, components: ComponentConfig,
                load_start: bool = True) -> nn.Module:
    """The wrapped model with its starting values; `load_start=False` (a resumed run, whose checkpoint
    is loaded next) skips reading the starting weights."""
    if not shards(train, info):
        model = objective.build()
        if load_start:
            objective.load_start(model)
        model = model.to(info.device)
        freeze(model, components)  # before wrapping: DDP and FSDP2 read requires_grad then
        return parallelize(model, train, info)
    # rank 0's whole draw comes first, so that it is the draw one process makes after the same seed
    start = _whole_start(objective, load_start) if info.is_main else {}
    with torch.device("meta"):
        model = objective.build()
    freeze(model, components)
    model = parallelize(model, train, info)
    model.to_empty(device=info.device)
    tie_weights(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        reset_all(model)  # no garbage anywhere, and the buffers no state dict holds (RoPE's frequencies)
    if load_start:
        _scatter_start(model, start, info)
    return model


@torch.no_grad()
def _scatter_start(model: nn.Module, start: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Rank 0's whole starting weights into every rank's shard, one parameter at a time: each rank holds
    its shards and, briefly, one parameter's full size."""
    from torch.distributed.tensor import distribute_tensor

    for name, param in model.named_parameters():  # a tied weight once, under its first name
        if info.is_main:
            full = start[name].to(info.device, param.dtype)
        else:  # its shape for the collective; the values come from rank 0
            full = torch.empty(param.shape, dtype=param.dtype, device=info.device)
        param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())


def _whole_start(objective: Objective, load_start: bool) -> dict[str, torch.Tensor]:
    if not load_start:
        return {}
    whole = objective.build()  # on the CPU, this once
    objective.load_start(whole)
    return whole.state_dict()


def tie_weights(model: nn.Module) -> None:
    """`to_empty` gives each module its own tensor, so a tied output layer comes back untied: tie it again
    (FSDP2 knows the two names as one parameter and keeps them one from here on)."""
    from mm1.model.decoder import Decoder

    for module in model.modules():
        if isinstance(module, Decoder) and module.cfg.tie_embeddings:
            module.lm_head.weight = module.embed.weight
