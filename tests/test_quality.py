"""Quality filtering: grades from a prompted LLM, a classifier fitted to them, a drop list prepare honours."""

import json
import random

import pytest

from mm1.config import apply_overrides
from mm1.data.formats.text import write_jsonl
from mm1.data.quality import GradeSettings, filter_source, grade_source, grades_file, quality_file, write_grades
from mm1.recipes import get_recipe

GOOD = ["A triangle has three corners and three sides, and a square has four equal sides.",
        "Yellow and blue paint mix into green, while red and yellow make orange.",
        "The river runs past the old mill and into the lake below the town.",
        "Counting shapes is easier when they do not overlap on the page."]
JUNK = ["click here buy now cheap cheap $$$ best price click here", "home | about | login | cart | home | login",
        "xq7 zzv 9f3 kk2 qpl vvv 0x1 aaa bbb", "free free free download now now now win win"]


def _source(tmp_path, world):
    rng = random.Random(0)
    docs, junk = [], []
    for i in range(120):
        bad = i % 3 == 0  # a third is junk
        pool = JUNK if bad else GOOD
        docs.append(" ".join(rng.sample(pool, k=2)) + f" {i}")
        junk.append(bad)
    write_jsonl(docs, tmp_path / "text" / "docs.jsonl")
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={tmp_path}", "train.stage=lm",
                                               f"data.tokenizer={world / 'tokenizer.json'}"])
    return cfg, docs, junk


def _write_grades(cfg, junk, flip=False):
    rows = [{"file": 0, "index": i, "grades": [float((not bad) != flip) * 5], "top": [0]}
            for i, bad in enumerate(junk) if i % 2 == 0]  # half the records graded
    head = {"source": "text", "files": [str(cfg.data.root) + "/text/docs.jsonl"], "grader": "hand", "settings": {}}
    path = grades_file(cfg, "text")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(head) + "\n" + "".join(json.dumps(r) + "\n" for r in rows))


def test_the_filter_keeps_what_the_grades_rank_high_and_prepare_leaves_the_rest_out(tmp_path, world):
    from mm1.data.prepare import prepare
    from mm1.data.stream import load_tokenizer
    from mm1.files import write_json

    cfg, _, junk = _source(tmp_path, world)
    _write_grades(cfg, junk)
    result = filter_source(cfg, "text", keep=2 / 3, progress=False)
    dropped = set(result.drop.get(0, []))
    assert result.records == 120 and result.dropped == 40
    assert sum(junk[i] for i in dropped) >= 38  # the junk third, as the grades say
    assert result.heldout_spearman > 0.8 and result.heldout_pairwise > 0.9
    _write_grades(cfg, junk, flip=True)  # the grades say the opposite: so does the filter
    flipped = set(filter_source(cfg, "text", keep=2 / 3, progress=False).drop.get(0, []))
    assert sum(not junk[i] for i in flipped) >= 38 and not flipped & dropped
    # prepare with data.prepare.quality=true leaves the dropped records out and counts them
    write_json(quality_file(cfg, "text"), result.to_dict())
    on = apply_overrides(cfg, ["data.prepare.quality=true"])
    summary = prepare(on, on.train.stage, load_tokenizer(on), progress=False)
    text = json.dumps(summary, default=str)
    assert "low quality (mm1 data filter)" in text and "40" in text


def test_the_filter_refuses_stale_or_missing_grades(tmp_path, world):
    from mm1.data.errors import RecordError

    cfg, _, junk = _source(tmp_path, world)
    with pytest.raises(RecordError, match=r"no grades.*mm1 data grade"):
        filter_source(cfg, "text", keep=0.5, progress=False)
    _write_grades(cfg, junk)
    path = grades_file(cfg, "text")
    lines = path.read_text().splitlines()
    path.write_text(json.dumps(json.loads(lines[0]) | {"files": ["other.jsonl"]}) + "\n" + "\n".join(lines[1:]))
    with pytest.raises(RecordError, match="grades are for other files"):
        filter_source(cfg, "text", keep=0.5, progress=False)
    with pytest.raises(ValueError, match=r"--keep 1\.5"):
        filter_source(cfg, "text", keep=1.5, progress=False)


def test_grading_reads_the_graders_probabilities_of_each_digit(tmp_path, world):
    """An instruct folder (a tiny random Llama here; SmolLM2-135M-Instruct in use) grades a seeded sample
    under two rubric phrasings; every grade is an expected value in [0, 5]."""
    from test_pretrained import hf_decoder_folder

    hf_decoder_folder(tmp_path / "grader")
    cfg, _, _ = _source(tmp_path, world)
    graded = grade_source(cfg, "text", tmp_path / "grader", GradeSettings(sample=6), progress=False)
    again = grade_source(cfg, "text", tmp_path / "grader", GradeSettings(sample=6), progress=False)
    assert [r["index"] for r in graded.rows] == [r["index"] for r in again.rows]  # the same seeded sample
    assert len(graded.rows) == 6 and all(0 <= g <= 5 for r in graded.rows for g in r["grades"])
    assert graded.rows == again.rows and set(graded.agreement()) == {"spearman", "same_top_grade"}
    write_grades(graded, grades_file(cfg, "text"))
    assert json.loads(grades_file(cfg, "text").read_text().splitlines()[0])["grader"] == str(tmp_path / "grader")
    # one document per pass grades as the batch of six does (left padding changes nothing)
    alone = grade_source(cfg, "text", tmp_path / "grader", GradeSettings(sample=6, batch=1), progress=False)
    for a, b in zip(alone.rows, graded.rows, strict=True):
        assert a["top"] == b["top"] and a["grades"] == pytest.approx(b["grades"], abs=1e-4)
    # a rubric of one's own is what the grader reads: another instruction, other grades
    own = grade_source(cfg, "text", tmp_path / "grader", GradeSettings(sample=6, rubrics=("Say 0.",)), progress=False)
    assert len(own.rows[0]["grades"]) == 1 and own.agreement() == {}
    assert [r["grades"][0] for r in own.rows] != [r["grades"][0] for r in graded.rows]
    with pytest.raises(ValueError, match="non-empty"):
        GradeSettings(rubrics=(" ",))


@pytest.mark.parametrize(("flags", "says"), [
    (["--rubric", "@/no/such/rubric.txt"], "no such file /no/such/rubric.txt"),
    (["--batch", "0"], "batch (0)"),
    (["--max-chars", "-5"], "max_chars (-5)"),
])
def test_grade_refuses_bad_settings_in_one_line_before_loading_a_grader(tmp_path, capsys, flags, says):
    from mm1.cli import main

    argv = ["data", "grade", "--stage", "pretrain", "--source", "interleaved", "--grader", str(tmp_path / "none"),
            *flags, f"data.root={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm1: error:") and says in err and "\n" not in err
