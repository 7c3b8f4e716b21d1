"""The `mm1` command: thin argument parsing that hands plain values to library functions.

Library code never sees `argparse.Namespace`; each handler resolves a `Config` (recipe, then an
optional saved config, then dotted overrides, validated before any compute) and calls one function.
Heavy imports happen inside handlers so that `mm1 --help` answers at once. The handlers and their
parsers live by what they work on: `runs.py` (train, eval, quickstart, pipeline, ablate, sweep),
`models.py` (chat, generate, serve, export, weights), `data.py` (data, config); this module builds the
parser and turns expected errors into one line.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from mm1.cli.common import resolve_config
from mm1.cli.data import add_tool_commands
from mm1.cli.models import add_model_commands
from mm1.cli.runs import add_recipe_commands, add_run_commands
from mm1.config import ConfigError

__all__ = ["build_parser", "main", "resolve_config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1", description="MM1-style multimodal LLMs: data, train, eval, serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_recipe_commands(sub)
    add_run_commands(sub)
    add_model_commands(sub)
    add_tool_commands(sub)
    return parser


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`--stage sft data.sub_image_grid=2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if getattr(args, "out_folder", False):  # a read-only or misnamed --out: one line before any work
            from mm1.files import check_writable

            check_writable(Path(args.out))
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:  # bad settings or paths: one line, no traceback
        print(f"mm1: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # malformed data files, images and weights: reported, not a traceback
        from mm1.data.errors import DataError
        from mm1.files import FileFormatError
        from mm1.model.weights import WeightsError
        from mm1.train.checkpoint import CheckpointError

        if not isinstance(err, DataError | WeightsError | CheckpointError | FileFormatError):
            raise
        print(f"mm1: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or vanished folder: the path and the reason, one line
        if err.errno not in DISK_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"mm1: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mm1: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
