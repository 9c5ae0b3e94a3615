import os
import signal
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Without a GPU, Triton kernels run in its CPU interpreter; the flag is read when triton loads, which inductor's
# config below and train_gpt's kernels make it do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch._dynamo.config  # noqa: E402
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch._logging._internal  # noqa: E402
import torch.compiler.config  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir  # noqa: E402

# Inductor sets its cache folders for the whole process where they are unset, when it first compiles: set them to its
# defaults now, so that the first test to compile is not taken for one that changed them.
cache_dir()
os.environ.setdefault("TRITON_CACHE_DIR", triton_cache_dir(0))

# What one test could change for every test after it in the process, so that the suite's result would depend on
# which tests ran before. Each test must leave all of it as it found it (pytest's monkeypatch, torch's
# config.patch); the fixtures below fail the test, or the module, that did not.
TORCH_CONFIGS = (torch._dynamo.config, torch._inductor.config, torch._functorch.config, torch.compiler.config)
# pytest's, and inductor's pointer for the C++ kernels it loads, set at each load for the whole process
OWN_VARIABLES = {"PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}
SIGNALS = {signal.Signals(s).name if s in set(signal.Signals) else f"signal {s}": s
           for s in sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})}


def torch_config(module) -> dict:
    """Every setting's value, and which settings a delattr has hidden (as an undone monkeypatch.setattr can)."""
    hidden = sorted(name for name, entry in module._config.items() if getattr(entry, "hide", False))
    return {**module.get_config_copy(), "(hidden settings)": hidden}


def global_state(new_modules=frozenset()) -> dict[str, dict]:
    """The state; warnings filters of categories that new_modules define are left out: a module's import adds them
    for good (pkg_resources does), whichever test first imports it."""
    log_state = torch._logging._internal.log_state
    state = {
        "environment variable": {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES},
        "signal handler": {name: signal.getsignal(s) for name, s in SIGNALS.items()},
        "torch logging (torch._logging.set_logs)": {"levels": dict(log_state.log_qname_to_level),
                                                     "artifacts": sorted(log_state.artifact_names)},
        "warnings filter": {repr(f): "set" for f in warnings.filters
                            if getattr(f[2], "__module__", None) not in new_modules},
        "default process group": {"initialized": dist.is_initialized()},
    }
    for module in TORCH_CONFIGS:
        state[module.__name__] = torch_config(module)
    return state


def changes(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """'what name: before -> after' for each entry that differs."""
    unset = "(unset)"
    return [f"{what} {name}: {before[what].get(name, unset)!r} -> {after[what].get(name, unset)!r}"
            for what in before for name in sorted(before[what].keys() | after[what].keys())
            if before[what].get(name, unset) != after[what].get(name, unset)]


def restore(before: dict[str, dict], filters: list):
    """Put back what a test changed, so that its failure does not spread to the tests after it."""
    for name in os.environ.keys() - before["environment variable"].keys() - OWN_VARIABLES:
        del os.environ[name]
    os.environ.update(before["environment variable"])
    for name, s in SIGNALS.items():
        if before["signal handler"][name] is not None:  # None: set outside Python, not ours to touch
            signal.signal(s, before["signal handler"][name])
    warnings.filters[:] = filters
    if dist.is_initialized() and not before["default process group"]["initialized"]:
        dist.destroy_process_group()
    for module in TORCH_CONFIGS:
        now = torch_config(module)
        for name in now["(hidden settings)"]:
            module._config[name].hide = False
        module.load_config({k: v for k, v in before[module.__name__].items() if k in module._config and v != now.get(k)})


@pytest.fixture(autouse=True)
def leaves_global_state_as_it_found_it(request):
    before, filters, modules = global_state(), list(warnings.filters), set(sys.modules)
    yield
    changed = changes(before, global_state(sys.modules.keys() - modules))
    if changed:
        restore(before, filters)
        pytest.fail(f"{request.node.nodeid} left global state changed:\n  " + "\n  ".join(changed), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def module_leaves_no_process_group(request):
    """Module-scoped fixtures may hold a process group across their module's tests, but must end it with them."""
    yield  # torn down after every other fixture of the module
    if dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} left the default process group initialized", pytrace=False)


# --- The tiny preset run whole, as ./run.sh runs it: for the golden-loss test and the compile record ---------------

class TinyRun(NamedTuple):
    mode: str  # --compile
    train: list[float]  # the training loss of each timed step
    val: dict[str, float]  # validation loss by step
    record: Path  # the run's JSON record
    stdout: str  # what the trainer printed
    checkpoint: Path  # the final weights (--checkpoint)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    import golden_run
    return golden_run.make_shards(tmp_path_factory.mktemp("tiny_shards"))


_tiny_runs = {}  # one run per mode for the whole session, whatever order the tests come in


@pytest.fixture(scope="session", params=["off", "on"])
def tiny_run(request, tiny_shards, tmp_path_factory) -> TinyRun:
    """The whole tiny preset on ./run.sh's shards with --compile=off or --compile=on (on an empty compile cache, as
    on a new machine), in one thread, with every loss at full precision (tests/golden_run.py)."""
    return tiny_run_of(request.param, tiny_shards, tmp_path_factory)


def tiny_run_of(mode: str, tiny_shards, tmp_path_factory) -> TinyRun:
    """tiny_run's run of one mode, for a test that needs only that one."""
    import golden_run  # after the flag above
    if mode not in _tiny_runs:
        folder = tmp_path_factory.mktemp(f"tiny_compile_{mode}")
        found = golden_run.run_tiny(tiny_shards, mode, folder)
        _tiny_runs[mode] = TinyRun(mode, found["train"], found["val"], Path(found["record"]), found["stdout"],
                                   folder / "model.pt")
    return _tiny_runs[mode]
