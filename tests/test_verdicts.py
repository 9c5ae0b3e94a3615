"""The verdicts on runs: paired statistics by seed, the optimization track's figures, dense validation near the end,
and interleaved A/B comparisons (records/ab.py and ./run.sh --ab)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from test_records import LOSSES_43, cli, cli_json, curve, log_text, mean_and_std, record_json, write_run
from test_train import ROOT, fake_nvidia_smi, run_trainer, shards, tiny_args  # noqa: F401 (shards: a fixture)

sys.path.insert(0, str(ROOT / "records"))
import ab  # noqa: E402
import compare  # noqa: E402
import train_gpt as tg  # noqa: E402

T_975_4DF = 2.7764451  # Student's t, 97.5% quantile at 4 degrees of freedom (statistical tables)


def seeded_run(folder: Path, name: str, seed: int | None, final: float, time_s: float = 20.0, steps: int = 400,
               val: dict[int, float] | None = None) -> Path:
    """A finished train_gpt.py record of the given seed, final loss, training time and step count."""
    val = val or {**{s: v for s, v in curve(final).items() if s < steps}, steps: final}
    record = record_json(name, val, steps, steps, "finished", setup={} if seed is None else {"seed": seed})
    record["val"][-1]["train_time_ms"] = record["train_time_ms"] = 1000 * time_s
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def runset(folder: Path) -> compare.RunSet:
    return compare.load_set([str(folder)], False)


# -----------------------------------------------------------------------------
# The optimization track's figures

def test_pairwise_figure_of_the_track_readmes_example_12_against_6(tmp_path):
    """#12 against #6: final_loss_diff -0.0002 (its loss 0.0002 higher), 50 steps fewer, 20 runs each: 0.00648."""
    for i in range(20):
        seeded_run(tmp_path / "six", f"six{i}", None, 3.2790 + (i % 5 - 2) * 1e-4, steps=2000)
        seeded_run(tmp_path / "twelve", f"twelve{i}", None, 3.2792 + (i % 5 - 2) * 1e-4, steps=1950)
    t = compare.diff(runset(tmp_path / "twelve"), runset(tmp_path / "six"))["track"]
    assert t["final_loss_diff"] == pytest.approx(-0.0002) and t["step_diff"] == 50
    assert t["n_runs"] == t["n_baseline"] == 20 and t["rate"] == 0.0045
    assert round(t["figure"], 5) == 0.00648 and t["better"] is True
    # its z-score and one-sided p-value at the track's sigma, by hand
    assert t["z"] == pytest.approx(0.0064827 / 0.0013, rel=1e-4)
    assert t["p"] == pytest.approx(0.5 * math.erfc(t["z"] / math.sqrt(2)))
    # the other way round the figure changes sign; a lower rate counts the 50 steps for less
    back = compare.diff(runset(tmp_path / "six"), runset(tmp_path / "twelve"))["track"]
    assert back["figure"] == pytest.approx(-t["figure"]) and back["better"] is False
    d = cli_json("diff", tmp_path / "twelve", "--baseline", tmp_path / "six", "--loss-per-100-steps", "0.002")
    assert d["track"]["figure"] == pytest.approx((-0.0002 + 50 / 100 * 0.002) / math.sqrt(2 / 20))
    assert d["track"]["rate"] == 0.002 and d["track"]["better"] is False
    arm = d["verdict"]["arms"][0]  # the verdict's line counts the steps at the same rate
    assert arm["track_figure"] == pytest.approx(d["track"]["figure"]) and arm["track_better"] is False
    code, out, _ = cli("diff", tmp_path / "twelve", "--baseline", tmp_path / "six", "--loss-per-100-steps", "0.002")
    assert code == 0 and "in 50 fewer steps (the track's rule: not better)" in out.splitlines()[0]
    code, out, _ = cli("diff", tmp_path / "twelve", "--baseline", tmp_path / "six")
    assert code == 0
    assert ("track rule   (-0.0002 + 50 steps / 100 x 0.0045) / sqrt(1/20 + 1/20) = +0.00648 >= 0.004: candidate better"
            in out)
    # the verdict comes first: the final loss alone favours the baseline, the steps saved turn the track's rule
    assert out.splitlines()[0].startswith("verdict at target 3.28 (the speedrun's): the baseline is better: the "
                                          "candidate's final loss is 0.0002 higher in 50 fewer steps (the track's "
                                          "rule: the candidate better) (p = ")


def test_acceptance_figure_of_record43_by_hand():
    mean = sum(LOSSES_43) / len(LOSSES_43)
    figure = (3.28 - mean) * math.sqrt(10)
    a = cli_json("summary", "record43")["acceptance"]
    assert a["figure"] == pytest.approx(figure) and round(figure, 5) == 0.00503
    assert a["passes"] is True and a["margin"] == 0.004 and a["sigma"] == 0.0013 and a["n"] == 10
    assert a["p"] == pytest.approx(0.5 * math.erfc(figure / 0.0013 / math.sqrt(2)))
    # one run with a curve: no step at which all ten validated
    assert a["shared_steps"] == 0 and a["earliest_step"] is None
    # --target moves the figure and the t-test's p-value alike
    s = cli_json("summary", "record43", "--target", "3.279")
    assert s["acceptance"]["figure"] == pytest.approx((3.279 - mean) * math.sqrt(10)) and not s["acceptance"]["passes"]
    assert s["t_test_below_target"]["target"] == 3.279
    assert s["t_test_below_target"]["p"] == pytest.approx(stats.ttest_1samp(LOSSES_43, 3.279, alternative="less").pvalue)
    code, out, _ = cli("summary", "record43")
    assert code == 0
    assert ("track rule   (3.28 - 3.2784) x sqrt(10) = +0.00503 >= 0.004: passes  (z = 3.87 at sigma 0.0013, "
            "p = 5.5e-05)") in out


def test_earliest_step_at_which_the_mean_passes_with_dense_validation(tmp_path):
    """Four runs validated every 25 steps near the end: sqrt(4) = 2, so the mean must be at most 3.278. Mean at
    2175: 3.2790 (figure 0.0020), at 2200: 3.2779 (0.0042, passes). A step only one run validated at is no step."""
    means = {2150: 3.2810, 2175: 3.2790, 2200: 3.2779, 2225: 3.2776, 2245: 3.2770}
    for i, spread in enumerate((-0.0003, -0.0001, 0.0001, 0.0003)):
        val = {0: 10.8, 2000: 3.32, **{s: m + spread for s, m in means.items()}}
        if i == 0:
            val[2190] = 3.0  # an extra validation of one run only
        seeded_run(tmp_path, f"r{i}", i, val[2245], steps=2245, val=val)
    a = cli_json("summary", tmp_path)["acceptance"]
    assert a["shared_steps"] == 7
    assert a["earliest_step"]["step"] == 2200
    assert a["earliest_step"]["val_loss"] == pytest.approx(3.2779)
    assert a["earliest_step"]["figure"] == pytest.approx((3.28 - 3.2779) * 2)
    assert a["figure"] == pytest.approx((3.28 - 3.2770) * 2) and a["passes"]
    # a lower target: only the final step passes ((3.2786 - 3.2770) x 2 = 0.0032 < 0.004 fails; at 3.2791: 0.0042)
    assert cli_json("summary", tmp_path, "--target", "3.2786")["acceptance"]["earliest_step"] is None
    assert cli_json("summary", tmp_path, "--target", "3.2791")["acceptance"]["earliest_step"]["step"] == 2245
    code, out, _ = cli("summary", tmp_path)
    assert "earliest step passing: step 2200 (mean 3.2779, +0.00420), of the 7 steps every run validated at" in out


def test_target_moves_the_steps_to_target_and_the_plot_line(tmp_path):
    seeded_run(tmp_path / "a", "a", 0, 3.30)
    seeded_run(tmp_path / "b", "b", 0, 3.30)
    d = cli_json("diff", tmp_path / "b", "--baseline", tmp_path / "a", "--target", "3.6")
    assert d["target"] == 3.6 and d["runs"]["first_step_at_target"] == 200  # curve(): 3.6 at step 200
    assert cli_json("diff", tmp_path / "b", "--baseline", tmp_path / "a")["runs"]["first_step_at_target"] is None
    fig = compare.figure([runset(tmp_path / "a")], target=3.32)
    full, last = fig.axes
    lines = [list(line.get_ydata()) for line in last.get_lines()]
    assert [3.32, 3.32] in lines and [compare.TARGET_LOSS] * 2 not in lines
    assert "target 3.32" in [t.get_text() for t in fig.legends[0].get_texts()]
    out = tmp_path / "curves.png"
    code, _, err = cli("plot", tmp_path / "a", "-o", out, "--target", "3.32")
    assert code == 0 and out.stat().st_size > 1000, err
    code, _, err = cli("summary", tmp_path / "a", "--target", "nan")
    assert code == 2 and "--target: 'nan' is not a finite number" in err


def test_track_figures_say_when_the_runs_are_far_noisier_than_the_track_assumes(tmp_path):
    """The tiny preset's final losses spread by about 0.05, 40 times the record's 0.0013."""
    for seed, (a, b) in enumerate([(4.7159, 4.7089), (4.6314, 4.6281)]):
        seeded_run(tmp_path / "a", f"a{seed}", seed, a)
        seeded_run(tmp_path / "b", f"b{seed}", seed, b)
    std = mean_and_std([4.7159, 4.6314])[1]
    d = cli_json("diff", tmp_path / "b", "--baseline", tmp_path / "a")
    assert d["track"]["loss_std"] == pytest.approx(std)
    note = f"(the loss std here is {std:.4f}, {std / 0.0013:.0f} x the track's sigma: its figures assume the record's noise)"
    assert note in cli("diff", tmp_path / "b", "--baseline", tmp_path / "a")[1]
    assert note in cli("summary", tmp_path / "a")[1]
    assert "track's sigma:" not in cli("summary", "record43")[1]  # std 0.0013 itself


# -----------------------------------------------------------------------------
# Paired statistics

BASE = [3.2800, 3.2750, 3.2830, 3.2770, 3.2810]        # seeds 0..4: the seeds' own noise is large
CAND = [3.2789, 3.2738, 3.2821, 3.2759, 3.2797]        # and the candidate about 0.0011 lower on each
BASE_TIME = [20.10, 20.30, 19.90, 20.00, 20.20]
CAND_TIME = [19.80, 20.05, 19.70, 19.65, 20.00]


def paired_folders(tmp_path) -> tuple[Path, Path]:
    for seed in range(5):
        seeded_run(tmp_path / "a", f"a{seed}", seed, BASE[seed], BASE_TIME[seed])
        seeded_run(tmp_path / "b", f"b{seed}", seed, CAND[seed], CAND_TIME[seed])
    return tmp_path / "b", tmp_path / "a"


def test_paired_t_test_against_scipy_and_a_hand_computed_interval(tmp_path):
    runs, base = paired_folders(tmp_path)
    d = cli_json("diff", runs, "--baseline", base)
    p = d["paired"]
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["unpaired"] == {"runs": [], "baseline": []}
    for key, cand, basel in (("final_val_loss", CAND, BASE), ("train_time_s", CAND_TIME, BASE_TIME)):
        ref = stats.ttest_rel(cand, basel)
        diffs = [c - b for c, b in zip(cand, basel)]
        mean, std = mean_and_std(diffs)
        half = T_975_4DF * std / math.sqrt(5)
        t = p[key]
        assert t["n"] == 5 and t["df"] == 4
        assert t["t"] == pytest.approx(ref.statistic) and t["p"] == pytest.approx(ref.pvalue)
        assert t["mean"] == pytest.approx(mean)
        assert t["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-6)
    # pairing sees what Welch's test cannot: the seeds' noise is shared
    assert p["final_val_loss"]["p"] < 0.001 < 0.5 < d["final_val_loss"]["welch"]["p"]
    code, out, _ = cli("diff", runs, "--baseline", base)
    t = p["final_val_loss"]
    assert "paired       by seed, candidate - baseline, 5 pairs (seeds 0, 1, 2, 3, 4)" in out
    assert (f"  final loss mean {t['mean']:+.4f}  95% CI [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]  "
            f"t = {t['t']:.3f}, 4 df, p = {t['p']:.4f} (two-sided)") in out
    assert out.index("paired") < out.index("track rule") < out.index("candidate timing")


def test_pairs_are_the_seeds_both_sets_ran_and_a_repeated_seed_counts_once(tmp_path):
    for seed in range(4):
        seeded_run(tmp_path / "a", f"a{seed}", seed + 1, BASE[seed + 1])   # baseline: seeds 1..4
        seeded_run(tmp_path / "b", f"b{seed}", seed, CAND[seed])           # runs: seeds 0..3
    seeded_run(tmp_path / "b", "b1again", 1, 3.2700)                       # seed 1 twice in the runs
    p = cli_json("diff", tmp_path / "b", "--baseline", tmp_path / "a")["paired"]
    assert p["seeds"] == [1, 2, 3] and p["unpaired"] == {"runs": [0], "baseline": [4]}
    assert p["repeated"] == {"runs": [{"seed": 1, "runs": 2}], "baseline": []}
    diffs = [(CAND[1] + 3.2700) / 2 - BASE[1], CAND[2] - BASE[2], CAND[3] - BASE[3]]
    ref = stats.ttest_1samp(diffs, 0)
    assert p["final_val_loss"]["n"] == 3 and p["final_val_loss"]["p"] == pytest.approx(ref.pvalue)
    code, out, _ = cli("diff", tmp_path / "b", "--baseline", tmp_path / "a")
    assert "  left out, without a partner: the candidate's seed 0" in out
    assert "  left out, without a partner: the baseline's seed 4" in out
    assert "  seed 1: 2 runs in the candidate, taken as their mean" in out


def test_sets_without_shared_seeds_keep_welch_only(tmp_path):
    runs, _ = paired_folders(tmp_path)
    d = cli_json("diff", runs, "--baseline", "record43")  # published figures tell no seeds
    assert d["paired"] is None and d["final_val_loss"]["welch"]["p"] is not None
    assert "paired       no seed in both sets: Welch's test only" in cli("diff", runs, "--baseline", "record43")[1]
    one = tmp_path / "one"
    seeded_run(one, "x", 0, 3.28)
    p = cli_json("diff", one, "--baseline", tmp_path / "a")["paired"]
    assert p["seeds"] == [0] and p["final_val_loss"]["p"] is None  # one pair: no test
    assert p["final_val_loss"]["mean"] == pytest.approx(3.28 - BASE[0])


def test_seeds_are_read_from_logs_and_kept_by_a_baseline_of_your_own(tmp_path, monkeypatch):
    log = tmp_path / "run.txt"
    log.write_text(log_text(curve(3.279), 400, 400, True).replace('config: {"preset"', 'config: {"seed": 7, "preset"'))
    assert compare.load_file(log).runs[0].seed == 7
    write_run(tmp_path / "noseed", "x", curve(3.279))  # a configuration without seed
    assert compare.load_file(tmp_path / "noseed" / "x.json").runs[0].seed is None
    monkeypatch.setattr(compare, "RECORDS_DIR", tmp_path / "records")
    (tmp_path / "records").mkdir()
    runs, base = paired_folders(tmp_path)
    assert cli("record", base, "--name", "mybox")[0] == 0
    figures = json.loads((tmp_path / "records" / "mybox" / "figures.json").read_text())
    assert [r["seed"] for r in figures["runs"]] == [0, 1, 2, 3, 4]
    assert cli_json("diff", runs, "--baseline", "mybox")["paired"]["seeds"] == [0, 1, 2, 3, 4]


# -----------------------------------------------------------------------------
# Dense validation in the trainer

def test_validation_steps_with_dense_validation_near_the_end():
    cfg = tg.parse_config(["--dense_val_every=25", "--dense_val_steps=200"])
    steps = [s for s in range(2246) if tg.validates(cfg, s, 2245)]
    assert steps == [0, 250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2050, 2075, 2100, 2125, 2150, 2175, 2200, 2225,
                     2245]
    cfg = tg.parse_config([])  # the record's: every 250 steps, none dense
    assert [s for s in range(2246) if tg.validates(cfg, s, 2245)] == list(range(0, 2001, 250)) + [2245]
    cfg = tg.parse_config(["--val_loss_every=0", "--dense_val_every=10", "--dense_val_steps=30", "--max_steps=100"])
    assert [s for s in range(101) if tg.validates(cfg, s, 100)] == [0, 70, 80, 90, 100]  # near --max_steps' stop


@pytest.mark.parametrize("flags", [["--dense_val_every=25"], ["--dense_val_steps=200"]])
def test_dense_validation_needs_both_flags(flags):
    with pytest.raises(tg.ConfigError, match="give both .*e.g. --dense_val_every=25 --dense_val_steps=200"):
        tg.parse_config(flags)


def test_the_trainer_validates_densely_near_its_stop(shards, tmp_path):  # noqa: F811
    result = run_trainer(tiny_args(shards, tmp_path, "--max_steps=5", "--warmup_steps=0", "--val_loss_every=0",
                                   "--dense_val_every=2", "--dense_val_steps=3", "--val_tokens=1024"), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = (tmp_path / "logs").glob("*.json")
    record = json.loads(path.read_text())
    assert [p["step"] for p in record["val"]] == [0, 2, 4, 5]
    times = [p["train_time_ms"] for p in record["val"]]
    assert times == sorted(times) and record["train_time_ms"] == times[-1]


# -----------------------------------------------------------------------------
# The plan of an A/B comparison (records/ab.py)

TRAINER = ["python", "train_gpt.py", "--preset=tiny"]


def test_plan_alternates_baseline_and_candidate_seed_by_seed_and_saves_the_comparison(tmp_path):
    command = TRAINER + [f"--log_dir={tmp_path}"]
    lines = ab.plan(2, ab.ab_comparison("--adam_weight_decay=0.005"), command)
    flags = ["--adam_weight_decay=0.005"]
    assert lines == [("baseline", 0, tmp_path / "baseline", "", []), ("candidate", 0, tmp_path / "candidate", "", flags),
                     ("baseline", 1, tmp_path / "baseline", "", []), ("candidate", 1, tmp_path / "candidate", "", flags)]
    saved = json.loads((tmp_path / "ab.args").read_text())
    assert saved == {"format": "train_gpt-ab/2", "kind": "ab", "given": ["--adam_weight_decay=0.005"],
                     "arms": {"candidate": flags}, "command": command, "packed": False}


def test_plan_of_the_gpu_command_reads_the_trainers_arguments_after_torchrun(tmp_path):
    command = ["torchrun", "--standalone", "--nproc_per_node=8", "train_gpt.py", "--train_files=d/fineweb_train_*.bin",
               "--val_files=d/fineweb_val_*.bin", "--log_dir", str(tmp_path / "gpu")]
    lines = ab.plan(1, ab.ab_comparison("--muon_lr=0.035 --num_scheduled_iterations=2150"), command)
    assert [(role, folder) for role, _, folder, _, _ in lines] == [("baseline", tmp_path / "gpu" / "baseline"),
                                                               ("candidate", tmp_path / "gpu" / "candidate")]
    with pytest.raises(ab.ABError, match="the baseline's arguments: unknown flag --nproc_per_node"):
        ab.plan(1, ab.ab_comparison("--muon_lr=0.035"), ["torchrun", "train_gpt.py", "--nproc_per_node=8"])


def test_plan_skips_the_runs_that_finished_and_only_those(tmp_path):
    command = TRAINER + ["--log_dir", str(tmp_path)]
    ab.plan(3, ab.ab_comparison("--muon_lr=0.035"), command)
    done = {"a0": seeded_run(tmp_path / "baseline", "a0", 0, 3.28),
            "b0": seeded_run(tmp_path / "candidate", "b0", 0, 3.28), "a1": seeded_run(tmp_path / "baseline", "a1", 1, 3.28)}
    interrupted = record_json("b1", {0: 10.8, 100: 4.1}, 400, 120, "interrupted", setup={"seed": 1})
    (tmp_path / "candidate" / "b1.json").write_text(json.dumps(interrupted))
    (tmp_path / "candidate" / "b2.json").write_text('{"format": "train_gpt-record/1", "status": "fini')  # cut short
    lines = ab.plan(3, ab.ab_comparison("--muon_lr=0.035"), command)
    assert [(role, seed, record) for role, seed, _, record, _ in lines] == [
        ("baseline", 0, str(done["a0"])), ("candidate", 0, str(done["b0"])), ("baseline", 1, str(done["a1"])),
        ("candidate", 1, ""), ("baseline", 2, ""), ("candidate", 2, "")]
    # more pairs later: the same comparison, longer
    assert len(ab.plan(5, ab.ab_comparison("--muon_lr=0.035"), command)) == 10


def test_plan_refuses_another_comparison_in_a_folder_with_finished_runs(tmp_path):
    command = TRAINER + [f"--log_dir={tmp_path}"]
    ab.plan(2, ab.ab_comparison("--muon_lr=0.035"), command)
    seeded_run(tmp_path / "baseline", "a0", 0, 3.28)
    with pytest.raises(ab.ABError) as e:
        ab.plan(2, ab.ab_comparison("--muon_lr=0.04"), command)
    assert str(e.value) == (f"{tmp_path} holds a comparison with other flags: --ab=\"--muon_lr=0.035\" on "
                            f"`python train_gpt.py --preset=tiny --log_dir={tmp_path}`; run that to go on with it, or "
                            "give another --log_dir")
    with pytest.raises(ab.ABError, match="with other arguments: "):
        ab.plan(2, ab.ab_comparison("--muon_lr=0.035"), command + ["--max_steps=10"])
    (tmp_path / "ab.args").unlink()
    with pytest.raises(ab.ABError, match=f"{tmp_path} holds finished runs in its subfolders but no ab.args"):
        ab.plan(2, ab.ab_comparison("--muon_lr=0.035"), command)


def test_a_folder_without_finished_runs_takes_a_new_comparison(tmp_path):
    command = TRAINER + [f"--log_dir={tmp_path}"]
    ab.plan(2, ab.ab_comparison("--muon_lr=0.035"), command)
    failed = record_json("a0", {0: 10.8}, 400, 3, "failed", setup={"seed": 0})
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "a0.json").write_text(json.dumps(failed))
    ab.plan(2, ab.ab_comparison("--muon_lr=0.04"), command)
    assert json.loads((tmp_path / "ab.args").read_text())["arms"] == {"candidate": ["--muon_lr=0.04"]}


@pytest.mark.parametrize("flags, message", [
    ("", "--ab needs the flags to try, e.g. --ab=\"--muon_lr=0.035 --num_scheduled_iterations=2150\""),
    ("--muon_lr=x", "the candidate's flags (--ab): --muon_lr=x: expected a number, for example --muon_lr=0.5"),
    ("--muon_lrr=0.04", "the candidate's flags (--ab): unknown flag --muon_lrr (did you mean --muon_lr?)"),
    ("--seed=3", "--ab=--seed=3: --seed is set by the comparison for each run; leave it out of --ab"),
    ("--log_dir x", "--ab=--log_dir x: --log_dir is set by the comparison"),
    ("--train_files='a b'", "quotes and backslashes are not understood"),
])
def test_plan_refuses_bad_flags_before_any_run(tmp_path, flags, message):
    with pytest.raises(ab.ABError) as e:
        ab.plan(2, ab.ab_comparison(flags), TRAINER + [f"--log_dir={tmp_path}"])
    assert message in str(e.value)
    assert not (tmp_path / "ab.args").exists()


def test_plan_checks_the_baselines_arguments_too(tmp_path):
    with pytest.raises(ab.ABError, match="the baseline's arguments: --val_tokens=1000 is not a multiple"):
        ab.plan(2, ab.ab_comparison("--muon_lr=0.04"), TRAINER + ["--val_tokens=1000", f"--log_dir={tmp_path}"])


# -----------------------------------------------------------------------------
# ./run.sh --ab: interleaved, interrupted, resumed

def test_run_sh_ab_interleaves_the_pairs_resumes_after_an_interrupt_and_ends_with_the_paired_diff(tmp_path):
    """Two pairs of very short tiny runs on the CPU; a Ctrl-C (SIGINT to the process group, as a terminal sends it)
    during the third run stops the comparison; the same command again runs only the third and fourth."""
    logs = tmp_path / "logs"
    command = [str(ROOT / "run.sh"), "--ab=--adam_lr=0.05", "--runs=2", "--max_steps=2", "--warmup_steps=0",
               "--val_tokens=1024", f"--log_dir={logs}"]
    env = {**fake_nvidia_smi(tmp_path, 0), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr", "w") as err:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                 start_new_session=True)
        seen, third = [], False
        for line in first.stdout:
            seen.append(line.rstrip("\n"))
            third = third or line.startswith("run 3 of 4:")
            if third and line.startswith("step:1/"):  # its record holds step 0: interrupted, not missing
                os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=600)
    assert first.returncode == 130, (tmp_path / "stderr").read_text()[-2000:]
    started = [line for line in seen if line.startswith("run ")]
    assert started[0] == "run 1 of 4: baseline, seed 0"  # then, at the pace of the runs made, the time to go
    assert re.fullmatch(r"run 2 of 4: candidate, seed 0, about \d+ min to go", started[1])
    assert re.fullmatch(r"run 3 of 4: baseline, seed 1, about \d+ min to go", started[2]) and len(started) == 3
    assert ("run 3 of 4 did not finish (exit status 130); the same command again goes on from it"
            in (tmp_path / "stderr").read_text())

    def records(side):
        return sorted((json.loads(p.read_text()) for p in (logs / side).glob("*.json")), key=lambda r: r["started_utc"])

    def record_path(side, record):
        return logs / side / Path(record["log_file"]).with_suffix(".json").name
    assert [(r["config"]["seed"], r["status"]) for r in records("baseline")] == [(0, "finished"), (1, "interrupted")]
    assert [(r["config"]["seed"], r["status"]) for r in records("candidate")] == [(0, "finished")]

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = [line for line in second.stdout.splitlines() if line.startswith("run ")]
    assert runs[:2] == [
        f"run 1 of 4: baseline, seed 0: finished before, {record_path('baseline', records('baseline')[0])}",
        f"run 2 of 4: candidate, seed 0: finished before, {record_path('candidate', records('candidate')[0])}"]
    assert runs[2] == "run 3 of 4: baseline, seed 1" and runs[3].startswith("run 4 of 4: candidate, seed 1, about ")
    a, b = records("baseline"), records("candidate")
    assert [(r["config"]["seed"], r["status"]) for r in a] == [(0, "finished"), (1, "interrupted"), (1, "finished")]
    assert [(r["config"]["seed"], r["status"], r["config"]["adam_lr"]) for r in b] == [(0, "finished", 0.05),
                                                                                       (1, "finished", 0.05)]
    assert {r["config"]["adam_lr"] for r in a} == {tg.PRESETS["tiny"]["adam_lr"]}
    # the closing diff: b against a, paired by seed, from the records' own losses and times
    finished_a = [r for r in a if r["status"] == "finished"]
    loss_diffs = [rb["final_val_loss"] - ra["final_val_loss"] for ra, rb in zip(finished_a, b)]
    ref = stats.ttest_rel([r["final_val_loss"] for r in b], [r["final_val_loss"] for r in finished_a])
    # the verdict first, at the tiny preset's target, naming the sides by their flags; the details after it
    report = second.stdout[second.stdout.index("verdict at target"):].splitlines()
    assert report[0].startswith("verdict at target 4.8 (the tiny preset's): ")
    assert report[0].endswith(f"(p = {ref.pvalue:.2g}, paired t-test over 2 seeds)" +
                              ("; more runs narrow it" if ref.pvalue >= 0.05 else ""))
    assert [line.split()[:2] for line in report[2:4]] == [["baseline", "(--adam_lr=0.03)"],
                                                          ["candidate", "(--adam_lr=0.05)"]]
    assert report[5:7] == ["baseline (--adam_lr=0.03): 2 runs, 2 with a curve",
                           "candidate (--adam_lr=0.05): 2 runs, 2 with a curve"]
    assert "paired       by seed, candidate - baseline, 2 pairs (seeds 0, 1)" in second.stdout
    assert (f"  final loss mean {sum(loss_diffs) / 2:+.4f}  95% CI [" in second.stdout and
            f"t = {ref.statistic:.3f}, 1 df, p = {ref.pvalue:.4f} (two-sided)" in second.stdout)
    assert "track rule   (" in second.stdout and "train time mean" in second.stdout
    # the interrupted record stays, outside the statistics
    assert "interrupted at step" in second.stderr

    # another comparison in that folder is refused before any run
    other = subprocess.run([*command[:1], "--ab=--adam_lr=0.06", *command[2:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "run 1" not in other.stdout
    assert other.stderr.splitlines()[-1].startswith(f"error: {logs} holds a comparison with other flags: "
                                                    "--ab=\"--adam_lr=0.05\" on `python train_gpt.py --preset=tiny")
