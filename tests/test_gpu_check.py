"""scripts/gpu_check.sh, the first thing run on a lent GPU, runs here in its dry-run form: every CUDA step
says it skipped, the others (environment, a world, its tokenizer, prepared data for tiny and for the ablation
recipe) run, the summary is JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_skips_every_cuda_step_and_runs_the_rest(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert summary["dry_run"] and summary["failed"] == [], status
    on_cpu = {"environment", "world", "tokenizer", "prepare", "ablation_prepare"}
    assert {k for k, v in status.items() if v == "ok"} == on_cpu
    assert all(v == "skipped: no CUDA" for k, v in status.items() if k not in on_cpu)
    assert {"ablation_bf16_flex", "recompiles"} <= status.keys()
    assert "skipped: no CUDA" in proc.stdout and "=== summary" in proc.stdout
