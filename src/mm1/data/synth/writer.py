"""`mm1 data synth`: write the synthetic world in the same formats as real data.

Layout of a world directory (every part documented in docs/data-formats.md):

    captions/00000.tar ...           image-caption pairs, WebDataset (img2dataset layout)
    interleaved/docs.parquet         OBELICS-style documents; images in interleaved/images/
    text/docs.jsonl                  text-only documents
    junk/docs.parquet                low-quality web pages, OBELICS-style (`data.synth.junk` of them; no
                                     mixture reads them by default); images in junk/images/
    sft/conversations.json           LLaVA-format conversations; images in sft/images/
    sft/text_conversations.json      LLaVA-format text-only conversations (no image)
    tasks/NAME/{train,test}.jsonl    evaluation tasks (captioning / VQA), images in tasks/NAME/images/
                                     (synth_caption, synth_vqa, synth_words, synth_stripes)
    tasks/synth_text/test.txt        held-out text documents, blank-line separated (`mm1 ablate` scores each alone)
    world.json                       seed, sizes and counts

Each part draws from its own random stream (seeded by the world seed and the part's name), so the
world is a pure function of the seed, and no evaluation scene is also a training scene.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
from pathlib import Path

from tqdm import tqdm

from mm1.config import Config, SynthConfig
from mm1.data.formats.interleaved import write_obelics
from mm1.data.formats.llava import write_llava
from mm1.data.formats.text import open_text, write_jsonl
from mm1.data.formats.webdataset import write_shards
from mm1.data.synth import junk, pages
from mm1.data.synth import language as lang
from mm1.data.synth.scene import COLOURS, WORD_SIZE, Scene, png_bytes, render, sample_scene
from mm1.system import available_cores

VERSION = 12


def _rng(seed: int, part: str) -> random.Random:
    return random.Random(f"mm1-world-{seed}-{part}")


class SceneSource:
    """Draws scenes and remembers training ones, so evaluation scenes can exclude them."""

    def __init__(self) -> None:
        self.train_signatures: set[tuple] = set()
        self.held_out_signatures: set[tuple] = set()

    def train(self, rng: random.Random) -> Scene:
        while True:
            scene = sample_scene(rng)
            if scene.signature() not in self.held_out_signatures:
                self.train_signatures.add(scene.signature())
                return scene

    def held_out(self, rng: random.Random, **kw) -> Scene:
        while True:
            scene = sample_scene(rng, **kw)
            if scene.signature() not in self.train_signatures:
                self.held_out_signatures.add(scene.signature())
                return scene


def _png(job: tuple[Scene, int, float]) -> bytes:
    return png_bytes(render(*job))


def _write_png(job: tuple[Scene, int, float, str]) -> None:
    Path(job[3]).write_bytes(_png(job[:3]))


class Painter:
    """Renders scenes to PNG, in worker processes: drawing and encoding are most of the world's cost.

    Scenes are still drawn from the random streams in order in this process, and every picture
    lands where it would otherwise, so the world's bytes do not depend on the number of workers.
    """

    def __init__(self, size: int, workers: int, word_size: float = WORD_SIZE) -> None:
        self.size, self.word_size = size, word_size
        self.pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
        self.pending: list = []

    def save(self, scene: Scene, path: Path) -> str:
        """Write `scene` as `path` (maybe later: `close` waits for every file); returns its name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        job = (scene, self.size, self.word_size, str(path))
        if self.pool is None:
            _write_png(job)
        else:
            self.pending.append(self.pool.apply_async(_write_png, (job,)))
            if len(self.pending) > 4096:  # bound what waits in memory
                self.pending.pop(0).get()
        return path.name

    def pngs(self, scenes: list[Scene]):
        """The PNG bytes of `scenes`, in order."""
        jobs = [(s, self.size, self.word_size) for s in scenes]
        return self.pool.imap(_png, jobs, chunksize=32) if self.pool else map(_png, jobs)

    def close(self) -> None:
        for result in self.pending:
            result.get()
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def write_captions(root: Path, n: int, painter: Painter, scenes: SceneSource, rng: random.Random, bar, *,
                   dense_share: float) -> None:
    drawn = []
    for _ in range(n):
        scene = scenes.train(rng)
        dense = rng.random() < dense_share  # MM1 mixes alt-text and VeCap-style synthetic captions
        drawn.append((scene, dense, lang.dense_caption(scene) if dense else lang.short_caption(scene, rng)))

    def records():
        for i, ((_, dense, text), png) in enumerate(zip(drawn, painter.pngs([d[0] for d in drawn]), strict=True)):
            bar.update()
            yield f"{i:08d}", png, "png", text, {"style": "dense" if dense else "short"}

    write_shards(records(), root / "captions", per_shard=2000)


def write_interleaved(root: Path, n: int, painter: Painter, scenes: SceneSource, rng: random.Random, bar) -> None:
    docs = []
    for i in range(n):
        doc_scenes = [scenes.train(rng) for _ in range(pages.images_on_page(rng))]
        names = [painter.save(s, root / "interleaved" / "images" / f"{i:07d}_{k}.png")
                 for k, s in enumerate(doc_scenes)]
        parts = pages.web_page(doc_scenes, rng)
        # OBELICS layout: texts and images side by side; paragraphs end in a newline, as on a web page
        docs.append(([p + "\n" if isinstance(p, str) else None for p in parts],
                     [f"images/{names[p]}" if isinstance(p, int) else None for p in parts]))
        bar.update()
    write_obelics(docs, root / "interleaved" / "docs.parquet")


def write_junk(root: Path, n: int, painter: Painter, scenes: SceneSource, rng: random.Random, bar) -> None:
    """Junk pages (`synth/junk.py`) in the interleaved layout. Written after every other part, so that the
    other parts (and the evaluation scenes) are the same with or without them."""
    docs = []
    for i in range(n):
        doc_scenes = [scenes.train(rng) for _ in range(junk.images_on_junk_page(rng))]
        names = [painter.save(s, root / "junk" / "images" / f"{i:07d}_{k}.png") for k, s in enumerate(doc_scenes)]
        parts = junk.junk_page(len(doc_scenes), rng)
        docs.append(([p + "\n" if isinstance(p, str) else None for p in parts],
                     [f"images/{names[p]}" if isinstance(p, int) else None for p in parts]))
        bar.update()
    write_obelics(docs, root / "junk" / "docs.parquet")


def write_sft(root: Path, n: int, painter: Painter, scenes: SceneSource, rng: random.Random, bar) -> None:
    records = []
    for i in range(n):
        if rng.random() < 0.15:  # two images, one comparison question
            a, b = scenes.train(rng), scenes.train(rng)
            names = [painter.save(s, root / "sft" / "images" / f"{i:07d}_{k}.png") for k, s in enumerate((a, b))]
            na, nb = len(a.shapes), len(b.shapes)
            answer = ("The first picture." if na > nb else "The second picture." if nb > na
                      else "Neither, they have the same number.")
            conv = [{"from": "human", "value": "<image>\n<image>\nWhich picture has more shapes?"},
                    {"from": "gpt", "value": answer}]
        else:
            scene = scenes.train(rng)
            names = [painter.save(scene, root / "sft" / "images" / f"{i:07d}.png")]
            conv = []
            for t, (q, a) in enumerate(lang.conversation(scene, rng)):
                conv += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
        records.append({"id": f"synth-{i:07d}", "image": names if len(names) > 1 else names[0],
                        "conversations": conv})
        bar.update()
    write_llava(records, root / "sft" / "conversations.json")


def write_sft_text(root: Path, n: int, rng: random.Random, bar) -> None:
    records = []
    for i in range(n):
        conv = [m for q, a in lang.text_conversation(rng) for m in ({"from": "human", "value": q},
                                                                   {"from": "gpt", "value": a})]
        records.append({"id": f"synth-text-{i:07d}", "conversations": conv})
        bar.update()
    write_llava(records, root / "sft" / "text_conversations.json")


def _single_question(kind: str, scene: Scene) -> tuple[str, str, str] | None:
    """The one question of a word or stripes task about `scene`, if it has one (a stripes item needs two
    colours or more to choose from)."""
    if kind == "word":
        return lang.word_question(scene)
    return lang.stripes_question(scene) if len({s.colour for s in scene.shapes}) > 1 else None


def _task_rows(kind: str, scene: Scene, name: str, rng: random.Random) -> list[dict]:
    if kind == "caption":
        return [{"image": f"images/{name}", "captions": lang.reference_captions(scene, rng)}]
    if kind == "vqa":
        q, a, qtype = rng.choice(lang.questions(scene, rng))
        return [{"image": f"images/{name}", "question": q, "answers": [a], "type": qtype}]
    q = _single_question(kind, scene)
    if not q:
        return []
    # The stripes task is answered by ranking the colours of the scene's shapes: a model that sees the
    # colours but not the stripes (64 px) is at chance among them, so what it scores above chance is
    # what resolution shows, free of format failures.
    choices = {"choices": [c for c in COLOURS if c in {s.colour for s in scene.shapes}]} if kind == "stripes" else {}
    return [{"image": f"images/{name}", "question": q[0], "answers": [q[1]], "type": q[2], **choices}]


def write_tasks(root: Path, n_test: int, painter: Painter, scenes: SceneSource, seed: int, bar) -> None:
    """Evaluation tasks; `train` splits (for few-shot demonstrations) draw training scenes."""
    for task, kind in (("synth_caption", "caption"), ("synth_vqa", "vqa"), ("synth_words", "word"),
                       ("synth_stripes", "stripes")):
        for split, count in (("train", 2 * n_test), ("test", n_test)):
            rng = _rng(seed, f"task-{task}-{split}")
            rows: list[dict] = []
            i = 0
            while len(rows) < count:
                word_prob = 1.0 if kind == "word" else 0.35
                scene = scenes.train(rng) if split == "train" else scenes.held_out(rng, word_prob=word_prob)
                if split == "train" and kind in ("word", "stripes") and not _single_question(kind, scene):
                    continue
                name = f"{split}_{i:06d}.png"
                new = _task_rows(kind, scene, name, rng)
                if new:
                    painter.save(scene, root / "tasks" / task / "images" / name)
                    rows += new
                    i += 1
            path = root / "tasks" / task / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            bar.update(count)


def write_text_task(root: Path, n: int, rng: random.Random) -> None:
    """Held-out text documents (`tasks/synth_text/test.txt`, blank-line separated) for perplexity: the
    text ability that MM1 finds text-only pre-training data preserves."""
    path = root / "tasks" / "synth_text" / "test.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(pages.text_page(rng) for _ in range(n)) + "\n")


def write_world(root: Path, *, seed: int, sizes: SynthConfig, progress: bool = False,
                workers: int = 0) -> Path:
    """Write the whole world under `root` (deterministic in `seed`, whatever the number of rendering
    `workers`; 0: one per CPU core); returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    scenes = SceneSource()
    painter = Painter(sizes.image_size, workers or available_cores(), sizes.word_size)
    total = sizes.captions + sizes.interleaved + sizes.sft + sizes.sft_text + 12 * sizes.eval_scenes + sizes.junk
    try:
        with tqdm(total=total, desc="synth world", unit="rec", disable=not progress) as bar:
            write_captions(root, sizes.captions, painter, scenes, _rng(seed, "captions"), bar,
                           dense_share=sizes.dense_captions)
            write_interleaved(root, sizes.interleaved, painter, scenes, _rng(seed, "interleaved"), bar)
            text_rng = _rng(seed, "text")
            docs = [pages.text_page(text_rng) for _ in range(sizes.text)]
            if sizes.real_text:  # real prose beside the world's own: as many documents again, at most
                reader = open_text(Path(sizes.real_text))
                docs += [reader.read(i).text for i in range(min(len(reader), sizes.text))]
            write_jsonl(docs, root / "text" / "docs.jsonl")
            write_sft(root, sizes.sft, painter, scenes, _rng(seed, "sft"), bar)
            write_sft_text(root, sizes.sft_text, _rng(seed, "sft-text"), bar)
            write_tasks(root, sizes.eval_scenes, painter, scenes, seed, bar)
            write_text_task(root, sizes.eval_scenes, _rng(seed, "text-test"))
            if sizes.junk:
                write_junk(root, sizes.junk, painter, scenes, _rng(seed, "junk"), bar)
    finally:
        painter.close()
    meta = {"version": VERSION, "seed": seed, "sizes": sizes.__dict__}
    (root / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def ensure_world(cfg: Config, root: Path, seed: int, *, progress: bool = True) -> Path:
    """The world of `cfg.data.synth` at `root` with its tokenizer: reused when it is this version's
    with these sizes and seed, written (and the tokenizer trained) otherwise."""
    from mm1.config import to_dict
    from mm1.data.sources import iter_texts
    from mm1.data.tokenizer import train_tokenizer

    meta = root / "world.json"
    want = {"version": VERSION, "seed": seed, "sizes": to_dict(cfg)["data"]["synth"]}
    if meta.exists():
        have = json.loads(meta.read_text())
        if all(have.get(k) == v for k, v in want.items()) and (root / "tokenizer.json").exists():
            return root
    write_world(root, seed=seed, sizes=cfg.data.synth, progress=progress)
    train_tokenizer(iter_texts(cfg), vocab_size=cfg.model.decoder.vocab_size, out=root / "tokenizer.json")
    return root
