"""Tokenizing, packing, the mixture of sequences and the exactly reproducible stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mm1.data.mixture import Mixture, Permutation
from mm1.data.packing import IGNORE, labels_from, layout, pack, split_chunks, tokenize
from mm1.data.records import CaptionRecord, ConversationRecord, DocumentRecord, ImageRef, Role, TextRecord, Turn
from mm1.data.stream import DataStream, load_tokenizer, make_loader
from mm1.data.synth.writer import SceneSource
from mm1.data.template import ChatTemplate, Text, render_record
from mm1.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(world) -> Tokenizer:
    return Tokenizer.from_file(world / "tokenizer.json")


def _labels(t, chunk, seq_len=64):
    row = layout([(t, chunk)], seq_len=seq_len, pad_id=0)
    return labels_from(row.tokens, row.loss, row.doc_ids)


def test_control_tokens_have_fixed_ids_and_text_never_becomes_one(tok):
    assert (tok.pad_id, tok.eos_id, tok.image_id, tok.user_id, tok.assistant_id, tok.end_id) == (0, 1, 2, 3, 4, 5)
    for text in ("<image>", "<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>", "<|pad|>", "<|system|>"):
        ids = tok.encode(f"a page about {text} tags")
        assert not set(ids) & {0, 1, 2, 3, 4, 5, 6}, text
        assert tok.decode(ids) == f"a page about {text} tags"


def test_loss_never_on_images_or_user_turns(tok):
    img = ImageRef("x.png")
    turns = [Turn(Role.USER, (img, "question?")), Turn(Role.ASSISTANT, ("answer",))]
    t = tokenize(ChatTemplate().render(turns), tok, image_tokens=4)
    assert (t.tokens == tok.image_id).sum() == 4
    assert not t.loss[t.tokens == tok.image_id].any()
    (c,), dropped = split_chunks(t, seq_len=64, max_images=2, block=4)
    targets = _labels(t, c)
    answer = tok.encode(" answer")  # mm1's template opens a reply with a space
    assert targets[targets != IGNORE].tolist() == [*answer, tok.end_id, tok.eos_id] and dropped == 0


def test_a_one_token_caption_predicts_its_end_of_text(tok):
    word = next(w for w in ("cat", "sun", "red") if len(tok.encode(w)) == 1)
    t = tokenize(render_record(CaptionRecord(ImageRef("x.png"), word), ChatTemplate()), tok, image_tokens=4)
    (c,), _ = split_chunks(t, seq_len=64, max_images=2, block=4)
    labels = _labels(t, c)
    assert labels[labels != IGNORE].tolist() == [*tok.encode(word), tok.eos_id]


def test_literal_control_text_in_a_caption_gets_no_image_slot(tok):
    record = CaptionRecord(ImageRef("x.png"), "an <image> tag and <|endoftext|> in alt text")
    t = tokenize(render_record(record, ChatTemplate()), tok, image_tokens=4)
    assert (t.tokens == tok.image_id).sum() == 4 and (t.tokens == tok.eos_id).sum() == 1
    assert len(t.images) == 1


LOOKALIKE = "see <image> and <|endoftext|> or <|user|><|end|><|assistant|> in this text"


@pytest.mark.parametrize("record", [
    CaptionRecord(ImageRef("x.png"), LOOKALIKE),
    DocumentRecord((LOOKALIKE, ImageRef("x.png"), LOOKALIKE)),
    TextRecord(LOOKALIKE),
    ConversationRecord((Turn(Role.USER, (ImageRef("x.png"), LOOKALIKE)), Turn(Role.ASSISTANT, (LOOKALIKE,)))),
], ids=["caption", "document", "text", "conversation"])
def test_text_of_every_source_never_becomes_a_control_token(tok, record):
    t = tokenize(render_record(record, ChatTemplate()), tok, image_tokens=4)
    images = 0 if isinstance(record, TextRecord) else 1
    assert (t.tokens == tok.image_id).sum() == 4 * images and len(t.images) == images
    assert (t.tokens == tok.eos_id).sum() == 1  # only the one the tokenizer step appends
    turns = len(record.turns) if isinstance(record, ConversationRecord) else 0
    assert (t.tokens == tok.end_id).sum() == turns and (t.tokens == tok.user_id).sum() == turns // 2


def test_long_samples_split_at_text_never_through_an_image(tok):
    segs = []
    for i in range(6):
        segs += [ImageRef(str(i)), Text(" word" * 30, loss=True)]
    t = tokenize(segs, tok, image_tokens=16)
    chunks, dropped = split_chunks(t, seq_len=64, max_images=2, block=16)
    assert dropped == 0 and sum(c.length for c in chunks) == len(t.tokens)
    for c in chunks:
        assert c.length <= 64 and c.num_images <= 2
        for s in t.image_starts:  # an image block lies wholly inside or wholly outside a chunk
            assert (s + 16 <= c.start) or (s >= c.end) or (c.start <= s and s + 16 <= c.end)
    chunks, dropped = split_chunks(t, seq_len=12, max_images=2, block=16)
    assert dropped == 6 and all(c.num_images == 0 for c in chunks)


def test_layout_document_ids_positions_and_no_label_across_documents(tok):
    a = tokenize([Text("first doc", loss=True)], tok, image_tokens=4)
    b = tokenize([Text("second one", loss=True)], tok, image_tokens=4)
    ca, cb = split_chunks(a, seq_len=32, max_images=1, block=4)[0][0], split_chunks(b, seq_len=32, max_images=1,
                                                                                  block=4)[0][0]
    row = layout([(a, ca), (b, cb)], seq_len=32, pad_id=0)
    n_a = len(a.tokens)
    assert row.doc_ids[:n_a].tolist() == [0] * n_a and row.positions[n_a] == 0
    labels = labels_from(row.tokens, row.loss, row.doc_ids)
    assert labels[n_a - 1] == IGNORE  # no prediction across documents
    assert (row.doc_ids[n_a + len(b.tokens):] == -1).all() and (labels[n_a + len(b.tokens) - 1:] == IGNORE).all()


def test_best_fit_decreasing_respects_caps_and_places_every_item():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 90, 400)
    images = rng.integers(0, 2, 400)
    bins = pack(lengths, images, seq_len=128, max_images=4)
    assert sorted(i for b in bins for i in b) == list(range(400))
    for b in bins:
        assert lengths[b].sum() <= 128 and images[b].sum() <= 4
    assert lengths.sum() / (128 * len(bins)) > 0.98  # small items next to the sequence: nearly full
    assert pack(lengths, images, seq_len=128, max_images=4) == bins  # deterministic


def test_permutation_is_a_bijection_for_any_size():
    for n in (1, 2, 7, 1000, 4097):
        p = Permutation(n, key=5)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    a, b = Permutation(1000, key=1), Permutation(1000, key=2)
    assert [a(i) for i in range(20)] != [b(i) for i in range(20)]
    big = Permutation(100_000_000, key=3)  # no table: as cheap at 100M as at 10
    assert len({big(i) for i in range(10_000)}) == 10_000


def test_mixture_shares_of_sequences_within_one_point_over_10000():
    mix = Mixture([900, 700, 300], [45, 45, 10], seed=3)
    for start in (0, 12_345):
        src = np.array([mix.locate(g)[0] for g in range(start, start + 10_000)])
        shares = np.bincount(src, minlength=3) / len(src)
        assert np.abs(shares - [0.45, 0.45, 0.10]).max() <= 0.01
    assert mix.draws(0, 10_000) == sum(mix.locate(g)[0] == 0 for g in range(10_000))


def test_mixture_epochs_visit_every_sequence_once_in_a_fresh_order():
    mix = Mixture([50, 10], [5, 1], seed=0, block=6)
    seen: dict[tuple[int, int], list[int]] = {}
    for g in range(600):
        s, e, j = mix.locate(g)
        seen.setdefault((s, e), []).append(j)
    for (s, _), js in seen.items():
        n = (50, 10)[s]
        if len(js) == n:
            assert sorted(js) == list(range(n))
    assert seen[(1, 0)] != seen[(1, 1)]  # each epoch has its own permutation
    assert mix.epochs(600) == [10.0, 10.0]


def test_realised_shares_of_sequences_and_tokens_match_the_weights(world):
    cfg = tiny_config(world, "data.packing.seq_len=384", "data.packing.max_images=16", "train.batch_size=100")
    stream = DataStream(cfg, load_tokenizer(cfg))
    seqs = np.zeros(3)
    tokens = np.zeros(3)
    for g in range(10_000):
        s, _, j = stream.mixture.locate(g)
        seqs[s] += 1
        tokens[s] += (stream.sources[stream.names[s]].sequence(j).doc_ids >= 0).sum()
    weights = np.array([0.45, 0.45, 0.10])
    assert np.abs(seqs / seqs.sum() - weights).max() <= 0.01
    assert np.abs(tokens / tokens.sum() - weights).max() <= 0.01  # sequences are ~equally full


def test_step_batches_are_a_pure_function_of_step(world):
    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    a, b = DataStream(cfg, tok), DataStream(cfg, tok)
    for step in (7, 0, 3):  # any order, fresh stream: same contents
        x, y = a.batch(step), b.batch(step)
        assert torch.equal(x.tokens_BT, y.tokens_BT) and torch.equal(x.labels_BT, y.labels_BT)
        assert (x.images_NCHW is None and y.images_NCHW is None) or torch.equal(x.images_NCHW, y.images_NCHW)
    assert not torch.equal(a.batch(1).tokens_BT, a.batch(2).tokens_BT)


def test_ranks_and_workers_partition_the_stream(world):
    cfg = tiny_config(world, "train.batch_size=4")
    stream = DataStream(cfg, load_tokenizer(cfg))
    single = [stream.batch(s) for s in range(6)]
    for world_size in (2, 4):
        for s in range(6):
            parts = [stream.batch(s, r, world_size) for r in range(world_size)]
            assert torch.equal(torch.cat([p.tokens_BT for p in parts]), single[s].tokens_BT)
    rows = [g for s in range(6) for r in range(2) for g in stream.rows(s, r, 2)]
    assert sorted(rows) == list(range(24))  # no duplicates, no gaps
    loader = make_loader(stream, start=2, stop=6, num_workers=2)
    got = list(loader)
    assert [b.step for b in got] == [2, 3, 4, 5]
    for b in got:
        assert torch.equal(b.tokens_BT, single[b.step].tokens_BT)


def test_every_image_slot_has_its_image_and_labels_skip_images(world):
    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    stream = DataStream(cfg, tok)
    for step in range(5):
        batch = stream.batch(step)
        slots = int((batch.tokens_BT == tok.image_id).sum())
        n = 0 if batch.images_NCHW is None else batch.images_NCHW.shape[0]
        assert slots == n * cfg.model.connector.num_tokens
        assert not (batch.labels_BT == tok.image_id).any()


def test_held_out_scenes_never_repeat_training_scenes():
    import random

    scenes = SceneSource()
    rng = random.Random(0)
    train = {scenes.train(rng).signature() for _ in range(300)}
    held = {scenes.held_out(random.Random(1)).signature() for _ in range(50)}
    assert not train & held


def test_world_is_deterministic_in_the_seed(tmp_path):
    from conftest import SMALL_WORLD
    from mm1.config import SynthConfig
    from mm1.data.synth.writer import write_world

    small = SynthConfig(**{**SMALL_WORLD.__dict__, "captions": 40, "interleaved": 10, "text": 5, "sft": 10,
                           "sft_text": 5, "eval_scenes": 5})
    a = write_world(tmp_path / "a", seed=5, sizes=small, workers=1)
    b = write_world(tmp_path / "b", seed=5, sizes=small, workers=2)  # rendering in 2 processes: the same bytes
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_junk_pages_change_no_other_part_of_the_world_and_describe_none_of_their_pictures(tmp_path):
    """The junk part is written last from its own stream: a world with it is the world without it plus junk/."""
    from conftest import SMALL_WORLD
    from mm1.config import SynthConfig
    from mm1.data.formats.interleaved import ObelicsParquet
    from mm1.data.synth.writer import write_world

    small = SynthConfig(**{**SMALL_WORLD.__dict__, "captions": 40, "interleaved": 10, "text": 5, "sft": 10,
                           "sft_text": 5, "eval_scenes": 5})
    a = write_world(tmp_path / "a", seed=5, sizes=small, workers=1)
    b = write_world(tmp_path / "b", seed=5, sizes=SynthConfig(**{**small.__dict__, "junk": 30}), workers=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "world.json")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "world.json")
    assert files_a == [f for f in files_b if f.parts[0] != "junk"]
    assert all((a / rel).read_bytes() == (b / rel).read_bytes() for rel in files_a)
    docs = ObelicsParquet(b / "junk" / "docs.parquet")
    assert len(docs) == 30
    pages = [docs.read(i).parts for i in range(len(docs))]
    assert all(isinstance(p[0], str) and " | " in p[0] for p in pages)  # every page opens with a menu
    assert 0 < sum(any(not isinstance(x, str) for x in p) for p in pages) < len(pages)  # some have pictures


def test_world_caption_styles_follow_the_vecap_share(world):
    """MM1's captions are 2B alt-text and 300M VeCap pairs: the world writes 13% dense captions."""
    from mm1.data.formats.webdataset import WebDatasetShard

    styles = []
    for shard in sorted((world / "captions").glob("*.tar")):
        reader = WebDatasetShard(shard)
        styles += [reader.read(i).caption.startswith("An image with ") for i in range(len(reader))]
    assert len(styles) == 600 and abs(sum(styles) / len(styles) - 0.13) < 0.04


def test_world_can_mix_in_real_text(tmp_path, shared):
    from conftest import SMALL_WORLD
    from mm1.config import SynthConfig
    from mm1.data.formats.text import TextJsonl
    from mm1.data.synth.writer import write_world

    small = SynthConfig(**{**SMALL_WORLD.__dict__, "captions": 10, "interleaved": 4, "text": 5, "sft": 4,
                           "sft_text": 2, "eval_scenes": 3,
                           "real_text": str(shared / "wikitext2_tokenized" / "valid.txt")})
    root = write_world(tmp_path, seed=0, sizes=small)
    reader = TextJsonl(root / "text" / "docs.jsonl")
    docs = [reader.read(i).text for i in range(len(reader))]
    assert len(docs) == 10 and any("Homarus" in d for d in docs)


def test_sft_sub_image_decomposition_and_text_only_conversations(world):
    cfg = tiny_config(world, "train.stage=sft", "data.sub_image_grid=2", "data.packing.seq_len=384",
                      "data.packing.max_images=12", "train.batch_size=8")
    tok = load_tokenizer(cfg)
    stream = DataStream(cfg, tok)
    assert stream.names == ["sft", "sft_text"]
    batch = stream.batch(0)
    n_views = batch.images_NCHW.shape[0]
    slots = int((batch.tokens_BT == tok.image_id).sum())
    assert n_views % 5 == 0 and slots == n_views * cfg.model.connector.num_tokens  # overview + 2×2 crops
    sources = {int(s) for s in batch.source_BT[batch.doc_ids_BT >= 0]}
    assert sources <= {0, 1}
    text_rows = [i for i in range(8) if stream.mixture.locate(stream.rows(0, 0, 1)[i])[0] == 1]
    for i in text_rows:
        assert batch.images_per_row[i] == 0 and tok.user_id in batch.tokens_BT[i].tolist()


def test_caption_data_in_sft_becomes_a_captioning_conversation(world):
    from mm1.data.template import CAPTION_PROMPT

    cfg = tiny_config(world, "train.stage=sft", "data.sft_sources.sft.weight=0", "data.sft_sources.sft_text.weight=0",
                      "data.sft_sources.caps.kind=caption", "data.sft_sources.caps.paths={root}/captions/*.tar",
                      "data.sft_sources.caps.weight=1")
    tok = load_tokenizer(cfg)
    batch = DataStream(cfg, tok).batch(0)
    row, labels, docs = batch.tokens_BT[0], batch.labels_BT[0], batch.doc_ids_BT[0]
    first = row[docs == 0].tolist()
    assert first[0] == tok.user_id and tok.assistant_id in first  # <|user|> image prompt <|end|><|assistant|>…
    text = tok.decode(first)
    assert CAPTION_PROMPT in text
    # the loss falls on the caption and its <|end|>, never on the prompt or the image
    targets = labels[docs == 0]
    predicted = tok.decode(targets[targets >= 0].tolist())
    assert CAPTION_PROMPT not in predicted and predicted.strip() and predicted.strip() in text


def test_engine_sees_images_as_the_sft_model_was_trained(world):
    from PIL import Image

    from mm1.model.mllm import MLLM
    from mm1.serve.engine import Engine
    from mm1.train.lm import resolve_model_config

    cfg = tiny_config(world, prepared=False)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    engine = Engine(MLLM(cfg.model), tok, sub_image_grid=2)
    enc = engine.encode([Image.new("RGB", (100, 80)), "what?"])
    assert len(enc.images) == 5 and enc.ids.count(tok.image_id) == 5 * cfg.model.connector.num_tokens


def test_control_token_lookalikes_reach_training_as_text(world, tmp_path):
    """A web page with `<image>` in its text and a caption with `<|endoftext|>`: no extra slot, no crash."""
    import random

    from mm1.data.formats.interleaved import write_obelics
    from mm1.data.formats.webdataset import write_shards
    from mm1.data.synth.scene import png_bytes, render, sample_scene
    from mm1.train.trainer import train

    rng = random.Random(0)
    pngs = [png_bytes(render(sample_scene(rng), 64)) for _ in range(4)]
    (tmp_path / "img.png").write_bytes(pngs[0])
    write_shards([(f"{i}", pngs[i], "png", f"alt <image> text <|endoftext|> {i}", None) for i in range(4)],
                 tmp_path / "caps")
    write_obelics([(["Use the <image> tag like this: <image>", None, "<|user|> hi"], [None, "img.png", None])] * 4,
                  tmp_path / "docs" / "d.parquet")
    cfg = tiny_config(world, f"data.caption_shards={tmp_path}/caps/*.tar",
                      f"data.interleaved_shards={tmp_path}/docs/*.parquet", "data.mixture.text=0",
                      "train.steps=2", "model.decoder.depth=1", "model.vision.depth=1")
    tok = load_tokenizer(cfg)
    batch = DataStream(cfg, tok).batch(0)
    assert int((batch.tokens_BT == tok.image_id).sum()) == batch.images_NCHW.shape[0] * 16
    assert np.isfinite(train(cfg, out=tmp_path / "run")["loss"])


def test_word_size_sets_the_printed_words_height_and_nothing_else():
    """`data.synth.word_size` (the world's text legibility, for the resolution finding) scales the word only."""
    import random

    import numpy as np

    from mm1.data.synth.scene import WORD_SIZE, Scene, render, sample_scene

    scene = sample_scene(random.Random(0), word_prob=1.0)
    small, default, big = (np.asarray(render(scene, 128, w), dtype=np.int16) for w in (0.05, WORD_SIZE, 0.15))
    assert (default == np.asarray(render(scene, 128), dtype=np.int16)).all()
    no_word = np.asarray(render(Scene(scene.shapes, scene.background, None), 128), dtype=np.int16)
    inked = [int((a != no_word).any(-1).sum()) for a in (small, default, big)]
    assert 0 < inked[0] < inked[1] < inked[2]  # more pixels carry the word as it grows
    assert (small[:96] == default[:96]).all() and (default[:96] == big[:96]).all()  # the shapes above it stay
