# Sourced by run.sh and test.sh, in the repository root. `ensure_env MODULE...` sets PY to a Python that finds every
# MODULE: python3 itself where it does (a virtual or conda environment with torch is used as it is), else .venv,
# which sees python3's packages and gets only the missing ones installed. No second torch is installed where one
# imports; with no package index, what is missing is named with the command that installs it.

fail() { echo "error: $*" >&2; exit 1; }

# lacking PYTHON MODULE...: prints the MODULEs that PYTHON cannot find
lacking() { "$1" - "${@:2}" <<'PY'
import importlib.util, sys

def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a dotted name whose parent package is missing
        return False

print(*(name for name in sys.argv[1:] if not found(name)))
PY
}

# The scripts' python and torchrun, after ensure_env: those of the interpreter it chose, whatever comes first on PATH
python() { "$PY" "$@"; }
torchrun() { "$PY" -m torch.distributed.run "$@"; }

# has_modules MODULE...: $PY finds every MODULE
has_modules() { [ -z "$(lacking "$PY" "$@")" ]; }

# use_venv: PY is .venv's Python, made if missing, and it sees python3's packages through a .pth file that adds
# python3's site folders (processing their own .pth files too). --system-site-packages would show only the base
# interpreter's packages, not those of python3's environment when python3 is a venv or conda environment.
use_venv() {
    if [ ! -x .venv/bin/python ]; then
        echo "setting up .venv on $(command -v python3), seeing its packages"
        python3 -m venv .venv >/dev/null || fail "could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    PY="$PWD/.venv/bin/python"
    # An existing .venv of the same Python gets the link too; python3 being .venv itself (activated) needs none.
    python3 -c 'import json, site, sys; print(json.dumps([sys.prefix, list(sys.version_info[:2]),
        site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]))' |
    "$PY" -c 'import json, os, sys, sysconfig
prefix, version, folders = json.load(sys.stdin)
if list(sys.version_info[:2]) == version and os.path.realpath(prefix) != os.path.realpath(sys.prefix):
    lines = ["# python3 (%s): its packages, seen from .venv (written by env.sh)" % prefix]
    lines += ["import site; site.addsitedir(%r)" % folder for folder in folders]
    with open(os.path.join(sysconfig.get_path("purelib"), "python3-packages.pth"), "w") as f:
        f.write("\n".join(lines) + "\n")' || fail "could not link .venv to python3's packages"
}

# requirement MODULE: its line in requirements.txt (torch on a machine without an NVIDIA GPU: the CPU build's
# version), or the module's name
requirement() {
    if [ "$1" = torch ] && ! nvidia-smi -L >/dev/null 2>&1; then
        echo "torch==2.13.0"
        return
    fi
    local line
    while read -r line; do
        [ "$(echo "${line%%[<>=!~;[ ]*}" | tr - _)" = "$1" ] && { echo "$line"; return; }
    done < requirements.txt
    echo "$1"
}

# venv_install PIP_ARGUMENT...: installs into .venv, failing fast without a package index. Where torch is found,
# it is pinned to the version there, so that nothing pulls in a second one.
venv_install() {
    local pins=.venv/pins.txt
    "$PY" -c 'import importlib.metadata as m
try:
    print("torch==" + m.version("torch"))
except m.PackageNotFoundError:
    pass' > "$pins"
    "$PY" -m pip install --disable-pip-version-check --retries 0 --timeout 15 -c "$pins" "$@" > .venv/pip.log 2>&1
}

# ensure_env MODULE...: PY finds every MODULE, or the script stops with one line naming what is missing. A torch
# outside the tested range is used as it is, with one warning line.
ensure_env() {
    find_env "$@"
    if [[ " $* " == *" torch "* ]]; then
        warn_outside_torch_range
    fi
}

find_env() {
    command -v python3 >/dev/null || fail "python3 not found; install Python 3.10 or newer"
    PY=python3
    local missing
    missing=$(lacking python3 "$@") || fail "python3 ($(command -v python3)) does not run"
    [ -z "$missing" ] && return
    use_venv
    missing=$(lacking "$PY" "$@")
    [ -z "$missing" ] && return
    local module specs=()
    for module in $missing; do
        specs+=("$(requirement "$module")")
    done
    echo "installing into .venv: ${specs[*]}"
    venv_install "${specs[@]}" && has_modules "$@" && return
    fail "missing ${missing// /, }, which pip could not install (no package index? its output: .venv/pip.log);" \
         "install with: $PY -m pip install$(printf " '%s'" "${specs[@]}")"
}

# torch_range: the lowest supported and the newest tested torch, from requirements.txt's torch>=LOW,<=HIGH
torch_range() {
    local line
    line=$(grep -E '^torch>=' requirements.txt) || fail "requirements.txt has no torch>=LOW,<=HIGH line"
    [[ "$line" =~ ^torch\>=([0-9.]+),\<=([0-9.]+)$ ]] || fail "requirements.txt: '$line' is not torch>=LOW,<=HIGH"
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}

# warn_outside_torch_range: one line on stderr where $PY's torch is outside the tested range
warn_outside_torch_range() {
    "$PY" - $(torch_range) <<'PY'
import importlib.metadata as metadata, re, sys

def release(version):
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))

low, high = sys.argv[1:]
version = metadata.version("torch")
if not release(low) <= release(version) <= release(high):
    print(f"warning: torch {version} is outside the range this trainer is tested on, {low} to {high} "
          "(requirements.txt); it is used as it is", file=sys.stderr)
PY
}

# torch_env VERSION: PY is the Python of an environment of its own with the CUDA build of torch VERSION (the package
# index's default build for Linux) and the other packages of requirements.txt, made under $TORCH_ENVS on first use
# (about 4 GB) and kept. It imports and runs without a GPU, so that tests/test_cuda_path.py can check the CUDA path.
torch_env() {
    local version=$1
    local folder="${TORCH_ENVS:-$HOME/.cache/train_gpt/torch-envs}/torch-$version"
    PY="$folder/bin/python"
    [ -f "$folder/ready" ] && return
    echo "making the environment of torch $version in $folder (about 4 GB the first time)"
    rm -rf "$folder"
    mkdir -p "$(dirname "$folder")"
    python3 -m venv "$folder" >/dev/null || fail "could not create $folder (on Debian/Ubuntu: apt-get install python3-venv)"
    # the version is exact, so a pip configuration's cap on torch must not refuse it
    PIP_CONSTRAINT=/dev/null "$PY" -m pip install --disable-pip-version-check --retries 2 --timeout 60 \
        "torch==$version" $(grep -Ev '^(#|torch\b|$)' requirements.txt) > "$folder.log" 2>&1 ||
        fail "pip could not install torch==$version and requirements.txt into $folder (its output: $folder.log)"
    touch "$folder/ready"
}
