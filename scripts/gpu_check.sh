#!/usr/bin/env bash
# The device checks of a GPU machine, in two calls (see scripts/gpu_kv_recall.sh for what gpu_carry holds):
#   bash scripts/gpu_check.sh passes OUT   # carry gpu_carry/a: every pass's CUDA path against its CPU path
#   bash scripts/gpu_check.sh recall OUT   # carry gpu_carry/b (a stays): benchmarks/kv_recall.py on SmolLM2
set -euo pipefail
cd "$(dirname "$0")/.."
out="${2:-${OUT:-gpu_out}}"
mkdir -p "$out"
case "${1:-}" in
    passes)
        site=/tmp/site-passes
        rm -rf "$site"
        wheels=$(ls gpu_carry/a/wheels/*.whl | grep -v -e '/transformers-' -e '/kvpress-')  # the machine's transformers
        python3 -m pip install -q --no-index --no-deps --target "$site" $wheels
        PYTHONPATH="$site:$PWD:$PWD/gpu_carry/a/stubs" LLMSURGERY_CACHE=/tmp/llmsurgery-cache HF_HUB_OFFLINE=1 \
            TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 python3 scripts/gpu_passes.py /tmp/gpu-passes 2>&1 \
            | grep -v -e 'Loading weights' -e 'Writing model' -e '^$' | tee "$out/gpu_passes.txt"
        ;;
    recall)
        timeout "${LIMIT:-480}" env LENGTHS="${LENGTHS:-1024,2048}" TRAIN_STEPS="${TRAIN_STEPS:-300}" \
            bash scripts/gpu_kv_recall.sh run "$out" || echo "kv_recall stopped with $? (the JSON holds the steps it finished)"
        ;;
    *) echo "usage: $0 passes|recall [OUT]" >&2; exit 2 ;;
esac
