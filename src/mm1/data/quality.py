"""`mm1 data grade` and `mm1 data filter`: LLM-graded quality filtering, distilled into a fast classifier.

The method of `../shared/reference/related-abstracts.txt` (MM1's data were filtered hard): a prompted
instruct LLM grades a sample of a source's documents on a stated rubric; a fast classifier learns those
grades and scores every document; the lowest-scoring share is left out of preparation.

- **grade**: each sampled document (its text, cut to `max_chars`) goes to the grader in its chat
  template with the rubric; the grade is read as the grader's probabilities of the answers "0".."5"
  (their expected value, and the most likely one), not parsed from free text, so no answer is
  malformed. A second phrasing of the rubric grades the same sample: their agreement (Spearman, and
  how often the most likely grade is the same) says how much the grades are the rubric's, not the
  wording's. Written to `DATA_ROOT/quality/<source>.grades.jsonl`.
- **filter**: hashed word 1-2-grams (scikit-learn's `HashingVectorizer`) and a ridge regression on the
  expected grades, fitted on 80% of the graded sample and checked on the rest (Spearman, and the share of
  pairs of different grades it orders as the grades do); then every record of the source is scored and
  the top `keep` share is kept. The dropped records are written as a drop list in `mm1 data dedup`'s
  format (`DATA_ROOT/quality/<source>.json`), which `mm1 data prepare` leaves out with
  `data.prepare.quality=true`.

Records are read in file order and the sample is drawn with a fixed seed: the same inputs give the
same grades, classifier and list.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mm1.config import Config, Stage
from mm1.data.errors import RecordError
from mm1.data.formats import open_reader
from mm1.data.records import record_texts
from mm1.data.sources import expand, resolve_files, stage_sources

GRADES = tuple(str(g) for g in range(6))
RUBRICS = (
    "Rate the quality of the following web text for teaching a language model, from 0 (spam, boilerplate, "
    "gibberish or a list of links) to 5 (clear, well-written and informative). Answer with one digit.",
    "How useful is this document as training data? Give a score from 0 to 5, where 0 means junk (ads, "
    "navigation menus, random characters, repeated keywords) and 5 means coherent, informative prose. "
    "Reply with a single number.",
)


@dataclass(frozen=True)
class GradeSettings:
    """How a sample is graded: its size and seed, the text shown, the rubrics (the first is the grade)."""
    sample: int = 200
    seed: int = 0
    max_chars: int = 1500
    rubrics: tuple[str, ...] = RUBRICS
    batch: int = 8  # prompts per forward pass

    def __post_init__(self):
        if not self.rubrics or any(not r.strip() for r in self.rubrics):
            raise ValueError("a rubric is a non-empty instruction (the first one is the grade)")
        if self.sample < 1 or self.batch < 1 or self.max_chars < 1:
            raise ValueError(f"sample ({self.sample}), batch ({self.batch}) and max_chars ({self.max_chars}) "
                             f"must be positive")


@dataclass
class Graded:
    """One source's graded sample: (file, record) → expected grade per rubric, and what it cost."""
    source: str
    files: list[str]
    grader: str
    settings: GradeSettings
    rows: list[dict] = field(default_factory=list)  # {"file", "index", "grades": [expected per rubric], "top"}
    seconds: float = 0.0

    def agreement(self) -> dict[str, float]:
        """How much the second rubric's grades agree with the first's."""
        if len(self.settings.rubrics) < 2 or len(self.rows) < 3:
            return {}
        a = [r["grades"][0] for r in self.rows]
        b = [r["grades"][1] for r in self.rows]
        same = sum(r["top"][0] == r["top"][1] for r in self.rows) / len(self.rows)
        return {"spearman": spearman(a, b), "same_top_grade": same}


def spearman(a: list[float], b: list[float]) -> float:
    from mm1.ablate.stats import spearman as rank_correlation

    value = rank_correlation(a, b)
    return value if value == value else 0.0  # a constant side has no rank correlation: 0, not NaN


def _records(cfg: Config, source: str):
    """(file index, record index, text) of every readable record of `source`, in file order."""
    src = stage_sources(cfg, Stage(cfg.train.stage))[source]
    files = resolve_files(src, cfg.data.root, source)
    images = expand(src.images, cfg.data.root)
    for f, path in enumerate(files):
        reader = open_reader(src.kind, Path(path), Path(images) if images else None)
        for i in range(len(reader)):
            try:
                text = " ".join(record_texts(reader.read(i)))
            except RecordError:
                continue  # prepare reports it
            yield f, i, text


def source_files(cfg: Config, source: str) -> list[str]:
    sources = stage_sources(cfg, Stage(cfg.train.stage))
    if source not in sources:
        raise ValueError(f"--source {source}: the {cfg.train.stage.value} stage's sources are {', '.join(sources)}")
    return list(resolve_files(sources[source], cfg.data.root, source))


def grade_source(cfg: Config, source: str, grader: Path, settings: GradeSettings, *,
                 progress: bool = True) -> Graded:
    """Grade a seeded sample of `source`'s records with the instruct LLM in the folder `grader`."""
    from mm1.serve.engine import Engine
    from mm1.store.loading import load_model

    files = source_files(cfg, source)
    sample = _reservoir(_records(cfg, source), settings.sample, random.Random(settings.seed))
    model, tok, _ = load_model(grader)
    engine = Engine(model.eval(), tok)
    t0 = time.perf_counter()
    out = Graded(source, files, str(grader), settings)
    texts = [text[: settings.max_chars] for _, _, text in sample]
    per_rubric = []
    with tqdm(total=len(texts) * len(settings.rubrics), desc=f"grade {source}", unit="doc",
              disable=not progress) as bar:
        for rubric in settings.rubrics:
            per_rubric.append(grade_texts(engine, rubric, texts, batch=settings.batch, on_batch=bar.update))
    for k, (f, i, _) in enumerate(sample):
        out.rows.append({"file": f, "index": i, "grades": [g[k][0] for g in per_rubric],
                         "top": [g[k][1] for g in per_rubric]})
    out.seconds = time.perf_counter() - t0
    return out


def _reservoir(records, k: int, rng: random.Random) -> list[tuple[int, int, str]]:
    """A uniform sample of k records read once, holding k texts at a time (a corpus does not fit in
    memory), in file order."""
    sample: list[tuple[int, int, str]] = []
    for n, record in enumerate(records):
        if n < k:
            sample.append(record)
        elif (j := rng.randrange(n + 1)) < k:
            sample[j] = record
    return sorted(sample, key=lambda r: (r[0], r[1]))


def grade_texts(engine, rubric: str, texts: list[str], *, batch: int = 8,
                on_batch=None) -> list[tuple[float, int]]:
    """The grader's expected grade of each text and its most likely grade, from its probabilities of
    "0".."5" after the rubric, in batches of prompts of similar length (little padding)."""
    import torch

    from mm1.data.template import template_for, user_turn

    template = template_for(engine.tok)
    prompts = [template.render([user_turn(f"{rubric}\n\n---\n{text}\n---", [])], generation_prompt=True)
               for text in texts]
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))  # similar lengths batch together
    out: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    for start in range(0, len(order), batch):
        part = order[start:start + batch]
        logp = torch.tensor(engine.next_token_logprobs([prompts[k] for k in part], list(GRADES)))
        p = torch.softmax(logp, -1)
        expected = (p * torch.arange(len(GRADES))).sum(-1)
        for row, k in enumerate(part):
            out[k] = (float(expected[row]), int(p[row].argmax()))
        if on_batch:
            on_batch(len(part))
    return out


def grades_file(cfg: Config, source: str) -> Path:
    return Path(cfg.data.root) / "quality" / f"{source}.grades.jsonl"


def quality_file(cfg: Config, source: str) -> Path:
    return Path(cfg.data.root) / "quality" / f"{source}.json"


def write_grades(graded: Graded, path: Path) -> None:
    from mm1.files import atomic_path

    head = {k: v for k, v in asdict(graded).items() if k != "rows"} | {"agreement": graded.agreement()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(head) + "\n" + "".join(json.dumps(r) + "\n" for r in graded.rows))


def read_grades(path: Path) -> tuple[dict, list[dict]]:
    if not path.exists():
        raise RecordError(str(path), "no grades", "run `mm1 data grade` first")
    lines = path.read_text().splitlines()
    try:
        return json.loads(lines[0]), [json.loads(line) for line in lines[1:] if line.strip()]
    except (json.JSONDecodeError, IndexError) as err:
        raise RecordError(str(path), "malformed grades file", str(err)) from None


@dataclass
class FilterResult:
    """The classifier's check on held-out grades, and what it kept of the source."""
    source: str
    files: list[str]
    keep: float
    records: int = 0
    dropped: int = 0
    heldout_spearman: float = 0.0
    heldout_pairwise: float = 0.0  # share of held-out pairs of different grades ordered as the grades are
    seconds: float = 0.0
    drop: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self) | {"drop": {str(k): v for k, v in self.drop.items()}}


def _vectorizer():
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=2**18, ngram_range=(1, 2), alternate_sign=False, norm="l2")


def filter_source(cfg: Config, source: str, *, keep: float, seed: int = 0, progress: bool = True) -> FilterResult:
    """Fit the classifier on `source`'s grades, score every record, drop all but the top `keep` share."""
    from sklearn.linear_model import Ridge

    if not 0 < keep <= 1:
        raise ValueError(f"--keep {keep}: the share of records to keep, in (0, 1]")
    head, rows = read_grades(grades_file(cfg, source))
    files = source_files(cfg, source)
    if head.get("files") != files:
        raise RecordError(str(grades_file(cfg, source)), "grades are for other files", "run `mm1 data grade` again")
    t0 = time.perf_counter()
    wanted = {(r["file"], r["index"]) for r in rows}  # first pass: the graded records' texts only
    text_of = {(f, i): t for f, i, t in _records(cfg, source) if (f, i) in wanted}
    graded = [(text_of[(r["file"], r["index"])], r["grades"][0]) for r in rows if (r["file"], r["index"]) in text_of]
    if len(graded) < 10:
        raise RecordError(str(grades_file(cfg, source)), f"only {len(graded)} graded records", "grade at least 10")
    order = list(range(len(graded)))
    random.Random(seed).shuffle(order)
    cut = int(0.8 * len(order))
    vec = _vectorizer()
    fit, held = [graded[k] for k in order[:cut]], [graded[k] for k in order[cut:]]
    model = Ridge(alpha=1.0).fit(vec.transform([t for t, _ in fit]), [g for _, g in fit])
    result = FilterResult(source, files, keep)
    if held:
        pred = list(model.predict(vec.transform([t for t, _ in held])))
        truth = [g for _, g in held]
        result.heldout_spearman = spearman(pred, truth)
        result.heldout_pairwise = _pairwise(pred, truth)
    # second pass: every record scored in chunks; what is kept of it is its place and its score
    where, scores, chunk = [], [], []
    bar = tqdm(desc=f"score {source}", unit="rec", disable=not progress)
    for f, i, text in _records(cfg, source):
        where.append((f, i))
        chunk.append(text)
        if len(chunk) == 4096:
            scores.append(model.predict(vec.transform(chunk)))
            bar.update(len(chunk))
            chunk = []
    if chunk:
        scores.append(model.predict(vec.transform(chunk)))
        bar.update(len(chunk))
    bar.close()
    score = np.concatenate(scores) if scores else np.zeros(0)
    n = len(where)
    n_keep = max(1, round(keep * n))
    ranked = np.lexsort((np.arange(n), -score))  # best first; ties in file order
    for k in np.sort(ranked[n_keep:]):
        f, i = where[k]
        result.drop.setdefault(f, []).append(i)
    result.records, result.dropped = n, n - n_keep
    result.seconds = time.perf_counter() - t0
    return result


def _pairwise(pred: list[float], truth: list[float]) -> float:
    """The share of pairs of different grades that the predictions order as the grades do (AUC for two)."""
    rows = list(zip(pred, truth, strict=True))
    pairs = [(pa, pb) for pa, ta in rows for pb, tb in rows if ta > tb]
    return sum(pa > pb for pa, pb in pairs) / len(pairs) if pairs else 0.0
