#!/usr/bin/env bash
# Start the whole remote deployment on one GPU machine: export -> two vLLM pools -> the app.
#
#   deploy/start.sh [CHECKPOINT]     CHECKPOINT: a Metis-HOME folder or Hub id; without one, a
#                                    full-size random-weight model is made first (a rehearsal).
# Environment (defaults in brackets):
#   OUT [runs/deploy]                where the checkpoint and the exports go
#   GPUS [one]                       "one": both pools share GPU 0 (memory split below);
#                                    "two": the thinking pool on GPU 0, the direct pool on GPU 1
#   THINK_MEM [0.55] DIRECT_MEM [0.35]  --gpu-memory-utilization of each pool when sharing a GPU
#   THINK_PORT [8001] DIRECT_PORT [8002] APP_PORT [7860]
#   MAX_MODEL_LEN [16384]
# Needs: pip install -r requirements.txt vllm (vLLM's CUDA wheel pins its own torch: use a separate
# virtual environment for the pools, e.g. VLLM=/opt/vllm-venv/bin/vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/deploy}; GPUS=${GPUS:-one}; VLLM=${VLLM:-vllm}
THINK_PORT=${THINK_PORT:-8001}; DIRECT_PORT=${DIRECT_PORT:-8002}; APP_PORT=${APP_PORT:-7860}
THINK_MEM=${THINK_MEM:-0.55}; DIRECT_MEM=${DIRECT_MEM:-0.35}; MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
mkdir -p "$OUT"

CHECKPOINT=${1:-}
if [[ -z "$CHECKPOINT" ]]; then
  CHECKPOINT="$OUT/random-metis-home"
  [[ -f "$CHECKPOINT/config.json" ]] || python deploy/random_checkpoint.py "$CHECKPOINT"
fi
[[ -f "$OUT/experts/router/config.json" ]] || python -m metis export-experts "$CHECKPOINT" "$OUT/experts"

pool() {  # name port gpu memory-fraction
  CUDA_VISIBLE_DEVICES=$3 "$VLLM" serve "$OUT/experts/$1" --served-model-name "metis-$1" \
    --host 127.0.0.1 --port "$2" --dtype bfloat16 --gpu-memory-utilization "$4" \
    --max-model-len "$MAX_MODEL_LEN" --reasoning-parser deepseek_r1 \
    --limit-mm-per-prompt '{"image": 8, "video": 0}' --enable-prefix-caching \
    > "$OUT/$1.log" 2>&1 &
  echo $! > "$OUT/$1.pid"
}
if [[ "$GPUS" == "two" ]]; then
  pool think "$THINK_PORT" 0 0.90
  pool direct "$DIRECT_PORT" 1 0.90
else
  pool think "$THINK_PORT" 0 "$THINK_MEM"
  sleep 60  # two vLLM instances profiling one GPU at the same moment misjudge the free memory
  pool direct "$DIRECT_PORT" 0 "$DIRECT_MEM"
fi
trap 'kill $(cat "$OUT/think.pid") $(cat "$OUT/direct.pid") 2>/dev/null' EXIT

for port in "$THINK_PORT" "$DIRECT_PORT"; do
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 5; done
  echo "pool on :$port is up"
done

python app.py --host 0.0.0.0 --port "$APP_PORT" --router "$OUT/experts/router" \
  --think-url "http://127.0.0.1:$THINK_PORT/v1" --direct-url "http://127.0.0.1:$DIRECT_PORT/v1"
