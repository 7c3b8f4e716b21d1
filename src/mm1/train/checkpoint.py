"""Checkpoints that survive a kill at any moment and reload at any world size.

Layout of a run directory's checkpoints:

    checkpoints/step_00000100/        one checkpoint, written as step_00000100.tmp/ then renamed
        dcp/                          model + optimizer via torch.distributed.checkpoint (sharded)
        meta.json                     step, data-stream state, learning-rate state
        model.safetensors             the full model's weights: what every weight-reading command loads
        rng_rank00000.json            each rank's RNG states (JSON and safetensors: nothing is unpickled)
        rng_rank00000.safetensors
    checkpoints/latest                name of the newest complete checkpoint (replaced atomically)

A checkpoint exists only once its directory has been renamed from `.tmp`, so a kill during a save
leaves the previous one intact; leftover `.tmp` directories are removed on the next start.

Only `--resume` reads `dcp/` (torch's distributed checkpoint, whose metadata file is a pickle: a run
folder from someone else is code, resume only your own). Every command that needs weights alone
(evaluation, serving, export, `--init-from`) reads `model.safetensors`, which loads no code.
Retention keeps the last `keep_last` plus, as Pythia does, log-spaced steps (1, 2, 4, 8, ...).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mm1.config import CheckpointConfig

# The layout and weight-only reading are `mm1.store.runs`'s (inference reads runs without the trainer);
# the trainer and its tests see them here too.
from mm1.store.runs import (  # noqa: F401
    WEIGHTS,
    CheckpointError,
    latest,
    load_meta,
    resolve,
    save_weights,
    step_dir,
)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def clean_partial(root: Path) -> None:
    if _rank() == 0 and (root / "checkpoints").exists():
        for p in (root / "checkpoints").glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(state: dict, stem: Path) -> None:
    """RNG states as JSON (Python's and NumPy's) and safetensors (torch's): loading them runs no code."""
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    stem.with_suffix(".json").write_text(json.dumps({
        "python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), cached]}))
    tensors = {"torch": state["torch"]} | {f"cuda.{i}": t for i, t in enumerate(state.get("cuda") or [])}
    save_file(tensors, str(stem.with_suffix(".safetensors")))


def load_rng(stem: Path) -> dict:
    saved = json.loads(stem.with_suffix(".json").read_text())
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    version, words, gauss = saved["python"]
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    return {"python": (version, tuple(words), gauss),
            "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
            "torch": tensors["torch"], "cuda": cuda or None}


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict,
         policy: CheckpointConfig, *, rng: dict | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, then apply retention. `rng`: the RNG
    states to resume with, when not the current ones (a step abandoned part-way has drawn from them)."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # single-process DCP warns that it assumes one process: it may
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    save_rng(rng if rng is not None else rng_state(), tmp / f"rng_rank{_rank():05d}")
    # every rank takes part in gathering the full weights; rank 0 writes them
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        save_weights(full, tmp / WEIGHTS)
    _barrier()
    if _rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / "checkpoints" / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "checkpoints" / "latest")
        _retain(root, policy)
    _barrier()
    return final


def _retain(root: Path, policy: CheckpointConfig) -> None:
    done = sorted(p for p in (root / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    keep = set(done[-policy.keep_last:])
    if policy.keep_log_spaced:
        keep |= {p for p in done if _is_power_of_two(int(p.name.split("_")[1]))}
    for p in done:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
         strict: bool = True) -> dict:
    """Restore model (and optimizer, RNG) from a checkpoint written at any world size."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
        rng = path / f"rng_rank{_rank():05d}"
        if rng.with_suffix(".json").exists():
            set_rng_state(load_rng(rng))
    return load_meta(path)


def write_weights_from_dcp(path: Path, model: nn.Module) -> Path:
    """For a checkpoint of an older mm1: read its distributed checkpoint (pickled metadata: only on the
    user's word that the run is theirs) and write `model.safetensors` beside it."""
    load(path, model, None, strict=True)
    tmp = path / (WEIGHTS + ".tmp")
    save_weights(model.state_dict(), tmp)
    os.replace(tmp, path / WEIGHTS)
    return path / WEIGHTS
