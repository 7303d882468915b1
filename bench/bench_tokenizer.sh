#!/usr/bin/env bash
# Side-by-side tokenizer speed: moedit (bench_tokenizer) vs Hugging Face `tokenizers` on ONE thread, encoding
# WikiText-2 test (1.29 MB) as one string ("whole") and line by line ("lines"), best of REPS runs each, and prints
# time ratios ours / tokenizers (< 1 means moedit is faster). Both sides do a full encode with offsets.
#
#   bash bench/bench_tokenizer.sh [NAME ...]
#     NAME: tokenizers under tests/fixtures/tokenizers/files (default: all ten)
#   env: BUILD_DIR (default build; must contain bench_tokenizer), TEXT (default datasets/data/wikitext-2/wiki.test.raw),
#        REPS (default 5), PYTHON (default python3)
# Needs: the `brotli` command (Debian package brotli) to unpack the fixture tokenizers, and Python with `tokenizers`
# for the comparison side only (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
TEXT=${TEXT:-datasets/data/wikitext-2/wiki.test.raw}
REPS=${REPS:-5}
PYTHON=${PYTHON:-python3}
BIN="$BUILD_DIR/bench_tokenizer"
[ -x "$BIN" ] || { echo "missing $BIN (build it: cmake --build $BUILD_DIR --target bench_tokenizer)" >&2; exit 2; }
[ -f "$TEXT" ] || { echo "missing $TEXT (set TEXT=path/to/wiki.test.raw)" >&2; exit 2; }
command -v brotli >/dev/null || { echo "needs the brotli command (apt-get install brotli)" >&2; exit 2; }
NAMES=("$@")
if [ ${#NAMES[@]} -eq 0 ]; then
  NAMES=(gpt2 mixtral-8x7b-v0.1 mistral-7b-v0.1 olmoe-1b-7b-0924 olmoe-1b-7b-0125 qwen2-0.5b qwen3-0.6b deepseek-r1
         gigachat-20b-a3b-base granite-3.0-2b-instruct)
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

printf "%-26s %10s %10s %7s   %10s %10s %7s\n" tokenizer "ours whole" "hf whole" ratio "ours lines" "hf lines" ratio
for name in "${NAMES[@]}"; do
  brotli -d -c "tests/fixtures/tokenizers/files/$name.json.br" > "$TMP/$name.json"
  ours=$("$BIN" --tokenizer "$TMP/$name.json" --text "$TEXT" --reps "$REPS" --json)
  hf=$("$PYTHON" - "$TMP/$name.json" "$TEXT" "$REPS" <<'EOF'
import json, sys, time
from tokenizers import Tokenizer
path, text_path, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(path)
text = open(text_path, "rb").read().decode("utf-8")   # bytes as they are (no newline translation)
lines = text.split("\n")
tok.encode(text)                                          # warm-up
whole = lines_t = 1e300
for _ in range(reps):
    t0 = time.perf_counter(); e = tok.encode(text); whole = min(whole, time.perf_counter() - t0)
for _ in range(reps):
    t0 = time.perf_counter(); es = tok.encode_batch(lines); lines_t = min(lines_t, time.perf_counter() - t0)
print(json.dumps({"whole_s": whole, "whole_tokens": len(e.ids), "lines_s": lines_t,
                  "lines_tokens": sum(len(x.ids) for x in es)}))
EOF
)
  "$PYTHON" - "$name" "$ours" "$hf" <<'EOF'
import json, sys
name, o, h = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for k in ("whole_tokens", "lines_tokens"):
    if o[k] != h[k]:
        print(f"  WARNING {name}: {k} differ: ours {o[k]} tokenizers {h[k]}")
print(f"{name:<26} {o['whole_s']:9.4f}s {h['whole_s']:9.4f}s {o['whole_s'] / h['whole_s']:7.3f}   "
      f"{o['lines_s']:9.4f}s {h['lines_s']:9.4f}s {o['lines_s'] / h['lines_s']:7.3f}")
EOF
done
