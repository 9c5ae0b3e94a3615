#!/usr/bin/env bash
# The main job. With NVIDIA GPUs: the record (record43 unless --preset says otherwise) under torchrun on every GPU
# of this node, downloading the FineWeb shards first when they are missing. Without a GPU: the tiny preset on
# synthetic shards on the CPU. Extra arguments go to train_gpt.py, e.g. ./run.sh --preset=record42
# --runs=N: N runs one after another with seeds 0 .. N-1 (a baseline for records/compare.py record).
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each, as for torchrun.
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh

runs=1
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs=*) runs="${1#--runs=}" ;;
        --runs) runs="${2-}"; [ $# -gt 1 ] && shift ;;
        *) args+=("$1") ;;
    esac
    shift
done
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --runs=$runs: give the number of runs as a positive whole number, e.g. --runs=5" >&2
    exit 2
fi

# each_seed COMMAND...: the command with the arguments, once, or once per seed with --runs
each_seed() {
    if [ "$runs" -eq 1 ]; then
        "$@" "${args[@]}"
        return
    fi
    for ((seed = 0; seed < runs; seed++)); do
        echo "run $((seed + 1)) of $runs, seed $seed"
        "$@" "${args[@]}" --seed="$seed"
    done
}

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "No NVIDIA GPU found: running the tiny preset on synthetic shards on the CPU (a few minutes)."
    ensure_env torch numpy
    # The tiny model's matrices are too small to gain from threads, and on small VMs idle threads cost ~10x.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    python data/synthetic.py --vocab_size 1024 --out data/synthetic
    each_seed python train_gpt.py --preset=tiny
    exit
fi

ensure_env torch numpy
command -v torchrun >/dev/null || fail "torchrun not found in .venv; reinstall torch (pip install torch)"
# Hopper and Blackwell: FlashAttention-4 kernels; train_gpt.py checks them against varlen_attn before using them.
if nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | grep -Eq '^(9|10)\.' && ! has_modules flash_attn.cute; then
    pip install -q -r requirements-gpu.txt ||
        echo "warning: could not install requirements-gpu.txt (flash-attn-4); attention runs on varlen_attn" >&2
fi
data="${DATA_PATH:-.}/data/fineweb10B"
train_shards=9  # enough for a record run
if [ ! -f "$data/fineweb_val_000000.bin" ] || [ ! -f "$data/fineweb_train_$(printf %06d $train_shards).bin" ]; then
    ensure_env huggingface_hub
    python data/cached_fineweb10B.py "$train_shards" --dir "$data" || fail "the FineWeb shards could not be had (see above)"
fi
gpus=$(nvidia-smi -L | wc -l)
if [ "${NNODES:-1}" -gt 1 ]; then
    launch=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
            --master_port="${MASTER_PORT:-29500}")
else
    launch=(--standalone)
fi
each_seed torchrun "${launch[@]}" --nproc_per_node="$gpus" train_gpt.py \
    --train_files="$data/fineweb_train_*.bin" --val_files="$data/fineweb_val_*.bin"
