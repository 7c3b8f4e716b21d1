"""FSDP2 builds the model on the meta device, shards it, then gives each rank memory for its shard only.

Two gloo processes build a ~480 MB MLLM through `mm1.train.build.build_model` (the trainer's path) and
report how much their peak memory grew. Building whole and then sharding (the old path) grew every rank
by the whole model (measured: 509 MB); now only rank 0's host memory holds it while it reads the start
(on a GPU the device holds the shard alone), the other ranks their half and 80-105 MB besides. The
values are right too: the random start is exactly one process's draw with the same seed, and starting
weights reach every shard. A one-process group (forced) runs the chosen wrapper: tests/test_gpu.py runs
that over NCCL on one GPU.
"""

import importlib
import json
import os
import random
from pathlib import Path

import pytest
import torch

from mm1.config import ComponentConfig, apply_overrides
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe

BIG = ["model.decoder.width=1024", "model.decoder.depth=8", "model.decoder.heads=8", "model.decoder.kv_heads=2",
       "model.decoder.ffn_hidden=4096", "model.decoder.vocab_size=2048"]


def _cfg():
    cfg = apply_overrides(get_recipe("tiny"), [*BIG, "train.parallel=fsdp", "train.precision=fp32"])
    cfg.model.image_token_id = 5
    return cfg


class _Objective:
    """What the trainer asks of an objective to build its model: a random draw, and starting weights."""

    def __init__(self, start: str | None) -> None:
        self.cfg, self.start = _cfg(), start
        self.loads = 0

    def build(self) -> MLLM:
        return MLLM(self.cfg.model)

    def load_start(self, model: MLLM) -> None:
        from safetensors.torch import load_file

        self.loads += 1
        if self.start is None:
            return
        state = load_file(self.start)
        state["decoder.lm_head.weight"] = state["decoder.embed.weight"]  # tied: saved once
        model.load_state_dict(state)


def _reset_peak() -> None:
    """Start the process's peak-memory mark afresh (Linux: a spawned process inherits its parent's)."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def _worker(rank: int, port: int, start: str | None, out: str) -> None:
    import torch.distributed as dist

    from mm1.train.build import build_model
    from mm1.train.parallel import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    objective = _Objective(start)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    for name in ("torch.distributed.fsdp", "torch.distributed.tensor"):  # their code (~80 MB) is not the model
        importlib.import_module(name)

    _reset_peak()
    before = _peak_mb()
    model = build_model(objective, objective.cfg.train, info, components=ComponentConfig())
    grew = _peak_mb() - before
    local = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
    tied = model.decoder.lm_head.weight is model.decoder.embed.weight
    result = {"grew_mb": grew, "local_mb": local, "loads": objective.loads, "tied": tied}
    print(f"rank {rank}: peak memory grew {grew:.0f} MB, its shard {local:.0f} MB", flush=True)
    full = {name: p.full_tensor() for name, p in model.named_parameters()}  # every rank gathers every shard
    if start is None:  # one process's draw after the same seed
        torch.manual_seed(0)
        want = MLLM(objective.cfg.model).state_dict()
    else:
        from safetensors.torch import load_file

        want = load_file(start)
    result["equal"] = all(torch.equal(full[k], v) for k, v in want.items() if k != "decoder.lm_head.weight")
    result["inv_freq_ok"] = bool(torch.equal(model.decoder.inv_freq, _reference_inv_freq(objective.cfg)))
    # one step runs on the sharded model: forward and backward through every shard
    tokens = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(rank))
    res = model(tokens_BT=tokens, labels_BT=tokens)
    res.loss_sum.backward()
    result["loss_finite"] = bool(torch.isfinite(res.loss_sum))
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def _reference_inv_freq(cfg) -> torch.Tensor:
    from mm1.model.decoder import rope_frequencies

    return rope_frequencies(cfg.model.decoder)


def _run(tmp_path: Path, start: str | None) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / "result"
    mp.spawn(_worker, args=(29500 + random.randint(1000, 2000), start, str(out)), nprocs=2, join=True)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def _whole_mb() -> float:
    with torch.device("meta"):
        return sum(p.numel() * 4 for p in MLLM(_cfg().model).parameters()) / 2**20


@pytest.mark.slow
def test_a_sharded_build_never_holds_the_whole_model_and_draws_its_starting_values(tmp_path):
    whole = _whole_mb()
    assert whole > 400  # big enough for the growth to tell a half from a whole
    ranks = _run(tmp_path, None)
    for r in ranks:
        assert r["local_mb"] == pytest.approx(whole / 2, rel=0.05)  # what stays on the device: half
        assert r["equal"] and r["inv_freq_ok"] and r["tied"] and r["loss_finite"]
    # beyond its shard a rank holds a parameter at a time and the communicator's buffers (measured: 80-105 MB);
    # the old path held the whole model (grew 509 MB: 272 beyond the shard) on every rank
    assert ranks[1]["grew_mb"] - ranks[1]["local_mb"] < 0.35 * whole, ranks[1]
    assert ranks[0]["loads"] == 1 and ranks[1]["loads"] == 0  # the start is drawn and read on rank 0 only


@pytest.mark.slow
def test_starting_weights_read_on_rank_zero_reach_every_shard(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    state = {k: v for k, v in MLLM(_cfg().model).state_dict().items() if k != "decoder.lm_head.weight"}
    save_file(state, str(tmp_path / "start.safetensors"))
    del state
    ranks = _run(tmp_path, str(tmp_path / "start.safetensors"))
    assert ranks[0]["equal"] and ranks[1]["equal"]  # gathered back: exactly the starting weights
    assert ranks[0]["loads"] == 1 and ranks[1]["loads"] == 0  # read once, on rank 0
    assert all(r["inv_freq_ok"] for r in ranks)
    assert ranks[1]["grew_mb"] - ranks[1]["local_mb"] < 0.35 * _whole_mb(), ranks[1]  # one tensor at a time
    assert all(r["tied"] and r["loss_finite"] for r in ranks)


def one_process_group_build(kind: str, device: torch.device, tmp_path: Path) -> dict:
    """FSDP2 or DDP through `build_model` and `parallelize` over a real one-process group (NCCL beside gloo
    on a GPU; torchrun with one process makes no group, so it is forced here), then a training step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mm1.train.build import build_model
    from mm1.train.parallel import DistInfo

    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        cfg = apply_overrides(get_recipe("tiny"), [f"train.parallel={kind}", "model.decoder.depth=2",
                                                   "model.decoder.vocab_size=256"])
        cfg.model.image_token_id = 5
        objective = _Objective(None)
        objective.cfg = cfg
        model = build_model(objective, cfg.train, DistInfo(0, 1, 0, device), components=ComponentConfig())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 256, (2, 16), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(tokens_BT=tokens, labels_BT=tokens).loss
        loss.backward()
        opt.step()
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        return {"loss": float(loss), "sharded": sharded, "wrapped": type(model).__name__}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_a_forced_one_process_group_runs_the_chosen_wrapper(kind, tmp_path):
    result = one_process_group_build(kind, torch.device("cpu"), tmp_path)
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert result["sharded"] == (kind == "fsdp") and (result["wrapped"] == "DistributedDataParallel") == (kind == "ddp")
