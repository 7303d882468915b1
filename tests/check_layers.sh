#!/usr/bin/env bash
# The `layers` test: no layer includes a folder above it.
#
#   tests/check_layers.sh SOURCE_DIR TABLE        (ctest runs it with TABLE = <build>/layers/table.txt)
#
# TABLE is written by CMakeLists.txt from the moedit_layer(...) declarations, one line per layer:
# "model: model io kernels" = files under model/ may include model/, io/ and kernels/ and nothing else of this tree.
# The compiler already rejects an upward include in any file a layer's own sources compile (each layer library
# sees only symlinks to its allowed folders); this check covers the rest: headers that only upper layers include,
# `#include "../x.h"` escapes, and a top-level folder with C++ sources that is neither a layer nor a top consumer.
set -euo pipefail
SRC=${1:?usage: check_layers.sh SOURCE_DIR TABLE}
TABLE=${2:?usage: check_layers.sh SOURCE_DIR TABLE}
cd "$SRC"

TOP_CONSUMERS="cli tests bench python tools"  # may include any layer; never included by one
fail=0
layers=()
declare -A allowed
while IFS= read -r line; do
  case $line in ''|'#'*) continue ;; esac
  layer=${line%%:*}
  layers+=("$layer")
  read -ra deps <<<"${line#*:}"
  allowed[$layer]=" ${deps[*]} "
done <"$TABLE"
[ ${#layers[@]} -gt 0 ] || { echo "check_layers: no layers in $TABLE"; exit 1; }

# Top-level folders of this tree (a quoted include "X/..." with X one of them is a dependency on that folder).
tops=()
for d in */; do
  d=${d%/}
  case $d in build*|models|shared) continue ;; esac
  tops+=("$d")
done

for layer in "${layers[@]}"; do
  [ -d "$layer" ] || { echo "check_layers: layer folder $layer/ is missing"; fail=1; continue; }
  while IFS= read -r hit; do
    file=${hit%%:*}; rest=${hit#*:}; lineno=${rest%%:*}; text=${rest#*:}
    inc=$(sed -E 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]([^">]*)[">].*/\1/' <<<"$text")
    case $inc in
      ../*|*/../*) echo "$file:$lineno: relative include '$inc' leaves its folder"; fail=1; continue ;;
      */*) ;;
      *) continue ;;  # same-folder include
    esac
    top=${inc%%/*}
    is_top=0
    for t in "${tops[@]}"; do [ "$t" = "$top" ] && is_top=1; done
    [ $is_top = 1 ] || continue  # a system/third-party header (<Eigen/Dense>, <nlohmann/json.hpp>, ...)
    if [[ ${allowed[$layer]} != *" $top "* ]]; then
      echo "$file:$lineno: upward include '$inc' ($layer/ may include only:${allowed[$layer]% })"
      fail=1
    fi
  done < <(grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]' "$layer" \
             --include='*.h' --include='*.hpp' --include='*.cpp' --include='*.cc' --include='*.cu' --include='*.cuh' || true)
done

# Every top-level folder holding C++ sources is a declared layer or a top consumer.
for t in "${tops[@]}"; do
  [[ " ${layers[*]} $TOP_CONSUMERS " == *" $t "* ]] && continue
  if [ -n "$(find "$t" -maxdepth 3 \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) -print -quit)" ]; then
    echo "check_layers: $t/ holds C++ sources but is not a layer in CMakeLists.txt (moedit_layer) nor a top consumer"
    fail=1
  fi
done

if [ $fail = 0 ]; then echo "layers ok: ${layers[*]}"; fi
exit $fail
