#!/usr/bin/env bash
# Start-up of a compiled run: the tiny preset with --compile=on on this machine's device (its GPU if it has one), first
# on an empty compile cache, as on a new node, then again on the cache that run left. For each start: the model graphs
# compiled, the graphs inductor compiled into the compile cache and found there, the seconds from launch to the first
# timed step (Python and torch loading, checks, compilation, warm-up) and the record's own split of its start-up.
# Extra arguments go to train_gpt.py. DATA_PATH as for ./run.sh.
#   benchmarks/cold_start.sh [--flag=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. ./env.sh
ensure_env torch numpy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data="${DATA_PATH:-.}/data/synthetic"  # the tiny preset's shards, where ./run.sh makes them
python data/synthetic.py --vocab_size 1024 --out "$data" > /dev/null

# first_step_after LAUNCHED: passes the trainer's output through to $work/log and prints the seconds from LAUNCHED
# (an $EPOCHREALTIME) to its first timed step line
first_step_after() {
    local seen=""
    while IFS= read -r line; do
        if [ -z "$seen" ] && [[ $line == step:1/* ]]; then
            seen=1
            awk -v now="$EPOCHREALTIME" -v launched="$1" 'BEGIN { print now - launched }'
        fi
        echo "$line" >> "$work/log"
    done
}

for cache in empty warm; do
    launched=$EPOCHREALTIME
    seconds=$(python train_gpt.py --preset=tiny --train_files="$data/train_*.bin" --val_files="$data/val_*.bin" \
                  --compile=on --compile_cache="$work/cache" --log_dir="$work/$cache" "$@" |
              first_step_after "$launched") || { tail -20 "$work/log" >&2; echo "error: the $cache-cache run failed" >&2; exit 1; }
    python - "$cache" "$seconds" "$work/$cache"/*.json <<'PY'
import json, sys
cache, seconds, path = sys.argv[1:]
record = json.load(open(path))
parts = ", ".join(f"{name.removesuffix('_s')} {value:.1f}s" for name, value in record["startup"].items())
compile = record["compile"]
print(f"{cache} cache: {compile['model_graphs']} model graphs ({compile['recompiles_after_warmup']} after the warm-up), "
      f"{compile['cache_misses']} graphs compiled into the cache and {compile['cache_hits']} found there, "
      f"{float(seconds):.1f}s from launch to the first timed step (the record's start-up: {parts}); "
      f"{record['env']['device']}, torch {record['env']['torch']}")
PY
done
