"""What a user meets, typed as a user types it: verdicts first at the target the runs aim at, bad values refused
before any compute, run.sh's own help and flags, and compare.py's errors naming what was meant."""
import json
import math
import statistics
import subprocess

import pytest

from test_records import ROOT, cli, cli_json, record_json
from test_train import fake_nvidia_smi, run_trainer

import ab  # noqa: E402 (records/ is on the path through test_records)
import compare  # noqa: E402
import train_gpt as tg  # noqa: E402

TINY = dict(preset="tiny", model_dim=64, num_heads=2, head_dim=32, train_batch_tokens=2048, vocab_size=1024,
            train_files="data/synthetic/train_*.bin", val_files="data/synthetic/val_*.bin", val_tokens=8192,
            num_scheduled_iterations=72, num_extension_iterations=8, adam_weight_decay=0.0,
            target_val_loss=tg.PRESETS["tiny"]["target_val_loss"])


def tiny_record(folder, name: str, seed: int, final: float, steps: int = 80, **changes) -> dict:
    """A finished record of a tiny-preset run, validated every 20 steps down to `final`."""
    val = {0: 6.9315, 20: 5.98, 40: 5.26, 60: 4.86, steps: final}
    record = record_json(name, val, steps, steps, "finished", setup={**TINY, "seed": seed, **changes})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record))
    return record


# -----------------------------------------------------------------------------
# Targets that fit the run

def test_the_tiny_presets_target_is_reached_by_the_golden_run_and_judged_by_default(tmp_path):
    golden = json.loads((ROOT / "tests/golden_tiny.json").read_text())["runs"]["off"]["val"]
    target = tg.PRESETS["tiny"]["target_val_loss"]
    assert golden["80"] < target < golden["60"]  # a healthy run reaches it, and only near its end
    tiny_record(tmp_path / "logs", "r0", 0, golden["80"])
    code, out, err = cli("summary", tmp_path / "logs")
    assert code == 0, err
    assert out.splitlines()[0] == (f"verdict at target {target} (the tiny preset's): the runs reach it, mean "
                                   f"{golden['80']:.4f} over 1 finished run; no p-value without 2 runs that differ "
                                   "(./run.sh --runs=N makes N); the track's rule passes")
    assert f"mean < {target}  p = n/a" in out and "(target: the tiny preset's)" in out
    figure = (target - golden["80"]) * math.sqrt(1)
    assert f"track rule   ({target} - {golden['80']:.4f}) x sqrt(1) = {figure:+.5f} >= 0.004: passes" in out
    # --target overrides it, and says so
    s = cli_json("summary", tmp_path / "logs", "--target", "4.7")
    assert (s["target"], s["target_from"], s["acceptance"]["passes"]) == (4.7, "--target", False)
    # records that tell no target are judged at the speedrun's
    assert cli_json("summary", "record43")["target_from"] == "the speedrun's"


def test_a_diff_of_different_models_says_so_in_one_line_and_shows_each_sides_own_figures(tmp_path):
    tiny_record(tmp_path / "logs", "r0", 0, 4.7159)
    code, out, err = cli("diff", tmp_path / "logs", "--baseline", "record43")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "logs and the baseline record43 are different models (model dim 64, 2 heads of 32 | dim 768, 6 heads of 128): "
        "their losses and times do not compare; each side's own figures:",
        "candidate logs: 1 finished run, final loss mean 4.7159 (target 4.8, the tiny preset's), steps 80, "
        "hardware 8x NVIDIA H100 80GB HBM3",
        "baseline  record43: 10 finished runs, final loss mean 3.2784 (target 3.28, the speedrun's), steps 2245, "
        "hardware 8x H100"]


# -----------------------------------------------------------------------------
# The verdict first, short by default

def ab_folders(tmp_path, candidate_losses, baseline_losses):
    for seed, (c, b) in enumerate(zip(candidate_losses, baseline_losses)):
        tiny_record(tmp_path / "candidate", f"c{seed}", seed, c, adam_weight_decay=0.005)
        tiny_record(tmp_path / "baseline", f"b{seed}", seed, b)
    return tmp_path / "candidate", tmp_path / "baseline"


def test_the_verdict_comes_first_naming_the_better_side_by_how_much_and_how_sure(tmp_path):
    candidate, baseline = ab_folders(tmp_path, [4.70, 4.62, 4.69, 4.68], [4.7159, 4.6316, 4.7161, 4.7041])
    code, out, _ = cli("diff", candidate, "--baseline", baseline)
    diffs = [4.70 - 4.7159, 4.62 - 4.6316, 4.69 - 4.7161, 4.68 - 4.7041]
    mean = sum(diffs) / 4
    from scipy import stats
    p = stats.ttest_1samp(diffs, 0).pvalue
    lines = out.splitlines()
    assert code == 0 and p < 0.05
    assert lines[0] == (f"verdict at target 4.8 (the tiny preset's): the candidate is better: its final loss is "
                        f"{abs(mean):.4f} lower (p = {p:.2g}, paired t-test over 4 seeds)")
    assert lines[1].split() == ["runs", "final", "loss", "diff", "95%", "CI", "p", "time", "(s)", "first", "at", "4.8"]
    assert lines[2].split()[:3] == ["baseline", "(--adam_weight_decay=0.0)", "4"]
    assert lines[3].split()[:6] == ["candidate", "(--adam_weight_decay=0.005)", "4", "4.6725", "±",
                                    f"{statistics.stdev([4.70, 4.62, 4.69, 4.68]):.4f}"]
    assert lines[3].split()[6] == f"{mean:+.4f}" and lines[3].split()[9] == f"{p:.2g}"
    # then the details, under their headings
    assert lines.index("validation loss by step (mean over runs)") < lines.index("statistics")
    # a difference within the noise is called no difference, and the sides swapped turn the sign
    candidate, baseline = ab_folders(tmp_path / "close", [4.72, 4.62, 4.71, 4.71], [4.7159, 4.6316, 4.7161, 4.7041])
    first = cli("diff", candidate, "--baseline", baseline)[1].splitlines()[0]
    assert first.startswith("verdict at target 4.8 (the tiny preset's): no clear difference: the candidate's final "
                            "loss is ") and first.endswith("; more runs narrow it")
    v = cli_json("diff", baseline, "--baseline", candidate)["verdict"]
    assert v["arms"][0]["diff"] == pytest.approx(-cli_json("diff", candidate, "--baseline", baseline)["verdict"]
                                                 ["arms"][0]["diff"])


def test_one_pair_is_undecided_and_says_what_would_decide(tmp_path):
    candidate, baseline = ab_folders(tmp_path, [4.70], [4.7159])
    first = cli("diff", candidate, "--baseline", baseline)[1].splitlines()[0]
    assert first == ("verdict at target 4.8 (the tiny preset's): undecided: the candidate's final loss is 0.0159 "
                     "lower than the baseline's, but a t-test needs 2 or more runs a side with some spread (best: "
                     "pairs by seed, ./run.sh --ab=FLAGS --runs=4)")


def test_the_verdict_of_several_arms_is_one_table():
    """The sweep's use: a baseline and several candidate arms, rendered by the same function."""
    def runset(name, losses, **changes):
        runs = []
        for seed, loss in enumerate(losses):
            record = record_json(name, {0: 6.93, 80: loss}, 80, 80, "finished", setup={**TINY, "seed": seed, **changes})
            runs.append(compare.run_from_record(ROOT / f"{name}{seed}.json", record))
        return compare.RunSet(name, runs, [])
    base = runset("base", [4.70, 4.63, 4.72, 4.70])
    arms = [runset("lr2", [4.60, 4.54, 4.61, 4.61], muon_lr=0.06), runset("lr3", [4.71, 4.62, 4.74, 4.70], muon_lr=0.09)]
    v = compare.verdict(base, arms, 4.8, "the tiny preset's", ["baseline", "muon_lr 0.06", "muon_lr 0.09"])
    lines = compare.render_verdict(v)
    assert [arm["better"] for arm in v["arms"]] == ["candidate", "neither"]
    assert lines[0] == ("verdict at target 4.8 (the tiny preset's): 1 of 2 candidates better than the baseline "
                        "(Holm-adjusted p < 0.05): muon_lr 0.06")
    assert [line.split()[0] for line in lines[2:5]] == ["baseline", "muon_lr", "muon_lr"] and len(lines) == 6
    # two tests: the smaller p doubled, the larger kept (Holm), each beside its own
    raw = [arm["p"] for arm in v["arms"]]
    assert [arm["p_holm"] for arm in v["arms"]] == pytest.approx([max(2 * min(raw), max(raw)) if p == max(raw)
                                                                  else 2 * p for p in raw])
    assert "p (Holm)" in lines[1] and f"{raw[0]:.2g}  {v['arms'][0]['p_holm']:.2g}" in lines[3]
    assert lines[5].startswith("  2 arms against one baseline are 2 tests") and "Holm's method" in lines[5]


def test_the_curve_and_the_weights_are_short_unless_all(tmp_path):
    val = {step: 7 - step / 100 for step in range(0, 401, 10)}
    for side in ("candidate", "baseline"):
        folder = tmp_path / side
        folder.mkdir()
        (folder / "r.json").write_text(json.dumps(record_json("r", val, 400, 400, "finished", setup={"seed": 0})))
    out = cli("diff", tmp_path / "candidate", "--baseline", tmp_path / "baseline")[1].splitlines()
    start = out.index("validation loss by step (mean over runs)")
    steps = [line.split()[0] for line in out[start + 2:start + 14]]
    assert steps == ["0", "40", "70", "110", "150", "180", "220", "250", "290", "330", "360", "400"]
    assert out[start + 14] == "(12 of the 41 shared steps; --all shows every one)"
    every = cli("diff", tmp_path / "candidate", "--baseline", tmp_path / "baseline", "--all")[1].splitlines()
    assert len([line for line in every if line.split()[:1] and line.split()[0].isdigit()]) == 41


# -----------------------------------------------------------------------------
# Bad values refused before compute

def test_every_numeric_setting_has_its_range_checked():
    numeric = {f.name for f in tg.dataclasses.fields(tg.Config) if type(f.default) in (int, float)}
    ranges = tg.POSITIVE + tg.NON_NEGATIVE + tg.FRACTIONS + tg.MOMENTA
    assert sorted(ranges) == sorted(numeric) and len(set(ranges)) == len(ranges)


@pytest.mark.parametrize("name", tg.POSITIVE + tg.NON_NEGATIVE + tg.FRACTIONS + tg.MOMENTA)
def test_a_value_out_of_range_is_refused_naming_the_presets_value(name):
    bad = {**{n: -1 for n in tg.POSITIVE + tg.NON_NEGATIVE}, **{n: 1.5 for n in tg.FRACTIONS + tg.MOMENTA}}[name]
    with pytest.raises(tg.ConfigError) as e:
        tg.parse_config(["--preset=tiny", f"--{name}={bad}"])
    value = tg.PRESETS["tiny"].get(name, tg.FIELDS[name].default)
    assert str(e.value).startswith(f"--{name}={type(tg.FIELDS[name].default)(bad)}: must ")
    assert str(e.value).endswith(f" (default {value})")
    if isinstance(value, float):
        with pytest.raises(tg.ConfigError, match=f"--{name}=nan: must "):
            tg.parse_config(["--preset=tiny", f"--{name}=nan"])


def test_a_negative_learning_rate_stops_before_any_run(tmp_path):
    result = run_trainer(["--preset=tiny", "--muon_lr=-1", f"--log_dir={tmp_path / 'logs'}"], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --muon_lr=-1.0: must be positive (default 0.03)\n"
    assert not (tmp_path / "logs").exists()


def test_a_set_mixing_settings_is_named_in_a_warning(tmp_path):
    tiny_record(tmp_path / "logs", "good", 0, 4.7159)
    tiny_record(tmp_path / "logs", "bad", 1, 7.1650, muon_lr=-1.0)
    code, out, _ = cli("summary", tmp_path / "logs")
    assert code == 0 and out.splitlines()[1] == (
        "warning: the runs of logs differ in muon_lr -1.0 | 0.03: their losses are not one setting's; pass each "
        "setting's runs as a set of its own")


# -----------------------------------------------------------------------------
# run.sh says what it does

def run_sh(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "run.sh"), *args], cwd=tmp_path, env=fake_nvidia_smi(tmp_path, 0),
                          capture_output=True, text=True, timeout=300)


def test_run_sh_help_tells_its_own_flags_then_the_trainers_and_does_nothing_else(tmp_path):
    result = run_sh(tmp_path, "--help")
    assert result.returncode == 0 and result.stderr == ""
    out = result.stdout
    assert out.startswith("usage: ./run.sh [--runs=N] [--ab=\"FLAGS\" | --sweep=\"--FLAG=V1,V2,...\" --runs=N "
                          "[--gpus_per_run=K]]\n                [train_gpt.py's flags")
    assert "  --runs=N " in out and "  --ab=\"FLAGS\" " in out and "  --sweep=\"--FLAG=V1,V2,...\"\n" in out
    assert "  --gpus_per_run=K\n" in out
    assert out.index("train_gpt.py's flags, which run.sh passes on:") < out.index("--muon_lr NUMBER")
    assert "No NVIDIA GPU" not in out and "wrote" not in out


def test_run_sh_ab_without_enough_pairs_stops_before_any_run(tmp_path):
    for extra in ([], ["--runs=1"]):
        result = run_sh(tmp_path, "--ab=--adam_weight_decay=0.005", *extra, f"--log_dir={tmp_path / 'logs'}")
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr == ("error: --ab needs --runs=N, N runs of each arm with N at least 2 (the paired test "
                                 "needs 2 pairs, more make it surer): add --runs=4\n")
    assert not (tmp_path / "logs").exists()


def test_ab_runs_go_apart_from_single_runs_unless_a_log_dir_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ab.plan(2, ab.ab_comparison("--adam_weight_decay=0.005 --train_files=data/x/*.bin"),
                    ["python", "train_gpt.py", "--preset=tiny"])
    folder = tmp_path / "logs" / "ab" / "adam_weight_decay=0.005_train_files=data_x__.bin"
    assert [(role, (tmp_path / path).resolve()) for role, _, path, _, _ in lines[:2]] == [
        ("baseline", folder / "baseline"), ("candidate", folder / "candidate")]
    assert (folder / "ab.args").is_file()


# -----------------------------------------------------------------------------
# compare.py's errors

def test_a_folder_of_a_comparison_names_its_subfolders_and_the_command(tmp_path):
    candidate, baseline = ab_folders(tmp_path / "ab", [4.70], [4.7159])
    code, out, err = cli("summary", tmp_path / "ab")
    assert code == 1 and out == ""
    assert err == (f"error: {tmp_path / 'ab'}: holds no record files itself, only in its subfolders baseline/, "
                   f"candidate/; pass those, e.g. python records/compare.py diff {candidate} --baseline {baseline}\n")


def test_a_file_that_is_not_a_record_is_refused_unread(tmp_path):
    (tmp_path / "ab.args").write_text("step:1/2 val_loss:3.0 train_time:1ms step_avg:1.00ms\n")
    code, _, err = cli("summary", tmp_path / "ab.args")
    assert code == 1 and err == (f"error: {tmp_path / 'ab.args'}: not a record file: records are .json or .txt files "
                                 "(or folders of them) written by train_gpt.py, or published logs and figures\n")


def test_a_mistyped_flag_gets_the_one_meant(tmp_path):
    code, _, err = cli("summary", "record43", "--tagret", "4.7")
    assert code == 2 and err.splitlines()[-1] == ("python records/compare.py: error: unrecognized arguments: --tagret "
                                                  "4.7 (did you mean --target?)")


# -----------------------------------------------------------------------------
# Suggestions that name what works

def test_a_micro_batch_that_does_not_divide_gets_one_that_does():
    cfg = tg.parse_config(["--preset=tiny", "--micro_batch_tokens=300"])
    with pytest.raises(tg.ConfigError) as e:
        tg.batch_split(cfg, 1)
    assert str(e.value).endswith("; use --micro_batch_tokens=256, the most that divides the 2048 tokens of each process")
    assert tg.batch_split(tg.parse_config(["--preset=tiny", "--micro_batch_tokens=256"]), 1) == (8, 256)
    with pytest.raises(tg.ConfigError, match="use a world size that divides it"):
        tg.batch_split(cfg, 3)


@pytest.mark.skipif(tg.torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_record_preset_on_a_cpu_without_shards_points_at_the_tiny_preset(tmp_path):
    result = run_trainer([], tmp_path)
    assert result.returncode == 2 and result.stderr == (
        "error: --train_files=data/fineweb10B/fineweb_train_*.bin matches no files, and on a CPU the record43 preset "
        "would take days: run the tiny preset (a few minutes) with `./run.sh`, or `python data/synthetic.py "
        "--vocab_size 1024` then `python train_gpt.py --preset=tiny`\n")


def test_the_plot_names_the_sides_as_the_verdict_does(tmp_path, monkeypatch):
    candidate, baseline = ab_folders(tmp_path, [4.70, 4.62], [4.7159, 4.6316])
    drawn = {}
    monkeypatch.setattr(compare, "plot", lambda sets, out, metric, target: drawn.update(
        legend=[t.get_text() for t in compare.figure(sets, metric, target).legends[0].get_texts()]))
    code, out, err = cli("plot", candidate, "--baseline", baseline, "-o", tmp_path / "curves.png")
    assert code == 0 and err == ""
    assert drawn["legend"] == ["candidate (--adam_weight_decay=0.005) (2 runs)", "baseline (--adam_weight_decay=0.0) "
                               "(2 runs)", "target 4.8"]
    # a tiny run drawn against record 43: the one line that says they do not compare, not a warning per field
    code, out, err = cli("plot", candidate, "--baseline", "record43", "-o", tmp_path / "curves.png")
    assert code == 0 and err.splitlines() == [
        "warning: candidate and the baseline record43 are different models (model dim 64, 2 heads of 32 | dim 768, 6 "
        "heads of 128): their losses and times do not compare"]
