"""Pipelines: MM1's training stages in order, each started from what the earlier ones wrote.

MM1 trains a model in this order: a CLIP image encoder and a pre-trained text LLM, then multimodal
pre-training starting from both, then supervised fine-tuning starting from that. A `Pipeline` writes
that order down once: each stage's config, and which earlier stage hands it what (`Handoff`). The
quickstart, `mm1 ablate` (one pipeline per arm and seed, the CLIP and LM stages shared between arms)
and `mm1 pipeline smol` all run one, so the hand-offs are written in one place.

Stages are ordinary run folders: a finished stage is skipped, an interrupted one resumes. Stages
that take nothing from each other (the CLIP and LM stages) may run side by side (`jobs=2`): on a
CPU, two processes of one thread each train more per second than one process of two threads.
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mm1.config import Config, ConfigError


class Handoff(str, enum.Enum):
    """What a stage takes from an earlier one."""

    VISION = "vision"  # model.vision.init: the CLIP stage's image encoder
    DECODER = "decoder"  # model.decoder.init: the LM stage's decoder (its `decoder/` folder)
    WHOLE = "whole"  # every weight of the stage's latest checkpoint (`--init-from`)


@dataclass(frozen=True)
class PipelineStage:
    """One stage: its config and what it takes from which earlier stage."""

    name: str
    config: Config
    takes: tuple[tuple[Handoff, str], ...] = ()


@dataclass(frozen=True)
class ResolvedStage:
    """A stage ready to run: its config with the hand-offs filled in, its folder, and the run it starts from."""

    name: str
    config: Config
    folder: Path
    init_from: Path | None

    @property
    def done(self) -> bool:
        from mm1.store import runs as ckpt

        last = ckpt.latest(self.folder)
        return last is not None and ckpt.load_meta(last)["step"] >= self.config.train.steps


@dataclass(frozen=True)
class Pipeline:
    """Stages in the order they run; `folders` places a stage elsewhere than `OUT/<name>` (a CLIP or LM
    stage that several pipelines share)."""

    stages: tuple[PipelineStage, ...]
    folders: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for stage in self.stages:
            for what, source in stage.takes:
                if source not in seen:
                    raise ConfigError(f"pipeline stage '{stage.name}' takes its {what.value} from '{source}', "
                                      f"which is not an earlier stage (stages: {', '.join(self.names)})")
            if stage.name in seen:
                raise ConfigError(f"pipeline stage '{stage.name}' is named twice")
            seen.add(stage.name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def folder(self, out: Path, name: str) -> Path:
        return self.folders.get(name, out / name)

    def resolve(self, out: Path) -> list[ResolvedStage]:
        """Every stage's config (a copy) with its hand-offs as paths under `out`; nothing is read or run."""
        resolved = []
        for stage in self.stages:
            cfg, init_from = copy.deepcopy(stage.config), None
            for what, source in stage.takes:
                path = self.folder(out, source)
                if what == Handoff.VISION:
                    cfg.model.vision.init = str(path)
                elif what == Handoff.DECODER:
                    cfg.model.decoder.init = str(path)
                else:
                    init_from = path
            resolved.append(ResolvedStage(stage.name, cfg, self.folder(out, stage.name), init_from))
        return resolved

    def prepare(self, out: Path, *, progress: bool = True) -> None:
        """Tokenize and pack every stage's sources once (each stage's own data spec)."""
        from mm1.data.prepare import prepare
        from mm1.data.stream import load_tokenizer

        stages = self.resolve(out)
        tok = load_tokenizer(stages[0].config)
        for stage in stages:
            prepare(stage.config, stage.config.train.stage, tok, progress=progress)

    def waves(self) -> list[list[str]]:
        """Stages grouped so that each group takes only from earlier groups (they may run side by side)."""
        level: dict[str, int] = {}
        for stage in self.stages:
            level[stage.name] = 1 + max((level[source] for _, source in stage.takes), default=-1)
        return [[n for n in self.names if level[n] == w] for w in range(max(level.values()) + 1)]

    def run(self, out: Path, *, only: list[str] | None = None, jobs: int = 1,
            on_stage: Callable[[int, ResolvedStage], None] | None = None) -> dict[str, float]:
        """Train every stage (or those in `only`) in order, skipping finished ones; with `jobs` > 1, the
        unfinished stages of a wave run in that many processes at once. Returns seconds per stage."""
        stages = {s.name: s for s in self.resolve(out)}
        index = {name: i for i, name in enumerate(self.names)}
        timings: dict[str, float] = {}
        for wave in self.waves():
            todo = [stages[n] for n in wave if only is None or n in only]
            for stage in todo:
                if on_stage:
                    on_stage(index[stage.name], stage)
            side_by_side = [s for s in todo if not s.done] if jobs > 1 else []
            if len(side_by_side) > 1:
                timings |= _run_side_by_side(side_by_side, jobs)
                continue
            for stage in todo:
                t = time.perf_counter()
                _train(stage)
                timings[stage.name] = time.perf_counter() - t
        return timings


def _train(stage: ResolvedStage) -> None:
    from mm1.train.trainer import train_or_resume

    train_or_resume(stage.config, stage.folder, stage.init_from)


def _stage_job(stage: ResolvedStage, threads: int) -> float:
    """One stage in a worker process with its share of the cores (no progress bar: they would interleave)."""
    import torch

    torch.set_num_threads(threads)
    stage.config.train.logging.progress = False
    t = time.perf_counter()
    _train(stage)
    return time.perf_counter() - t


def _run_side_by_side(stages: list[ResolvedStage], jobs: int) -> dict[str, float]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from mm1.system import available_cores

    workers = min(jobs, len(stages))
    threads = max(1, available_cores() // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {s.name: pool.submit(_stage_job, s, threads) for s in stages}
        return {name: f.result() for name, f in futures.items()}
