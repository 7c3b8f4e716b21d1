"""Which sources a stage trains on, and their files.

Sources are configuration (`data.sources` for pre-training, `data.sft_sources` for SFT; the CLIP
stage uses the caption sources), each with a kind, comma-separated globs and a weight. In paths,
`{root}` is `data.root` and `{shared}` the shared real-data folder (`../shared/data` beside the
checkout, or $MM1_SHARED_DATA). Only sources with a weight take part.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from mm1.config import Config, SourceConfig, SourceKind, Stage
from mm1.data.errors import RecordError
from mm1.data.formats import open_reader
from mm1.data.records import record_texts


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout (or $MM1_SHARED_DATA)."""
    env = os.environ.get("MM1_SHARED_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (base.parent / "shared" / "data").exists():
            return base.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


def expand(path: str, root: str) -> str:
    """A configured path with `{root}` and `{shared}` filled in."""
    if "{shared}" in path:
        path = path.replace("{shared}", str(shared_data_dir()))
    return path.replace("{root}", root)


def stage_sources(cfg: Config, stage: Stage) -> dict[str, SourceConfig]:
    """The sources a stage trains on (weight > 0), in config order."""
    if stage == Stage.SFT:
        pool = cfg.data.sft_sources
    elif stage == Stage.CLIP:
        pool = {n: s for n, s in cfg.data.sources.items() if s.kind == SourceKind.CAPTION}
    elif stage == Stage.LM:  # the decoder's language pre-training: the text-only sources
        pool = {n: s for n, s in cfg.data.sources.items() if s.kind == SourceKind.TEXT}
    else:
        pool = cfg.data.sources
    out = {n: s for n, s in pool.items() if s.weight > 0}
    if not out:
        what = {Stage.CLIP: "a caption source", Stage.LM: "a text source"}.get(stage, "a source")
        raise RecordError("data.sources", f"the {stage.value} stage needs {what} with a weight")
    return out


def resolve_files(src: SourceConfig, root: str, name: str) -> tuple[str, ...]:
    """The files of a source, sorted, as absolute paths; FileNotFoundError for a glob matching nothing."""
    files: list[str] = []
    for pattern in (p.strip() for p in expand(src.paths, root).split(",") if p.strip()):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"data source '{name}': no files match '{pattern}' "
                                    "(write the synthetic world with `mm1 data synth`, or fix the path)")
        files += [os.path.abspath(m) for m in matches]
    return tuple(files)


def iter_texts(cfg: Config) -> Iterator[str]:
    """Every text of every source of both stages (for training a tokenizer); bad records are passed over."""
    for stage in (Stage.PRETRAIN, Stage.SFT):
        for name, src in stage_sources(cfg, stage).items():
            images = Path(expand(src.images, cfg.data.root)) if src.images else None
            for path in resolve_files(src, cfg.data.root, name):
                reader = open_reader(src.kind, Path(path), images)
                for i in range(len(reader)):
                    try:
                        yield from record_texts(reader.read(i))
                    except RecordError:
                        continue
