#!/usr/bin/env bash
# All GPU checks and the full-size benchmark table in one call (about 8 minutes on one H100):
#   1. the GPU-only tests (bf16 forward/backward of every network, regional compile = eager, one-GPU DDP)
#   2. bench.py at full size: stage 1 (1B student + InternViT-6B + VideoMAEv2-g, batch 16) eager with
#      fp32 and bf16 teachers, then compiled; stage 2 (1B + BERT-large, 4 frames, 80% masking);
#      stage 3 (1B at 8 frames + Q-Former base + Mistral-7B, LoRA); the data loader at 224 px
#   3. results: $OUT/bench.jsonl (one JSON line per run), $OUT/gpu_check.log, $OUT/pytest.log
#
#     OUT=results bash scripts/gpu_check.sh
# Each benchmark has its own time limit, so one that hangs or runs out of memory costs only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
J="$OUT/bench.jsonl"
: > "$J"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
DEADLINE=${DEADLINE:-550}   # seconds: a benchmark that would end past it gets what is left, or is skipped
bench() {   # bench <time limit s> <args...>
    local limit=$1; shift
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then say "skipped (deadline): $*"; return; fi
    say "bench (limit ${limit}s) $*"
    timeout "$limit" $PY bench.py --out="$J" "$@" 2>&1 | grep -v "it/s\]" | tail -n 45 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || say "  -> exit code $rc"
}

say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
say "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

if [ -z "${SKIP_TESTS:-}" ]; then
    say "GPU tests"
    timeout 120 $PY -m pytest -q tests/test_gpu.py 2>&1 | tail -n 30 > "$OUT/pytest.log"
    say "  $(tail -n 1 "$OUT/pytest.log")"
fi

S1="--stage=1 --preset=1B --clip_teacher=internvit-6b --mae_teacher=videomae-g --batch_size=16 --steps=5 --warmup=2"
bench 170 $S1 --compile --profile
bench 120 --stage=2 --preset=1B --text=bert-large --batch_size=64 --steps=5 --warmup=2 --compile --profile
bench 150 --stage=3 --preset=1B --qformer=base --llm=mistral-7b --batch_size=8 --grad_ckpt_blocks=40 \
    --steps=4 --warmup=2 --compile --profile
bench 50 $S1
bench 40 --stage=loader --data=/tmp/frames224 --make_frames=96 --img_size=224 --batch_size=8 \
    --loader_batches=10 --workers=1,4,8,15
bench 100 $S1 --compile --teacher_dtype=float8     # FP8 teachers: clips/s and the fidelity figures (issue 15)
say "done"
