"""The README's CPU commands (its ```sh blocks), run in order as written in a copy of the repository, training
commands stopped after two steps so that the suite stays fast."""
import os
import re
import shutil
import subprocess
import sys

from test_train import ROOT, fake_nvidia_smi

TRAINING = re.compile(r"^(\./run\.sh|python train_gpt\.py)( |$)")
SHORT_RUN = "--max_steps=2"  # the one flag the test adds, to training commands: the suite has no time for 80 steps


def readme_commands() -> list[str]:
    """Each line of the README's ```sh blocks, its comment dropped."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S):
        commands += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return commands


def repository_copy(folder):
    """The tracked files, and the virtual environment where the repository has one (run.sh would make it)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    if (ROOT / ".venv").is_dir():
        (folder / ".venv").symlink_to(ROOT / ".venv")
    return folder


def test_the_readmes_cpu_commands_run_as_written(tmp_path):
    commands = readme_commands()
    assert commands[:2] == ["./run.sh", "python records/compare.py summary logs/"]  # the first screen's
    repo = repository_copy(tmp_path / "repo")
    bin_dir = tmp_path / "bin"  # `python` is the suite's interpreter, as after `. .venv/bin/activate`
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = fake_nvidia_smi(tmp_path, 0)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    for command in commands:
        run = command + (f" {SHORT_RUN}" if TRAINING.match(command) and "--help" not in command else "")
        result = subprocess.run(["bash", "-c", run], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{run}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, run
        if command == "./run.sh":  # the first screen tells what a healthy run ends with and where its record goes
            finished = result.stdout.splitlines()[-1]
            assert re.fullmatch(r"finished: val_loss \d\.\d{4} after 2 steps, .*; record: logs/\S+\.txt, "
                                r"logs/\S+\.json", finished), finished
