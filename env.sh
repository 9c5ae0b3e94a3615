# Sourced by run.sh and test.sh: activates .venv, creating it and installing what is missing.
# The venv sees the system's packages, so a machine image that ships torch (with CUDA) keeps using it.

fail() { echo "error: $*" >&2; exit 1; }

has_modules() { python - "$@" <<'PY' 2>/dev/null
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))
PY
}

# ensure_env MODULE...: the venv is active and can import every MODULE.
ensure_env() {
    command -v python3 >/dev/null || fail "python3 not found; install Python 3.10 or newer"
    if [ ! -x .venv/bin/python ]; then
        echo "setting up .venv"
        python3 -m venv --system-site-packages .venv || fail "could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    . .venv/bin/activate
    has_modules "$@" && return
    if ! has_modules torch && ! nvidia-smi -L >/dev/null 2>&1; then
        pip install -q torch==2.13.0 || fail "could not install torch; check the network or install torch yourself"
    fi
    pip install -q -r requirements.txt || fail "could not install requirements.txt; check the network"
    has_modules "$@" || fail "still missing after installing requirements.txt: $*"
}
