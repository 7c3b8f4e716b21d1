"""Run folders on disk, as everything that reads weights sees them: the layout, and weights without code.

    RUN/config.json, RUN/tokenizer.json       the run's resolved config and tokenizer
    RUN/checkpoints/step_00000100/            one checkpoint (written by `mm1.train.checkpoint`)
        meta.json                             step, data-stream and learning-rate state
        model.safetensors                     the full model's weights, tied tensors stored once as aliases
        dcp/, rng_rank*.{json,safetensors}    training state: read by `--resume` only
    RUN/checkpoints/latest                    name of the newest complete checkpoint

Evaluation, serving, export and `--init-from` read `model.safetensors` through here, which runs no code;
the training state (torch's distributed checkpoint, whose metadata is a pickle) stays in `mm1.train`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"  # in each checkpoint: the full model, what weight-only readers load


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


def load_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


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
