"""The plan of an interleaved comparison, for `./run.sh --ab="FLAGS" --runs=N` and
`./run.sh --sweep="--FLAG=V1,V2,..." --runs=N`: its arms, and which of its runs are still to do.

    python records/ab.py plan --runs=N --ab="FLAGS" -- python train_gpt.py --preset=tiny ARGS...
    python records/ab.py plan --runs=N --sweep="--weight_decay=0.6,1.8" [--sweep=...] -- python train_gpt.py ...

The baseline is the trainer command as given; each arm is the same plus its flags: --ab's FLAGS (one arm, the
candidate), or one value of each --sweep (several --sweep make the grid of their values). They run in turn, seed by
seed (baseline seed 0, each arm seed 0, baseline seed 1, ...), into FOLDER/baseline and FOLDER/ARM, FOLDER being the
command's --log_dir where it gives one, else logs/ab/FLAGS or logs/sweep/FLAGS (apart from the single runs in logs/).
Each run is printed as a line ROLE<TAB>SEED<TAB>FOLDER<TAB>RECORD<TAB>FLAGS..., in that order, RECORD being the
finished record of that run where one is there already, else "-". FOLDER/ab.args keeps the arms and the command, so
that the same command again goes on with the runs still missing, and another comparison is refused in that folder.
"""
import argparse
import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path

RECORDS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECORDS_DIR.parent))
import compare  # noqa: E402
import train_gpt  # noqa: E402

SAVED_FORMAT = "train_gpt-ab/2"
BASELINE = "baseline"
CANDIDATE = "candidate"  # the one arm of --ab
SET_BY_THE_COMPARISON = ("seed", "log_dir")
EXAMPLES = {"ab": '--ab="--muon_lr=0.035 --num_scheduled_iterations=2150"',
            "sweep": '--sweep="--weight_decay=0.6,0.9,1.5,1.8"'}


class ABError(Exception):
    """A problem with the comparison's arguments or folder: one line, exit status 2, no run started."""


@dataclasses.dataclass
class Comparison:
    kind: str                       # "ab" or "sweep": run.sh's flag
    given: list[str]                # the flag's values as given, one per --ab or --sweep
    arms: dict[str, list[str]]      # each arm's folder name and the flags it adds to the baseline's arguments

    def described(self) -> str:
        return " ".join(f'--{self.kind}="{text}"' for text in self.given)


def split_flags(text: str, kind: str) -> list[str]:
    """FLAGS as words, split at spaces as run.sh splits them (no quoting)."""
    flags = text.split()
    if not flags:
        raise ABError(f"--{kind} needs the flags to try, e.g. {EXAMPLES[kind]}")
    if any(quote in text for quote in "'\"\\"):
        raise ABError(f"--{kind}={text}: the flags are split at spaces, quotes and backslashes are not understood; "
                      f"give them plainly, e.g. {EXAMPLES[kind]}")
    for flag in flags:
        name = flag.removeprefix("--").split("=", 1)[0]
        if name in SET_BY_THE_COMPARISON:
            raise ABError(f"--{kind}={text}: --{name} is set by the comparison for each run; leave it out of --{kind} "
                          f"(--log_dir goes outside --{kind}: the runs go into its baseline/ and one folder an arm)")
    return flags


def ab_comparison(text: str) -> Comparison:
    return Comparison("ab", [text], {CANDIDATE: split_flags(text, "ab")})


def sweep_comparison(texts: list[str]) -> Comparison:
    """One arm for each value of a --sweep, or for each combination of values where there are several."""
    axes, names = [], []
    for text in texts:
        flags = split_flags(text, "sweep")
        name, _, values = flags[0].partition("=")
        if len(flags) != 1 or not name.startswith("--") or not all(values.split(",")):
            raise ABError(f"--sweep={text}: give one flag and its values separated by commas, e.g. "
                          f"{EXAMPLES['sweep']}; a second --sweep makes the grid of both")
        if name in names:
            raise ABError(f"--sweep={text}: {name} is swept twice; give all its values in one --sweep")
        names.append(name)
        axes.append([f"{name}={value}" for value in values.split(",")])
    arms = {}
    for flags in itertools.product(*axes):
        arms[re.sub(r"[^A-Za-z0-9._=,+-]", "_", "_".join(f.removeprefix("--") for f in flags))] = list(flags)
    if BASELINE in arms:
        raise ABError(f"--sweep: an arm may not be named {BASELINE}")
    return Comparison("sweep", texts, arms)


def trainer_args(command: list[str]) -> list[str]:
    """The arguments of train_gpt.py in a command that runs it (python ... or torchrun ...)."""
    for i, word in enumerate(command):
        if Path(word).name == "train_gpt.py":
            return command[i + 1:]
    raise ABError(f"no train_gpt.py in the command {' '.join(command)}")


def configs(command: list[str], comparison: Comparison) -> dict[str, train_gpt.Config]:
    """The configuration of the baseline and of every arm, checked as the trainer checks them, before any run."""
    args = trainer_args(command)
    found = {}
    for role, flags in {BASELINE: [], **comparison.arms}.items():
        try:
            found[role] = train_gpt.parse_config(args + flags)
        except train_gpt.ConfigError as e:
            whose = ("the baseline's arguments" if role == BASELINE else
                     f"the candidate's flags (--{comparison.kind})" if role == CANDIDATE else f"the arm {role}")
            raise ABError(f"{whose}: {e}")
    return found


def comparison_folder(command: list[str], comparison: Comparison, log_dir: str) -> Path:
    """The command's --log_dir where it gives one; else a folder of the comparison's own in the default one, named
    after its flags (characters a folder name should not hold as _)."""
    if any(arg == "--log_dir" or arg.startswith("--log_dir=") for arg in trainer_args(command)):
        return Path(log_dir)
    words = [flag.removeprefix("--") for text in comparison.given for flag in text.split()]
    return Path(log_dir) / comparison.kind / re.sub(r"[^A-Za-z0-9._=,+-]", "_", "_".join(words))


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


def check_saved(log_dir: Path, comparison: Comparison, command: list[str], finished: bool, packed: bool) -> None:
    """Refuse to continue, in log_dir, a comparison of other arms or another command; else save this one's, with
    whether any of its runs shared the node with others (packed: their times do not compare with a record's). A
    folder without a finished run holds nothing to continue: a new comparison takes it over."""
    saved_path = log_dir / compare.COMPARISON_FILE
    if finished:
        if not saved_path.is_file():
            raise ABError(f"{log_dir} holds finished runs in its subfolders but no {compare.COMPARISON_FILE} telling "
                          "of which comparison; give another --log_dir")
        try:
            saved = json.loads(saved_path.read_text())
            if saved.get("format") == "train_gpt-ab/1":  # an --ab begun before sweeps: its one arm's flags
                saved = {**saved, "kind": "ab", "given": [" ".join(saved["flags"])],
                         "arms": {CANDIDATE: saved["flags"]}, "packed": False}
            theirs = Comparison(saved["kind"], list(saved["given"]), dict(saved["arms"]))
            saved_command, packed = list(saved["command"]), packed or bool(saved["packed"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ABError(f"{saved_path}: damaged ({e!r}); it tells which comparison {log_dir} holds: restore it, or "
                          "give another --log_dir")
        if (theirs.arms, saved_command) != (comparison.arms, command):
            differs = "flags" if theirs.arms != comparison.arms else "arguments"
            raise ABError(f"{log_dir} holds a comparison with other {differs}: {theirs.described()} on "
                          f"`{' '.join(saved_command)}`; run that to go on with it, or give another --log_dir")
    this = {"format": SAVED_FORMAT, "kind": comparison.kind, "given": comparison.given, "arms": comparison.arms,
            "command": command, "packed": packed}
    log_dir.mkdir(parents=True, exist_ok=True)
    compare.write_atomically(saved_path, lambda f: f.write((json.dumps(this, indent=1) + "\n").encode()))


def plan(runs: int, comparison: Comparison, command: list[str], packed: bool = False) -> list[tuple]:
    """(role, seed, folder, finished record or "", flags) of every run of the comparison, in the order they run."""
    found = configs(command, comparison)
    for role in comparison.arms:
        if dataclasses.asdict(found[role]) == dataclasses.asdict(found[BASELINE]):
            print(f"warning: {' '.join(comparison.arms[role])} leaves the configuration as it is: the arm {role} runs "
                  "the baseline again", file=sys.stderr)
    log_dir = comparison_folder(command, comparison, found[BASELINE].log_dir)
    flags = {BASELINE: [], **comparison.arms}
    done = {role: finished_seeds(log_dir / role) for role in flags}
    check_saved(log_dir, comparison, command, any(done.values()), packed)
    return [(role, seed, log_dir / role, done[role].get(seed, ""), flags[role])
            for seed in range(runs) for role in flags]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python records/ab.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    planning = commands.add_parser("plan", help="the runs of the comparison, one line each, finished ones named")
    planning.add_argument("--runs", type=int, required=True, help="runs of each arm: seeds 0 to RUNS - 1")
    arms = planning.add_mutually_exclusive_group(required=True)
    arms.add_argument("--ab", metavar="FLAGS", help="what the candidate adds to the baseline's arguments")
    arms.add_argument("--sweep", action="append", metavar="--FLAG=V1,V2", help="a flag and the values to try")
    planning.add_argument("--packed", action="store_true", help="runs of this command share the node")
    planning.add_argument("trainer", nargs=argparse.REMAINDER, help="-- then the command that runs train_gpt.py")
    args = parser.parse_args(argv)
    trainer = args.trainer[1:] if args.trainer[:1] == ["--"] else args.trainer
    try:
        if args.runs < 1:
            raise ABError(f"--runs={args.runs}: give the number of runs of each arm as a positive whole number")
        comparison = ab_comparison(args.ab) if args.ab is not None else sweep_comparison(args.sweep)
        lines = plan(args.runs, comparison, trainer, args.packed)
    except ABError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for role, seed, folder, record, flags in lines:
        print("\t".join([role, str(seed), str(folder), record or "-", *flags]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
