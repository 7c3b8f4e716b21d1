"""The CLIP stage through the one trainer: its loss, gathered negatives under torchrun, exact resume, output."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import prepare_for, tiny_config
from mm1.config import save
from mm1.model.clip import CLIPEmbeddings
from mm1.train import checkpoint as ckpt
from mm1.train.clip import contrastive_sums
from mm1.train.trainer import Trainer, train

CLIP = ["train.stage=clip", "model.vision.depth=1", "train.batch_size=8", "train.checkpoint.every=2",
        "train.schedule.warmup_steps=2", "train.checkpoint.keep_log_spaced=false"]


def clip_config(world: Path, *extra: str):
    return prepare_for(tiny_config(world, *CLIP, *extra, prepared=False))


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_contrastive_loss_is_clips_symmetric_cross_entropy_and_ignores_empty_rows():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    total, pairs, _ = contrastive_sums(CLIPEmbeddings(img, txt, scale), torch.ones(6, dtype=torch.bool))
    logits = scale * img @ txt.t()
    target = torch.arange(6)
    want = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(total / (2 * pairs), want)
    # a row that holds no pair is neither scored nor a negative: the loss of the other five alone
    real = torch.tensor([True, True, False, True, True, True])
    total, pairs, _ = contrastive_sums(CLIPEmbeddings(img, txt, scale), real)
    keep = real.nonzero().squeeze(1)
    sub = scale * img[keep] @ txt[keep].t()
    t5 = torch.arange(5)
    torch.testing.assert_close(total / (2 * pairs), (F.cross_entropy(sub, t5) + F.cross_entropy(sub.t(), t5)) / 2)
    assert pairs == 5


def test_clip_stage_logs_images_per_s_resumes_exactly_and_writes_the_encoder(world, tmp_path):
    from mm1.model.vision import VisionEncoder
    from mm1.store.pretrained import load_vision_weights

    cfg = clip_config(world, "train.steps=6")
    last = train(cfg, out=tmp_path / "ref")
    assert last["step"] == 6 and "images_per_s" in last and "clip_accuracy" in last and last["images_per_s"] > 0
    ref = losses(tmp_path / "ref")
    # a run stopped after step 4 (its loader ends there), then resumed: the uninterrupted run's losses
    cut = Trainer(clip_config(world, "train.steps=6"), tmp_path / "cut")
    loader = cut.objective.loader
    cut.objective.loader = lambda **kw: loader(**(kw | {"stop": 4}))
    cut.run()
    assert ckpt.load_meta(ckpt.latest(tmp_path / "cut"))["step"] == 4
    assert not (tmp_path / "cut" / "vision.safetensors").exists()  # written only when the run completes
    Trainer(clip_config(world, "train.steps=6"), tmp_path / "cut", resume=True).run()
    got = losses(tmp_path / "cut")
    assert [got[s] for s in (5, 6)] == [ref[s] for s in (5, 6)]
    assert (tmp_path / "cut" / "vision.safetensors").exists()
    # the encoder it writes loads strictly into an MLLM's vision tower
    vision = VisionEncoder(cfg.model.vision)
    load_vision_weights(vision, str(tmp_path / "ref"))
    trained = Trainer(clip_config(world, "train.steps=6"), tmp_path / "ref", resume=True)
    torch.testing.assert_close(vision.state_dict(), trained.model.vision.state_dict())


def test_clip_micro_batches_are_separate_contrastive_problems(world, tmp_path):
    one = Trainer(clip_config(world, "train.steps=1"), tmp_path / "a")
    two = Trainer(clip_config(world, "train.steps=1", "train.micro_batch_size=4"), tmp_path / "b")
    two.model.load_state_dict(one.model.state_dict())
    batch = one.objective.batch(0)
    halves = batch.split(2)
    with torch.no_grad():
        want = []
        for h in halves:
            total, pairs, _ = contrastive_sums(one.model(h.images_NCHW, h.ids_NL, h.valid_NL), h.real_N)
            want.append(float(total / (2 * pairs)))
    for t in (one, two):
        t._set_lr(0)
    assert two.train_step(batch).loss == pytest.approx(sum(want) / 2, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_torchrun_clip_with_gathered_negatives_matches_one_process(world, tmp_path, kind):
    """2 ranks × 4 pairs with negatives gathered across ranks: the losses of one process with 8 pairs."""
    cfg = clip_config(world, "train.steps=3", f"train.parallel={kind}")
    save(cfg, tmp_path / "cfg.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(29500 + random.randint(0, 500)), "-m", "mm1", "train", "--config", str(tmp_path / "cfg.json"),
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(clip_config(world, "train.steps=3"), out=tmp_path / "one")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    from safetensors.torch import load_file

    one, two = load_file(str(tmp_path / "one" / "vision.safetensors")), load_file(str(tmp_path / "two" /
                                                                                    "vision.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-3, msg=k)
