"""The numbers the trainer computes, guarded: every training and validation loss of the whole tiny preset, eager and
compiled, against tests/golden_tiny.json. A change that moves them fails here; if it moves them for a reason (fidelity
to the record comes first), it writes the file anew (`python tests/golden_run.py --write tests/golden_tiny.json`) in a
commit of its own that says why.

How close is the same: on a machine like the one that wrote the file (the same torch and numpy, CPU vector
instructions and one thread, as the file's "machine" lists them) a run is deterministic, so every loss must equal the
file's to the last bit: two eager runs there did, and so did a compiled run on a warm compile cache against the cold
one. Elsewhere the kernels round differently, and training amplifies a rounding difference. Measured against the file
(written on an Intel Xeon with AVX512, torch 2.13): on an AMD EPYC with AVX512, eager runs moved training losses by up
to 5.9e-4 and validation losses by up to 2.5e-4, compiled ones (inductor fuses and reorders the float32 arithmetic)
by up to 6.5e-4 and 3.2e-4, the same on torch 2.11 and 2.13; with torch held to AVX2 there (ATEN_CPU_CAPABILITY=avx2),
compiled, by up to 6.3e-4 and 3.5e-4. So elsewhere a training loss must be within 1.5e-3 of the file's and a
validation loss within 1e-3, about 2.3 and 2.9 times those. That still catches a small real change: 1% more NorMuon lr
moves training losses by up to 2.4e-3 (the step-20 validation by 6.4e-4, its final validation loss by only 3.7e-5:
the tiny run's end is flat, so the whole curve is compared).
"""
import json
from pathlib import Path

import golden_run

GOLDEN = json.loads((Path(__file__).parent / "golden_tiny.json").read_text())
TRAIN_ELSEWHERE, VAL_ELSEWHERE = 1.5e-3, 1e-3  # see above


def test_every_loss_of_the_tiny_preset_is_the_golden_one(tiny_run):  # once per --compile mode
    want = GOLDEN["runs"][tiny_run.mode]
    assert len(tiny_run.train) == len(want["train"]) and tiny_run.val.keys() == want["val"].keys()
    here = golden_run.machine() == GOLDEN["machine"]
    compared = [(f"training loss of step {i + 1}", a, b, TRAIN_ELSEWHERE)
                for i, (a, b) in enumerate(zip(tiny_run.train, want["train"]))]
    compared += [(f"validation loss at step {step}", a, want["val"][step], VAL_ELSEWHERE) for step, a in tiny_run.val.items()]
    moved = [f"{name} {a!r}, golden {b!r} ({a - b:+.1e})" for name, a, b, tolerance in compared
             if (a != b if here else not abs(a - b) <= tolerance)]
    rule = "bit for bit (this machine is the golden file's)" if here else "within the tolerance for other machines"
    assert not moved, f"{len(moved)} losses differ, {rule}; the first: " + "; ".join(moved[:4])
