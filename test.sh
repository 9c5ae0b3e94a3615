#!/usr/bin/env bash
# The test suite on this machine (CPU is enough), with python3 where it has everything, else .venv (see env.sh).
#   ./test.sh [PYTEST ARGUMENTS]                  the whole suite (or what the arguments select) on this machine's torch
#   ./test.sh --torch=VERSION [PYTEST ARGUMENTS]  the torch-range checks on the CUDA build of torch VERSION, in an
#                                                 environment of its own made on first use (env.sh's torch_env)
#   ./test.sh --torch=range                       the same on both ends of requirements.txt's torch range
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh

# The checks a torch release must pass: the CUDA path without a GPU, and the suite's parts that lean most on torch's
# own behaviour (numerics and optimizers, attention, kernels, FLOPs and GPU choices, checkpoints, flags). A minute or
# three each; pass pytest arguments (e.g. tests) to run more.
TORCH_RANGE_CHECKS=(tests/test_cuda_path.py tests/test_numerics.py tests/test_attention.py tests/test_polar_triton.py
                    tests/test_hardware.py tests/test_checkpoint.py tests/test_train.py::test_presets_and_overrides
                    tests/test_train.py::test_bad_flags_are_rejected_with_the_fix)

# The tests' tensors are small: threads gain nothing, and on small VMs idle threads cost ~10x.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

versions=()
case "${1-}" in
    --torch=range) versions=($(torch_range)); shift ;;
    --torch=*) versions=("${1#--torch=}"); shift ;;
esac
if [ ${#versions[@]} -eq 0 ]; then
    # Triton's CPU interpreter runs the Polar Express kernels here; CUDA builds of torch bring triton with them.
    ensure_env torch numpy scipy matplotlib tiktoken huggingface_hub pyarrow pytest triton
    exec "$PY" -m pytest tests -q "$@"
fi

checks=("$@")
[ $# -gt 0 ] || checks=("${TORCH_RANGE_CHECKS[@]}")
failed=()
for version in "${versions[@]}"; do
    [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "--torch=$version: give a release as X.Y.Z (e.g. --torch=2.15.0) or --torch=range"
    torch_env "$version"
    echo "torch $version: $("$PY" -c 'import torch, triton; print(torch.__version__, "with Triton", triton.__version__)')"
    "$PY" -m pytest -q "${checks[@]}" || failed+=("$version")
done
[ ${#failed[@]} -eq 0 ] || fail "the checks failed on torch ${failed[*]} (above)"
