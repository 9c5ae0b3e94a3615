import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Without a GPU, Triton kernels run in its CPU interpreter; the flag is read when train_gpt's kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- The tiny preset run whole, as ./run.sh runs it: for the golden-loss test and the compile record ---------------

class TinyRun(NamedTuple):
    mode: str  # --compile
    train: list[float]  # the training loss of each timed step
    val: dict[str, float]  # validation loss by step
    record: Path  # the run's JSON record


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    import golden_run
    return golden_run.make_shards(tmp_path_factory.mktemp("tiny_shards"))


_tiny_runs = {}  # one run per mode for the whole session, whatever order the tests come in


@pytest.fixture(scope="session", params=["off", "on"])
def tiny_run(request, tiny_shards, tmp_path_factory) -> TinyRun:
    """The whole tiny preset on ./run.sh's shards with --compile=off or --compile=on (on an empty compile cache, as
    on a new machine), in one thread, with every loss at full precision (tests/golden_run.py)."""
    import golden_run  # after the flag above
    mode = request.param
    if mode not in _tiny_runs:
        found = golden_run.run_tiny(tiny_shards, mode, tmp_path_factory.mktemp(f"tiny_compile_{mode}"))
        _tiny_runs[mode] = TinyRun(mode, found["train"], found["val"], Path(found["record"]))
    return _tiny_runs[mode]
