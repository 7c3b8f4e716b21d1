"""Files a user reads are written whole or not at all, and read back with one-line errors.

A result, an export or a run's metadata written in place can be cut short by a kill or a full disk
and then read as if it were whole (a truncated `results.json`, half an exported folder). Here every
such file is written under a temporary name and renamed over the real one (`os.replace` is atomic
on one file system); a folder is assembled beside its final name and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class FileFormatError(ValueError):
    """A file that is not what it should be (truncated, not JSON): the message names it."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write; renamed to `path` when the block ends without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A folder to fill beside `path`, which replaces `path` (and whatever it held) once filled."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path):
    """A JSON file, or one line naming it when it is cut short or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: not valid JSON (truncated? {err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not a UTF-8 text file") from None


def check_writable(folder: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be written (read-only, under a file); nothing
    is created: the folder's nearest existing ancestor is what is checked."""
    from mm1.config import ConfigError

    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder}: cannot write there ({existing} is not a folder)")
    probe = existing / f".mm1-write-test{os.getpid()}"
    try:  # a real write: os.access says yes to root on a read-only mount
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{what} {folder}: cannot write there ({err.strerror})") from None
