#!/usr/bin/env bash
# Causal-tracing benchmark on one checkpoint: moedit cached vs naive (bench_trace) and the same trace done by the
# HF-transformers script (tools/trace_reference.py time), on the same machine, same noise, same thread count.
#
#   bench/bench_trace.sh [BUILD_DIR] [MODEL_DIR]
#
# BUILD_DIR defaults to build; MODEL_DIR defaults to a random Qwen2-MoE checkpoint (H 256, 12 layers, 16 experts
# top-4, shared expert) written once to /tmp/moedit-bench-model by tools/trace_reference.py make-model. For the demo
# model pass models/moedit-demo and set PROMPT_IDS / SUBJECT_RANGE (see below).
# THREADS (default 1) applies to both sides (OMP_NUM_THREADS / torch.set_num_threads): single-threaded CPU time is
# the steadiest comparison on a shared machine. Both wall and CPU times are printed; ratios use CPU time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
MODEL="${2:-/tmp/moedit-bench-model}"
THREADS="${THREADS:-1}"
IDS="${PROMPT_IDS:-11,203,57,981,4000,12,77,310,2048,5,640,99,1500,7}"   # 14 tokens
RANGE="${SUBJECT_RANGE:-3:6}"
OUT="${OUT:-/tmp/moedit-bench-trace}"
mkdir -p "$OUT"

if [ ! -f "$MODEL/config.json" ]; then
  echo "writing random Qwen2-MoE checkpoint to $MODEL" >&2
  python3 "$ROOT/tools/trace_reference.py" make-model --out "$MODEL" >&2
fi

echo "== moedit (bench_trace, $THREADS thread(s)) ==" >&2
OMP_NUM_THREADS=$THREADS "$BUILD/bench_trace" "$MODEL" --ids "$IDS" --subject-range "$RANGE" \
  --save-noise "$OUT/noise.safetensors" --json | tee "$OUT/moedit.json"
echo "== HF transformers (tools/trace_reference.py time, fp32, $THREADS thread(s)) ==" >&2
python3 "$ROOT/tools/trace_reference.py" time --model "$MODEL" --ids "$IDS" --subject-range "$RANGE" \
  --noise-file "$OUT/noise.safetensors" --threads "$THREADS" --dtype float32 2>/dev/null | tail -1 | tee "$OUT/hf.json"

python3 - "$OUT/moedit.json" "$OUT/hf.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1])); h = json.load(open(sys.argv[2]))
print(f"restorations: {m['restorations']} (moedit cached computes {m['computed']} distinct)")
print(f"moedit cached {m['cached_cpu_seconds']:.2f} s CPU ({m['cached_seconds']:.2f} s wall), "
      f"naive {m['naive_cpu_seconds']:.2f} s CPU ({m['naive_seconds']:.2f} s wall)")
print(f"cached/naive: CPU time {m['cpu_time_ratio']:.3f}, wall {m['time_ratio']:.3f}, FLOPs {m['flop_ratio']:.3f} (target <= 0.35)")
print(f"HF transformers (ROME loop, {h['restorations']} forwards): {h['cpu_seconds']:.2f} s CPU ({h['seconds']:.2f} s wall)")
print(f"HF / moedit cached: {h['cpu_seconds'] / m['cached_cpu_seconds']:.1f}x CPU time, "
      f"{h['seconds'] / m['cached_seconds']:.1f}x wall (target >= 10x)")
print(f"same answer: {h['answer'] == m['answer']}; |high - high_HF| = {abs(h['high_score'] - m['high_score']):.2e}, "
      f"|low - low_HF| = {abs(h['low_score'] - m['low_score']):.2e}")
EOF
