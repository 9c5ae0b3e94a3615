#!/usr/bin/env bash
# The main job. With NVIDIA GPUs: the record (record43 unless --preset says otherwise) under torchrun on every GPU
# of this node, downloading the FineWeb shards first when they are missing. Without a GPU: the tiny preset on
# synthetic shards on the CPU (a record preset is refused there). ./run.sh --help tells its flags.
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh

usage() {
    cat <<'EOF'
usage: ./run.sh [--runs=N] [--ab="FLAGS" | --sweep="--FLAG=V1,V2,..." --runs=N [--gpus_per_run=K]]
                [train_gpt.py's flags, e.g. --preset=record42]

With NVIDIA GPUs: the record (record43 unless --preset says otherwise) under torchrun on every GPU of this node,
downloading the FineWeb shards first when they are missing. Without a GPU: the tiny preset on synthetic shards on the
CPU (a few minutes). Each run writes its record, a .txt log and a .json, into --log_dir (default logs/).

  --runs=N        N runs one after another, seeds 0 .. N-1 (a baseline for records/compare.py record)
  --ab="FLAGS"    an A/B comparison, with --runs=N of at least 2: N pairs of runs, the baseline (the arguments) and
                  the candidate (the arguments plus FLAGS) alternating seed by seed, into logs/ab/FLAGS/baseline and
                  logs/ab/FLAGS/candidate (with --log_dir=DIR: DIR/baseline and DIR/candidate), then the verdict of
                  the candidate against the baseline; the same command again goes on with the runs still missing
  --sweep="--FLAG=V1,V2,..."
                  a sweep of a flag, with --runs=N of at least 2: the baseline (the arguments) and one arm for each
                  value (the arguments plus --FLAG=V), in turn seed by seed, into logs/sweep/FLAG=V1,V2,.../baseline
                  and .../FLAG=V (with --log_dir=DIR: DIR/baseline and DIR/FLAG=V), then the verdict of every arm
                  (compare.py sweep); a second --sweep makes the grid of both; the same command again goes on
  --gpus_per_run=K
                  the runs of an --ab or --sweep K GPUs each, GPUs / K of them at once, each on its own GPUs
                  (default: every GPU, one run at a time); for losses at fixed steps: runs that share the node
                  disturb each other's times. Without a GPU: K runs at once on the CPU
  --help          this, then train_gpt.py's flags

Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each, as for torchrun.
DATA_PATH=DIR: the shards in DIR/data/ (fineweb10B/, or synthetic/ on the CPU) instead of this folder's data/.

train_gpt.py's flags, which run.sh passes on:
EOF
}

runs=1
ab=()  # the --ab FLAGS, when given
sweeps=()  # each --sweep
gpus_per_run=""  # empty: every GPU, one run at a time
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
        --sweep=*) sweeps+=("${1#--sweep=}") ;;
        --sweep) sweeps+=("${2-}"); [ $# -gt 1 ] && shift ;;
        --gpus_per_run=*) gpus_per_run="${1#--gpus_per_run=}" ;;
        --gpus_per_run) gpus_per_run="${2-}"; [ $# -gt 1 ] && shift ;;
        *) args+=("$1") ;;
    esac
    shift
done
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --runs=$runs: give the number of runs as a positive whole number, e.g. --runs=5" >&2
    exit 2
fi
if [ ${#ab[@]} -gt 0 ] && [ ${#sweeps[@]} -gt 0 ]; then
    echo "error: --ab and --sweep together: give one; --ab=\"FLAGS\" is the sweep of one arm" >&2
    exit 2
fi
comparing=$(( ${#ab[@]} + ${#sweeps[@]} ))
kind=$([ ${#ab[@]} -gt 0 ] && echo ab || echo sweep)
if [ "$comparing" -gt 0 ] && [ "$runs" -lt 2 ]; then
    echo "error: --$kind needs --runs=N, N runs of each arm with N at least 2 (the paired test needs 2 pairs, more" \
         "make it surer): add --runs=4" >&2
    exit 2
fi
if [ -n "$gpus_per_run" ]; then
    if [ "$comparing" -eq 0 ]; then
        echo "error: --gpus_per_run packs the runs of an --ab or --sweep onto the GPUs; add one, or leave it out" >&2
        exit 2
    fi
    if ! [[ "$gpus_per_run" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: --gpus_per_run=$gpus_per_run: give the GPUs of each run as a positive whole number, e.g." \
             "--gpus_per_run=1" >&2
        exit 2
    fi
fi

started=$SECONDS
# to_go DONE LEFT: ", about N min to go" for LEFT runs at the pace of the DONE ones this command made; empty before one
to_go() {
    if [ "$1" -gt 0 ]; then echo ", about $(( ((SECONDS - started) * $2 / $1 + 59) / 60 )) min to go"; fi
}

# each_seed COMMAND...: the command with the arguments, once, or once per seed with --runs (per arm with --ab, --sweep)
each_seed() {
    if [ "$comparing" -gt 0 ]; then
        comparison "$@"
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

# comparison COMMAND...: the runs of the --ab or --sweep comparison that are not finished yet, in their order
# (records/ab.py tells which and with what flags, and refuses a folder that holds another comparison), then the
# verdict of every arm against the baseline. One run at a time, or with --gpus_per_run one on each slot's GPUs (the
# slots: `devices`), the next starting when one ends; a run that fails there is reported and the others go on.
comparison() {
    local plan lines line fields seed folder out where i=0 made=0 slot
    local options=(--runs="$runs")
    [ ${#ab[@]} -gt 0 ] && options+=(--ab="${ab[0]}")
    for line in "${sweeps[@]}"; do options+=(--sweep="$line"); done
    if [ ${#devices[@]} -gt 1 ]; then
        options+=(--packed)
        trap 'stop_runs INT' INT
        trap 'stop_runs TERM' TERM
    fi
    plan=$(python records/ab.py plan "${options[@]}" -- "$@" "${args[@]}") || exit
    mapfile -t lines <<< "$plan"
    total=${#lines[@]} free=("${!devices[@]}") failed=()
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<< "$line"  # role, seed, folder, finished record or -, flags
        seed=${fields[1]} folder=${fields[2]}
        i=$((i + 1))
        if [ "${fields[3]}" != - ]; then
            echo "run $i of $total: ${fields[0]}, seed $seed: finished before, ${fields[3]}"
            continue
        fi
        if [ ${#devices[@]} -eq 1 ]; then
            echo "run $i of $total: ${fields[0]}, seed $seed$(to_go "$made" $((total - i + 1)))"
            made=$((made + 1))
            "$@" "${args[@]}" "${fields[@]:4}" --seed="$seed" --log_dir="$folder" || {
                local rc=$?
                echo "run $i of $total did not finish (exit status $rc); the same command again goes on from it" >&2
                exit "$rc"
            }
            continue
        fi
        [ ${#free[@]} -gt 0 ] || wait_for_a_run
        slot=${free[0]} free=("${free[@]:1}")
        out="${folder%/*}/${fields[0]}.seed$seed.out"  # beside the arms' folders, where compare.py looks for no record
        where=${devices[slot]:+GPUs ${devices[slot]}}
        echo "run $i of $total: ${fields[0]}, seed $seed, on ${where:-the CPU} (its output: $out)$(to_go \
             "${#done_runs[@]}" $((total - i + 1)))"
        mkdir -p "$folder"
        set -m  # the run in a process group of its own, which a stop reaches whole (torchrun's workers too)
        (
            [ -z "${devices[slot]}" ] || export CUDA_VISIBLE_DEVICES="${devices[slot]}"
            "$@" "${args[@]}" "${fields[@]:4}" --seed="$seed" --log_dir="$folder"
        ) >"$out" 2>&1 &
        set +m
        running[$!]="$slot $i $out"
    done
    while [ ${#running[@]} -gt 0 ]; do wait_for_a_run; done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "${#failed[@]} of the runs did not finish (runs ${failed[*]} of $total); the same command again runs" \
             "them" >&2
        exit 1
    fi
    python records/compare.py sweep "${folder%/*}"
}

# the packed runs of a comparison: pid -> "SLOT RUN OUTPUT"; the runs that ended, and those of them that failed
declare -A running=()
done_runs=() failed=()

# stop_runs SIGNAL: pass a Ctrl-C (or a TERM) on to the process group of every packed run, wait for them to write
# their records, and stop
stop_runs() {
    local pid
    for pid in "${!running[@]}"; do kill -s "$1" -- "-$pid" 2>/dev/null || true; done
    wait
    echo "stopped by SIG$1 with ${#running[@]} runs going; the same command again goes on with them" >&2
    exit $((128 + $(kill -l "$1")))
}

# wait_for_a_run: wait until one of the packed runs ends, say how it ended and free its slot
wait_for_a_run() {
    local pid rc=0 slot i out
    wait -n -p pid "${!running[@]}" || rc=$?
    read -r slot i out <<< "${running[$pid]}"
    unset "running[$pid]"
    free+=("$slot") done_runs+=("$i")
    if [ "$rc" -eq 0 ]; then
        echo "run $i of $total finished"
    else
        failed+=("$i")
        echo "run $i of $total did not finish (exit status $rc; its output: $out); the others go on" >&2
    fi
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
    devices=()  # a slot for each run at once, with no GPU to give it: --gpus_per_run=K runs K side by side
    for ((i = 0; i < ${gpus_per_run:-1}; i++)); do devices+=(""); done
    each_seed python train_gpt.py --preset=tiny --train_files="$synthetic/train_*.bin" --val_files="$synthetic/val_*.bin"
    exit
fi

gpus=$(nvidia-smi -L | wc -l)
per_run=${gpus_per_run:-$gpus}
if [ $((gpus % per_run)) -ne 0 ]; then
    echo "error: --gpus_per_run=$per_run does not divide the $gpus GPUs of this node; give a divisor, e.g." \
         "--gpus_per_run=1" >&2
    exit 2
fi
if [ -n "$gpus_per_run" ] && [ "${NNODES:-1}" -gt 1 ]; then
    echo "error: --gpus_per_run packs runs onto the GPUs of one node; with NNODES=$NNODES leave it out" >&2
    exit 2
fi
devices=()  # the GPUs of each slot a run at once takes, as CUDA_VISIBLE_DEVICES: 0,1 2,3 ...
for ((i = 0; i < gpus; i += per_run)); do devices+=("$(seq -s, "$i" $((i + per_run - 1)))"); done
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
    launch=(--standalone)  # its rendezvous on a free port of its own: runs packed onto one node never meet
fi
each_seed torchrun "${launch[@]}" --nproc_per_node="$per_run" train_gpt.py \
    --train_files="$data/fineweb_train_*.bin" --val_files="$data/fineweb_val_*.bin"
