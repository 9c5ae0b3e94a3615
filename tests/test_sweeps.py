"""Sweeps over a knob: the plan of their runs (records/ab.py), the verdict of every arm with Holm-adjusted p-values
(compare.py sweep), ./run.sh --sweep run, interrupted and resumed, and its runs packed side by side
(--gpus_per_run); and the record folder of a submission to the speedrun (compare.py submission)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import torch
from scipy import stats

from test_records import cli, cli_json, png_size, record_json, write_run
from test_train import ROOT, fake_nvidia_smi, fineweb_named_shards, shards  # noqa: F401 (shards: a fixture)

import ab  # noqa: E402 (records/ is on the path through test_records)
import compare  # noqa: E402

TRAINER = ["python", "train_gpt.py", "--preset=tiny"]
TINY_RUN = ["--max_steps=2", "--warmup_steps=0", "--val_tokens=1024"]  # seconds a run on the CPU


# -----------------------------------------------------------------------------
# Holm's adjustment

def test_holm_adjusts_step_down_as_computed_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06
    assert compare.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert compare.holm([0.6, 0.2]) == pytest.approx([0.6, 0.4])  # at most 1, never below an earlier one
    assert compare.holm([0.7, 0.9]) == [1.0, 1.0]
    adjusted = compare.holm([0.01, math.nan, 0.04])  # an undefined test is no test: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert compare.holm([0.02]) == [0.02]


# -----------------------------------------------------------------------------
# The plan of a sweep

def test_a_sweep_plans_every_value_and_a_second_sweep_the_grid_seed_by_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    comparison = ab.sweep_comparison(["--muon_lr=0.03,0.04", "--adam_lr=0.01,0.02"])
    names = ["muon_lr=0.03_adam_lr=0.01", "muon_lr=0.03_adam_lr=0.02", "muon_lr=0.04_adam_lr=0.01",
             "muon_lr=0.04_adam_lr=0.02"]
    assert list(comparison.arms) == names
    assert comparison.arms[names[1]] == ["--muon_lr=0.03", "--adam_lr=0.02"]
    lines = ab.plan(2, comparison, TRAINER)
    folder = Path("logs/sweep/muon_lr=0.03,0.04_adam_lr=0.01,0.02")
    assert [(role, seed, path) for role, seed, path, _, _ in lines] == [
        (role, seed, folder / role) for seed in (0, 1) for role in ["baseline"] + names]
    saved = json.loads((folder / "ab.args").read_text())
    assert saved["kind"] == "sweep" and saved["arms"] == comparison.arms and saved["packed"] is False
    # the same folder refuses another sweep once a run there finished
    run = record_json("a", {0: 6.9, 2: 6.8}, 2, 2, "finished", setup={"seed": 0})
    (folder / "baseline").mkdir(parents=True)
    (folder / "baseline" / "a.json").write_text(json.dumps(run))
    with pytest.raises(ab.ABError, match=re.escape(f'{folder} holds a comparison with other flags: '
                                                   '--sweep="--muon_lr=0.03,0.04" --sweep="--adam_lr=0.01,0.02" on')):
        ab.plan(2, ab.sweep_comparison(["--muon_lr=0.03,0.05"]), TRAINER + [f"--log_dir={folder}"])


def test_an_ab_comparison_begun_before_sweeps_goes_on(tmp_path):
    command = TRAINER + [f"--log_dir={tmp_path}"]
    (tmp_path / "ab.args").write_text(json.dumps({"format": "train_gpt-ab/1", "flags": ["--muon_lr=0.035"],
                                                  "command": command}))
    run = record_json("a", {0: 6.9, 2: 6.8}, 2, 2, "finished", setup={"seed": 0})
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "a.json").write_text(json.dumps(run))
    with pytest.raises(ab.ABError, match='other flags: --ab="--muon_lr=0.035" on'):
        ab.plan(2, ab.ab_comparison("--muon_lr=0.04"), command)
    lines = ab.plan(2, ab.ab_comparison("--muon_lr=0.035"), command)
    assert [record for _, _, _, record, _ in lines] == [str(tmp_path / "baseline" / "a.json"), "", "", ""]
    assert json.loads((tmp_path / "ab.args").read_text())["arms"] == {"candidate": ["--muon_lr=0.035"]}


@pytest.mark.parametrize("sweeps, message", [
    (["--muon_lr"], "--sweep=--muon_lr: give one flag and its values separated by commas"),
    (["--muon_lr=0.03 --adam_lr=0.1"], "give one flag and its values separated by commas"),
    (["--muon_lr=0.03,,0.04"], "give one flag and its values separated by commas"),
    (["muon_lr=0.03,0.04"], "give one flag and its values separated by commas"),
    (["--muon_lr=0.03", "--muon_lr=0.05"], "--sweep=--muon_lr=0.05: --muon_lr is swept twice; give all its values"),
    (["--seed=1,2"], "--seed is set by the comparison for each run; leave it out of --sweep"),
    (["--muon_lr=0.03,x"], "the arm muon_lr=x: --muon_lr=x: expected a number, for example --muon_lr=0.5"),
])
def test_a_bad_sweep_is_refused_before_any_run(tmp_path, sweeps, message):
    with pytest.raises(ab.ABError) as e:
        ab.plan(2, ab.sweep_comparison(sweeps), TRAINER + [f"--log_dir={tmp_path}"])
    assert message in str(e.value)
    assert not (tmp_path / "ab.args").exists()


def test_the_plan_command_prints_each_runs_flags(tmp_path):
    result = subprocess.run([sys.executable, "records/ab.py", "plan", "--runs=1", "--sweep=--muon_lr=0.03,0.04", "--",
                             *TRAINER, f"--log_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"baseline\t0\t{tmp_path}/baseline\t-",
                                          f"muon_lr=0.03\t0\t{tmp_path}/muon_lr=0.03\t-\t--muon_lr=0.03",
                                          f"muon_lr=0.04\t0\t{tmp_path}/muon_lr=0.04\t-\t--muon_lr=0.04"]


# -----------------------------------------------------------------------------
# compare.py sweep on records of known losses

LOSSES = {"baseline": [3.2810, 3.2790, 3.2805, 3.2800],          # weight_decay 1.2, the command as given
          "weight_decay=0.6": [3.2842, 3.2818, 3.2840, 3.2826],  # worse
          "weight_decay=1.8": [3.2771, 3.2760, 3.2772, 3.2768],  # better
          "weight_decay=2.4": [3.2775, 3.2752, 3.2780, 3.2766]}  # as good as 1.8
TIMES = {"baseline": [20.0, 20.3, 20.1, 20.2], "weight_decay=0.6": [20.1, 20.2, 20.2, 20.4],
         "weight_decay=1.8": [19.8, 20.2, 19.9, 20.0], "weight_decay=2.4": [20.0, 20.1, 20.3, 20.2]}


def write_sweep(folder: Path) -> Path:
    for name, losses in LOSSES.items():
        decay = 1.2 if name == "baseline" else float(name.split("=")[1])
        (folder / name).mkdir(parents=True)
        for seed, (loss, time_s) in enumerate(zip(losses, TIMES[name])):
            record = record_json(f"{name}{seed}", {0: 10.8, 200: 3.6, 400: loss}, 400, 400, "finished",
                                 setup={"seed": seed, "weight_decay": decay})
            record["val"][-1]["train_time_ms"] = record["train_time_ms"] = 1000 * time_s
            (folder / name / f"{seed}.json").write_text(json.dumps(record))
    return folder


def test_the_sweep_verdict_against_scipy_with_holm_and_the_best_arm(tmp_path):
    folder = write_sweep(tmp_path / "sweep")
    report = cli_json("sweep", folder)
    arms = report["verdict"]["arms"]
    assert [arm["label"] for arm in arms] == ["weight_decay=0.6", "weight_decay=1.8", "weight_decay=2.4"]
    raw = []
    for arm in arms:
        loss = stats.ttest_rel(LOSSES[arm["label"]], LOSSES["baseline"])
        time = stats.ttest_rel(TIMES[arm["label"]], TIMES["baseline"])
        assert arm["p"] == pytest.approx(loss.pvalue) and arm["time"]["p"] == pytest.approx(time.pvalue)
        assert arm["ci95"] == pytest.approx(list(loss.confidence_interval(0.95)))
        assert arm["time"]["ci95"] == pytest.approx(list(time.confidence_interval(0.95)))
        raw.append(loss.pvalue)
    # Holm by hand: the smallest of 3 times 3, the next times 2 (kept above the first), the largest times 1
    order = sorted(range(3), key=lambda i: raw[i])
    expected = {}
    for rank, i in enumerate(order):
        expected[i] = max([min(1.0, (3 - rank) * raw[i])] + [expected[j] for j in order[:rank]])
    assert [arm["p_holm"] for arm in arms] == pytest.approx([expected[i] for i in range(3)])
    assert [arm["better"] for arm in arms] == ["baseline", "candidate", "candidate"]
    best = report["best"]
    assert (best["label"], best["runner_up"]) == ("weight_decay=1.8", "weight_decay=2.4")
    assert best["p"] == pytest.approx(stats.ttest_rel(LOSSES["weight_decay=1.8"], LOSSES["weight_decay=2.4"]).pvalue)
    assert best["sure"] is False and report["packed"] is False
    assert report["plots"] == [str(folder / "final_loss.png"), str(folder / "curves.png")]

    code, out, err = cli("sweep", folder)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("verdict at target 3.28 (the speedrun's): 2 of 3 candidates better than the baseline "
                        "(Holm-adjusted p < 0.05): weight_decay=1.8, weight_decay=2.4")
    assert "p (Holm)" in lines[1] and lines[2].split()[:2] == ["baseline", "(--weight_decay=1.2)"]
    assert lines[6].startswith("  3 arms against one baseline are 3 tests")
    assert "warning: the best does not beat the runner-up significantly (diff " in out
    assert f"p = {best['p']:.2g}, paired t-test over 4 seeds): more runs decide" in out
    assert png_size(folder / "final_loss.png") == (800, 500) and png_size(folder / "curves.png") == (1200, 550)


def test_the_final_loss_plot_puts_each_side_at_its_value_with_its_interval(tmp_path):
    folder = write_sweep(tmp_path / "sweep")
    baseline, arms, _ = compare.comparison_sets(folder, False)
    fig = compare.sweep_figure(compare.sweep(baseline, arms))
    ax = fig.axes[0]
    points = {}
    for container in ax.containers:  # one errorbar a side: its point and its bar
        (x,), (y,) = container.lines[0].get_data()
        (segment,) = container.lines[2][0].get_segments()
        points[x] = (y, segment[1][1] - y)
    assert sorted(points) == [0.6, 1.2, 1.8, 2.4] and ax.get_xlabel() == "--weight_decay"
    for x, name in ((0.6, "weight_decay=0.6"), (1.2, "baseline"), (2.4, "weight_decay=2.4")):
        losses = LOSSES[name]
        half = stats.t.ppf(0.975, 3) * stats.tstd(losses) / 2
        assert points[x] == pytest.approx((sum(losses) / 4, half))


def test_one_arm_gets_the_diff_report_and_packed_runs_a_note_on_their_times(tmp_path):
    folder = write_sweep(tmp_path / "ab")
    for name in ("weight_decay=1.8", "weight_decay=2.4"):
        for path in (folder / name).iterdir():
            path.unlink()
        (folder / name).rmdir()
    (folder / "ab.args").write_text(json.dumps({"packed": True}))
    code, out, _ = cli("sweep", folder)
    assert code == 0
    expected = compare.render_diff(compare.diff(compare.load_set([str(folder / "weight_decay=0.6")], False),
                                                compare.load_set([str(folder / "baseline")], False)))
    assert out.startswith(expected + "\n\nnote: these runs shared the node, several at once (./run.sh --gpus_per_run)"
                          ": their losses are unaffected, their training times are disturbed and do not compare with "
                          "a record's\nplots: ")


def test_sweep_refuses_a_folder_that_is_not_a_comparison(tmp_path):
    code, _, err = cli("sweep", tmp_path)
    assert code == 1 and err == (f"error: {tmp_path}: no baseline/ in it; pass the folder of a ./run.sh --sweep or "
                                 "--ab comparison (its --log_dir, or logs/sweep/FLAGS)\n")
    (tmp_path / "baseline").mkdir()
    code, _, err = cli("sweep", tmp_path)
    assert code == 1 and err == f"error: {tmp_path}: only a baseline/, no arm's records beside it yet; run the " \
                                "comparison first\n"


# -----------------------------------------------------------------------------
# ./run.sh --sweep: interleaved, interrupted, resumed; packed onto the "GPUs" of a CPU

def finals(folder: Path) -> dict[tuple[str, int], float]:
    """(arm, seed) -> final loss of every finished run in the comparison's folder."""
    found = {}
    for path in folder.glob("*/*.json"):
        record = json.loads(path.read_text())
        if record["status"] == "finished":
            found[(path.parent.name, record["config"]["seed"])] = record["final_val_loss"]
    return found


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """./run.sh --sweep of --adam_lr over two values, two seeds, very short tiny runs on the CPU; a Ctrl-C during the
    fourth run stops it, and the same command again runs the rest."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    logs = tmp_path / "logs"
    command = [str(ROOT / "run.sh"), "--sweep=--adam_lr=0.02,0.05", "--runs=2", *TINY_RUN, f"--log_dir={logs}"]
    env = {**fake_nvidia_smi(tmp_path, 0), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr", "w") as err:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                 start_new_session=True)
        seen, fourth = [], False
        for line in first.stdout:
            seen.append(line.rstrip("\n"))
            fourth = fourth or line.startswith("run 4 of 6:")
            if fourth and line.startswith("step:1/"):
                os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=600)
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return {"tmp_path": tmp_path, "logs": logs, "env": env, "first": first, "first_stdout": seen, "second": second}


def test_run_sh_sweep_runs_in_turn_resumes_and_ends_with_the_verdict_and_the_plots(sweep_run):
    first, second, logs = sweep_run["first"], sweep_run["second"], sweep_run["logs"]
    assert first.returncode == 130
    started = [line.split(",")[0] + "," + line.split(",")[1] for line in sweep_run["first_stdout"]
               if line.startswith("run ")]
    assert started == ["run 1 of 6: baseline, seed 0", "run 2 of 6: adam_lr=0.02, seed 0",
                       "run 3 of 6: adam_lr=0.05, seed 0", "run 4 of 6: baseline, seed 1"]
    assert second.returncode == 0, second.stderr[-2000:]
    runs = [line for line in second.stdout.splitlines() if line.startswith("run ")]
    assert [line.split(": finished before, ")[0] for line in runs[:3]] == [
        "run 1 of 6: baseline, seed 0", "run 2 of 6: adam_lr=0.02, seed 0", "run 3 of 6: adam_lr=0.05, seed 0"]
    assert all(": finished before, " in line for line in runs[:3])
    assert [line.split(", about")[0] for line in runs[3:]] == [
        "run 4 of 6: baseline, seed 1", "run 5 of 6: adam_lr=0.02, seed 1", "run 6 of 6: adam_lr=0.05, seed 1"]
    records = [json.loads(p.read_text()) for p in logs.glob("*/*.json")]
    assert sorted((r["config"]["adam_lr"], r["config"]["seed"], r["status"]) for r in records) == [
        (0.02, 0, "finished"), (0.02, 1, "finished"), (0.03, 0, "finished"), (0.03, 1, "finished"),
        (0.03, 1, "interrupted"), (0.05, 0, "finished"), (0.05, 1, "finished")]
    # the verdict: every arm, its paired p and the Holm-adjusted one, from the records' own losses
    found = finals(logs)
    report = second.stdout[second.stdout.index("verdict at target"):].splitlines()
    assert report[0].startswith("verdict at target 4.8 (the tiny preset's): ")
    raw = [stats.ttest_rel([found[(arm, s)] for s in (0, 1)], [found[("baseline", s)] for s in (0, 1)]).pvalue
           for arm in ("adam_lr=0.02", "adam_lr=0.05")]
    for line, p, adjusted in zip(report[3:5], raw, compare.holm(raw)):
        assert f"  {p:.2g}  " in line and line.rstrip().split()[-4] == f"{adjusted:.2g}"
    assert "best: " in second.stdout and "training time and the track's figure" in second.stdout
    assert second.stdout.rstrip().endswith(f"plots: {logs}/final_loss.png, {logs}/curves.png")
    assert png_size(logs / "final_loss.png") == (800, 500)


def test_run_sh_packs_the_runs_two_at_a_time_with_the_same_losses(sweep_run):
    tmp_path = sweep_run["tmp_path"]
    packed = tmp_path / "packed"
    command = [str(ROOT / "run.sh"), "--sweep=--adam_lr=0.02,0.05", "--runs=2", "--gpus_per_run=2", *TINY_RUN,
               f"--log_dir={packed}"]
    result = subprocess.run(command, cwd=tmp_path, env=sweep_run["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert events[0] == f"run 1 of 6: baseline, seed 0, on the CPU (its output: {packed}/baseline.seed0.out)"
    assert events[1].startswith("run 2 of 6: adam_lr=0.02, seed 0, on the CPU")
    assert re.fullmatch(r"run [12] of 6 finished", events[2])  # two going before the first ends
    assert len([e for e in events if e.endswith(" finished")]) == 6
    assert finals(packed) == finals(sweep_run["logs"]) and len(finals(packed)) == 6
    assert json.loads((packed / "ab.args").read_text())["packed"] is True
    assert "note: these runs shared the node" in result.stdout
    assert "finished: val_loss" in (packed / "adam_lr=0.05.seed1.out").read_text()


def test_with_gpus_each_packed_run_gets_its_own_gpus_and_torchrun_and_a_failing_one_stops_no_other(shards,  # noqa: F811
                                                                                                    tmp_path):
    """run.sh's GPU branch with two (stand-in) GPUs and --gpus_per_run=1: torchruns side by side, each --standalone on
    a rendezvous port of its own, one process each, on GPU 0 or GPU 1 (the tiny preset, run on the CPU). The
    candidate's runs fail at start-up (no such shards): each is reported, the baseline's go on, none is judged."""
    fineweb_named_shards(shards, tmp_path)
    logs = tmp_path / "logs"
    result = subprocess.run([str(ROOT / "run.sh"), "--ab=--train_files=nowhere/train_*.bin", "--runs=2",
                             "--gpus_per_run=1", "--preset=tiny", "--device=cpu", *TINY_RUN, f"--log_dir={logs}"],
                            cwd=tmp_path, env={**fake_nvidia_smi(tmp_path, 2), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    started = [line.split(" (its output")[0] for line in result.stdout.splitlines() if " (its output: " in line]
    assert started[:2] == ["run 1 of 4: baseline, seed 0, on GPUs 0", "run 2 of 4: candidate, seed 0, on GPUs 1"]
    assert len(started) == 4 and {line[-1] for line in started[2:]} == {"0", "1"}
    failed = [line for line in result.stderr.splitlines() if line.startswith("run ")]
    assert sorted(line.split(" (exit status")[0] for line in failed) == ["run 2 of 4 did not finish",
                                                                         "run 4 of 4 did not finish"]
    assert all(line.endswith("); the others go on") for line in failed)
    assert result.stderr.splitlines()[-1] == ("2 of the runs did not finish (runs 2 4 of 4); the same command again "
                                              "runs them")
    records = [json.loads(p.read_text()) for p in logs.glob("*/*.json")]
    assert sorted((r["config"]["seed"], r["env"]["world_size"], r["status"]) for r in records) == [
        (0, 1, "finished"), (1, 1, "finished")]
    assert "verdict" not in result.stdout


@pytest.mark.parametrize("gpus, args, message", [
    (0, ["--ab=--muon_lr=0.04", "--sweep=--muon_lr=0.03,0.05", "--runs=2"],
     "error: --ab and --sweep together: give one; --ab=\"FLAGS\" is the sweep of one arm"),
    (0, ["--sweep=--muon_lr=0.03,0.05"], "error: --sweep needs --runs=N, N runs of each arm with N at least 2"),
    (0, ["--gpus_per_run=2", "--runs=2"], "error: --gpus_per_run packs the runs of an --ab or --sweep onto the GPUs"),
    (0, ["--sweep=--muon_lr=0.03", "--runs=2", "--gpus_per_run=two"],
     "error: --gpus_per_run=two: give the GPUs of each run as a positive whole number"),
    (8, ["--sweep=--muon_lr=0.03", "--runs=2", "--gpus_per_run=3"],
     "error: --gpus_per_run=3 does not divide the 8 GPUs of this node; give a divisor"),
])
def test_run_sh_refuses_a_bad_comparison_before_any_run(tmp_path, gpus, args, message):
    result = subprocess.run([str(ROOT / "run.sh"), *args, f"--log_dir={tmp_path / 'logs'}"], cwd=tmp_path,
                            env=fake_nvidia_smi(tmp_path, gpus), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
    assert "run 1" not in result.stdout and not (tmp_path / "logs").exists()


# -----------------------------------------------------------------------------
# compare.py submission: the speedrun's record folder

def write_side(folder: Path, losses: list[float], times: list[float], **setup) -> Path:
    """Finished runs of seeds 0, 1, ... with these final losses and training times: a .json record and its .txt log
    each, as train_gpt.py writes them."""
    for seed, (loss, time_s) in enumerate(zip(losses, times)):
        write_run(folder, f"run{seed}", {0: 10.8, 200: 3.6, 400: loss}, setup={"seed": seed, **setup})
        record = json.loads((folder / f"run{seed}.json").read_text())
        record["val"][-1]["train_time_ms"] = record["train_time_ms"] = 1000 * time_s
        (folder / f"run{seed}.json").write_text(json.dumps(record))
    return folder


def statistics_table(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^\| (.+?) \| (.+?) \|$", text, re.M)}


def snippet_p(text: str, tmp_path: Path) -> float:
    """Run the statistics.md's python block as it is; the p it prints."""
    code = re.search(r"```python\n(.*?)```", text, re.S)[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.startswith("p = ")
    return float(result.stdout.removeprefix("p = "))


def test_submission_writes_the_record_folder_whose_figures_scipy_recomputes(tmp_path):
    this = write_side(tmp_path / "b", [3.2771, 3.2779, 3.2768, 3.2775], [137.2, 137.5, 137.1, 137.4], muon_lr=0.04)
    base = write_side(tmp_path / "a", [3.2782, 3.2788, 3.2779, 3.2786], [138.0, 138.4, 137.9, 138.1])
    log = (this / "run0.txt").read_text()
    (this / "run0.txt").write_text(log.replace("import torch\n", "import torch  # faster\n", 1))
    for path in base.glob("*.txt"):  # nvidia-smi's report in the log's header
        smi = "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |\n"
        path.write_text(path.read_text().replace("PyTorch 2.13.0\n", "PyTorch 2.13.0\n" + smi, 1))
    folder = compare.submission(compare.load_set([str(this)], False), compare.load_set([str(base)], False),
                                "CautiousWD", tmp_path / "out", today=date(2026, 3, 1))
    assert folder == tmp_path / "out/records/track_1_short/2026-03-01_CautiousWD"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "README.md", "baseline", *[f"baseline/run{i}.txt" for i in range(4)], "baseline/statistics.md", "curves.png",
        "this_pr", *[f"this_pr/run{i}.txt" for i in range(4)], "this_pr/statistics.md"]
    assert (folder / "baseline/run2.txt").read_text() == (base / "run2.txt").read_text()
    for side, losses, times in (("this_pr", [3.2771, 3.2779, 3.2768, 3.2775], [137.2, 137.5, 137.1, 137.4]),
                                ("baseline", [3.2782, 3.2788, 3.2779, 3.2786], [138.0, 138.4, 137.9, 138.1])):
        text = (folder / side / "statistics.md").read_text()
        figures = statistics_table(text)
        p = stats.ttest_1samp(losses, 3.28, alternative="less").pvalue
        assert figures["mean val loss"] == f"{sum(losses) / 4:.4f}"
        assert figures["val loss std (n - 1)"] == f"{stats.tstd(losses):.4f}"
        assert figures["p, one-sided t-test of mean < 3.28"] == f"{p:.4g}"
        assert figures["median train time"] == f"{sorted(times)[1] / 2 + sorted(times)[2] / 2:.3f} s"
        assert figures["train time range"] == f"{min(times):.3f} s - {max(times):.3f} s"
        assert snippet_p(text, tmp_path) == pytest.approx(p, rel=1e-12)
        cuda = "12.8" if side == "baseline" else "unknown"
        assert (f"- GPUs: 8x NVIDIA H100 80GB HBM3\n- torch: 2.13.0\n- Triton: 3.9.0\n- CUDA: {cuda}\n- runs: 4\n"
                in text)
        assert "do not reach the target" not in text
    readme = (folder / "README.md").read_text()
    assert readme.startswith("# CautiousWD\n\n## What changed\n\n"
                             "Flags: `--muon_lr=0.04` (the baseline: `--muon_lr=0.03`).")
    assert "```diff\n--- baseline/train_gpt.py\n+++ this_pr/train_gpt.py\n" in readme
    assert "\n-import torch\n+import torch  # faster\n" in readme
    saved = stats.ttest_rel([138.0, 138.4, 137.9, 138.1], [137.2, 137.5, 137.1, 137.4])
    low, high = saved.confidence_interval(0.95)
    assert (f"Time saved: {0.8:+.3f} s ({100 * 0.8 / 138.1:+.2f}% of the baseline's 138.100 s), 95% interval "
            f"[{low:+.3f}, {high:+.3f}] s, p = {saved.pvalue:.3g} (paired by seed over 4 seeds" in readme)
    assert "![validation loss](curves.png)" in readme and png_size(folder / "curves.png") == (1200, 550)
    with pytest.raises(compare.RecordError, match="already exists; choose another --name or --out"):
        compare.submission(compare.load_set([str(this)], False), compare.load_set([str(base)], False),
                           "CautiousWD", tmp_path / "out", today=date(2026, 3, 1))


def test_submission_of_the_sweeps_runs_takes_their_losses_software_and_weight_figures(sweep_run, tmp_path):
    logs = sweep_run["logs"]
    code, _, err = cli("submission", logs / "adam_lr=0.05", "--baseline", logs / "baseline", "--name", "AdamLR",
                       "--out", tmp_path)
    assert code == 0, err
    (folder,) = (tmp_path / "records/track_1_short").iterdir()
    found = finals(logs)
    for side, arm in (("this_pr", "adam_lr=0.05"), ("baseline", "baseline")):
        losses = [found[(arm, seed)] for seed in (0, 1)]
        text = (folder / side / "statistics.md").read_text()
        figures = statistics_table(text)
        p = stats.ttest_1samp(losses, 4.8, alternative="less").pvalue  # the tiny preset's target
        assert figures["mean val loss"] == f"{sum(losses) / 2:.4f}"
        assert figures["val loss std (n - 1)"] == f"{stats.tstd(losses):.4f}"
        assert figures["p, one-sided t-test of mean < 4.8"] == f"{p:.4g}"
        assert snippet_p(text, tmp_path) == pytest.approx(p, rel=1e-12)
        assert f"- torch: {torch.__version__}\n" in text and "- GPUs: 1x cpu\n- " in text and "- runs: 2\n" in text
        # two steps are far from the target: said first
        assert text.startswith(f"# {side}: {arm}\n\n**These runs do not reach the target: p = {p:.4g}")
        logs_there = sorted(path.name for path in (folder / side).glob("*.txt"))
        assert logs_there == sorted(path.with_suffix(".txt").name for path in (logs / arm).glob("*.json")
                                    if json.loads(path.read_text())["status"] == "finished")
    readme = (folder / "README.md").read_text()
    assert "Flags: `--adam_lr=0.05` (the baseline: `--adam_lr=0.03`).\ntrain_gpt.py is the same on both sides." in readme
    for group in ("attn", "mlp"):  # the records hold the weight figures
        assert f"(mean_square_{group}.png)" in readme and png_size(folder / f"mean_square_{group}.png") == (1200, 550)


def test_a_side_that_misses_the_target_gets_its_folder_saying_so_first(tmp_path):
    this = write_side(tmp_path / "b", [3.2790, 3.2815, 3.2802], [137.0, 137.2, 137.1], muon_lr=0.04)
    base = write_side(tmp_path / "a", [3.2775, 3.2780, 3.2772], [138.0, 138.4, 137.9])
    code, out, err = cli("submission", this, "--baseline", base, "--name", "Slower", "--out", tmp_path / "out")
    assert code == 0, err
    (folder,) = (tmp_path / "out/records/track_1_short").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_Slower", folder.name) and out.startswith(f"wrote {folder}: ")
    p = stats.ttest_1samp([3.2790, 3.2815, 3.2802], 3.28, alternative="less").pvalue
    miss = f"p = {p:.4g}, not below 0.01 (one-sided t-test of mean val loss < 3.28).**"
    assert (folder / "README.md").read_text().startswith(f"# Slower\n\n**this_pr does not reach the target: {miss}\n\n"
                                                         "## What changed")
    assert (folder / "this_pr/statistics.md").read_text().startswith(
        f"# this_pr: b\n\n**These runs do not reach the target: {miss}\n\n- GPUs:")
    assert "do not reach" not in (folder / "baseline/statistics.md").read_text()
    code, _, err = cli("submission", this, "--baseline", base, "--name", "no/slashes", "--out", tmp_path / "out")
    assert code == 1 and err == "error: --name 'no/slashes': use letters, digits, '.', '_' and '-', as in CautiousWD\n"
