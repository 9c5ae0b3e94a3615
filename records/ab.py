"""The plan of an interleaved A/B comparison, for `./run.sh --ab="FLAGS" --runs=N`: which of its runs are still to do.

    python records/ab.py plan --runs=N --flags="FLAGS" -- python train_gpt.py --preset=tiny ARGS...

The baseline is the trainer command as given, the candidate the same plus FLAGS; they run alternately, seed by seed
(baseline seed 0, candidate seed 0, baseline seed 1, ...), into FOLDER/baseline and FOLDER/candidate, FOLDER being
the command's --log_dir where it gives one, else logs/ab/FLAGS (apart from the single runs in logs/). Each run is
printed as a line ROLE<TAB>SEED<TAB>FOLDER<TAB>RECORD, in that order, RECORD being the finished record of that run
where one is there already (empty where the run is to do). FOLDER/ab.args keeps FLAGS and the command, so that the
same command again goes on with the runs still missing, and another comparison is refused in that folder.
"""
import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

RECORDS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECORDS_DIR.parent))
import compare  # noqa: E402
import train_gpt  # noqa: E402

SAVED_FORMAT = "train_gpt-ab/1"
SAVED_NAME = "ab.args"  # JSON; not .json, so that compare.py takes it for no record
ROLES = ("baseline", "candidate")  # each runs into the folder of its name
SET_BY_THE_COMPARISON = ("seed", "log_dir")


class ABError(Exception):
    """A problem with the comparison's arguments or folder: one line, exit status 2, no run started."""


def split_flags(text: str) -> list[str]:
    """FLAGS as words, split at spaces as run.sh splits them (no quoting)."""
    flags = text.split()
    example = 'e.g. --ab="--muon_lr=0.035 --num_scheduled_iterations=2150"'
    if not flags:
        raise ABError(f"--ab needs the candidate's flags, {example}")
    if any(quote in text for quote in "'\"\\"):
        raise ABError(f"--ab={text}: the flags are split at spaces, quotes and backslashes are not understood; "
                      f"give them plainly, {example}")
    for flag in flags:
        name = flag.removeprefix("--").split("=", 1)[0]
        if name in SET_BY_THE_COMPARISON:
            raise ABError(f"--ab={text}: --{name} is set by the comparison for each run; leave it out of --ab "
                          "(--log_dir goes outside --ab: the runs go into its baseline/ and candidate/)")
    return flags


def trainer_args(command: list[str]) -> list[str]:
    """The arguments of train_gpt.py in a command that runs it (python ... or torchrun ...)."""
    for i, word in enumerate(command):
        if Path(word).name == "train_gpt.py":
            return command[i + 1:]
    raise ABError(f"no train_gpt.py in the command {' '.join(command)}")


def configs(command: list[str], flags: list[str]) -> tuple[train_gpt.Config, train_gpt.Config]:
    """The baseline's and the candidate's configurations, checked as the trainer checks them, before any run."""
    args = trainer_args(command)
    try:
        baseline = train_gpt.parse_config(args)
    except train_gpt.ConfigError as e:
        raise ABError(f"the baseline's arguments: {e}")
    try:
        candidate = train_gpt.parse_config(args + flags)
    except train_gpt.ConfigError as e:
        raise ABError(f"the candidate's flags (--ab): {e}")
    return baseline, candidate


def comparison_folder(command: list[str], flags: list[str], log_dir: str) -> Path:
    """The command's --log_dir where it gives one; else a folder of the comparison's own in the default one, named
    after its flags (characters a folder name should not hold as _)."""
    if any(arg == "--log_dir" or arg.startswith("--log_dir=") for arg in trainer_args(command)):
        return Path(log_dir)
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", "_".join(flag.removeprefix("--") for flag in flags))
    return Path(log_dir) / "ab" / name


def finished_seeds(folder: Path) -> dict[int, str]:
    """The seed of every finished run in the folder, with its record file (the first, where a seed has several)."""
    if not folder.is_dir() or not any(p.suffix in (".json", ".txt") for p in folder.iterdir()):
        return {}
    seeds: dict[int, str] = {}
    for path, _ in compare.record_files([str(folder)]):
        try:
            loaded = compare.load_file(path)
        except compare.RecordError:
            continue  # a damaged or partial file: not a finished run
        for run in loaded.runs:
            if not run.incomplete and run.seed is not None:
                seeds.setdefault(run.seed, str(path))
    return seeds


def check_saved(log_dir: Path, flags: list[str], command: list[str], finished: bool) -> None:
    """Refuse to continue, in log_dir, a comparison of other flags or another command; else save this one's. A
    folder without a finished run holds nothing to continue: a new comparison takes it over."""
    saved_path = log_dir / SAVED_NAME
    if finished:
        if not saved_path.is_file():
            raise ABError(f"{log_dir}/baseline or /candidate holds finished runs but no {SAVED_NAME} telling of "
                          "which comparison; give another --log_dir")
        try:
            saved = json.loads(saved_path.read_text())
            saved_flags, saved_command = list(saved["flags"]), list(saved["command"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ABError(f"{saved_path}: damaged ({e}); it tells which comparison {log_dir} holds: restore it, or "
                          "give another --log_dir")
        if (saved_flags, saved_command) != (flags, command):
            differs = "FLAGS" if saved_flags != flags else "arguments"
            raise ABError(f"{log_dir} holds a comparison with other {differs}: --ab=\"{' '.join(saved_flags)}\" on "
                          f"`{' '.join(saved_command)}`; run that to go on with it, or give another --log_dir")
        return
    this = {"format": SAVED_FORMAT, "flags": flags, "command": command}
    log_dir.mkdir(parents=True, exist_ok=True)
    compare.write_atomically(saved_path, lambda f: f.write((json.dumps(this, indent=1) + "\n").encode()))


def plan(runs: int, flags_text: str, command: list[str]) -> list[tuple[str, int, Path, str]]:
    """(role, seed, folder, finished record or "") of every run of the comparison, in the order they run."""
    flags = split_flags(flags_text)
    baseline, candidate = configs(command, flags)
    if dataclasses.asdict(baseline) == dataclasses.asdict(candidate):
        print(f"warning: --ab={flags_text} leaves the configuration as it is: the candidate runs the baseline again",
              file=sys.stderr)
    log_dir = comparison_folder(command, flags, baseline.log_dir)
    done = {role: finished_seeds(log_dir / role) for role in ROLES}
    check_saved(log_dir, flags, command, any(done.values()))
    return [(role, seed, log_dir / role, done[role].get(seed, "")) for seed in range(runs) for role in ROLES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python records/ab.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    planning = commands.add_parser("plan", help="the runs of the comparison, one line each, finished ones named")
    planning.add_argument("--runs", type=int, required=True, help="pairs of runs: seeds 0 to RUNS - 1")
    planning.add_argument("--flags", required=True, help="what the candidate adds to the baseline's arguments")
    planning.add_argument("trainer", nargs=argparse.REMAINDER, help="-- then the command that runs train_gpt.py")
    args = parser.parse_args(argv)
    trainer = args.trainer[1:] if args.trainer[:1] == ["--"] else args.trainer
    try:
        if args.runs < 1:
            raise ABError(f"--runs={args.runs}: give the number of pairs as a positive whole number")
        lines = plan(args.runs, args.flags, trainer)
    except ABError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for role, seed, folder, record in lines:
        print(f"{role}\t{seed}\t{folder}\t{record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
