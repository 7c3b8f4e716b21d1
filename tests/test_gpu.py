"""The CUDA paths: bf16 autocast, FSDP2 mixed precision over NCCL, grouped-GEMM experts, flex attention.

Every test here skips without a GPU (CI and laptops have none); they run where one is lent, and the
CPU-side equivalences they rest on are tested everywhere (flex attention's mask in test_model.py, the
per-expert loop in test_model.py's MoE tests).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from mm1.config import MoEConfig, save

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = ["model.decoder.depth=2", "model.vision.depth=1", "train.steps=4", "train.checkpoint.every=2",
         "train.schedule.warmup_steps=2", "data.num_workers=0"]


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_bf16_autocast_training_follows_fp32(world, tmp_path):
    from mm1.train.trainer import train

    train(tiny_config(world, *SMALL, "train.precision=fp32"), out=tmp_path / "fp32")
    train(tiny_config(world, *SMALL, "train.precision=bf16"), out=tmp_path / "bf16")
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=3e-2), step


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: 2 GPUs")
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_torchrun_nccl_two_gpus_follow_one(world, tmp_path, kind):
    """NCCL beside gloo, bf16 (FSDP2: bf16 parameters, fp32 gradient reduction), text-only ranks included."""
    from mm1.train.trainer import train

    cfg = tiny_config(world, *SMALL, f"train.parallel={kind}", "train.precision=bf16")
    save(cfg, tmp_path / "cfg.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(29500 + random.randint(0, 500)), "-m", "mm1", "train", "--config", str(tmp_path / "cfg.json"),
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(tiny_config(world, *SMALL, "train.precision=bf16"), out=tmp_path / "one")
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=3e-2), step


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_fsdp2_and_ddp_through_parallelize_on_one_gpu_over_nccl(kind, tmp_path):
    """The sharded build (meta device, to_empty, scatter) and DDP on a real NCCL group of one GPU, bf16."""
    from test_sharded_build import one_process_group_build

    result = one_process_group_build(kind, torch.device("cuda"), tmp_path)
    assert torch.isfinite(torch.tensor(result["loss"])) and result["sharded"] == (kind == "fsdp")


def test_grouped_gemm_experts_equal_the_per_expert_loop(monkeypatch):
    """fp32 modules under bf16 autocast, as training runs them: the grouped side must take the grouped GEMM
    (asserted), the other the loop."""
    import mm1.model.moe as moe_mod
    from mm1.model.moe import MoEFFN

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    calls = []
    real = moe_mod._grouped_swiglu
    monkeypatch.setattr(moe_mod, "_grouped_swiglu", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    grouped = MoEFFN(256, 512, MoEConfig(num_experts=8, top_k=2, grouped_mm=True)).cuda()
    loop = MoEFFN(256, 512, MoEConfig(num_experts=8, top_k=2, grouped_mm=False)).cuda()
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 333, 256, device="cuda")  # token counts per expert that are not multiples of 16
    outs, grads = [], []
    for moe in (grouped, loop):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = moe(xi)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append((xi.grad, moe.w_gate_up.grad, moe.w_down.grad))
    assert calls == [torch.bfloat16]  # the grouped side ran the grouped GEMM; the loop side did not
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for g, h in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g, h, atol=2e-2, rtol=5e-2)
