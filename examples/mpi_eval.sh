#!/bin/bash
# A CounterFact evaluation on N MPI ranks (Open MPI's mpirun; one machine, or the hosts of a Slurm allocation):
# every rank evaluates its shard into OUT/shards/<rank>-of-N and rank 0 merges them into OUT when all are done,
# the summary of one process. The key statistics of --layer L are computed first the same way: each rank streams
# a corpus shard, rank 0 adds the sums into the cache.
#
#   examples/mpi_eval.sh N MODEL DATASET OUT LAYER [moedit eval flags...]
#
# As root (containers), Open MPI refuses to start without --allow-run-as-root; with more ranks than cores it needs
# --oversubscribe: both are added when needed. MOEDIT: the moedit binary (default: build/moedit).
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: examples/mpi_eval.sh N MODEL DATASET OUT LAYER [moedit eval flags...]" >&2
  exit 2
fi
n=$1 model=$2 dataset=$3 out=$4 layer=$5
shift 5
moedit=${MOEDIT:-build/moedit}
flags=()
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
[ "$n" -gt "$(nproc)" ] && flags+=(--oversubscribe)
threads=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))  # OpenMP threads per rank on one machine
run() { OMP_NUM_THREADS=$threads mpirun "${flags[@]}" -x OMP_NUM_THREADS -np "$n" "$moedit" "$@"; }
run stats "$model" --layer "$layer" --mpi
run eval "$model" --dataset "$dataset" --layer "$layer" --out "$out" --mpi "$@"
