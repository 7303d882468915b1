#!/usr/bin/env bash
# Runs every libFuzzer target in tests/fuzz (or the ones named) for SECONDS each, under ASan + UBSan.
#
#   bench/fuzz.sh [SECONDS=600] [TARGET...]        e.g. bench/fuzz.sh 15 (CI smoke), bench/fuzz.sh 600 fuzz_config
#
# Seeds: the committed corpus tests/fuzz/corpus/<target>/ plus real files (../shared/data when present, the test
# fixtures, the demo model). Inputs that add coverage are merged (minimised) back into tests/fuzz/corpus/<target>/
# only with MERGE=1. Logs and per-target statistics go to build-san/fuzz/; a crash, leak, hang (> 10 s per input),
# out-of-memory (> 2 GB) or sanitizer report makes the script fail and leaves the reproducer in build-san/fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_EACH=${1:-600}
shift || true
BUILD=${BUILD:-build-san}

if [ ! -f "$BUILD/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMOEDIT_SANITIZE=ON -DMOEDIT_FUZZ=ON -DMOEDIT_BUILD_BENCH=OFF >/dev/null
fi
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.cpp; do TARGETS+=("$(basename "$f" .cpp)"); done
fi
ninja -C "$BUILD" "${TARGETS[@]}" >/dev/null

SHARED=$ROOT/../shared/data
WORK=$BUILD/fuzz
mkdir -p "$WORK"

# seeds TARGET DIR: real inputs for one target (small files only, so mutation stays fast).
seeds() {
  local t=$1 d=$2
  mkdir -p "$d"
  local files=()
  case $t in
    fuzz_safetensors) files=(tests/fixtures/models/*/model.safetensors tests/fixtures/edit/*.safetensors) ;;
    fuzz_index) files=(tests/fixtures/models/*/model.safetensors.index.json) ;;
    fuzz_config) files=(tests/fixtures/configs/*/config.json tests/fixtures/models/*/config.json
                        "$SHARED"/configs/*/config.json models/moedit-demo/config.json) ;;
    fuzz_counterfact)
      python3 - "$d" "$SHARED" <<'EOF' 2>/dev/null || true
import json, os, sys
out, shared = sys.argv[1], sys.argv[2]
src = "datasets/data/counterfact/counterfact_preknown.json"
recs = json.load(open(src, encoding="utf-8"))
for i in range(0, 40, 4):
    with open(os.path.join(out, f"cf{i}.json"), "w", encoding="utf-8") as f:
        json.dump(recs[i:i + 2], f, ensure_ascii=False)
EOF
      ;;
    fuzz_eval_records)  # first byte: the format (0 auto, 1 zsre, 2 easyedit, 3 counterfact)
      python3 - "$d" <<'EOF' 2>/dev/null || true
import json, os, sys
out = sys.argv[1]
recs = json.load(open("datasets/data/counterfact/counterfact_preknown.json", encoding="utf-8"))
for i in range(0, 20, 4):
    r = recs[i]
    rw = r["requested_rewrite"]
    s, prompt = rw["subject"], rw["prompt"].replace("{}", rw["subject"])
    zsre = [{"subject": s, "src": prompt + "?", "pred": rw["target_true"]["str"], "rephrase": r["paraphrase_prompts"][0],
             "alt": rw["target_new"]["str"], "answers": [rw["target_new"]["str"]], "loc": "nq question: who is it",
             "loc_ans": "nobody", "cond": "x"}]
    easy = [{"prompt": prompt, "subject": s, "target_new": rw["target_new"]["str"],
             "ground_truth": rw["target_true"]["str"], "rephrase_prompt": r["paraphrase_prompts"][1],
             "locality_prompt": r["neighborhood_prompts"][0], "locality_ground_truth": rw["target_true"]["str"]}]
    for tag, fmt, obj in (("zsre", 1, zsre), ("easy", 2, easy), ("auto", 0, easy), ("cf", 3, recs[i:i + 1])):
        with open(os.path.join(out, f"{tag}{i}.bin"), "wb") as f:
            f.write(bytes([fmt]) + json.dumps(obj, ensure_ascii=False).encode())
EOF
      ;;
    fuzz_tokenizer_load) files=(models/moedit-demo/tokenizer.json) ;;
    fuzz_tokenizer_encode)
      head -c 200000 datasets/data/wikitext-2/wiki.test.raw 2>/dev/null | split -l 40 - "$d/wiki_" || true ;;
  esac
  local f
  for f in "${files[@]}"; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 4000000 ] && cp "$f" "$d/$(echo "$f" | tr '/' '_')" || true
  done
}

status=0
printf '%-24s %10s %14s %10s %s\n' target seconds executions exec/s result
for t in "${TARGETS[@]}"; do
  corpus=tests/fuzz/corpus/$t
  mkdir -p "$corpus"
  rm -rf "$WORK/$t.seeds" "$WORK/$t.new"
  seeds "$t" "$WORK/$t.seeds"
  mkdir -p "$WORK/$t.new"
  log=$WORK/$t.log
  rc=0
  (cd "$WORK" && ASAN_OPTIONS=detect_leaks=1 "$ROOT/$BUILD/$t" -max_total_time="$SECONDS_EACH" -timeout=10 \
     -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$t-" \
     "$t.new" "$ROOT/$corpus" "$t.seeds") >"$log" 2>&1 || rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  result=ok
  if [ $rc -ne 0 ]; then result="FAILED (rc $rc, see $log)"; status=1; fi
  printf '%-24s %10s %14s %10s %s\n' "$t" "$SECONDS_EACH" "${execs:-0}" "${rate:-0}" "$result"
  if [ "${MERGE:-0}" = 1 ] && [ $rc -eq 0 ]; then
    "$ROOT/$BUILD/$t" -merge=1 -timeout=10 "$corpus" "$WORK/$t.new" >>"$log" 2>&1
  fi
done
exit $status
