"""Every loss of a tiny-preset run of train_gpt.py at full float precision, and the golden file made of them.

    python tests/golden_run.py --write tests/golden_tiny.json   # both modes on fresh shards: the golden file
    python tests/golden_run.py LOSSES.json -- FLAGS...           # one run of `python train_gpt.py FLAGS`

tests/test_golden.py compares later runs with tests/golden_tiny.json. The second form runs the trainer in this process,
as `python train_gpt.py FLAGS` would, with one method wrapped to see the training losses. What it relies on in
train_gpt.py, and nothing else:
- `train_gpt.main(argv)` runs the trainer with the flags `argv` and returns its exit status;
- `train_gpt.LossCheck.push(self, where, loss)` receives every step's training loss (a 0-dim tensor, per token), with
  `where` "step N" for timed step N; other steps (the warm-up's, "warm-up step N") are left out, since the warm-up
  is undone before the timed steps and its length is free to change;
- the record's JSON, the only .json file in --log_dir after the run, lists the validations under "val" as
  {"step": S, "val_loss": L}.
LOSSES.json gets {"exit_status", "train": [loss of step 1, step 2, ...], "val": {"S": L, ...}, "record": path}.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402

MODES = ("off", "on")  # --compile


def make_shards(out: Path) -> Path:
    """The shards ./run.sh makes for the tiny preset: data/synthetic.py's defaults at its vocabulary."""
    subprocess.run([sys.executable, str(ROOT / "data" / "synthetic.py"), "--vocab_size", "1024", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run_tiny(shards: Path, mode: str, folder: Path) -> dict:
    """The whole tiny preset in a process of its own, in one thread, with --compile=mode (on an empty compile cache,
    as on a new machine) and its final weights saved in folder/model.pt; the losses of run(), the record's path among
    them, and what the run printed."""
    losses = folder / "losses.json"
    flags = ["--preset=tiny", f"--train_files={shards}/train_*.bin", f"--val_files={shards}/val_*.bin",
             f"--compile={mode}", f"--compile_cache={folder / 'cache'}", f"--log_dir={folder / 'logs'}",
             f"--checkpoint={folder / 'model.pt'}"]
    result = subprocess.run([sys.executable, __file__, str(losses), "--", *flags], cwd=folder, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"the tiny preset with --compile={mode} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(losses.read_text()), "stdout": result.stdout}


def machine() -> dict:
    """What decides the rounding of the same computation: the software and the CPU's vector instructions."""
    import numpy
    import torch
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "cpu": names[0] if names else platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": 1}  # run_tiny's


def write_golden(path: Path):
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "shards")
        runs = {}
        for mode in MODES:
            (Path(tmp) / mode).mkdir()
            found = run_tiny(shards, mode, Path(tmp) / mode)
            runs[mode] = {"train": found["train"], "val": found["val"]}
    path.write_text(json.dumps({"about": "Every loss of the tiny preset on ./run.sh's synthetic shards, in one thread: "
                                         "the training loss of each timed step and each validation loss, by "
                                         "--compile. Written by `python tests/golden_run.py --write`.",
                                "machine": machine(), "runs": runs}, indent=1) + "\n")


def flag(argv: list[str], name: str) -> str | None:
    """The last value of --name in argv, in either form (the trainer's rule)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def run(out: Path, argv: list[str]) -> int:
    train = {}
    push = train_gpt.LossCheck.push

    def recording_push(self, where, loss):
        if where.startswith("step "):
            train[int(where.split()[1])] = float(loss)
        return push(self, where, loss)

    train_gpt.LossCheck.push = recording_push
    status = train_gpt.main(argv)
    (record_path,) = Path(flag(argv, "log_dir") or "logs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert sorted(train) == list(range(1, len(train) + 1)), f"steps missing: {sorted(train)}"
    out.write_text(json.dumps({"exit_status": status, "train": [train[s] for s in sorted(train)],
                               "val": {str(v["step"]): v["val_loss"] for v in record["val"]},
                               "record": str(record_path.resolve())}, indent=1))
    return status


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_golden(Path(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[2] == "--":
        sys.exit(run(Path(sys.argv[1]), sys.argv[3:]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --write GOLDEN.json | LOSSES.json -- TRAIN_GPT_FLAGS...")
