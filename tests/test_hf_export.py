"""`mm1 export --hf`: the whole model as a transformers folder, loaded where mm1 is not installed.

Each variant (the three connectors, an MoE decoder, an SFT model that sees sub-images) is a random model
moved off its initialisation (so a wrong weight map shows), exported, then loaded by
`AutoModelForImageTextToText` and `AutoProcessor` in one subprocess whose path has no mm1. The processor's
ids must equal mm1's engine's, the logits of every position agree within 1e-4, and greedy `generate()`
gives mm1's tokens, on prompts with two images.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from hf_loader import mm1_prompt, run_transformers

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "c_abstractor": (),
    "avg_pool": ("model.connector.kind=avg_pool",),
    "attention_pool": ("model.connector.kind=attention_pool",),
    "moe": ("model.moe.num_experts=4", "model.moe.every=2", "model.decoder.ffn_hidden=256"),
    "sft_sub_images": ("data.sub_image_grid=2",),
}
QUESTION = "What color is the big shape?"
PRETRAIN_PROMPT = "<image>Photo 1: a small red circle. <image>Photo 2:"



def _model(world: Path, overrides: tuple[str, ...], *, sft: bool):
    from mm1.config import Stage, apply_overrides
    from mm1.data.tokenizer import Tokenizer
    from mm1.model.mllm import MLLM
    from mm1.recipes import get_recipe

    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={world}", f"model.decoder.vocab_size={len(tok)}",
                                               f"model.image_token_id={tok.image_id}", *overrides])
    if sft:
        cfg.train.stage = Stage.SFT
    torch.manual_seed(len(overrides))
    model = MLLM(cfg.model).eval()
    with torch.no_grad():  # off the initialisation: norms away from 1, biases from 0, weights larger
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    return model, tok, cfg


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    """Every variant exported, and what transformers made of it (one subprocess, mm1 off its path)."""
    from PIL import Image

    from mm1.store.transformers import export_transformers

    root = tmp_path_factory.mktemp("hf_export")
    images = sorted((world / "tasks" / "synth_vqa" / "images").glob("*.png"))[:2]
    jobs, ours = [], {}
    for name, overrides in VARIANTS.items():
        sft = name.startswith("sft")
        model, tok, cfg = _model(world, overrides, sft=sft)
        # the MoE variant is cut into 1 MiB shards, the way a large model is (with an index)
        export_transformers(model, cfg, tok, root / name, max_shard_bytes=2**20 if name == "moe" else 2**30)
        text = QUESTION if sft else PRETRAIN_PROMPT
        ours[name] = (model, tok, cfg, mm1_prompt(text, [Image.open(p).convert("RGB") for p in images],
                                                  chat=sft, tok=tok))
        jobs.append({"name": name, "folder": str(root / name), "images": [str(p) for p in images], "text": text,
                     "chat": sft})
    return root, ours, run_transformers(jobs, root), [str(p) for p in images]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_generates_what_mm1_generates(exported, name):
    from mm1.serve.engine import Engine, GenerationConfig

    root, ours, theirs, _ = exported
    model, tok, cfg, prompt = ours[name]
    hf = theirs[name]
    engine = Engine.for_run(model, tok, cfg)
    encoded = engine.encode(prompt)
    assert hf["class"] == "MM1ForConditionalGeneration"
    assert hf["prompt"].tolist() == encoded.ids  # the processor (and chat template) prepare mm1's very ids
    views = 5 if name.startswith("sft") else 1  # an overview and 2×2 crops
    assert hf["tokens_per_image"] == cfg.model.connector.num_tokens * views
    assert hf["image_token_id"] == tok.image_id and encoded.ids.count(tok.image_id) == 2 * hf["tokens_per_image"]
    with torch.no_grad():
        logits = model(tokens_BT=torch.tensor([encoded.ids]), images_NCHW=torch.stack(encoded.images),
                       return_logits=True).logits_BTV[0]
    assert (logits - hf["logits"]).abs().max() <= 1e-4
    assert hf["attn"] == "sdpa" and hf["eager_attn"] == "eager"  # what the decoder's attention layers read
    assert (logits - hf["eager_logits"]).abs().max() <= 1e-4
    ids = engine.generate_ids([prompt], GenerationConfig(max_new_tokens=12))[0]
    stops = set(json.loads((root / name / "config.json").read_text())["eos_token_id"])
    theirs_ids = hf["ids"].tolist()
    assert theirs_ids[: len(ids)] == ids and (len(theirs_ids) == len(ids) or theirs_ids[len(ids)] in stops)
    assert len(ids) > 0


def test_export_loads_back_into_mm1_bit_for_bit(exported):
    from mm1.store.loading import describe_checkpoint, load_model

    root, ours, _, _ = exported
    for name in ("moe", "sft_sub_images"):  # sharded, and tied with mm1's chat template
        model, tok, cfg, _ = ours[name]
        again, tok2, cfg2 = load_model(root / name)
        assert again.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(v, again.state_dict()[k]), k
        assert tok2.chat_template is None and tok2.fingerprint == tok.fingerprint  # mm1's own template
        assert cfg2.train.stage == cfg.train.stage and cfg2.data.sub_image_grid == cfg.data.sub_image_grid
        assert describe_checkpoint(root / name)["kind"] == "mm1 export (transformers)"
    files = {p.name for p in (root / "moe").iterdir()}
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(sorted(files))
    assert {"modeling_mm1.py", "configuration_mm1.py", "processing_mm1.py", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "tokenizer.json"} <= files


def test_remote_files_import_nothing_of_mm1():
    from mm1.store.transformers import REMOTE, REMOTE_FILES

    for name in REMOTE_FILES:
        source = (REMOTE / name).read_text()
        assert "import mm1" not in source and "from mm1" not in source, name


def test_cli_export_hf_and_init_from_it(world, tmp_path):
    """`mm1 export --hf` on a trained run; `--init-from` the export starts from its weights exactly."""
    from conftest import tiny_config
    from mm1.cli import main
    from mm1.store.loading import load_model
    from mm1.train.lm import init_weights
    from mm1.train.trainer import train

    cfg = tiny_config(world, "train.steps=1", "train.batch_size=2")
    train(cfg, out=tmp_path / "run")
    assert main(["export", "--hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    ours, _, _ = load_model(tmp_path / "run")
    fresh, _, _ = load_model(tmp_path / "run")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    init_weights(fresh, cfg, tmp_path / "hf")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    again = tiny_config(world, "train.steps=1", "train.batch_size=2")
    train(again, out=tmp_path / "next", init_from=str(tmp_path / "hf"))  # the trainer accepts the folder
    assert (tmp_path / "next" / "checkpoints").exists()


def test_average_pooling_is_idefics3_pixel_shuffle_with_the_projection_tiled():
    """MM1's average-pooling connector is a standard one: Idefics3's (served natively by vLLM) with the
    projection tiled, when its bias is zero (Idefics3's projection has none)."""
    from transformers.models.idefics3.configuration_idefics3 import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    from mm1.config import ConnectorConfig, ConnectorKind
    from mm1.model.connector import AvgPoolConnector
    from mm1.store.transformers import pixel_shuffle_weight

    vision_width, width, grid, scale = 32, 48, 8, 2
    ours = AvgPoolConnector(vision_width, width, ConnectorConfig(kind=ConnectorKind.AVG_POOL,
                                                                 num_tokens=(grid // scale) ** 2))
    with torch.no_grad():
        ours.proj.bias.zero_()
    cfg = Idefics3Config(scale_factor=scale, vision_config={"hidden_size": vision_width, "num_attention_heads": 4},
                         text_config={"hidden_size": width, "num_attention_heads": 4, "num_key_value_heads": 4})
    theirs = Idefics3Connector(cfg)
    with torch.no_grad():
        theirs.modality_projection.proj.weight.copy_(pixel_shuffle_weight(ours.proj.weight, scale))
        x_NPC = torch.randn(3, grid * grid, vision_width)
        assert (ours(x_NPC) - theirs(x_NPC)).abs().max() <= 1e-5
        ours.proj.bias.fill_(0.1)  # with a bias the two differ: the equivalence is not vacuous
        assert (ours(x_NPC) - theirs(x_NPC)).abs().max() > 1e-2


def test_layers_model_below_data_and_train_serve_below_train():
    """The room for models on disk (`mm1.store`) sits below train/serve/eval: `mm1.model` imports neither
    data nor train (nor what is above them), and inference (`mm1.serve`, `mm1.eval`) does not import train."""
    import ast

    import mm1

    root = Path(mm1.__file__).parent
    rules = {"model": ("mm1.data", "mm1.train", "mm1.serve", "mm1.eval", "mm1.store"),
             "serve": ("mm1.train",), "eval": ("mm1.train",), "store": ("mm1.train", "mm1.serve", "mm1.eval")}
    broken = []
    for package, banned in rules.items():
        for file in (root / package).rglob("*.py"):
            if "remote" in file.parts:
                continue
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                broken += [f"{file.relative_to(root)} imports {n}" for n in names if n.startswith(banned)]
    assert broken == []


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"

VLLM_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: `-c` cannot spawn
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from PIL import Image
from vllm import LLM, SamplingParams

folder, job = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=folder, trust_remote_code=True, model_impl="transformers", dtype="float32", max_model_len=512,
          enforce_eager=True, limit_mm_per_prompt={"image": 2})
kind = llm.apply_model(lambda m: type(m).__name__)[0]
images = [Image.open(p).convert("RGB") for p in job["images"]]
out = llm.generate([{"prompt": job["text"], "multi_modal_data": {"image": images}}],
                   SamplingParams(max_tokens=12, temperature=0.0, logprobs=1))[0]
ids = list(out.outputs[0].token_ids)
logprobs = [step[i].logprob for step, i in zip(out.outputs[0].logprobs, ids)]
print("RESULT " + json.dumps({"ids": ids, "logprobs": logprobs, "prompt": list(out.prompt_token_ids),
                              "class": kind}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_vllm_serves_the_export_through_its_transformers_backend(exported, name):
    """vLLM's CPU build (its own venv beside the CPU torch: scripts/setup_vllm.sh) runs the export with
    `model_impl="transformers"` as a multimodal model and generates mm1's greedy tokens for a two-image prompt
    (the SFT model: a chat turn, each image an overview and 2×2 sub-images)."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"vLLM's CPU build is not installed in {VLLM_PYTHON.parent.parent} (scripts/setup_vllm.sh)")
    from mm1.serve.engine import Engine, GenerationConfig

    root, ours, theirs, images = exported
    model, tok, cfg, prompt = ours[name]
    job = {"text": theirs[name]["text"], "images": images}  # the SFT model's: its chat template, rendered
    run = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_SCRIPT, str(root / name), json.dumps(job)],
                         capture_output=True, text=True, cwd=root, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    vllm = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert vllm["class"] == "TransformersMultiModalForCausalLM"  # images in, not a text-only fallback
    engine = Engine.for_run(model, tok, cfg)
    assert vllm["prompt"] == engine.encode(prompt).ids
    ids = engine.generate_ids([prompt], GenerationConfig(max_new_tokens=12))[0]
    stops = set(json.loads((root / name / "config.json").read_text())["eos_token_id"])
    assert len(ids) > 0 and vllm["ids"][: len(ids)] == ids
    assert len(vllm["ids"]) == len(ids) or vllm["ids"][len(ids)] in stops
    # and the same numbers: each generated token's log-probability, from mm1's forward over the whole sequence
    encoded = engine.encode(prompt)
    with torch.no_grad():
        logits = model(tokens_BT=torch.tensor([encoded.ids + ids]), images_NCHW=torch.stack(encoded.images),
                       return_logits=True).logits_BTV[0]
    steps = logits[len(encoded.ids) - 1: -1].log_softmax(-1)
    ours_lp = steps.gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert (ours_lp - torch.tensor(vllm["logprobs"][: len(ids)])).abs().max() <= 1e-3


def test_a_tampered_export_is_refused_in_one_line_before_anything_large_is_built(exported, tmp_path):
    """An export from elsewhere: a weight under a name no module has is named in the error; a config asking for
    100,000 layers is refused by the size check before a model is built; nothing is unpickled either way."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mm1.config import ConfigError
    from mm1.files import read_json, write_json
    from mm1.model.weights import WeightsError
    from mm1.store.loading import load_model

    root, _, _, _ = exported
    renamed = tmp_path / "renamed"
    shutil.copytree(root / "sft_sub_images", renamed)
    state = load_file(str(renamed / "model.safetensors"))
    state["model.vision.extra.weight"] = state.pop("model.vision.pos_embed")
    save_file(state, str(renamed / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing vision.pos_embed \| unexpected vision.extra.weight"):
        load_model(renamed)
    huge = tmp_path / "huge"
    shutil.copytree(root / "sft_sub_images", huge)
    cfg = read_json(huge / "mm1_config.json")
    cfg["model"]["decoder"]["depth"] = 100000
    write_json(huge / "mm1_config.json", cfg)
    with pytest.raises(ConfigError, match=r"model.decoder.depth=100000, .*B parameters"):
        load_model(huge)
