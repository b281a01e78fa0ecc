#!/usr/bin/env bash
# One prepared check of the GPU path, for one CUDA GPU without network, in at most 9 minutes
# (docs/BENCHMARKS.md, "GPU check"):
#
#   make gpu-wheels                                # beforehand, with network: the missing packages into .whl/
#   OUT=DIR PY=python3 bench/gpu_check.sh          # on the GPU machine, from a copy of the repository
#   PY=.venv/bin/python bench/gpu_check.sh --dry-run   # anywhere: the steps before the first that needs CUDA
#
# Steps (each under `timeout`, within one deadline; a failing step does not stop the next):
#   install    .whl/*.whl into /tmp/site, offline (skipped when megatron-core, DeepSpeed and webdataset import)
#   env        interpreter, torch, CUDA, GPU and package versions
#   data       a 32k tokenizer and shards of seq_len 2048 from the built-in corpora (no network there)
#   -- the first CUDA-only step; a dry run (or a machine without CUDA) stops here --
#   tests      pytest -m gpu tests/test_gpu.py (CPMTP_TEST_GPU=1)
#   train_1b   20 bf16 steps of configs/gpu_1b.yaml (ZeRO-2): tokens/s, MFU, HFU, peak memory, checkpoint time
#   resume     bf16 ZeRO-2 save -> resume: a small model, 4 steps saving at 2, resumed from 2, compared
#   decode     cpmtp bench decode --device cuda on the 1B checkpoint: autoregressive vs speculative, bf16
#   cp_loss    bench/cp_loss.py --device cuda --dtype bf16: naive vs chunked CP loss, time and memory
# Results: OUT/gpu_check.json (every step's exit status and seconds, and the numbers), OUT/gpu_check.log (all
# output), OUT/cp_loss_cuda.json, OUT/bench_decode_cuda.json, OUT/train_1b_metrics.jsonl, OUT/pytest.xml.
# Data, runs and checkpoints (≈20 GB) stay in WORK.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
OUT=${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-/tmp/cpmtp-gpu-check}
BUDGET_S=${BUDGET_S:-540}
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: [OUT=DIR] [PY=python] [WORK=DIR] [BUDGET_S=540] bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/runs" "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 CPMTP_TEST_GPU=1 CPMTP_CACHE_DIR=$WORK/cache
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
start=$(date +%s.%N)
deadline=$(($(date +%s) + BUDGET_S))
[[ $DRY_RUN == 1 ]] && touch "$WORK/DRY_RUN"

say() { echo "$*" | tee -a "$LOG"; }

# step NAME CAP_S COMMAND...: run it under `timeout` (at most CAP_S, at most what the deadline leaves), its
# output to WORK/logs/NAME.log and LOG, its exit status and wall seconds to WORK/steps.tsv.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((deadline - $(date +%s)))
    if ((left < 20)); then
        printf '%s\tskipped\t0\n' "$name" >>"$WORK/steps.tsv"
        say "== $name: skipped, ${left} s of the ${BUDGET_S} s budget left"
        return 0
    fi
    local limit=$((cap < left ? cap : left)) rc=0 t0
    say "== $name (limit ${limit} s): $*"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
    local wall
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    cat "$WORK/logs/$name.log" >>"$LOG"
    tail -n 15 "$WORK/logs/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$wall" >>"$WORK/steps.tsv"
    say "== $name: exit status $rc after $wall s$([[ $rc == 124 || $rc == 137 ]] && echo ' (its time limit)')"
}

finish() {
    "$PY" bench/gpu_check.py collect "$WORK" "$OUT" 2>&1 | tee -a "$LOG" || true
    say "== done in $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s: $OUT/gpu_check.json"
}

cli() { "$PY" -m launchers.cli "$@"; }
export -f cli
export PY

# --- CPU steps -----------------------------------------------------------------------------------------
step install 60 bash -c '
    if "$PY" -c "import megatron.core, deepspeed, webdataset" 2>/dev/null; then
        echo "megatron-core, deepspeed and webdataset import already: .whl/ not installed"
    else
        ls .whl/*.whl
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        "$PY" -c "import megatron.core, deepspeed, webdataset; print(\"installed into /tmp/site\")"
    fi'
step env 60 "$PY" bench/gpu_check.py probe "$WORK/env.json"

DATA=$WORK/data
workers=$(($(nproc) < 8 ? $(nproc) : 8))
step data 120 bash -c "
    set -e
    cli data tokenizer --input builtin:stdlib-code builtin:stdlib-prose --vocab-size 32000 --out $DATA/tokenizer
    cli data shards --input builtin:stdlib-code builtin:stdlib-prose --tokenizer $DATA/tokenizer --seq-len 2048 \
        --heldout-fraction 0.02 --shard-size-mb 8 --workers $workers --out $DATA/shards"

if [[ $DRY_RUN == 1 ]] || ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    if [[ $DRY_RUN == 1 ]]; then
        say "== dry run: stopping before the first CUDA-only step (tests)"
    else
        say "== torch sees no CUDA device: stopping before the first CUDA-only step (tests); --dry-run does this on purpose"
    fi
    finish
    [[ $DRY_RUN == 1 ]] && exit 0 || exit 1
fi

# --- CUDA steps ----------------------------------------------------------------------------------------
step tests 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --basetemp="$WORK/pytest" \
    --junitxml="$WORK/pytest.xml" tests/test_gpu.py

RUN=$WORK/runs
step train_1b 200 "$PY" -m launchers.cli train --config configs/gpu_1b.yaml --run-dir "$RUN/train_1b" \
    --tracking-uri none data.path="$DATA/shards" train.precision=bf16 train.steps=20 train.global_batch_size=16 \
    train.micro_batch_size=8 train.log_every=5 optim.warmup_steps=5 train.eval_every=0 checkpoint.every=0
cp "$RUN/train_1b/metrics.jsonl" "$OUT/train_1b_metrics.jsonl" 2>/dev/null || true

# The same bf16 ZeRO-2 code path on a small model: an uninterrupted run saves at step 2 and goes on to 4; a
# second run resumes from that step-2 checkpoint; their steps 3-4 and final weights are compared.
SMALL=(--config configs/gpu_1b.yaml --tracking-uri none data.path="$DATA/shards" train.precision=bf16
    model.trunk.num_layers=4 model.trunk.hidden_size=512 model.trunk.num_attention_heads=8
    model.trunk.ffn_hidden_size=2048 model.cp.phi_hidden_size=128 train.steps=4 train.global_batch_size=8
    train.micro_batch_size=4 train.log_every=1 train.eval_every=0 train.eval_batches=1 optim.warmup_steps=2
    optim.lr=1e-3 checkpoint.every=2 checkpoint.keep_last=2)
step resume 150 bash -c "
    set -e
    cli train --run-dir $RUN/resume_a ${SMALL[*]@Q}
    cli train --run-dir $RUN/resume_b --resume $RUN/resume_a/checkpoints/step_0000002 ${SMALL[*]@Q}"

step decode 120 "$PY" -m launchers.cli bench decode --checkpoint "$RUN/train_1b/checkpoints" --device cuda \
    --prompts 4 --max-new-tokens 64 --repeats 2 --tracking-uri none --out "$OUT/bench_decode_cuda.json"

step cp_loss 120 "$PY" bench/cp_loss.py --device cuda --dtype bf16 --max-naive-gib 40 --out "$OUT/cp_loss_cuda.json"

cp "$WORK/pytest.xml" "$OUT/pytest.xml" 2>/dev/null || true
finish
