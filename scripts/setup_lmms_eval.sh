#!/usr/bin/env bash
# A separate virtual environment with lmms-eval, for scoring `mm1 serve` through lmms-eval's
# OpenAI-compatible model (docs/evaluation.md, tests/test_lmms_eval.py).
#
# lmms-eval declares torch, torchvision, timm, opencv, … as dependencies; its OpenAI-compatible model
# needs none of the heavy ones. So the CPU torch goes in first, lmms-eval without its dependencies,
# then only what it imports on that path (filelock < 4: lmms-eval 0.7.3 imports filelock._api).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-lmms}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet --no-deps "lmms-eval==0.7.3"
"$py" -m pip install --quiet datasets evaluate loguru openai httpx pyyaml jinja2 pytablewriter sacrebleu tenacity \
    transformers accelerate numpy pillow tqdm jsonlines sqlitedict dill python-dotenv "filelock<4"
"$py" -c "import lmms_eval, torch; print(f'[setup] lmms-eval ready in $venv (torch {torch.__version__})')"
