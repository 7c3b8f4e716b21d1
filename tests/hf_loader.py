"""Loading an `mm1 export --hf` folder the way a user without mm1 does, for the tests that compare it with mm1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# Runs with mm1 off sys.path: what a user with transformers and no mm1 runs.
LOADER = r'''
import json, sys
from pathlib import Path
sys.path = [p for p in sys.path if not (Path(p) / "mm1").is_dir()]
import importlib.util
assert importlib.util.find_spec("mm1") is None, "mm1 is importable"
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

jobs, out = json.loads(sys.argv[1]), Path(sys.argv[2])
for job in jobs:
    model = AutoModelForImageTextToText.from_pretrained(job["folder"], trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(job["folder"], trust_remote_code=True)
    text = job["text"]
    if job["chat"]:
        content = [{"type": "image"} for _ in job["images"]] + [{"type": "text", "text": text}]
        text = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
    inputs = proc(text=text, images=[Image.open(p) for p in job["images"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    # the written-out attention, as other engines' attention functions replace it, computes the same
    eager = AutoModelForImageTextToText.from_pretrained(job["folder"], trust_remote_code=True, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        eager_logits = eager(**inputs).logits[0]
    torch.save({"prompt": inputs["input_ids"][0], "logits": logits, "eager_logits": eager_logits, "ids": ids,
                "class": type(model).__name__, "attn": model.config.get_text_config()._attn_implementation,
                "eager_attn": eager.config.get_text_config()._attn_implementation,
                "image_token_id": proc.image_token_id, "tokens_per_image": proc.image_tokens_per_image(),
                "text": text}, out / (job["name"] + ".pt"))
'''


def run_transformers(jobs: list[dict], root: Path) -> dict[str, dict]:
    """Each job ({name, folder, images, text, chat}) loaded by transformers in one subprocess whose path has
    no mm1; returns, by name, its prompt ids, logits (sdpa and eager), greedy ids and processor facts."""
    run = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(root)], capture_output=True,
                         text=True, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return {job["name"]: torch.load(root / f"{job['name']}.pt", weights_only=True) for job in jobs}


def mm1_prompt(text: str, images: list, *, chat: bool, tok) -> list:
    """mm1's prompt parts for a `<image>`-marked text (pre-training format), or for a chat turn with the images."""
    from mm1.data.template import Text, template_for, user_turn

    if chat:
        return [s.text if isinstance(s, Text) else s
                for s in template_for(tok).render([user_turn(text, images)], generation_prompt=True)]
    parts: list = []
    for i, piece in enumerate(text.split("<image>")):
        parts += [images[i - 1]] if i else []
        parts += [piece] if piece else []
    return parts
