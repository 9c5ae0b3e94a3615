#!/usr/bin/env bash
# The main job. With NVIDIA GPUs: the record (record43 unless --preset says otherwise) under torchrun on every GPU
# of this node, downloading the FineWeb shards first when they are missing. Without a GPU: the tiny preset on
# synthetic shards on the CPU (a record preset is refused there). ./run.sh --help tells its flags.
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh

usage() {
    cat <<'EOF'
usage: ./run.sh [--runs=N] [--ab="FLAGS" --runs=N] [train_gpt.py's flags, e.g. --preset=record42]

With NVIDIA GPUs: the record (record43 unless --preset says otherwise) under torchrun on every GPU of this node,
downloading the FineWeb shards first when they are missing. Without a GPU: the tiny preset on synthetic shards on the
CPU (a few minutes). Each run writes its record, a .txt log and a .json, into --log_dir (default logs/).

  --runs=N        N runs one after another, seeds 0 .. N-1 (a baseline for records/compare.py record)
  --ab="FLAGS"    an A/B comparison, with --runs=N of at least 2: N pairs of runs, the baseline (the arguments) and
                  the candidate (the arguments plus FLAGS) alternating seed by seed, into logs/ab/FLAGS/baseline and
                  logs/ab/FLAGS/candidate (with --log_dir=DIR: DIR/baseline and DIR/candidate), then the verdict of
                  the candidate against the baseline; the same command again goes on with the runs still missing
  --help          this, then train_gpt.py's flags

Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each, as for torchrun.
DATA_PATH=DIR: the shards in DIR/data/ (fineweb10B/, or synthetic/ on the CPU) instead of this folder's data/.

train_gpt.py's flags, which run.sh passes on:
EOF
}

runs=1
ab=()  # the --ab FLAGS, when given
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help)
            usage
            ensure_env torch numpy
            python train_gpt.py --help | tail -n +2  # its usage line is train_gpt.py's own
            exit ;;
        --runs=*) runs="${1#--runs=}" ;;
        --runs) runs="${2-}"; [ $# -gt 1 ] && shift ;;
        --ab=*) ab=("${1#--ab=}") ;;
        --ab) ab=("${2-}"); [ $# -gt 1 ] && shift ;;
        *) args+=("$1") ;;
    esac
    shift
done
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --runs=$runs: give the number of runs as a positive whole number, e.g. --runs=5" >&2
    exit 2
fi
if [ ${#ab[@]} -gt 0 ] && [ "$runs" -lt 2 ]; then
    echo "error: --ab needs --runs=N, N pairs of runs with N at least 2 (the paired test needs 2 pairs, more make it" \
         "surer): add --runs=4" >&2
    exit 2
fi

started=$SECONDS
# to_go DONE LEFT: ", about N min to go" for LEFT runs at the pace of the DONE ones this command made; empty before one
to_go() {
    if [ "$1" -gt 0 ]; then echo ", about $(( ((SECONDS - started) * $2 / $1 + 59) / 60 )) min to go"; fi
}

# each_seed COMMAND...: the command with the arguments, once, or once per seed with --runs (per pair with --ab)
each_seed() {
    if [ ${#ab[@]} -gt 0 ]; then
        ab_pairs "$@"
        return
    fi
    if [ "$runs" -eq 1 ]; then
        "$@" "${args[@]}"
        return
    fi
    for ((seed = 0; seed < runs; seed++)); do
        echo "run $((seed + 1)) of $runs, seed $seed$(to_go "$seed" $((runs - seed)))"
        "$@" "${args[@]}" --seed="$seed"
    done
}

# ab_pairs COMMAND...: the runs of the --ab comparison that are not finished yet, in their order (records/ab.py tells
# which, and refuses a folder that holds another comparison), then the diff of the candidate against the baseline
ab_pairs() {
    local plan lines line role seed folder record flags=() extra i=0 made=0 rc
    local -A folders  # of each role
    plan=$(python records/ab.py plan --runs="$runs" --flags="${ab[0]}" -- "$@" "${args[@]}") || exit
    mapfile -t lines <<< "$plan"
    read -ra flags <<< "${ab[0]}"
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r role seed folder record <<< "$line"
        i=$((i + 1))
        folders[$role]=$folder
        if [ -n "$record" ]; then
            echo "run $i of ${#lines[@]}: $role, seed $seed: finished before, $record"
            continue
        fi
        echo "run $i of ${#lines[@]}: $role, seed $seed$(to_go "$made" $((${#lines[@]} - i + 1)))"
        made=$((made + 1))
        extra=()
        [ "$role" = candidate ] && extra=("${flags[@]}")
        "$@" "${args[@]}" "${extra[@]}" --seed="$seed" --log_dir="$folder" || {
            rc=$?
            echo "run $i of ${#lines[@]} did not finish (exit status $rc); the same command again goes on from it" >&2
            exit "$rc"
        }
    done
    python records/compare.py diff "${folders[candidate]}" --baseline "${folders[baseline]}"
}

# the preset the arguments ask for (the last --preset wins, as in train_gpt.py); empty: none asked for
preset=""
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --preset=*) preset="${args[i]#--preset=}" ;;
        --preset) preset="${args[i + 1]-}" ;;
    esac
done

if ! nvidia-smi -L >/dev/null 2>&1; then
    if [ -n "$preset" ] && [ "$preset" != tiny ]; then
        echo "error: --preset=$preset is a GPU run, and no NVIDIA GPU is visible here (nvidia-smi lists none); on" \
             "this CPU, ./run.sh without --preset runs the tiny preset (a few minutes)" >&2
        exit 2
    fi
    echo "No NVIDIA GPU found: running the tiny preset on synthetic shards on the CPU (a few minutes)."
    ensure_env torch numpy
    # The tiny model's matrices are too small to gain from threads, and on small VMs idle threads cost ~10x.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    synthetic="${DATA_PATH:-.}/data/synthetic"
    synthetic="${synthetic#./}"  # without DATA_PATH, the preset's own paths
    python data/synthetic.py --vocab_size 1024 --out "$synthetic"
    each_seed python train_gpt.py --preset=tiny --train_files="$synthetic/train_*.bin" --val_files="$synthetic/val_*.bin"
    exit
fi

gpus=$(nvidia-smi -L | wc -l)
data="${DATA_PATH:-.}/data/fineweb10B"
train_shards=9  # enough for a record run
needed=(torch numpy)
if [ ! -f "$data/fineweb_val_000000.bin" ] || [ ! -f "$data/fineweb_train_$(printf %06d $train_shards).bin" ]; then
    needed+=(huggingface_hub)
fi
echo "$gpus NVIDIA GPU(s) found: running ${preset:-record43} under torchrun on them, with the FineWeb shards in $data."
ensure_env "${needed[@]}"
# Hopper and Blackwell: FlashAttention-4 kernels; train_gpt.py checks them against varlen_attn before using them.
# Installed into .venv where that is in use; python3 used as it is stays as it is.
if nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | grep -Eq '^(9|10)\.' && ! has_modules flash_attn.cute; then
    if [ "$PY" = python3 ]; then
        echo "note: python3 ($(command -v python3)) has no flash-attn-4, so attention runs on varlen_attn;" \
             "python3 -m pip install -r requirements-gpu.txt adds it" >&2
    else
        venv_install -r requirements-gpu.txt || echo "warning: could not install requirements-gpu.txt (flash-attn-4;" \
            "pip's output: .venv/pip.log); attention runs on varlen_attn" >&2
    fi
fi
if [[ " ${needed[*]} " == *" huggingface_hub "* ]]; then
    python data/cached_fineweb10B.py "$train_shards" --dir "$data" || fail "the FineWeb shards could not be had (see above)"
fi
if [ "${NNODES:-1}" -gt 1 ]; then
    launch=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
            --master_port="${MASTER_PORT:-29500}")
else
    launch=(--standalone)
fi
each_seed torchrun "${launch[@]}" --nproc_per_node="$gpus" train_gpt.py \
    --train_files="$data/fineweb_train_*.bin" --val_files="$data/fineweb_val_*.bin"
