#!/usr/bin/env bash
# The GPU figures docs/benchmarks.md waits for, in one bounded call on one H100 / H200:
#
#   bash bench/gpu_session.sh            # writes under $OUT (default bench/results/gpu)
#
# Each benchmark runs under its own time limit, the most wanted first, so a short lease still
# brings back the first ones: serving (ours vs HF generate at 1 / 8 / 32 streams on the 0.3B), then
# serving with the decode step compiled (CUDA graphs) at 32 streams, also with prompts gathered for 8
# and 16 decode steps (serve.prompt_wait_steps), then the pretraining step (eager and compiled, ours
# vs HF). Needs torch with CUDA, transformers, numpy and tokenizers; not Ray,
# MLflow or Hydra (the benchmarks import only ernie/ and the stage kernels). Limits in seconds:
# SERVE_S (each serving run), PRETRAIN_S; about 9 minutes in all.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
summary="$OUT/summary.txt"
: > "$summary"

step() {  # name limit command...: its output to $OUT/name.log, its exit status and seconds to summary.txt
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$summary"
}

{ nvidia-smi; $PY -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
step serve_load "${SERVE_S:-180}" $PY bench/serve_load.py --device cuda --out "$OUT/serve_load.json"
step serve_load_compiled "${SERVE_S:-180}" $PY bench/serve_load.py --device cuda --compile --streams 32 \
    --prompt-wait-steps 8 --prompt-wait-steps 16 --out "$OUT/serve_load_compiled.json"
step pretrain_mfu "${PRETRAIN_S:-200}" $PY bench/pretrain_mfu.py --compile --profile --out "$OUT/pretrain_mfu.json"
