"""Summarise and compare speedrun runs: final-loss statistics, validation curves side by side, plots, and
baselines of your own.

    python records/compare.py summary logs/
    python records/compare.py diff logs/ --baseline record43
    python records/compare.py plot logs/ --baseline record43 -o curves.png
    python records/compare.py record logs/baseline --name mybox

A RUN is a record written by train_gpt.py (logs/<stem>.json, or the .txt log beside it), a log in the
speedrun's public text format, the figures.json of a published record, or a folder holding such files.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import dataclasses
import datetime
import difflib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

TARGET_LOSS = 3.28                      # the speedrun's target validation loss, where the runs tell no other
TARGET_KEY = "target_val_loss"          # the configuration's own target (train_gpt.py sets it with the preset)
# The rules of the speedrun's optimization track (modded-nanogpt records/track_3_optimization/README.md). A result is
# accepted when (target - mean loss) x sqrt(n) >= TRACK_MARGIN: a one-sided z-test with the runs' loss std taken as
# TRACK_SIGMA, the margin being 3.09 sigma (p < 0.001). A result beats another when
# (final loss diff + step diff / 100 x rate) / sqrt(1/n1 + 1/n2) >= TRACK_MARGIN, the rate being the loss that 100
# more steps are worth, measured on the track's baseline.
TRACK_SIGMA = 0.0013
TRACK_MARGIN = 0.004
LOSS_PER_100_STEPS = 0.0045
SURE_P = 0.05                           # a verdict calls a side better where its two-sided p-value is below this
RECORDS_DIR = Path(__file__).resolve().parent
RECORD_SUFFIXES = (".json", ".txt")
RECORD_FORMAT = "train_gpt-record/1"    # the .json train_gpt.py writes beside its log
FIGURES_FORMAT = "speedrun-figures/1"   # published figures of a record, see records/README.md
SEPARATOR = "=" * 100                   # ends the trainer's source code at the top of a log
COMPARISON_FILE = "ab.args"             # what records/ab.py keeps of a comparison in its folder; JSON, but not .json,
                                        # so that it is taken for no record

# Only whole lines that match these count: the source code above the separator holds the same
# format strings inside f-strings.
# Fields after the public ones (training loss, tokens/s, ETA) are allowed and ignored.
_NUM = r"(\d+(?:\.\d+)?|nan)"
_MORE = r"(?: \S+)*"
VAL_LINE = re.compile(rf"step:(\d+)/(\d+) val_loss:{_NUM} train_time:(\d+(?:\.\d+)?)ms step_avg:{_NUM}ms{_MORE}")
TRAIN_LINE = re.compile(rf"step:(\d+)/(\d+) train_time:(\d+(?:\.\d+)?)ms step_avg:{_NUM}ms{_MORE}")
PEAK_LINE = re.compile(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
CONFIG_LINE = "config: "                # train_gpt.py's configuration as JSON, in the log's header

# What changes a run's numbers beside the idea under test: the fields compared between runs, in report order,
# and the configuration keys they come from.
SETUP_FIELDS = ("preset", "steps", "model", "batch", "vocabulary", "data", "hardware")
SETUP_KEYS = ("preset", "max_steps", "model_dim", "num_heads", "head_dim", "train_batch_tokens", "vocab_size",
              "train_files", "val_files", "val_tokens")
# Setup fields in which two sets must agree for their losses to compare at all: the model's shape.
SHAPE_FIELDS = ("model", "vocabulary")
# Configuration keys that runs of one setting may differ in: the seed (what pairs them), where their files go and
# what is measured besides the training. Every other key is a setting, compared between the runs of a set.
UNCOMPARED_KEYS = ("seed", "log_dir", "checkpoint", "checkpoint_dir", "save_every", "keep_checkpoints", "resume",
                   "compile_cache", "hellaswag", "analysis", TARGET_KEY)
# The weight figures' groups that diff shows unless --all: those the trainer's log line shows
KEY_GROUPS = ("attn", "mlp")
CURVE_ROWS = 12                         # validation steps diff shows unless --all: evenly spread, the last kept

# What plot --metric draws: the validation loss, or METRIC:NAME of a record's analysis (NAME a group or a part)
VAL_LOSS = "val_loss"
ANALYSIS_METRICS = ("mean_square", "cautious_fraction", "condition_number", "max_singular_value")
METRIC_LABELS = {"mean_square": "mean square", "cautious_fraction": "cautious fraction",
                 "condition_number": "condition number", "max_singular_value": "largest singular value"}

RUN_HELP = ("a record file written by train_gpt.py (.json, or its .txt log), a log in the public speedrun "
            "format ('step:S/N val_loss:L train_time:Tms step_avg:Ams' lines), a figures.json of a "
            "published record, a folder of these (a .json is taken over the .txt of the same name), or the "
            "name of a record folder in records/ such as record43")


class RecordError(Exception):
    """A problem with an input file or argument: reported as one message and exit status 1."""


@dataclass
class ValPoint:
    step: int
    val_loss: float
    train_time_ms: float


@dataclass
class Run:
    name: str
    source: Path
    num_steps: int                   # N: scheduled plus extension steps
    steps_done: int
    final: ValPoint                  # the last validation: a run's final loss and time
    hardware: str | None             # None where the source does not tell
    val: list[ValPoint] = field(default_factory=list)   # empty where only final figures are published
    incomplete: str | None = None    # why the run did not finish; None for a finished run
    peak_memory_mib: tuple[int, int] | None = None      # (allocated, reserved)
    config: dict | None = None       # its SETUP_KEYS, where the source tells them
    seed: int | None = None          # train_gpt.py's --seed: runs of two sets with one seed are paired in diff
    analysis: dict | None = None     # the record's "analysis" (weights at each validation), where it has one
    settings: dict | None = None     # its configuration but UNCOMPARED_KEYS, where the source tells it
    target: float | None = None      # the validation loss its configuration aims at, where it tells one

    @property
    def setup(self) -> dict[str, str]:
        return describe_setup(self.config, self.num_steps, self.hardware)


@dataclass
class Timing:
    label: str
    times_s: list[float]


@dataclass
class RunSet:
    name: str
    runs: list[Run]                  # finished runs, and unfinished ones where allowed (for their curves)
    other_timings: list[Timing]      # published timings of a record taken apart from its runs

    @property
    def finished(self) -> list[Run]:
        """The runs whose final losses and times count in the statistics."""
        return [r for r in self.runs if not r.incomplete]

    @property
    def timings(self) -> list[Timing]:
        own = [Timing("all runs", [r.final.train_time_ms / 1000 for r in self.finished])] if self.finished else []
        return own + self.other_timings


# -----------------------------------------------------------------------------
# Reading runs

def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions")


def damaged_fix(path: Path) -> str:
    """What to do about a damaged .json: its .txt log carries the same run."""
    txt = path.with_suffix(".txt")
    return f"use the log {txt} instead" if txt.is_file() else "restore the file or leave it out"


def parse_points(items) -> list[ValPoint]:
    return [ValPoint(int(p["step"]), float(p["val_loss"]), float(p["train_time_ms"])) for p in items]


def setup_config(config) -> dict | None:
    """The SETUP_KEYS of a configuration; None where it lacks one (a record of another version, a public log)."""
    if not isinstance(config, dict) or any(key not in config for key in SETUP_KEYS):
        return None
    return {key: config[key] for key in SETUP_KEYS}


def describe_setup(config: dict | None, num_steps: int, hardware: str | None) -> dict[str, str]:
    """A run's SETUP_FIELDS as text; a field its source does not tell is left out (a public log tells only its
    steps)."""
    setup = {"steps": str(num_steps)}
    if config is not None:
        c = config
        if c["max_steps"] and c["max_steps"] < num_steps:
            setup["steps"] = f"{c['max_steps']} of {num_steps}"
        setup.update(preset=str(c["preset"]), model=f"dim {c['model_dim']}, {c['num_heads']} heads of {c['head_dim']}",
                     batch=f"{c['train_batch_tokens']} tokens", vocabulary=str(c["vocab_size"]),
                     data=f"{Path(c['train_files']).name} + {Path(c['val_files']).name} ({c['val_tokens']} val tokens)")
    if hardware is not None:
        setup["hardware"] = hardware
    return {name: setup[name] for name in SETUP_FIELDS if name in setup}


def settings_of(config) -> dict | None:
    """A configuration's keys that set what a run computes (all but UNCOMPARED_KEYS); None where it tells none."""
    if not isinstance(config, dict):
        return None
    return {key: value for key, value in config.items() if key not in UNCOMPARED_KEYS}


def target_of(config) -> float | None:
    target = config.get(TARGET_KEY) if isinstance(config, dict) else None
    return float(target) if isinstance(target, (int, float)) and not isinstance(target, bool) else None


def seed_of(config) -> int | None:
    """The --seed of a train_gpt.py configuration; None where it does not tell."""
    seed = config.get("seed") if isinstance(config, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def config_of_log(lines: list[str]) -> dict | None:
    """The whole configuration in the header of a train_gpt.py log; None for other logs."""
    for line in lines:
        if line.startswith(CONFIG_LINE):
            try:
                return json.loads(line[len(CONFIG_LINE):])
            except json.JSONDecodeError:
                return None
    return None


def run_from_log(path: Path) -> Run:
    """A .txt log: ours (source code, separator, header, log lines) or a public speedrun log."""
    lines = read_text(path).splitlines()
    if SEPARATOR in lines:
        lines = lines[lines.index(SEPARATOR) + 1:]
    val, num_steps, steps_done, peak = [], None, 0, None
    for line in map(str.strip, lines):
        if m := PEAK_LINE.fullmatch(line):
            peak = (int(m[1]), int(m[2]))
        elif m := VAL_LINE.fullmatch(line) or TRAIN_LINE.fullmatch(line):
            steps_done, num_steps = int(m[1]), int(m[2])
            if m.re is VAL_LINE:
                val.append(ValPoint(steps_done, float(m[3]), float(m[4])))
    if num_steps is None:
        raise RecordError(f"{path}: not a record: no 'step:S/N ...' log line in it")
    if not val:
        raise RecordError(f"{path}: no validation line: the run stopped before its first validation")
    # A run stopped early on purpose (max_steps) still reaches the closing peak-memory line.
    incomplete = None
    if val[-1].step < num_steps and peak is None:
        incomplete = f"log ends at step {steps_done} of {num_steps}, before the final validation"
    config = config_of_log(lines)
    return Run(path.stem, path, num_steps, steps_done, val[-1], None, val, incomplete, peak, setup_config(config),
               seed_of(config), settings=settings_of(config), target=target_of(config))


def run_from_record(path: Path, data: dict) -> Run:
    """A .json record written by train_gpt.py."""
    try:
        val, status, env = parse_points(data["val"]), data["status"], data["env"]
        num_steps, steps_done = int(data["num_steps"]), int(data["steps_done"])
        hardware = f"{env['world_size']}x {env['gpu'] or env['device']}"
        allocated, reserved = data["peak_memory_allocated_mib"], data["peak_memory_reserved_mib"]
        name = str(data["run_id"])
        config, seed = setup_config(data.get("config")), seed_of(data.get("config"))
        settings, target = settings_of(data.get("config")), target_of(data.get("config"))
        analysis = checked_analysis(data.get("analysis"))
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{path}: damaged record, field {e} is missing or malformed; {damaged_fix(path)}")
    if status not in ("finished", "running", "failed", "interrupted", "preempted"):
        raise RecordError(f"{path}: damaged record, status {status!r} is not finished, running, failed, "
                          f"interrupted or preempted; {damaged_fix(path)}")
    if not val:
        raise RecordError(f"{path}: no validation point: the run {status} before its first validation")
    where = "after" if status == "failed" else "at"  # as train_gpt.py says it: a failed step did not complete
    incomplete = None if status == "finished" else f"{status} {where} step {steps_done} of {num_steps}"
    peak = None if allocated is None or reserved is None else (int(allocated), int(reserved))
    return Run(name, path, num_steps, steps_done, val[-1], hardware, val, incomplete, peak, config, seed, analysis,
               settings, target)


def checked_analysis(analysis) -> dict | None:
    """A record's "analysis" (see the README's record files), with every series as long as its steps; a KeyError,
    TypeError or ValueError where it is malformed."""
    if analysis is None:
        return None
    steps = [int(step) for step in analysis["steps"]]
    for section in ("groups", "params"):
        for name, figures in analysis[section].items():
            for metric in ANALYSIS_METRICS:
                values = figures.get(metric, [])
                if metric in figures and (len(values) != len(steps) or
                                          not all(v is None or isinstance(v, (int, float)) for v in values)):
                    raise ValueError(f"analysis.{section}.{name}.{metric}")
    return analysis


def runs_from_figures(path: Path, data: dict) -> RunSet:
    """The published figures of a record: per-run final losses and times, curves where published."""
    try:
        name, hardware, num_steps = str(data["name"]), str(data["hardware"]), int(data["num_steps"])
        peak = data.get("peak_memory_mib")
        peak = None if peak is None else (int(peak["allocated"]), int(peak["reserved"]))
        config = setup_config(data.get("config"))
        settings, target = settings_of(data.get("config")), target_of(data.get("config"))
        runs = []
        for i, r in enumerate(data["runs"], 1):
            val = parse_points(r.get("val", []))
            final_step = val[-1].step if val else num_steps  # a run stopped by max_steps ends before num_steps
            final = ValPoint(final_step, float(r["final_val_loss"]), 1000 * float(r["train_time_s"]))
            runs.append(Run(f"{name} #{i}", path, num_steps, final_step, final, hardware, val, None, peak, config,
                            seed_of(r), settings=settings, target=target))
        timings = [Timing(str(t["label"]), [float(x) for x in t["train_times_s"]])
                   for t in data.get("other_timings", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{path}: damaged figures file, field {e} is missing or malformed; "
                          "see records/README.md for the format")
    if not runs:
        raise RecordError(f"{path}: the figures file lists no runs")
    return RunSet(name, runs, timings)


def load_file(path: Path) -> RunSet:
    if path.suffix != ".json":
        run = run_from_log(path)
        return RunSet(run.name, [run], [])
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problem = "empty" if not text.strip() else f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise RecordError(f"{path}: {problem}: the file is truncated or corrupt; {damaged_fix(path)}")
    kind = data.get("format") if isinstance(data, dict) else None
    if kind == RECORD_FORMAT:
        run = run_from_record(path, data)
        return RunSet(run.name, [run], [])
    if kind == FIGURES_FORMAT:
        return runs_from_figures(path, data)
    raise RecordError(f"{path}: not a record: JSON without \"format\": \"{RECORD_FORMAT}\" or \"{FIGURES_FORMAT}\"")


def resolve(name_or_path: str) -> Path:
    """A path as given, else the record folder of that name in records/ (record43, record42, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if (RECORDS_DIR / name_or_path).is_dir():
        return RECORDS_DIR / name_or_path
    available = sorted(p.name for p in RECORDS_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    raise RecordError(f"{name_or_path}: no such file or folder, nor a record folder in {RECORDS_DIR}; "
                      f"check the path or use one of {', '.join(available)}")


def record_files(args: list[str]) -> list[tuple[Path, str | None]]:
    """The files named by the arguments, folders expanded, each with the folder name it came from."""
    files = []
    for arg in args:
        path = resolve(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in RECORD_SUFFIXES)
            if not found:
                raise RecordError(empty_folder(path))
            files += [(p, path.resolve().name) for p in found]
        elif path.suffix not in RECORD_SUFFIXES:
            raise RecordError(f"{path}: not a record file: records are .json or .txt files (or folders of them) "
                              "written by train_gpt.py, or published logs and figures")
        else:
            files.append((path, None))
    # A .json and the .txt log beside it describe one run: keep the .json; drop repeats.
    json_stems = {p.with_suffix("").resolve() for p, _ in files if p.suffix == ".json"}
    seen, kept = set(), []
    for path, folder in files:
        key = path.resolve()
        if key in seen or (path.suffix == ".txt" and key.with_suffix("") in json_stems):
            continue
        seen.add(key)
        kept.append((path, folder))
    return kept


def empty_folder(path: Path) -> str:
    """Why a folder holds no run, naming its subfolders that hold records (an A/B comparison's, several logs)."""
    inner = sorted(p for p in path.iterdir() if p.is_dir() and any(q.suffix in RECORD_SUFFIXES for q in p.iterdir()))
    if not inner:
        return (f"{path}: the folder holds no .json or .txt record files; pass a folder with records written by "
                "train_gpt.py, or the files themselves")
    names = {p.name: p for p in inner}
    if {"baseline", "candidate"} <= names.keys():
        example = f"python records/compare.py diff {names['candidate']} --baseline {names['baseline']}"
    else:
        example = f"python records/compare.py summary {inner[0]}"
    return (f"{path}: holds no record files itself, only in its subfolders {', '.join(p.name + '/' for p in inner)}; "
            f"pass those, e.g. {example}")


def load_set(args: list[str], allow_incomplete: bool) -> RunSet:
    """The runs named by the arguments as one set. A file without a run to use (not a record, damaged, stopped
    before its first validation, or unfinished unless allowed) is skipped with one line on stderr."""
    labels, runs, timings = [], [], []
    for path, folder in record_files(args):
        try:
            loaded = load_file(path)
        except RecordError as e:
            print(f"skipped {e}", file=sys.stderr)
            continue
        for run in loaded.runs:
            if run.incomplete and not allow_incomplete:
                print(f"skipped {run.source}: {run.incomplete} (--allow-incomplete shows its curve, never in the "
                      "statistics)", file=sys.stderr)
        kept = [r for r in loaded.runs if allow_incomplete or not r.incomplete]
        if kept:
            labels.append(folder or loaded.name)
            runs += kept
            timings += loaded.other_timings
    if not runs:
        raise RecordError(f"no run to use in {', '.join(args)}: every file was skipped (see above)")
    labels = list(dict.fromkeys(labels))
    name = ", ".join(labels) if len(labels) <= 2 else f"{labels[0]} and {len(labels) - 1} more"
    return RunSet(name, runs, timings)


def setup_warnings(sets: list[RunSet]) -> list[str]:
    """One line per setup field in which the runs differ, among themselves or from the baseline (the second set):
    their losses come from different experiments, or their times from different machines."""
    lines = []
    for name in SETUP_FIELDS:
        values = [sorted({r.setup[name] for r in s.runs if name in r.setup}) for s in sets]
        if len(set().union(*values)) < 2 or not all(values):
            continue
        texts = ["; ".join(v) for v in values]
        if len(sets) == 1:
            line = f"warning: the runs differ in {name}: {texts[0]}"
        else:
            line = f"warning: runs and baseline differ in {name}: runs {texts[0]} | baseline {texts[1]}"
        lines.append(line + (" (times from different machines do not compare)" if name == "hardware" else ""))
    return lines


def flag_value(value) -> str:
    """A configuration value as the trainer's flag takes it: 3,7,11 for a tuple (a list in JSON)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def shared_settings(runset: RunSet) -> dict:
    """The settings every run of the set tells, with the value they agree on (those they differ in left out)."""
    told = [r.settings for r in runset.runs]
    if not told or None in told:
        return {}
    return {key: value for key, value in told[0].items() if all(t.get(key, value) == value for t in told)}


def settings_warnings(runset: RunSet) -> list[str]:
    """A line naming the settings besides the setup fields (learning rates, decay, schedules, ...) in which the runs
    of a set differ: their losses are then not one setting's spread."""
    told = [r.settings for r in runset.runs if r.settings is not None]
    keys = sorted({key for t in told for key in t} - set(SETUP_KEYS))
    values = {key: list(dict.fromkeys(flag_value(t.get(key)) for t in told)) for key in keys}  # in the runs' order
    differing = [key for key in keys if len(values[key]) > 1]
    if not differing:
        return []
    named = "; ".join(f"{key} {' | '.join(values[key])}" for key in differing[:4])
    more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
    return [f"warning: the runs of {runset.name} differ in {named}{more}: their losses are not one setting's; "
            "pass each setting's runs as a set of its own"]


def choose_target(sets: list[RunSet], given: float | None) -> tuple[float, str]:
    """The target loss and whose it is: --target where given, else the one the baseline's runs (the last set) aim
    at, e.g. the tiny preset's, else the speedrun's."""
    if given is not None:
        return given, "--target"
    targets = {r.target for r in sets[-1].runs if r.target is not None}
    if len(targets) == 1:
        presets = {r.config["preset"] for r in sets[-1].runs if r.config}
        whose = f"the {presets.pop()} preset's" if len(presets) == 1 else "the runs' own"
        return targets.pop(), whose
    return TARGET_LOSS, "the speedrun's"


def incomparable(runs: RunSet, baseline: RunSet) -> str | None:
    """Why the two sets' losses do not compare at all (models of different shapes); None where they do."""
    for name in SHAPE_FIELDS:
        mine, theirs = ({r.setup[name] for r in s.runs if name in r.setup} for s in (runs, baseline))
        if mine and theirs and mine != theirs:
            return (f"{runs.name} and the baseline {baseline.name} are different models ({name} "
                    f"{'; '.join(sorted(mine))} | {'; '.join(sorted(theirs))}): their losses and times do not "
                    "compare")
    return None


def side_label(role: str, runset: RunSet, other: RunSet) -> str:
    """How a report names a side: its role, its name where that says more, the flags it differs from the other by."""
    theirs = shared_settings(other)
    flags = " ".join(f"--{key}={flag_value(value)}" for key, value in shared_settings(runset).items()
                     if theirs.get(key, value) != value)
    return role + (f" {runset.name}" if runset.name != role else "") + (f" ({flags})" if flags else "")


# -----------------------------------------------------------------------------
# Statistics

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator, as torch.std); nan where undefined."""
    mean = float(np.mean(values)) if values else math.nan
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)


def t_test_below(losses: list[float], target: float = TARGET_LOSS) -> dict:
    """One-sided one-sample t-test that the mean loss is below the target."""
    if len(losses) < 2 or np.ptp(losses) == 0:
        return {"t": math.nan, "df": math.nan, "p": math.nan}  # undefined without spread
    res = stats.ttest_1samp(losses, target, alternative="less")
    return {"t": float(res.statistic), "df": float(res.df), "p": float(res.pvalue)}


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's two-sided t-test that two means differ (unequal variances)."""
    if len(a) < 2 or len(b) < 2 or np.ptp(a) == np.ptp(b) == 0:
        return {"t": math.nan, "df": math.nan, "p": math.nan, "ci95": [math.nan, math.nan]}
    res = stats.ttest_ind(a, b, equal_var=False)
    interval = res.confidence_interval(0.95)
    return {"t": float(res.statistic), "df": float(res.df), "p": float(res.pvalue),
            "ci95": [float(interval.low), float(interval.high)]}


def mean_curve(runs: list[Run]) -> list[tuple[int, float, int]]:
    """(step, mean validation loss, number of runs) at every step any of the runs validated at."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for p in run.val:
            by_step.setdefault(p.step, []).append(p.val_loss)
    return [(step, float(np.mean(losses)), len(losses)) for step, losses in sorted(by_step.items())]


def interval95(values: list[float]) -> float:
    """Half the width of the 95% t-interval of the mean of the values; nan below 2."""
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def paired_t(diffs: list[float]) -> dict:
    """The paired t-test: two-sided, that the mean of per-pair differences is zero (scipy's ttest_rel on the pairs),
    with the 95% interval of that mean."""
    n = len(diffs)
    mean = float(np.mean(diffs)) if diffs else math.nan
    if n < 2 or np.ptp(diffs) == 0:
        return {"n": n, "mean": mean, "ci95": [math.nan, math.nan], "t": math.nan, "df": math.nan, "p": math.nan}
    res = stats.ttest_1samp(diffs, 0.0)
    half = interval95(diffs)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half], "t": float(res.statistic), "df": float(res.df),
            "p": float(res.pvalue)}


def by_seed(runs: list[Run]) -> dict[int, list[Run]]:
    seeds: dict[int, list[Run]] = {}
    for run in runs:
        if run.seed is not None:
            seeds.setdefault(run.seed, []).append(run)
    return seeds


def paired(runs: list[Run], baseline: list[Run]) -> dict | None:
    """Paired t-tests on the per-seed differences (runs minus baseline) of final loss and training time, over the
    seeds both sets have; None where they share none. A seed with several runs in a set enters once, as the mean of
    its runs, so that each seed is one pair however often it was run."""
    mine, theirs = by_seed(runs), by_seed(baseline)
    seeds = sorted(mine.keys() & theirs.keys())
    if not seeds:
        return None
    def per_seed(group, value):
        return [float(np.mean([value(r) for r in group[seed]])) for seed in seeds]
    def differences(value):
        return [a - b for a, b in zip(per_seed(mine, value), per_seed(theirs, value))]
    return {
        "seeds": seeds,
        "unpaired": {"runs": sorted(mine.keys() - theirs.keys()), "baseline": sorted(theirs.keys() - mine.keys())},
        "repeated": {side: [{"seed": seed, "runs": len(group[seed])} for seed in seeds if len(group[seed]) > 1]
                     for side, group in (("runs", mine), ("baseline", theirs))},
        "final_val_loss": paired_t(differences(lambda r: r.final.val_loss)),
        "train_time_s": paired_t(differences(lambda r: r.final.train_time_ms / 1000)),
    }


def track_z(figure: float) -> dict:
    """A track figure as the z-score it is (figure / sigma) and its one-sided p-value."""
    z = figure / TRACK_SIGMA
    return {"z": z, "p": float(stats.norm.sf(z)) if math.isfinite(z) else math.nan}


def acceptance(runs: list[Run], target: float = TARGET_LOSS) -> dict:
    """The track's acceptance figure (target - mean final loss) x sqrt(n) against TRACK_MARGIN, and the earliest
    step, among those at which every run validated, where the runs' mean loss there passes it (validation every few
    steps near the end, the trainer's --dense_val_every, makes that step fine-grained)."""
    def figure_of(losses):
        return (target - float(np.mean(losses))) * math.sqrt(len(losses)) if losses else math.nan
    figure = figure_of([r.final.val_loss for r in runs])
    shared = set.intersection(*({p.step for p in r.val} for r in runs)) if runs and all(r.val for r in runs) else set()
    earliest = None
    for step in sorted(shared):
        losses = [next(p.val_loss for p in r.val if p.step == step) for r in runs]
        if figure_of(losses) >= TRACK_MARGIN:
            earliest = {"step": step, "val_loss": float(np.mean(losses)), "figure": figure_of(losses)}
            break
    return {"target": target, "n": len(runs), "figure": figure, "margin": TRACK_MARGIN, "sigma": TRACK_SIGMA,
            "passes": figure >= TRACK_MARGIN if runs else None, **track_z(figure),
            "loss_std": mean_std([r.final.val_loss for r in runs])[1], "shared_steps": len(shared),
            "earliest_step": earliest}


def pairwise(runs: list[Run], baseline: list[Run], rate: float = LOSS_PER_100_STEPS) -> dict:
    """The track's figure for the runs beating the baseline: positive where the runs are better. The loss and step
    differences are the baseline's minus the runs' (means of final losses and of the steps of the final
    validations), 100 steps being worth `rate` of loss."""
    def mean_of(group, value):
        return float(np.mean([value(r) for r in group])) if group else math.nan
    loss_diff = mean_of(baseline, lambda r: r.final.val_loss) - mean_of(runs, lambda r: r.final.val_loss)
    step_diff = mean_of(baseline, lambda r: r.final.step) - mean_of(runs, lambda r: r.final.step)
    figure = ((loss_diff + step_diff / 100 * rate) / math.sqrt(1 / len(runs) + 1 / len(baseline))
              if runs and baseline else math.nan)
    stds = [mean_std([r.final.val_loss for r in group])[1] for group in (runs, baseline)]
    return {"final_loss_diff": loss_diff, "step_diff": step_diff, "rate": rate, "n_runs": len(runs),
            "n_baseline": len(baseline), "figure": figure, "margin": TRACK_MARGIN, "sigma": TRACK_SIGMA,
            "better": figure >= TRACK_MARGIN if runs and baseline else None, **track_z(figure),
            "loss_std": max((s for s in stds if not math.isnan(s)), default=math.nan)}


def first_step_below(curve: list[tuple[int, float]], target: float = TARGET_LOSS) -> float | None:
    """The step at which a (step, loss) curve first reaches the target, linear between validations."""
    for i, (step, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(step)
            prev_step, prev_loss = curve[i - 1]
            return prev_step + (prev_loss - target) / (prev_loss - loss) * (step - prev_step)
    return None


# -----------------------------------------------------------------------------
# Reports: a dict (printed as JSON with --json) and its table

def summarise(runset: RunSet, target: float | None = None) -> dict:
    """Every run in the table; the statistics over the finished runs only. The target is the runs' own unless given."""
    target, whose = choose_target([runset], target)
    finished = runset.finished
    losses = [r.final.val_loss for r in finished]
    loss_mean, loss_std = mean_std(losses)
    timings = []
    for t in runset.timings:
        mean, std = mean_std(t.times_s)
        timings.append({"label": t.label, "n": len(t.times_s), "mean_s": mean, "std_s": std})
    peaks = [r.peak_memory_mib for r in finished if r.peak_memory_mib]
    return {
        "name": runset.name,
        "warnings": setup_warnings([runset]) + settings_warnings(runset),
        "target": target,
        "target_from": whose,
        "num_runs": len(runset.runs),
        "num_finished": len(finished),
        "runs": [{"name": r.name, "source": str(r.source), "hardware": r.hardware or "unknown", "num_steps": r.num_steps,
                  "steps_done": r.steps_done, "final_step": r.final.step, "final_val_loss": r.final.val_loss,
                  "train_time_s": r.final.train_time_ms / 1000,
                  "ms_per_step": r.final.train_time_ms / r.final.step if r.final.step else math.nan,
                  "incomplete": r.incomplete} for r in runset.runs],
        "val_loss": {"mean": loss_mean, "std": loss_std},
        "t_test_below_target": {"target": target, "alternative": "less", **t_test_below(losses, target)},
        "acceptance": acceptance(finished, target),
        "train_time": timings,
        "hardware": sorted({r.hardware or "unknown" for r in runset.runs}),
        "num_steps": sorted({r.num_steps for r in runset.runs}),
        "ms_per_step": float(np.mean([r.final.train_time_ms / r.final.step for r in finished if r.final.step]
                                     or [math.nan])),
        "peak_memory_mib": {"allocated": max(p[0] for p in peaks), "reserved": max(p[1] for p in peaks)}
        if peaks else None,
    }


def side(runset: RunSet, label: str, target: float) -> dict:
    """A side of a verdict: its runs' final loss and training time, and where its mean curve first reaches the
    target."""
    losses = [r.final.val_loss for r in runset.finished]
    loss_mean, loss_std = mean_std(losses)
    curve = [(step, loss) for step, loss, _ in mean_curve(runset.runs)]
    return {"name": runset.name, "label": label, "n": len(losses), "final_val_loss": loss_mean,
            "final_step": mean_std([r.final.step for r in runset.finished])[0],
            "final_val_loss_std": loss_std,
            "train_time_s": mean_std([r.final.train_time_ms / 1000 for r in runset.finished])[0],
            "has_curve": any(r.val for r in runset.runs),
            "first_step_at_target": first_step_below(curve, target) if curve else None}


def arm_verdict(arm: RunSet, baseline: RunSet, label: str, target: float, rate: float = LOSS_PER_100_STEPS) -> dict:
    """One candidate against the baseline: the final-loss difference (candidate minus baseline) by the paired
    t-test over the seeds both ran where they share two, else by Welch's test; the better side where p < SURE_P;
    the track's rule with 100 steps worth `rate` of loss."""
    pairs = paired(arm.finished, baseline.finished)
    if pairs and pairs["final_val_loss"]["n"] >= 2:
        t = pairs["final_val_loss"]
        test = {"test": "paired", "test_n": t["n"], "diff": t["mean"], "ci95": t["ci95"], "p": t["p"]}
    else:
        mine, theirs = ([r.final.val_loss for r in s.finished] for s in (arm, baseline))
        w = welch(mine, theirs)
        test = {"test": "Welch", "test_n": len(mine) + len(theirs), "diff": mean_std(mine)[0] - mean_std(theirs)[0],
                "ci95": w["ci95"], "p": w["p"]}
    track = pairwise(arm.finished, baseline.finished, rate)
    return {**side(arm, label, target), **test, "better": better_side(test["diff"], test["p"]),
            "step_diff": -track["step_diff"], "track_figure": track["figure"], "track_better": track["better"],
            "time": pairs["train_time_s"] if pairs else None}


def better_side(diff: float, p: float) -> str | None:
    """The side a final-loss difference (candidate minus baseline) with its p-value calls better; None: undecided."""
    return None if math.isnan(p) else "neither" if p >= SURE_P else "candidate" if diff < 0 else "baseline"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of several tests' p-values: the i-th smallest of m is multiplied by m - i + 1 (i
    from 1) and kept at least as large as those before it, so that calling every adjusted p below 0.05 significant
    has a chance below 0.05 of calling any true null so. Undefined p-values stay nan and do not count in m."""
    order = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    adjusted, largest = [math.nan] * len(p_values), 0.0
    for rank, i in enumerate(order):
        largest = max(largest, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = largest
    return adjusted


def verdict(baseline: RunSet, arms: list[RunSet], target: float, whose: str, labels: list[str],
            rate: float = LOSS_PER_100_STEPS) -> dict:
    """The baseline and one or more candidate arms at one target: labels[0] names the baseline, the rest the arms.
    Several arms are several tests: each is then judged by its Holm-adjusted p-value."""
    judged = [arm_verdict(arm, baseline, label, target, rate) for arm, label in zip(arms, labels[1:])]
    if len(judged) > 1:
        for arm, adjusted in zip(judged, holm([arm["p"] for arm in judged])):
            arm.update(p_holm=adjusted, better=better_side(arm["diff"], adjusted))
    return {"target": target, "target_from": whose, "baseline": side(baseline, labels[0], target), "arms": judged}


def diff(runs: RunSet, baseline: RunSet, target: float | None = None, rate: float = LOSS_PER_100_STEPS) -> dict:
    """The runs (the candidate) against the baseline: the verdict, then the curves, the tests and the weights. Models
    of different shapes get each side's own figures only."""
    target, whose = choose_target([runs, baseline], target)
    labels = {"runs": side_label("candidate", runs, baseline), "baseline": side_label("baseline", baseline, runs)}
    reason = incomparable(runs, baseline)
    if reason:
        return {"incomparable": reason, **{key: summarise(s) for key, s in (("runs", runs), ("baseline", baseline))}}
    curves = {"runs": mean_curve(runs.runs), "baseline": mean_curve(baseline.runs)}
    missing = [f"{s.name} has no validation curve" for s, c in zip((runs, baseline), curves.values()) if not c]
    base_by_step = {step: (loss, n) for step, loss, n in curves["baseline"]}
    shared = [{"step": step, "runs": loss, "runs_n": n, "baseline": base_by_step[step][0],
               "baseline_n": base_by_step[step][1], "diff": loss - base_by_step[step][0]}
              for step, loss, n in curves["runs"] if step in base_by_step]
    if missing:
        note = "; ".join(missing) + ": comparing final losses and times only"
    elif not shared:
        note = "the two sets share no validation step: comparing final losses and times only"
    else:
        note = None
    a, b = [r.final.val_loss for r in runs.finished], [r.final.val_loss for r in baseline.finished]
    times = []
    for ta in runs.timings:
        for tb in baseline.timings:
            mean_a, mean_b = float(np.mean(ta.times_s)), float(np.mean(tb.times_s))
            times.append({"runs_timing": ta.label, "runs_n": len(ta.times_s), "runs_s": mean_a,
                          "baseline_timing": tb.label, "baseline_n": len(tb.times_s), "baseline_s": mean_b,
                          "diff_s": mean_a - mean_b, "diff_percent": 100 * (mean_a / mean_b - 1)})
    sides = {key: {"name": s.name, "label": labels[key], "num_runs": len(s.runs),
                   "incomplete": len(s.runs) - len(s.finished), "num_curves": sum(bool(r.val) for r in s.runs),
                   "first_step_at_target": first_step_below([(step, loss) for step, loss, _ in curves[key]], target)}
             for key, s in (("runs", runs), ("baseline", baseline))}
    mean_a, mean_b = mean_std(a)[0], mean_std(b)[0]
    return {
        "verdict": verdict(baseline, [runs], target, whose, [labels["baseline"], labels["runs"]], rate),
        **sides,
        "warnings": setup_warnings([runs, baseline]) + settings_warnings(runs) + settings_warnings(baseline),
        "target": target,
        "note": note,
        "curve": shared,
        "final_val_loss": {"runs": mean_a, "baseline": mean_b, "diff": mean_a - mean_b, "welch": welch(a, b)},
        "paired": paired(runs.finished, baseline.finished),
        "track": pairwise(runs.finished, baseline.finished, rate),
        "train_time": times,
        "analysis": analysis_diff(runs, baseline),
    }


def comparison_sets(folder: Path, allow_incomplete: bool) -> tuple[RunSet, list[RunSet], bool]:
    """The baseline and the arms of a ./run.sh --ab or --sweep folder (FOLDER/baseline and every other subfolder
    with records), and whether its runs shared the node (--gpus_per_run, as its COMPARISON_FILE tells)."""
    if not (folder / "baseline").is_dir():
        raise RecordError(f"{folder}: no baseline/ in it; pass the folder of a ./run.sh --sweep or --ab comparison "
                          "(its --log_dir, or logs/sweep/FLAGS)")
    arm_folders = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "baseline"
                         and any(q.suffix in RECORD_SUFFIXES for q in p.iterdir()))
    if not arm_folders:
        raise RecordError(f"{folder}: only a baseline/, no arm's records beside it yet; run the comparison first")
    saved = folder / COMPARISON_FILE
    try:
        packed = bool(json.loads(saved.read_text()).get("packed")) if saved.is_file() else False
    except (OSError, ValueError, AttributeError) as e:
        raise RecordError(f"{saved}: damaged ({e}); it is rewritten when ./run.sh goes on with the comparison")
    baseline = load_set([str(folder / "baseline")], allow_incomplete)
    return baseline, [load_set([str(p)], allow_incomplete) for p in arm_folders], packed


def knob(arm: RunSet, baseline: RunSet) -> dict:
    """The settings an arm differs from the baseline in, with the arm's values."""
    theirs = shared_settings(baseline)
    return {key: value for key, value in shared_settings(arm).items() if theirs.get(key, value) != value}


def sweep(baseline: RunSet, arms: list[RunSet], target: float | None = None) -> dict:
    """Every arm of a sweep against the baseline (verdict, Holm-adjusted), the paired training-time differences and
    the track's figure of each, and the best side with whether it beats the runner-up."""
    target, whose = choose_target(arms + [baseline], target)
    labels = [side_label("baseline", baseline, arms[0])] + [arm.name for arm in arms]
    v = verdict(baseline, arms, target, whose, labels)
    sides = [(labels[0], baseline)] + list(zip(labels[1:], arms))
    means = [mean_std([r.final.val_loss for r in s.finished])[0] for _, s in sides]
    ranked = sorted(range(len(sides)), key=lambda i: means[i])
    (best, best_set), (second, second_set) = sides[ranked[0]], sides[ranked[1]]
    # the best against the runner-up: the same test as an arm against the baseline
    against = arm_verdict(best_set, second_set, best, target)
    time_p = [arm["time"]["p"] if arm["time"] else math.nan for arm in v["arms"]]
    return {
        "verdict": v,
        "time_p_holm": holm(time_p),
        "warnings": setup_warnings(arms + [baseline]) + [w for s in arms + [baseline] for w in settings_warnings(s)],
        "knobs": [knob(arm, baseline) for arm in arms],
        "baseline_knob": {key: shared_settings(baseline).get(key) for arm in arms for key in knob(arm, baseline)},
        "final_losses": {label: [r.final.val_loss for r in s.finished] for label, s in sides},
        "best": {"label": best, "final_val_loss": means[ranked[0]], "runner_up": second,
                 "runner_up_val_loss": means[ranked[1]], "test": against["test"], "test_n": against["test_n"],
                 "diff": against["diff"], "p": against["p"], "sure": against["better"] == "candidate"},
    }


def final_figures(runs: list[Run]) -> dict[str, list[float]]:
    """METRIC:GROUP -> each run's value at its final validation, over the runs whose analysis has it there."""
    values = {}
    for run in runs:
        if run.analysis is None or run.analysis["steps"][-1:] != [run.final.step]:
            continue
        for group, figures in run.analysis["groups"].items():
            for metric in ANALYSIS_METRICS:
                if figures.get(metric) and figures[metric][-1] is not None:
                    values.setdefault(f"{metric}:{group}", []).append(figures[metric][-1])
    return values


def analysis_diff(runs: RunSet, baseline: RunSet) -> dict:
    """The groups' weight figures at the final validation, mean over the finished runs of each side, side by side
    with their ratio (None where a side lacks a figure)."""
    finals = [final_figures(s.finished) for s in (runs, baseline)]
    lacking = [s.name for s, f in zip((runs, baseline), finals) if not f]
    note = None
    if lacking:
        note = (f"{' and '.join(lacking)}: no analysis figures (they are in the .json records of train_gpt.py runs "
                "with --analysis=on, the default)")
    keys = sorted(dict.fromkeys(key for f in finals for key in f),
                  key=lambda key: ANALYSIS_METRICS.index(key.partition(":")[0]))
    rows = []
    for key in keys:
        (mean_a, n_a), (mean_b, n_b) = [(float(np.mean(f[key])), len(f[key])) if key in f else (None, 0)
                                        for f in finals]
        ratio = mean_a / mean_b if mean_a is not None and mean_b else None
        rows.append({"figure": key, "runs": mean_a, "runs_n": n_a, "baseline": mean_b, "baseline_n": n_b,
                     "ratio": ratio})
    return {"note": note, "final": rows}


def fmt(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows)


def render_summary(s: dict) -> str:
    rows = [[r["name"] + (" *" if r["incomplete"] else ""), f"{r['steps_done']}/{r['num_steps']}",
             fmt(r["final_val_loss"], ".4f"), fmt(r["train_time_s"], ".3f"), fmt(r["ms_per_step"], ".2f")]
            for r in s["runs"]]
    unfinished = s["num_runs"] - s["num_finished"]
    counts = plural(s["num_runs"], "run") + (f" ({unfinished} unfinished)" if unfinished else "")
    out = [summary_verdict(s)] + s["warnings"] + [f"{s['name']}: {counts}, hardware {', '.join(s['hardware'])}", "",
                           table(["run", "steps", "val loss", "time (s)", "ms/step"], rows)]
    out += [f"* unfinished, not in the statistics, {r['source']}: {r['incomplete']}" for r in s["runs"] if r["incomplete"]]
    t = s["t_test_below_target"]
    test = ("p = n/a  (the t-test needs at least 2 runs with different losses)" if math.isnan(t["p"]) else
            f"p = {t['p']:.4f}  (one-sided one-sample t-test, t = {t['t']:.3f}, {t['df']:.0f} df)")
    out += ["", f"val loss     mean {fmt(s['val_loss']['mean'], '.4f')}  std {fmt(s['val_loss']['std'], '.4f')}",
            f"mean < {t['target']}  {test}  (target: {s['target_from']})"]
    out += render_acceptance(s["acceptance"], fmt(s["val_loss"]["mean"], ".4f"))
    for i, timing in enumerate(s["train_time"]):
        out.append(f"{'train time' if i == 0 else '':<12} mean {fmt(timing['mean_s'], '.4f')} s  "
                   f"std {fmt(timing['std_s'], '.4f')} s  ({timing['n']}: {timing['label']})")
    out.append(f"steps        {', '.join(map(str, s['num_steps']))}  ({fmt(s['ms_per_step'], '.2f')} ms per step)")
    if s["peak_memory_mib"]:
        out.append(f"peak memory  {s['peak_memory_mib']['allocated']} MiB allocated, "
                   f"{s['peak_memory_mib']['reserved']} MiB reserved")
    return "\n".join(out)


def summary_verdict(s: dict) -> str:
    """One line: whether the runs reach the target, how sure, and what the track's rule says."""
    mean, t = s["val_loss"]["mean"], s["t_test_below_target"]
    reach = "reach it" if mean < s["target"] else "do not reach it"
    how = (f"below it at p = {t['p']:.2g} (one-sided t-test)" if not math.isnan(t["p"]) else
           "no p-value without 2 runs that differ (./run.sh --runs=N makes N)")
    track = "passes" if s["acceptance"]["passes"] else "does not pass"
    return (f"verdict at target {s['target']} ({s['target_from']}): the runs {reach}, mean {mean:.4f} over "
            f"{plural(s['num_finished'], 'finished run')}; {how}; the track's rule {track}")


def track_verdict(figure: dict, yes: str, no: str) -> str:
    """A track figure against the margin, with the z-score and one-sided p-value it stands for."""
    if math.isnan(figure["figure"]):
        return "n/a"
    return (f"{figure['figure']:+.5f} {'>=' if figure['figure'] >= figure['margin'] else '<'} {figure['margin']}: "
            f"{yes if figure['figure'] >= figure['margin'] else no}  (z = {figure['z']:.2f} at sigma "
            f"{figure['sigma']}, p = {figure['p']:.2g})")


def noise_note(figure: dict) -> list[str]:
    """A line where the runs' loss std is well above the track's sigma: the track's figures then mean little."""
    std = figure["loss_std"]
    if math.isnan(std) or std <= 3 * figure["sigma"]:
        return []
    return [f"{'':<12} (the loss std here is {std:.4f}, {std / figure['sigma']:.0f} x the track's sigma: its figures "
            "assume the record's noise)"]


def render_acceptance(a: dict, mean: str) -> list[str]:
    out = [f"track rule   ({a['target']} - {mean}) x sqrt({a['n']}) = {track_verdict(a, 'passes', 'does not pass')}"]
    if a["shared_steps"]:
        step = a["earliest_step"]
        first = f"step {step['step']} (mean {step['val_loss']:.4f}, {step['figure']:+.5f})" if step else "none"
        out.append(f"{'':<12} earliest step passing: {first}, of the {a['shared_steps']} steps every run validated at")
    return out + noise_note(a)


def render_paired(p: dict | None) -> list[str]:
    if p is None:
        return ["paired       no seed in both sets: Welch's test only"]
    out = [f"paired       by seed, candidate - baseline, {plural(len(p['seeds']), 'pair')} "
           f"(seeds {', '.join(map(str, p['seeds']))})"]
    for key, label, unit, spec in (("final_val_loss", "final loss", "", "+.4f"),
                                   ("train_time_s", "train time", " s", "+.3f")):
        t = p[key]
        if math.isnan(t["p"]):
            out.append(f"  {label:<10} mean {fmt(t['mean'], spec)}{unit}  (the paired t-test needs 2 pairs with "
                       "different differences)")
            continue
        low, high = t["ci95"]
        out.append(f"  {label:<10} mean {t['mean']:{spec}}{unit}  95% CI [{low:{spec}}, {high:{spec}}]{unit}  "
                   f"t = {t['t']:.3f}, {t['df']:.0f} df, p = {t['p']:.4f} (two-sided)")
    for side in ("runs", "baseline"):
        if p["unpaired"][side]:
            seeds = p["unpaired"][side]
            whose = "candidate's" if side == "runs" else "baseline's"
            out.append(f"  left out, without a partner: the {whose} {'seeds' if len(seeds) > 1 else 'seed'} "
                       f"{', '.join(map(str, seeds))}")
        for r in p["repeated"][side]:
            out.append(f"  seed {r['seed']}: {r['runs']} runs in the {'candidate' if side == 'runs' else side}, "
                       "taken as their mean")
    return out


def render_track(t: dict) -> list[str]:
    steps = t["step_diff"]
    steps_part = "n/a" if math.isnan(steps) else f"{'-' if steps < 0 else '+'} {abs(steps):g}"
    return [f"track rule   ({fmt(t['final_loss_diff'], '+.4f')} {steps_part} steps / 100 x {t['rate']}) / "
            f"sqrt(1/{t['n_runs']} + 1/{t['n_baseline']}) = {track_verdict(t, 'candidate better', 'not better')}",
            f"{'':<12} (loss and steps: baseline minus candidate; {t['rate']} of loss for 100 steps)"] + noise_note(t)


def call(arm: dict) -> str:
    """The verdict on one arm in words: which side is better, by how much, how sure; where the step counts differ,
    what the track's rule, which counts steps too, says."""
    diff, steps = arm["diff"], arm["step_diff"]
    size = "n/a" if math.isnan(diff) else f"{abs(diff):.4f} {'lower' if diff < 0 else 'higher'}"
    if steps and not math.isnan(steps):
        track = "the candidate better" if arm["track_better"] else "not better"
        size += f" in {abs(steps):g} {'fewer' if steps < 0 else 'more'} steps (the track's rule: {track})"
    over = plural(arm["test_n"], "seed") if arm["test"] == "paired" else plural(arm["test_n"], "run")
    how = f"p = {arm['p']:.2g}, {arm['test']} t-test over {over}"
    if arm["better"] is None:
        return (f"undecided: the candidate's final loss is {size} than the baseline's, but a t-test needs 2 or more "
                "runs a side with some spread (best: pairs by seed, ./run.sh --ab=FLAGS --runs=4)")
    if arm["better"] == "candidate":
        return f"the candidate is better: its final loss is {size} ({how})"
    if arm["better"] == "baseline":
        return f"the baseline is better: the candidate's final loss is {size} ({how})"
    return f"no clear difference: the candidate's final loss is {size} ({how}); more runs narrow it"


def render_verdict(v: dict) -> list[str]:
    """The verdict in a few lines: a headline, then the baseline and each arm with its difference, interval and
    p-value (and, for several arms, the Holm-adjusted one the headline goes by), its training time and where its mean
    curve first reaches the target."""
    arms = v["arms"]
    several = len(arms) > 1
    if several:
        better = [arm["label"] for arm in arms if arm["better"] == "candidate"]
        headline = (f"{len(better)} of {len(arms)} candidates better than the baseline (Holm-adjusted p < {SURE_P})"
                    + (f": {', '.join(better)}" if better else ""))
    else:
        headline = call(arms[0])
    def first(part):
        step = part["first_step_at_target"]
        return "no curve" if not part["has_curve"] else "not reached" if step is None else f"step {step:.1f}"
    base = v["baseline"]
    rows = [[base["label"], str(base["n"]), loss_and_std(base), "", "", ""] + [""] * several +
            [fmt(base["train_time_s"], ".1f"), first(base)]]
    for arm in arms:
        low, high = arm["ci95"]
        interval = "" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
        rows.append([arm["label"], str(arm["n"]), loss_and_std(arm), fmt(arm["diff"], "+.4f"), interval,
                     fmt(arm["p"], ".2g")] + ([fmt(arm["p_holm"], ".2g")] if several else []) +
                    [fmt(arm["train_time_s"], ".1f"), first(arm)])
    header = ["", "runs", "final loss", "diff", "95% CI", "p"] + ["p (Holm)"] * several + ["time (s)",
                                                                                          f"first at {v['target']}"]
    out = ([f"verdict at target {v['target']} ({v['target_from']}): {headline}"] +
           ["  " + line for line in table(header, rows).splitlines()])
    if several:
        out.append(f"  {len(arms)} arms against one baseline are {len(arms)} tests, and one of them may pass by luck: "
                   "p (Holm) is each p adjusted for that (Holm's method), and the verdict goes by it")
    return out


def loss_and_std(part: dict) -> str:
    std = part["final_val_loss_std"]
    return fmt(part["final_val_loss"], ".4f") + ("" if math.isnan(std) else f" ± {std:.4f}")


def render_incomparable(d: dict) -> str:
    """Each side's own figures, under the line that says why they do not compare."""
    def line(role, s):
        return (f"{role:<9} {s['name']}: {plural(s['num_finished'], 'finished run')}, final loss mean "
                f"{fmt(s['val_loss']['mean'], '.4f')} (target {s['target']}, {s['target_from']}), "
                f"steps {', '.join(map(str, s['num_steps']))}, hardware {', '.join(s['hardware'])}")
    return "\n".join([d["incomparable"] + "; each side's own figures:", line("candidate", d["runs"]),
                      line("baseline", d["baseline"])])


def render_diff(d: dict, all_rows: bool = False) -> str:
    """The verdict first; then the runs, the curves, the statistics, the times and the weights under their own
    headings, the curves and the weights short unless all_rows."""
    if "incomparable" in d:
        return render_incomparable(d)
    def described(part):
        unfinished = f", {part['incomplete']} unfinished (curve only)" if part["incomplete"] else ""
        return f"{part['label']}: {plural(part['num_runs'], 'run')}, {part['num_curves']} with a curve{unfinished}"
    out = render_verdict(d["verdict"]) + [""] + d["warnings"] + [described(d["baseline"]), described(d["runs"]), ""]
    if d["note"]:
        out += [d["note"], ""]
    else:
        shown = d["curve"] if all_rows else evenly(d["curve"], CURVE_ROWS)
        rows = [[str(c["step"]), f"{c['runs']:.4f}", str(c["runs_n"]), f"{c['baseline']:.4f}", str(c["baseline_n"]),
                 f"{c['diff']:+.4f}"] for c in shown]
        out += ["validation loss by step (mean over runs)",
                table(["step", "candidate", "n", "baseline", "n", "diff"], rows)]
        if len(shown) < len(d["curve"]):
            out.append(f"({len(shown)} of the {len(d['curve'])} shared steps; --all shows every one)")
        out.append("")
    f, w = d["final_val_loss"], d["final_val_loss"]["welch"]
    test = (f"Welch t = {w['t']:.3f}, {w['df']:.1f} df, p = {w['p']:.4f} (two-sided)" if not math.isnan(w["p"])
            else "Welch's t-test needs at least 2 runs in each set and some spread")
    out += ["statistics",
            f"final loss   candidate {fmt(f['runs'], '.4f')}  baseline {fmt(f['baseline'], '.4f')}  "
            f"diff {fmt(f['diff'], '+.4f')}  {test}"]
    out += render_paired(d["paired"]) + render_track(d["track"]) + [""]
    rows = [[f"{t['runs_timing']} ({t['runs_n']})", f"{t['baseline_timing']} ({t['baseline_n']})",
             f"{t['runs_s']:.4f}", f"{t['baseline_s']:.4f}", f"{t['diff_s']:+.4f}", f"{t['diff_percent']:+.2f}%"]
            for t in d["train_time"]]
    out.append(table(["candidate timing", "baseline timing", "candidate (s)", "baseline (s)", "diff (s)", "diff"],
                     rows))
    out += render_analysis_diff(d["analysis"], all_rows)
    return "\n".join(out)


def render_sweep(w: dict) -> str:
    """The verdict of every arm, the best side and whether it beats the runner-up, then the training times and the
    track's figure of each arm against the baseline."""
    b = w["best"]
    out = render_verdict(w["verdict"]) + [""]
    out.append(f"best: {b['label']}, mean final loss {b['final_val_loss']:.4f}; the runner-up: {b['runner_up']}, "
               f"{b['runner_up_val_loss']:.4f}")
    over = plural(b["test_n"], "seed" if b["test"] == "paired" else "run")
    test = f"diff {fmt(b['diff'], '+.4f')}, p = {fmt(b['p'], '.2g')}, {b['test']} t-test over {over}"
    out.append(f"  it beats the runner-up: {test}" if b["sure"] else
               f"warning: the best does not beat the runner-up significantly ({test}): more runs decide, or either "
               "will do")
    out += w["warnings"] + ["", "training time and the track's figure, each arm against the baseline"]
    rows = []
    for arm, time_holm in zip(w["verdict"]["arms"], w["time_p_holm"]):
        t = arm["time"]
        if t is None:
            time_cells = ["n/a (no seed in both)", "", "", ""]
        else:
            low, high = t["ci95"]
            time_cells = [fmt(t["mean"], "+.3f"), "" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]",
                          fmt(t["p"], ".2g"), fmt(time_holm, ".2g")]
        figure = arm["track_figure"]
        track = "n/a" if math.isnan(figure) else f"{figure:+.5f} ({'better' if arm['track_better'] else 'not better'})"
        rows.append([arm["label"]] + time_cells + [track])
    out.append(table(["", "time diff (s)", "95% CI", "p", "p (Holm)", f"track figure (>= {TRACK_MARGIN}: better)"],
                     rows))
    out.append(f"(time diff: arm - baseline by seed, paired t-test; track figure: the optimization track's rule for "
               f"the arm beating the baseline, loss and steps)")
    return "\n".join(out)


def packed_note(packed: bool) -> list[str]:
    if not packed:
        return []
    return ["note: these runs shared the node, several at once (./run.sh --gpus_per_run): their losses are "
            "unaffected, their training times are disturbed and do not compare with a record's"]


def evenly(rows: list, most: int) -> list:
    """At most `most` of the rows, evenly spread, the first and the last kept."""
    if len(rows) <= most:
        return rows
    return [rows[i] for i in sorted({round(k * (len(rows) - 1) / (most - 1)) for k in range(most)})]


def render_analysis_diff(a: dict, all_rows: bool = False) -> list[str]:
    """The weight figures' table, of the KEY_GROUPS unless all_rows; nothing where neither side has any."""
    if not a["final"]:
        return []
    def value(x, spec=".4g"):
        return "n/a" if x is None else format(x, spec)
    shown = [r for r in a["final"] if all_rows or r["figure"].partition(":")[2] in KEY_GROUPS]
    rows = [[r["figure"], value(r["runs"]), str(r["runs_n"]), value(r["baseline"]), str(r["baseline_n"]),
             value(r["ratio"], ".3f")] for r in shown]
    out = ["", "weights at the final validation (mean over runs)"]
    if rows:
        out.append(table(["figure", "candidate", "n", "baseline", "n", "candidate / baseline"], rows))
    if len(shown) < len(a["final"]):
        out.append(f"({len(a['final']) - len(shown)} more figures of the other groups; --all shows them)")
    return out + ([a["note"]] if a["note"] else [])


def to_json(report: dict) -> str:
    """JSON text with nan written as null (JSON has no nan)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(report), indent=2)


# -----------------------------------------------------------------------------
# Plot

def write_atomically(path: Path, write) -> None:
    """Write through a temporary file in the same folder so that a failure leaves no partial file."""
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        write(tmp)
        tmp.flush()
        os.fsync(tmp.fileno())
        tmp.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)  # the temporary file was private; give it a normal file's mode
        os.replace(tmp.name, path)
    except BaseException:
        tmp.close()
        os.unlink(tmp.name)
        raise


def loss_range(losses: list[float], target: float = TARGET_LOSS) -> tuple[float, float]:
    """Axis limits around the losses, stretched to show the target line when it is near."""
    low, high = min(losses), max(losses)
    if low < target + 0.2:
        low, high = min(low, target), max(high, target)
    margin = 0.05 * (high - low) or 0.01
    return low - margin, high + margin


def value_range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.01
    return low - margin, high + margin


def analysis_series(run: Run, metric: str) -> list | None:
    """The series METRIC:NAME of a run's analysis, NAME a group or a part; None where the run lacks it."""
    kind, _, name = metric.partition(":")
    if run.analysis is None or kind not in ANALYSIS_METRICS:
        return None
    for section in ("groups", "params"):
        if kind in run.analysis[section].get(name, {}):
            return run.analysis[section][name][kind]
    return None


def run_points(run: Run, metric: str) -> list[tuple[int, float]]:
    """(step, value) of a run's curve of `metric`: its validation losses (the final one alone where only it is
    published), or an analysis series with undefined values as nan (gaps); [] where the run lacks it."""
    if metric == VAL_LOSS:
        return [(p.step, p.val_loss) for p in (run.val or [run.final])]
    series = analysis_series(run, metric) or []
    return [(step, math.nan if v is None else v) for step, v in zip(run.analysis["steps"], series)] if series else []


def metric_label(metric: str) -> str:
    if metric == VAL_LOSS:
        return "validation loss"
    kind, _, name = metric.partition(":")
    return f"{METRIC_LABELS[kind]}, {name}"


def check_metric(sets: list[RunSet], metric: str) -> list[str]:
    """Refuse a metric no run has, naming those the runs have; one warning line per set with runs that lack it."""
    if metric == VAL_LOSS:
        return []
    runs = [r for s in sets for r in s.runs]
    if not any(run_points(r, metric) for r in runs):
        groups = dict.fromkeys(g for r in runs if r.analysis for g in r.analysis["groups"])
        names = [f"{kind}:{g}" for kind in ANALYSIS_METRICS for g in groups
                 if any(analysis_series(r, f"{kind}:{g}") for r in runs)]
        if not names:
            raise RecordError(f"--metric {metric}: no run here has weight figures: they are in the .json records of "
                              f"train_gpt.py runs with --analysis=on (the default); use --metric {VAL_LOSS}")
        close = difflib.get_close_matches(metric, [VAL_LOSS] + names, n=1, cutoff=0.8)
        if close:
            raise RecordError(f"--metric {metric}: no run has it; did you mean --metric {close[0]}?")
        raise RecordError(f"--metric {metric}: no run has it; choose {VAL_LOSS} or METRIC:GROUP, METRIC one of "
                          f"{', '.join(ANALYSIS_METRICS)} and GROUP one of {', '.join(groups)} (or METRIC:PART for a "
                          "part of the record's analysis, e.g. mean_square:blocks.1.mlp.fc)")
    lines = []
    for s in sets:
        lacking = sum(not run_points(r, metric) for r in s.runs)
        if lacking:
            lines.append(f"warning: {plural(lacking, 'run')} of {s.name} without {metric}, not drawn")
    return lines


def draw_runs(ax, sets: list[RunSet], metric: str = VAL_LOSS) -> None:
    """Each run's curve in its set's colour; unfinished runs dashed, runs with only a final loss as dots."""
    for i, runset in enumerate(sets):
        for run in runset.runs:
            points = run_points(run, metric)
            ax.plot([step for step, _ in points], [value for _, value in points], color=f"C{i % 10}",
                    linestyle="--" if run.incomplete else "-", marker="o" if len(points) == 1 else None,
                    linewidth=1.2, markersize=4, alpha=0.7)
    ax.grid(alpha=0.3)


def figure(sets: list[RunSet], metric: str = VAL_LOSS, target: float = TARGET_LOSS):
    """`metric` (the validation loss, or METRIC:NAME of the records' analysis) against step: whole curves from step 0
    on the left, the last third of the steps on the right, each scaled to what it shows; for the validation loss the
    target line only where it falls inside a panel."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12, 5.5), dpi=100, layout="constrained")
    points = [p for s in sets for r in s.runs for p in run_points(r, metric)]
    end = max(max(step for step, _ in points), 1)
    start = 2 * end / 3
    full, last = fig.subplots(1, 2)
    target_shown = False
    for ax, left, title in ((full, 0, "whole run"), (last, start, "last third")):
        draw_runs(ax, sets, metric)
        ax.set_xlim(left - 0.02 * end, 1.02 * end)
        shown = [value for step, value in points if step >= left and not math.isnan(value)]
        if shown:
            ax.set_ylim(*(loss_range(shown, target) if metric == VAL_LOSS else value_range(shown)))
        low, high = ax.get_ylim()
        if metric == VAL_LOSS and low <= target <= high:
            ax.axhline(target, color="black", linestyle=":", linewidth=1)
            target_shown = True
        ax.set_title(title)
        ax.set_xlabel("step")
    full.set_ylabel(metric_label(metric))
    drawn = [(i, s, sum(bool(run_points(r, metric)) for r in s.runs)) for i, s in enumerate(sets)]
    handles = [Line2D([], [], color=f"C{i % 10}", label=f"{s.name} ({plural(n, 'run')})") for i, s, n in drawn if n]
    if target_shown:
        handles.append(Line2D([], [], color="black", linestyle=":", label=f"target {target}"))
    if any(r.incomplete for s in sets for r in s.runs):
        handles.append(Line2D([], [], color="gray", linestyle="--", label="unfinished run"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    fig.suptitle(metric_label(metric))  # the legend names the sets, the baseline last
    return fig


def plot(sets: list[RunSet], out: Path, metric: str = VAL_LOSS, target: float = TARGET_LOSS) -> None:
    fig = figure(sets, metric, target)
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix[1:] not in formats:
        raise RecordError(f"{out}: cannot write a {out.suffix or 'suffix-less'} image; end the name with "
                          f"one of {', '.join('.' + f for f in sorted(formats))}, e.g. curves.png")
    if not out.parent.is_dir():
        raise RecordError(f"{out}: folder {out.parent} does not exist; create it or choose another -o path")
    write_atomically(out, lambda f: fig.savefig(f, format=out.suffix[1:]))


def sweep_figure(w: dict):
    """Each side's final loss, mean and 95% interval over its runs, against the value of the swept flag where one
    numeric flag tells the arms apart, else side by side by name; the baseline in black."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    labels = list(w["final_losses"])
    knobs = [w["baseline_knob"]] + w["knobs"]
    keys = {key for k in knobs for key in k}
    numeric = len(keys) == 1 and all(isinstance(k.get(key), (int, float)) and not isinstance(k.get(key), bool)
                                     for k in knobs for key in keys)
    xs = [k[key] for k in knobs for key in keys] if numeric else list(range(len(labels)))
    means = [float(np.mean(losses)) for losses in w["final_losses"].values()]
    for i, (x, mean, losses) in enumerate(zip(xs, means, w["final_losses"].values())):
        half = interval95(losses)
        ax.errorbar([x], [mean], yerr=None if math.isnan(half) else [half], fmt="o", capsize=5,
                    color="black" if i == 0 else "C0", label="baseline" if i == 0 else None)
    if numeric:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [means[i] for i in order], color="C0", alpha=0.4)
        ax.set_xlabel(f"--{keys.pop()}")
    else:
        ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_ylabel("final validation loss")
    ax.set_title("final validation loss: mean and 95% interval over the seeds")
    return fig


def plot_sweep(baseline: RunSet, arms: list[RunSet], w: dict, folder: Path) -> list[Path]:
    """FOLDER/final_loss.png (sweep_figure) and FOLDER/curves.png (the validation curves of every side)."""
    target = w["verdict"]["target"]
    sets = arms + [dataclasses.replace(baseline, name=w["verdict"]["baseline"]["label"])]
    written = []
    for name, fig in (("final_loss.png", sweep_figure(w)), ("curves.png", figure(sets, VAL_LOSS, target))):
        write_atomically(folder / name, lambda f: fig.savefig(f, format="png"))
        written.append(folder / name)
    return written


# -----------------------------------------------------------------------------
# A baseline of your own: records/NAME from finished runs

def write_record(runset: RunSet, name: str) -> Path:
    """records/NAME/figures.json and README.md from the finished runs of one setup on one machine, so that
    `diff --baseline NAME` compares against times measured where the new runs are."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise RecordError(f"--name {name!r}: use letters, digits, '.', '_' and '-', as in my-baseline")
    folder = RECORDS_DIR / name
    if folder.exists():
        raise RecordError(f"{folder} already exists; choose another --name or remove that folder")
    differences = setup_warnings([runset])
    if differences:
        raise RecordError(f"{differences[0].removeprefix('warning: ')}; a baseline holds runs of one setup on one "
                          "machine: pass only those")
    runs, first = runset.finished, runset.finished[0]
    hardware = first.hardware or "unknown"
    figures = {"format": FIGURES_FORMAT, "name": name, "hardware": hardware, "num_steps": first.num_steps}
    peaks = [r.peak_memory_mib for r in runs if r.peak_memory_mib]
    if peaks:
        figures["peak_memory_mib"] = {"allocated": max(p[0] for p in peaks), "reserved": max(p[1] for p in peaks)}
    if first.config is not None:
        figures["config"] = first.config
    figures["runs"] = [{"source": r.source.name, **({} if r.seed is None else {"seed": r.seed}),
                        "final_val_loss": r.final.val_loss, "train_time_s": r.final.train_time_ms / 1000,
                        "val": [vars(p) for p in r.val]} for r in runs]
    summary = render_summary(summarise(RunSet(name, runs, [])))
    readme = (f"# {name}\n\nA baseline of {plural(len(runs), 'finished run')} on {hardware}, written by "
              f"`python records/compare.py record` from {', '.join(r.source.name for r in runs)}.\n\n"
              f"```\n{summary}\n```\n\n"
              f"Compare new runs with it: `python records/compare.py diff logs/ --baseline {name}`\n")
    write_folder_atomically(folder, {"figures.json": json.dumps(figures, indent=1) + "\n", "README.md": readme})
    return folder


def write_folder_atomically(folder: Path, files: dict[str, str | bytes]) -> None:
    """Write the files (text or bytes, at paths relative to `folder`) into a hidden temporary folder beside `folder`,
    then rename it: no half-written record."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        umask = os.umask(0)
        os.umask(umask)
        for name, content in files.items():
            path = tmp / name
            if path.parent != tmp:
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        tmp.chmod(0o777 & ~umask)  # the temporary folder was private; give it a normal folder's mode
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -----------------------------------------------------------------------------
# A record's folder for the speedrun's repository: records/track_1_short/DATE_NAME with baseline/ and this_pr/

SUBMISSION_TRACK = Path("records/track_1_short")  # where the speedrun's repository keeps its main track's records
SUBMISSION_P = 0.01                       # the main track's rule: mean below the target at p < 0.01
CUDA_LINE = re.compile(r"CUDA Version: ([\d.]+)")
VERSIONS_LINE = re.compile(r"Python (\S+), PyTorch (\S+), Triton (.+)")


def log_of(run: Run) -> Path | None:
    """The .txt log of a run: its source, or the log_file its .json record names; None where it is not there."""
    if run.source.suffix == ".txt":
        return run.source
    try:
        path = run.source.with_name(json.loads(read_text(run.source))["log_file"])
    except (KeyError, TypeError, ValueError):
        return None
    return path if path.is_file() else None


def software_of(run: Run) -> dict[str, str]:
    """The torch, Triton and CUDA versions a run ran with, from its record and its log (CUDA: nvidia-smi's, in the
    log's header); those neither tells are left out."""
    found = {}
    if run.source.suffix == ".json":
        env = json.loads(read_text(run.source)).get("env") or {}
        found = {"torch": env.get("torch"), "Triton": env.get("triton")}
    log = log_of(run)
    if log is not None:
        parts = read_text(log).split("\n" + SEPARATOR + "\n", 2)
        header = parts[1] if len(parts) == 3 else ""  # between the source and the step lines
        if m := VERSIONS_LINE.search(header):
            found = {"torch": found.get("torch") or m[2], "Triton": found.get("Triton") or m[3]}
        if m := CUDA_LINE.search(header):
            found["CUDA"] = m[1]
    return {key: str(value) for key, value in found.items() if value and value != "not installed"}


def one_or_all(values) -> str:
    values = list(dict.fromkeys(values))
    return ", ".join(values) if values else "unknown"


def statistics_md(label: str, runs: list[Run], target: float) -> str:
    """A side's statistics.md: its machine and software, the loss and time figures, the losses and times as lists
    and the scipy lines that recompute its p-value from them."""
    losses = [r.final.val_loss for r in runs]
    times = [r.final.train_time_ms / 1000 for r in runs]
    loss_mean, loss_std = mean_std(losses)
    time_mean, time_std = mean_std(times)
    p = t_test_below(losses, target)["p"]
    software = [software_of(r) for r in runs]
    out = [f"# {label}", ""]
    if not p < SUBMISSION_P:
        out += [f"**These runs do not reach the target: p = {fmt(p, '.4g')}, not below {SUBMISSION_P} (one-sided "
                f"t-test of mean val loss < {target}).**", ""]
    out += [f"- GPUs: {one_or_all(r.hardware or 'unknown' for r in runs)}"]
    out += [f"- {name}: {one_or_all(s[name] for s in software if name in s)}" for name in ("torch", "Triton", "CUDA")]
    out += [f"- runs: {len(runs)}", "", "| figure | value |", "| --- | --- |",
            f"| mean val loss | {fmt(loss_mean, '.4f')} |", f"| val loss std (n - 1) | {fmt(loss_std, '.4f')} |",
            f"| p, one-sided t-test of mean < {target} | {fmt(p, '.4g')} |",
            f"| mean train time | {fmt(time_mean, '.3f')} s |",
            f"| train time std (n - 1) | {fmt(time_std, '.3f')} s |",
            f"| median train time | {float(np.median(times)):.3f} s |",
            f"| train time range | {min(times):.3f} s - {max(times):.3f} s |", "",
            "```python", "import scipy.stats", f"losses = {losses!r}", f"times = {times!r}",
            f'print("p =", scipy.stats.ttest_1samp(losses, {target!r}, alternative="less").pvalue)', "```", ""]
    return "\n".join(out)


def source_of(run: Run) -> str | None:
    """The train_gpt.py a run ran, as its log keeps it above the separator; None where there is no such log."""
    log = log_of(run)
    text = read_text(log) if log else ""
    return text.split("\n" + SEPARATOR + "\n", 1)[0] + "\n" if "\n" + SEPARATOR + "\n" in text else None


def what_changed(runs: RunSet, baseline: RunSet) -> list[str]:
    """The flags the sides differ in, and the diff of the train_gpt.py they ran where the two differ."""
    changed = knob(runs, baseline)
    theirs = shared_settings(baseline)
    flags, before = (" ".join(f"--{key}={flag_value(values[key])}" for key in changed) for values in (changed, theirs))
    out = [f"Flags: `{flags}` (the baseline: `{before}`)." if flags else "Flags: the same on both sides."]
    sources = [source_of(s.finished[0]) for s in (baseline, runs)]
    if None in sources:
        out.append("The logs of one side keep no source: no diff of train_gpt.py.")
    elif sources[0] != sources[1]:
        lines = difflib.unified_diff(sources[0].splitlines(keepends=True), sources[1].splitlines(keepends=True),
                                     "baseline/train_gpt.py", "this_pr/train_gpt.py")
        out += ["", "The diff of train_gpt.py between the two sides' recorded sources:", "", "```diff",
                "".join(lines).rstrip("\n"), "```"]
    else:
        out.append("train_gpt.py is the same on both sides.")
    return out


def time_saved(runs: RunSet, baseline: RunSet) -> str:
    """The training time saved (baseline minus this side), paired by seed where they share 2 seeds, else Welch's."""
    pairs = paired(runs.finished, baseline.finished)
    if pairs and pairs["train_time_s"]["n"] >= 2:
        t = pairs["train_time_s"]
        saved, (low, high), how = -t["mean"], [-x for x in reversed(t["ci95"])], f"paired by seed over {t['n']} seeds"
        p = t["p"]
    else:
        mine, theirs = ([r.final.train_time_ms / 1000 for r in s.finished] for s in (runs, baseline))
        w = welch(theirs, mine)
        saved, (low, high), how, p = float(np.mean(theirs) - np.mean(mine)), w["ci95"], "Welch's t-test", w["p"]
    base = mean_std([r.final.train_time_ms / 1000 for r in baseline.finished])[0]
    interval = "n/a" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}] s"
    return (f"Time saved: {saved:+.3f} s ({100 * saved / base:+.2f}% of the baseline's {base:.3f} s), 95% interval "
            f"{interval}, p = {fmt(p, '.3g')} ({how}, two-sided).")


def submission(runs: RunSet, baseline: RunSet, name: str, out: Path, target: float | None = None,
               today: datetime.date | None = None) -> Path:
    """OUT/records/track_1_short/DATE_NAME: baseline/ and this_pr/ with their logs and statistics.md, and a README
    with what changed, the time saved and the plots (the validation curves, and the weights' mean square where the
    records hold it)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise RecordError(f"--name {name!r}: use letters, digits, '.', '_' and '-', as in CautiousWD")
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    folder = out / SUBMISSION_TRACK / f"{today:%Y-%m-%d}_{name}"
    if folder.exists():
        raise RecordError(f"{folder} already exists; choose another --name or --out, or remove that folder")
    reason = incomparable(runs, baseline)
    if reason:
        raise RecordError(f"{reason}; a record compares runs of one model")
    target = choose_target([runs, baseline], target)[0]
    sides = {"this_pr": runs, "baseline": baseline}
    files: dict[str, str | bytes] = {}
    failing = []
    for side_name, runset in sides.items():
        files[f"{side_name}/statistics.md"] = statistics_md(f"{side_name}: {runset.name}", runset.finished, target)
        for run in runset.finished:
            log = log_of(run)
            if log is not None:
                files[f"{side_name}/{log.name}"] = log.read_bytes()
        p = t_test_below([r.final.val_loss for r in runset.finished], target)["p"]
        if not p < SUBMISSION_P:
            failing.append(f"**{side_name} does not reach the target: p = {fmt(p, '.4g')}, not below "
                           f"{SUBMISSION_P} (one-sided t-test of mean val loss < {target}).**")
    sets = [dataclasses.replace(runs, name="this_pr"), dataclasses.replace(baseline, name="baseline")]
    plots = {"curves.png": ("validation loss", VAL_LOSS)}
    for group in KEY_GROUPS:
        metric = f"mean_square:{group}"
        if any(run_points(r, metric) for s in sets for r in s.finished):
            plots[f"mean_square_{group}.png"] = (f"mean square of the {group} weights", metric)
    for file_name, (_, metric) in plots.items():
        buffer = io.BytesIO()
        figure([dataclasses.replace(s, runs=s.finished) for s in sets], metric, target).savefig(buffer, format="png")
        files[file_name] = buffer.getvalue()
    means = {key: mean_std([r.final.val_loss for r in s.finished])[0] for key, s in sides.items()}
    readme = [f"# {name}", ""] + [line for f in failing for line in (f, "")] + ["## What changed", ""]
    readme += what_changed(runs, baseline) + ["", "## Results", "",
               f"Mean final validation loss {means['this_pr']:.4f} over {plural(len(runs.finished), 'run')} "
               f"(baseline: {means['baseline']:.4f} over {len(baseline.finished)}), target {target}.", "",
               time_saved(runs, baseline), ""]
    readme += [f"![{title}]({file_name})" for file_name, (title, _) in plots.items()]
    readme += ["", "Each side's figures, its losses and times, and the lines that recompute its p-value: "
               "[this_pr/statistics.md](this_pr/statistics.md), [baseline/statistics.md](baseline/statistics.md); "
               "its logs beside them.", ""]
    files["README.md"] = "\n".join(readme)
    write_folder_atomically(folder, files)
    return folder


# -----------------------------------------------------------------------------
# Command line

def finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number, e.g. 3.28")
    return value


class CommandParser(argparse.ArgumentParser):
    """argparse that names the flag meant where an unknown one is close to one of any command's."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (-[\w-]+)", message)
        close = difflib.get_close_matches(unknown[1], self.known_flags(), n=1) if unknown else []
        super().error(message + (f" (did you mean {close[0]}?)" if close else ""))

    def known_flags(self) -> list[str]:
        flags = []
        for action in self._actions:
            flags += action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                flags += [flag for sub in action.choices.values() for flag in sub.known_flags()]
        return flags


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python records/compare.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Summarise and compare speedrun runs against each other, against published records and "
                    "against baselines of your own.",
        epilog="RUN: " + RUN_HELP + ".\n"
               "Only finished runs count. Other files (failed, interrupted or running runs, files that are not "
               "records) are skipped with a line each on stderr; --allow-incomplete shows unfinished runs' curves, "
               "never their losses in the statistics.\n\n"
               "examples:\n  python records/compare.py summary record43\n"
               "  python records/compare.py diff logs/ --baseline record43\n"
               "  python records/compare.py plot logs/ --baseline record43 -o curves.png\n"
               "  python records/compare.py record logs/baseline --name mybox\n"
               "  python records/compare.py sweep logs/sweep/weight_decay=0.6,0.9,1.5,1.8\n"
               "  python records/compare.py submission logs/b --baseline logs/a --name CautiousWD")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help, description):
        sub = commands.add_parser(name, help=help, description=description)
        sub.add_argument("runs", nargs="+", metavar="RUN", help=RUN_HELP)
        return sub

    def add_allow_incomplete(sub):
        sub.add_argument("--allow-incomplete", action="store_true",
                         help="show failed, interrupted or running runs too (marked), outside the statistics")

    summary = add("summary", "statistics of one set of runs",
                  "Statistics of the RUNs taken as one set: per-run final validation loss and time, loss mean "
                  "and sample std, the one-sided one-sample t-test that the mean is below the target, the "
                  f"optimization track's acceptance figure (target - mean) x sqrt(n) against {TRACK_MARGIN} and the "
                  "earliest validated step at which the runs' mean passes it, training time mean and std, step "
                  "count and ms per step.")
    diffing = add("diff", "compare a set of runs with a baseline",
                  "Compare the RUNs with a baseline: mean loss of each at every validation step both have, the "
                  "final loss difference with Welch's t-test, the paired t-tests of final loss and training time "
                  "over the seeds both sets ran, the optimization track's figure for the runs beating the "
                  f"baseline against {TRACK_MARGIN}, the training time difference, and the step (interpolated) at "
                  "which each mean curve first reaches the target.")
    diffing.add_argument("--baseline", required=True, metavar="NAME_OR_PATH",
                         help="the runs to compare against, as a RUN: record43, record42, a record of your own or a path")
    diffing.add_argument("--all", action="store_true",
                         help="every validation step and every group's weight figures (default: a dozen steps and "
                              f"the {' and '.join(KEY_GROUPS)} groups)")
    diffing.add_argument("--loss-per-100-steps", type=finite_number, default=LOSS_PER_100_STEPS, metavar="RATE",
                         help="the loss that 100 steps are worth in the track's figure (default: %(default)s, "
                              "measured on the track's baseline)")
    sweeping = commands.add_parser(
        "sweep", help="the verdict of a ./run.sh --sweep or --ab folder",
        description="The verdict of every arm of a ./run.sh --sweep (or --ab) comparison against its baseline: final "
                    "loss, the paired difference by seed with its 95% interval and p-value (with several arms also "
                    "Holm-adjusted), the same for the training time, the track's figure and the step at which each "
                    "mean curve reaches the target; the best side, and whether it beats the runner-up. Writes "
                    "FOLDER/final_loss.png (final loss against the swept value) and FOLDER/curves.png. One arm "
                    "(--ab) gets diff's report.")
    sweeping.add_argument("folder", metavar="FOLDER", type=Path,
                          help="the comparison's folder: baseline/ and one subfolder an arm, as ./run.sh made them")
    for sub in (summary, diffing, sweeping):
        add_allow_incomplete(sub)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plotting = add("plot", "plot validation loss (or a weight figure) against step",
                   "Plot the validation loss of the RUNs (and the baseline) against step, or with --metric a weight "
                   "figure of their analysis: the whole curves, and the last third of the steps (for the loss, near "
                   "the target). Unfinished runs are drawn dashed; runs with only a published final loss as dots.")
    plotting.add_argument("--baseline", metavar="NAME_OR_PATH",
                          help="runs to draw in a second colour, as a RUN: record43, record42 or a path")
    plotting.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image to write (.png, .svg, .pdf)")
    plotting.add_argument("--metric", default=VAL_LOSS, metavar="NAME",
                          help=f"what to draw: {VAL_LOSS} (the default), or a weight figure of the records' "
                               f"analysis as METRIC:GROUP with METRIC one of {', '.join(ANALYSIS_METRICS)} and GROUP "
                               "e.g. attn, mlp, mlp_in, attn_o, embed (or a part: mean_square:blocks.1.mlp.fc)")
    add_allow_incomplete(plotting)
    recording = add("record", "write records/NAME from finished runs, a baseline of your own",
                    "Write records/NAME/ (figures.json, and a README with the runs table, mean, std and p-value) "
                    "from the finished RUNs, which must share one setup and machine; then "
                    "`diff RUNS --baseline NAME` compares against times measured on this machine.")
    recording.add_argument("--name", required=True, help="the folder to create in records/, e.g. mybox")
    submitting = add("submission", "write the folder a record's pull request adds to the speedrun's repository",
                     f"Write OUT/{SUBMISSION_TRACK}/DATE_NAME/ from the finished RUNs (this_pr/) and the baseline's "
                     "(baseline/): each side's .txt logs and a statistics.md (GPUs, torch, Triton and CUDA versions, "
                     "runs; mean val loss, its std, the one-sided p for the target, the training time's mean, std, "
                     "median and range; the losses and times as Python lists and the scipy lines that recompute p), "
                     "and a README.md with what changed (flags, or the diff of the recorded train_gpt.py), the time "
                     "saved with its paired interval, and the validation curves and weight figures as PNG files. "
                     f"A side whose p is not below {SUBMISSION_P} gets the folder too, with that said at the top.")
    submitting.add_argument("--baseline", required=True, metavar="NAME_OR_PATH", help="the runs the record beats")
    submitting.add_argument("--name", required=True, help="the record's name, e.g. CautiousWD")
    submitting.add_argument("--out", type=Path, default=Path("submission"),
                            help=f"the folder to write {SUBMISSION_TRACK}/DATE_NAME in, e.g. a clone of the "
                                 "speedrun's repository (default: %(default)s)")
    for sub in (summary, diffing, plotting, sweeping, submitting):
        sub.add_argument("--target", type=finite_number, metavar="LOSS",
                         help="the validation loss to reach, in every figure, p-value and line (default: the one the "
                              f"(baseline's) runs aim at, set with their preset: {TARGET_LOSS} for the record "
                              "presets, the tiny preset's own for tiny runs)")
    return parser


def print_sweep(folder: Path, target: float | None, allow_incomplete: bool, as_json: bool) -> int:
    """compare.py sweep: the report of a comparison's folder, its plots written beside its runs."""
    baseline, arms, packed = comparison_sets(folder, allow_incomplete)
    w = sweep(baseline, arms, target)
    plots = plot_sweep(baseline, arms, w, folder)
    if len(arms) == 1:
        report = diff(arms[0], baseline, target)
        text = render_diff(report)
    else:
        report, text = w, render_sweep(w)
    report = {**report, "packed": packed, "plots": [str(p) for p in plots]}
    print(to_json(report) if as_json else "\n".join([text, ""] + packed_note(packed) +
                                                     [f"plots: {', '.join(map(str, plots))}"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        allow_incomplete = getattr(args, "allow_incomplete", False)
        if args.command == "sweep":
            return print_sweep(args.folder, args.target, allow_incomplete, args.json)
        runs = load_set(args.runs, allow_incomplete)
        baseline = load_set([args.baseline], allow_incomplete) if getattr(args, "baseline", None) else None
        if args.command == "record":
            folder = write_record(runs, args.name)
            print(f"wrote {folder} from {plural(len(runs.finished), 'finished run')}; compare with it: "
                  f"python records/compare.py diff RUN... --baseline {args.name}")
            return 0
        if args.command == "submission":
            folder = submission(runs, baseline, args.name, args.out, args.target)
            print(f"wrote {folder}: README.md, baseline/ and this_pr/; copy {args.out / 'records'} into a clone of "
                  "the speedrun's repository for the pull request")
            return 0
        if args.command == "plot":
            sets = [runs] + ([baseline] if baseline else [])
            reason = incomparable(runs, baseline) if baseline else None
            for line in ([f"warning: {reason}"] if reason else setup_warnings(sets)) + check_metric(sets, args.metric):
                print(line, file=sys.stderr)
            if baseline:  # the legend names the sides as diff does
                sets = [dataclasses.replace(runs, name=side_label("candidate", runs, baseline)),
                        dataclasses.replace(baseline, name=side_label("baseline", baseline, runs))]
            plot(sets, Path(args.output), args.metric, choose_target(sets, args.target)[0])
            print(f"wrote {args.output}")
            return 0
        if args.command == "summary":
            report, render = summarise(runs, args.target), render_summary
        else:
            report = diff(runs, baseline, args.target, args.loss_per_100_steps)
            render = lambda d: render_diff(d, args.all)  # noqa: E731
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
