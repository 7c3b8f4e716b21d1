"""Tokenizing, packing, the mixture and the exactly reproducible stream."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mm1.data.loader import DataStream, load_tokenizer, make_loader
from mm1.data.mixture import Mixture
from mm1.data.packing import IGNORE, best_fit, build_sequence, split_chunks, tokenize
from mm1.data.sample import ImageRef, Sample, Source, Text
from mm1.data.synth.writer import SceneSource
from mm1.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(world) -> Tokenizer:
    return Tokenizer.from_file(world / "tokenizer.json")


def test_special_tokens_and_chat_template(tok):
    assert (tok.pad_id, tok.eos_id, tok.image_id) == (0, 1, 2)
    ids = tok.encode("<|user|>hi<|end|><|assistant|>")
    assert ids[0] == tok.user_id and tok.assistant_id in ids and tok.end_id in ids


def test_loss_never_on_images_or_user_turns(tok):
    img = ImageRef(where="x", data=b"")
    sample = Sample(Source.SFT, [Text("<|user|>", False), img, Text("question?<|end|><|assistant|>", False),
                                 Text("answer<|end|>", True)])
    t = tokenize(sample, tok, image_tokens=4)
    assert (t.tokens == tok.image_id).sum() == 4
    assert not t.loss[t.tokens == tok.image_id].any()
    answer = tok.encode("answer<|end|>")
    assert t.loss.sum() == len(answer) + 1  # the answer, its end token and the final EOS
    (c,), dropped = split_chunks(t, seq_len=64, max_images=2, block=4)
    seq = build_sequence([(t, c, 3, "x")], seq_len=64, pad_id=tok.pad_id)
    targets = seq.labels[seq.labels != IGNORE]
    assert targets.tolist() == [*answer, tok.eos_id] and dropped == 0


def test_long_samples_split_at_text_never_through_an_image(tok):
    segs = []
    for i in range(6):
        segs += [ImageRef(where=str(i)), Text(" word" * 30)]
    t = tokenize(Sample(Source.INTERLEAVED, segs), tok, image_tokens=16)
    chunks, dropped = split_chunks(t, seq_len=64, max_images=2, block=16)
    assert dropped == 0 and sum(c.length for c in chunks) == len(t.tokens)
    for c in chunks:
        assert c.length <= 64 and c.num_images <= 2
        for s in t.image_starts:  # an image block lies wholly inside or wholly outside a chunk
            assert (s + 16 <= c.start) or (s >= c.end) or (c.start <= s and s + 16 <= c.end)
    chunks, dropped = split_chunks(t, seq_len=12, max_images=2, block=16)
    assert dropped == 6 and all(c.num_images == 0 for c in chunks)


def test_document_mask_ids_and_positions(tok):
    a = tokenize(Sample(Source.TEXT, [Text("first doc")]), tok, image_tokens=4)
    b = tokenize(Sample(Source.TEXT, [Text("second one")]), tok, image_tokens=4)
    ca, _ = split_chunks(a, seq_len=32, max_images=1, block=4)
    cb, _ = split_chunks(b, seq_len=32, max_images=1, block=4)
    seq = build_sequence([(a, ca[0], 2, "a"), (b, cb[0], 2, "b")], seq_len=32, pad_id=0)
    n_a = len(a.tokens)
    assert seq.doc_ids[:n_a].tolist() == [0] * n_a and seq.positions[n_a] == 0
    assert seq.labels[n_a - 1] == IGNORE  # no prediction across documents
    assert (seq.doc_ids[n_a + len(b.tokens):] == -1).all()


def test_best_fit_respects_length_and_image_caps():
    lengths = np.array([50, 50, 30, 70, 20, 90])
    images = np.array([1, 1, 0, 2, 0, 1])
    bins, left = best_fit(lengths, images, bins=2, seq_len=100, max_images=2)
    for b in bins:
        assert lengths[b].sum() <= 100 and images[b].sum() <= 2
    assert sorted([i for b in bins for i in b] + left) == list(range(6))


def test_mixture_shares_within_one_point_over_10000_samples():
    mix = Mixture([900, 700, 300], [45, 45, 10], seed=3)
    for start in (0, 12_345):
        src = np.array([s for s, _ in mix.positions(start, start + 10_000)])
        shares = np.bincount(src, minlength=3) / len(src)
        assert np.abs(shares - [0.45, 0.45, 0.10]).max() <= 0.01


def test_mixture_epochs_visit_every_record_once():
    mix = Mixture([50], [1.0], seed=0, block=10)
    recs = [r for _, r in mix.positions(0, 100)]
    assert sorted(recs[:50]) == list(range(50)) and sorted(recs[50:]) == list(range(50))


def test_packed_stream_efficiency_and_realised_mixture(world):
    cfg = tiny_config(world, "data.packing.seq_len=384", "data.packing.max_images=12")
    stream = DataStream(cfg, load_tokenizer(cfg))
    report = stream.block_report(0)
    assert report["efficiency"] >= 0.97 and report["left_over"] < 0.06
    src = [s for seq in stream.plan_block(0) for s, _, c in seq if c == 0]
    shares = np.bincount(src, minlength=3) / len(src)
    assert np.abs(shares - [0.45, 0.45, 0.10]).max() <= 0.02


def test_step_batches_are_a_pure_function_of_step(world):
    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    a, b = DataStream(cfg, tok), DataStream(cfg, tok)
    for step in (7, 0, 3):  # any order, fresh stream: same contents
        x, y = a.batch(step), b.batch(step)
        assert torch.equal(x.tokens_BT, y.tokens_BT) and torch.equal(x.images_NCHW, y.images_NCHW)
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


def test_corrupt_images_in_a_shard_are_skipped_and_counted(world, tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(world / "captions" / "00000.tar") as src, tarfile.open(shard, "w") as dst:
        for k, m in enumerate(m for m in src if m.isfile()):
            data = src.extractfile(m).read()
            if m.name.endswith(".png") and k % 9 == 0:
                data = data[:20]  # truncated image
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    cfg = tiny_config(world, f"data.caption_shards={shard}", "data.mixture.interleaved=0", "data.mixture.text=0")
    stream = DataStream(cfg, load_tokenizer(cfg))
    skipped = sum(n for s in range(8) for k, n in stream.batch(s).skipped.items() if "left over" not in k)
    assert skipped > 0
    assert stream.stats.skipped_by_source()["caption"] == skipped
    assert any(str(shard) in r or "cannot decode" in r for (_, r) in stream.stats.skipped)


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
                           "eval_scenes": 5})
    a, b = write_world(tmp_path / "a", seed=5, sizes=small), write_world(tmp_path / "b", seed=5, sizes=small)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_world_can_mix_in_real_text(tmp_path, shared):
    from conftest import SMALL_WORLD
    from mm1.config import SynthConfig
    from mm1.data.formats.text import read_texts
    from mm1.data.synth.writer import write_world

    small = SynthConfig(**{**SMALL_WORLD.__dict__, "captions": 10, "interleaved": 4, "text": 5, "sft": 4,
                           "eval_scenes": 3, "real_text": str(shared / "wikitext2_tokenized" / "valid.txt")})
    root = write_world(tmp_path, seed=0, sizes=small)
    docs = [t for _, t in read_texts(root / "text" / "docs.jsonl")]
    assert len(docs) == 10 and any("Homarus" in d for d in docs)


def test_sft_sub_image_decomposition(world):
    cfg = tiny_config(world, "train.stage=sft", "data.sub_image_grid=2", "data.packing.seq_len=384",
                      "data.packing.max_images=12")
    stream = DataStream(cfg, load_tokenizer(cfg))
    batch = stream.batch(0)
    n_views = batch.images_NCHW.shape[0]
    slots = int((batch.tokens_BT == load_tokenizer(cfg).image_id).sum())
    assert n_views % 5 == 0 and slots == n_views * cfg.model.connector.num_tokens  # overview + 2×2 crops
    assert (batch.source_BT[batch.doc_ids_BT >= 0] == 3).all()  # all SFT


def test_engine_sees_images_as_the_sft_model_was_trained(world):
    from PIL import Image

    from mm1.model.mllm import MLLM
    from mm1.serve.engine import Engine
    from mm1.train.trainer import resolve_model_config

    cfg = tiny_config(world)
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    engine = Engine(MLLM(cfg.model), tok, sub_image_grid=2)
    enc = engine.encode([Image.new("RGB", (100, 80)), "what?"])
    assert len(enc.images) == 5 and enc.ids.count(tok.image_id) == 5 * cfg.model.connector.num_tokens
