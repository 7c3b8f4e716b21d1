"""lmms-eval scores `mm1 serve` as `mm1 eval` scores the same model on the same items.

Needs lmms-eval in its own virtual environment (`bash scripts/setup_lmms_eval.sh`, or
MM1_LMMS_PYTHON=path/to/python); skipped without it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LMMS_PYTHON = Path(os.environ.get("MM1_LMMS_PYTHON", ROOT / ".venv-lmms" / "bin" / "python"))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not LMMS_PYTHON.exists(), reason=f"needs lmms-eval at {LMMS_PYTHON} (bash scripts/setup_lmms_eval.sh)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lmms_eval_through_mm1_serve_equals_mm1_eval(world, tmp_path):
    from conftest import tiny_config
    from mm1.cli import main
    from mm1.train.trainer import train

    sys.path.insert(0, str(ROOT / "scripts"))
    from lmms_eval_task import write_task

    run = tmp_path / "sft"
    train(tiny_config(world, "model.decoder.depth=1", "model.vision.depth=1", "train.steps=3", "train.stage=sft",
                      "data.sub_image_grid=2"), out=run)
    n, new = 12, 6
    write_task("synth_vqa", tmp_path / "task", name="mm1_vqa", limit=n, max_new_tokens=new, world=world)
    assert main(["eval", "--checkpoint", str(run), "--tasks", "synth_vqa", "--shots", "0", "--out", str(tmp_path / "e"),
                 f"eval.limit={n}", f"eval.max_new_tokens={new}"]) == 0
    ours = json.loads((tmp_path / "e" / "results.json").read_text())["tasks"]["synth_vqa"]["scores"]["0"]
    predictions = [json.loads(x)["prediction"] for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mm1", "serve", "--checkpoint", str(run), "--port", str(port),
                               "--images-first"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [str(LMMS_PYTHON), "-m", "lmms_eval", "--model", "openai", "--model_args",
             f"model_version=sft,base_url=http://127.0.0.1:{port}/v1,api_key=-", "--include_path",
             str(tmp_path / "task"), "--tasks", "mm1_vqa", "--batch_size", "1", "--output_path",
             str(tmp_path / "lmms"), "--log_samples"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = json.loads(next((tmp_path / "lmms").rglob("*_results.json")).read_text())
    theirs = results["results"]["mm1_vqa"]["exact_match,none"]
    log = next((tmp_path / "lmms").rglob("*_samples_mm1_vqa.jsonl"))
    samples = [json.loads(x) for x in log.read_text().splitlines()]
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples}
    said = [answers[i] if isinstance(answers[i], str) else answers[i][0] for i in range(n)]
    assert [s.split("\n")[0].strip() for s in said] == predictions  # the same answer to every question
    assert theirs == pytest.approx(ours)
