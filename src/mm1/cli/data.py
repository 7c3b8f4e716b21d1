"""`mm1 data ...` and `mm1 config show`: the commands that make, inspect and curate data, and show configs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm1.cli.common import config_args, resolve_config
from mm1.config import Config, ConfigError, to_dict


def _stage_args(p: argparse.ArgumentParser) -> None:
    """The config arguments and `--stage`, for the data commands that work on one stage's sources."""
    config_args(p)
    p.add_argument("--stage", choices=["clip", "lm", "pretrain", "sft"], help="shorthand for train.stage=...")


def _stage_config(a: argparse.Namespace) -> Config:
    return resolve_config(a.recipe, a.config, [*a.overrides, *([f"train.stage={a.stage}"] if a.stage else [])])


def _cmd_config_show(a: argparse.Namespace) -> int:
    from mm1.model.mllm import count_parameters, lr_rule_parameters
    from mm1.train.optim import describe

    cfg = resolve_config(a.recipe, a.config, a.overrides)
    total, active = count_parameters(cfg.model)
    print(json.dumps(to_dict(cfg), indent=2))
    print(f"parameters: total {total:,} ({total / 1e9:.3f}B), active per token {active:,} ({active / 1e9:.3f}B)")
    print("\n".join(describe(cfg.train.optimizer, cfg.train.schedule, lr_rule_parameters(cfg.model))))
    return 0


def _cmd_data_synth(a: argparse.Namespace) -> int:
    from mm1.data.synth.writer import write_world

    cfg = resolve_config(a.recipe, a.config, a.overrides, pretrained=False)
    write_world(Path(a.out), seed=a.seed, sizes=cfg.data.synth, progress=True)
    return 0


def _cmd_data_tokenizer(a: argparse.Namespace) -> int:
    from mm1.data.sources import iter_texts
    from mm1.data.tokenizer import train_tokenizer

    cfg = resolve_config(a.recipe, a.config, [*([f"data.root={a.root}"] if a.root else []), *a.overrides],
                         pretrained=False)
    if cfg.model.decoder.init:
        raise ConfigError(f"model.decoder.init is set: the tokenizer is that folder's "
                          f"({Path(cfg.model.decoder.init) / 'tokenizer.json'}); there is none to train")
    out = Path(a.out) if a.out else Path(cfg.data.root) / "tokenizer.json"
    path = train_tokenizer(iter_texts(cfg), vocab_size=cfg.model.decoder.vocab_size, out=out)
    print(f"tokenizer written to {path}")
    return 0


def _cmd_data_prepare(a: argparse.Namespace) -> int:
    from mm1.config import ConfigError, Stage
    from mm1.data.prepare import Part, prepare, prepare_part, summary_table
    from mm1.data.stream import load_tokenizer

    if (a.shard is None) != (a.of is None) or (a.merge and a.shard is not None):
        raise ConfigError("--shard I and --of N go together, and --merge runs alone, after every shard")
    cfg = _stage_config(a)
    if a.shard is not None:
        part = Part(a.shard, a.of)
        done = prepare_part(cfg, Stage(cfg.train.stage), load_tokenizer(cfg), part)
        for name, (now, units) in done.items():
            print(f"{name}: {now} of this shard's {units} work units prepared now (the rest were done before)")
        print(f"shard {a.shard} of {a.of} done; once every shard is, run `mm1 data prepare ... --merge`")
        return 0
    summary = prepare(cfg, Stage(cfg.train.stage), load_tokenizer(cfg), force=a.force, merge=a.merge)
    print(summary_table(summary))
    print(f"prepared {cfg.train.stage.value} data in {Path(cfg.data.prepared or Path(cfg.data.root) / 'prepared')}")
    return 0


def _cmd_data_dedup(a: argparse.Namespace) -> int:
    from mm1.config import Stage
    from mm1.data.dedup import DedupSettings, dedup_folder, run_dedup, summary_lines

    cfg = _stage_config(a)
    settings = DedupSettings(threshold=a.threshold, num_perm=a.num_perm, ngram=a.ngram, caption_text=a.caption_text)
    results = run_dedup(cfg, Stage(cfg.train.stage), settings)
    print("\n".join(summary_lines(results)))
    print(f"dedup lists in {dedup_folder(cfg)}; prepare with data.prepare.dedup=true to leave the duplicates out")
    return 0


def _rubric(value: str) -> str:
    """A --rubric: its text, or `@FILE` for the text of a file."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise FileNotFoundError(f"--rubric {value}: no such file {path}")
    return path.read_text(encoding="utf-8").strip()


def _cmd_data_grade(a: argparse.Namespace) -> int:
    from mm1.data.quality import RUBRICS, GradeSettings, grade_source, grades_file, write_grades

    cfg = _stage_config(a)
    rubrics = tuple(_rubric(r) for r in a.rubric) if a.rubric else RUBRICS
    try:
        settings = GradeSettings(sample=a.sample, seed=a.seed, rubrics=rubrics, batch=a.batch, max_chars=a.max_chars)
    except ValueError as err:
        raise ConfigError(f"mm1 data grade: {err}") from None
    graded = grade_source(cfg, a.source, Path(a.grader), settings)
    write_grades(graded, grades_file(cfg, a.source))
    n = len(graded.rows)
    mean = sum(r["grades"][0] for r in graded.rows) / max(1, n)
    print(f"{a.source}: {n} documents graded by {a.grader} in {graded.seconds:.0f} s "
          f"({n / max(graded.seconds, 1e-9):.2f} docs/s per rubric pair), mean grade {mean:.2f} of 5")
    agree = graded.agreement()
    if agree:
        print(f"agreement of the two rubric phrasings: Spearman {agree['spearman']:.2f}, same most likely grade "
              f"{agree['same_top_grade']:.0%}")
    print(f"grades in {grades_file(cfg, a.source)}; next: mm1 data filter --source {a.source} --keep SHARE")
    return 0


def _cmd_data_filter(a: argparse.Namespace) -> int:
    from mm1.data.quality import filter_source, quality_file
    from mm1.files import write_json

    cfg = _stage_config(a)
    result = filter_source(cfg, a.source, keep=a.keep)
    write_json(quality_file(cfg, a.source), result.to_dict())
    print(f"{a.source}: classifier on held-out grades: Spearman {result.heldout_spearman:.2f}, pairs of different "
          f"grades ordered as the grades are {result.heldout_pairwise:.0%}")
    print(f"{a.source}: {result.records} records scored in {result.seconds:.1f} s "
          f"({result.records / max(result.seconds, 1e-9):,.0f} records/s), {result.dropped} left out "
          f"(keeping the top {a.keep:.0%})")
    print(f"drop list in {quality_file(cfg, a.source)}; prepare with data.prepare.quality=true to leave them out")
    return 0


def _cmd_data_batch(a: argparse.Namespace) -> int:
    from mm1.data.stream import describe_batch

    cfg = resolve_config(a.recipe, a.config, a.overrides)
    print(describe_batch(cfg, step=a.step, rank=a.rank, world_size=a.world_size,
                         out=Path(a.out) if a.out else None))
    return 0


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for inspecting configs and preparing data."""
    p = sub.add_parser("config", help="inspect configs and recipes")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = csub.add_parser("show", help="print the resolved config and its parameter counts")
    config_args(q)
    q.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("data", help="synthesise data, train a tokenizer, prepare sources, inspect batches")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = dsub.add_parser("synth", help="write the embedded synthetic world in the real data formats")
    config_args(q)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_data_synth)
    q = dsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the texts of the configured sources")
    config_args(q)
    q.add_argument("--root", help="world directory (default: data.root)")
    q.add_argument("--out", help="tokenizer.json path (default: ROOT/tokenizer.json)")
    q.set_defaults(func=_cmd_data_tokenizer)
    q = dsub.add_parser("prepare", help="tokenize and pack a stage's sources once, into memory-mapped sequences",
                        description="Reads every source of the stage (data.sources, or data.sft_sources with "
                                    "--stage sft), checks its images, and writes packed sequences under "
                                    "data.prepared (default DATA_ROOT/prepared), where train and `data batch` "
                                    "with the same settings find them.")
    _stage_args(q)
    q.add_argument("--force", action="store_true", help="prepare again even if this spec is already prepared")
    q.add_argument("--shard", type=int, metavar="I", help="across machines: prepare only the I-th of --of N disjoint "
                   "shares of the work units (one call per machine, e.g. a Slurm array), then run --merge once")
    q.add_argument("--of", type=int, metavar="N", help="with --shard: the number of shares")
    q.add_argument("--merge", action="store_true", help="after every --shard I --of N: write the manifests (the "
                   "result is byte for byte a one-machine prepare)")
    q.set_defaults(func=_cmd_data_prepare)
    q = dsub.add_parser("dedup", help="find near-duplicate texts (MinHash-LSH) and duplicate images in a stage's "
                                      "sources; `prepare` with data.prepare.dedup=true leaves them out")
    _stage_args(q)
    q.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard similarity of word 5-grams "
                                                                  "at which a record is a near-duplicate")
    q.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    q.add_argument("--ngram", type=int, default=5, help="words per shingle")
    q.add_argument("--caption-text", action="store_true",
                   help="caption pairs are near-duplicates by their caption too (default: only a duplicate image "
                        "makes one: short captions repeat across distinct images)")
    q.set_defaults(func=_cmd_data_dedup)
    q = dsub.add_parser("grade", help="grade a sample of a source's documents with a prompted instruct LLM "
                                      "(the first step of quality filtering)")
    _stage_args(q)
    q.add_argument("--source", required=True, help="the source to grade (a name under data.sources)")
    q.add_argument("--grader", required=True, help="an HF instruct model folder (e.g. SmolLM2-135M-Instruct)")
    q.add_argument("--sample", type=int, default=200, help="documents graded (a seeded sample)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--rubric", action="append", metavar="TEXT|@FILE",
                   help="the grading instruction, asking for one digit 0-5 (repeat it: the first phrasing is the "
                        "grade, the others measure how much the grades depend on the wording); default: two "
                        "built-in phrasings (mm1.data.quality.RUBRICS)")
    q.add_argument("--batch", type=int, default=8, help="documents per forward pass of the grader")
    q.add_argument("--max-chars", type=int, default=1500, help="the part of each document the grader reads")
    q.set_defaults(func=_cmd_data_grade)
    q = dsub.add_parser("filter", help="fit a fast classifier to the grades, score every record, keep the top share; "
                                       "`prepare` with data.prepare.quality=true leaves the rest out")
    _stage_args(q)
    q.add_argument("--source", required=True)
    q.add_argument("--keep", type=float, required=True, help="the share of records kept, in (0, 1]")
    q.set_defaults(func=_cmd_data_filter)
    q = dsub.add_parser("batch", help="print the exact contents of training step N without replaying the run")
    config_args(q)
    q.add_argument("--step", type=int, required=True)
    q.add_argument("--rank", type=int, default=0)
    q.add_argument("--world-size", type=int, default=1)
    q.add_argument("--out", help="also save the batch tensors to this .pt file")
    q.set_defaults(func=_cmd_data_batch)
