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

WEIGHTS = "model.safetensors"  # in each checkpoint: the full model, what weight-only readers load


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = root / "checkpoints" / "latest"
    if pointer.exists():
        path = root / "checkpoints" / pointer.read_text().strip()
        if (path / "meta.json").exists():
            return path
    done = sorted(p for p in (root / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")
                  and (p / "meta.json").exists()) if (root / "checkpoints").exists() else []
    return done[-1] if done else None


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


def load_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


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


def resolve(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory or one of its checkpoints."""
    if (path / "meta.json").exists():
        return path.parent.parent, path
    last = latest(path)
    if last is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step_*)")
    return path, last


class CheckpointError(ValueError):
    """A checkpoint that cannot give what was asked of it (said in one line, naming it)."""


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A full state dict as safetensors; tensors that share storage (tied embeddings) are stored once
    and recorded as aliases in the file's metadata."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state = load_file(str(path))
    except Exception as err:  # a truncated or foreign file: safetensors' own message names the problem
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return state | {name: state[source] for name, source in aliases.items()}


def load_model_weights(path: Path, model: nn.Module) -> dict:
    """Model weights only (evaluation, serving, export, SFT starting from a pre-training checkpoint), from
    `model.safetensors`: nothing is unpickled. Strict about names."""
    from mm1.model.weights import load_strict

    file = path / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS} (an mm1 checkpoint from before 2026-12-06): weights are "
                              f"read from safetensors only, so that loading runs no code; if this run is your own, "
                              f"`mm1 checkpoint-weights {path}` writes it from the distributed checkpoint once")
    load_strict(model, load_weights(file), what=f"weights from {file}")
    return load_meta(path)


def write_weights_from_dcp(path: Path, model: nn.Module) -> Path:
    """For a checkpoint of an older mm1: read its distributed checkpoint (pickled metadata: only on the
    user's word that the run is theirs) and write `model.safetensors` beside it."""
    load(path, model, None, strict=True)
    tmp = path / (WEIGHTS + ".tmp")
    save_weights(model.state_dict(), tmp)
    os.replace(tmp, path / WEIGHTS)
    return path / WEIGHTS
