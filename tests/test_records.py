"""records/compare.py: published figures, statistics against hand computation, parsing, bad input, plots."""
import contextlib
import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "records"))
import compare  # noqa: E402

LOSSES_43 = [3.2784, 3.2771, 3.2777, 3.2790, 3.2794, 3.2813, 3.2772, 3.2772, 3.2785, 3.2783]
TIMES_43 = [137.582, 137.753, 137.636, 137.507, 137.639, 137.708, 137.722, 137.677, 137.456, 137.705]
MS_PER_STEP = 50.0

# The trainer prints its own source first; it holds the log format strings and, here, a docstring
# with a whole example line that must not be read as a validation.
SOURCE = '''import torch
"""A log looks like this:
step:0/20 val_loss:10.8258 train_time:0ms step_avg:0.00ms
"""
def log_val(step, n, loss, ms):
    print0(f"step:{step}/{n} val_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{ms / max(step, 1):.2f}ms")
'''


def config(preset: str = "test", max_steps: int = 0, **changes) -> dict:
    """A train_gpt.py configuration: record 43's setup under another preset name."""
    return {"preset": preset, "num_scheduled_iterations": 360, "num_extension_iterations": 40, "max_steps": max_steps,
            "model_dim": 768, "num_heads": 6, "head_dim": 128, "train_batch_tokens": 262144, "vocab_size": 50257,
            "train_files": "data/fineweb10B/fineweb_train_*.bin", "val_files": "data/fineweb10B/fineweb_val_*.bin",
            "val_tokens": 10485760, "muon_lr": 0.03, **changes}


def log_text(val: dict[int, float], num_steps: int, last_step: int, finished: bool) -> str:
    """A log in train_gpt.py's format: source, separator, header, a line per step, validations at `val`; step and
    validation lines carry train_gpt.py's fields after the public ones."""
    lines = [SOURCE, "=" * 100, "config: " + json.dumps(config()), "Python 3.11.9, PyTorch 2.13.0", "=" * 100]
    for step in range(last_step + 1):
        ms = MS_PER_STEP * step
        avg = ms / max(step, 1)
        if step in val:
            lines.append(f"step:{step}/{num_steps} val_loss:{val[step]:.4f} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms"
                         + (f" eta:{(num_steps - step) * avg / 1000:.0f}s" if 0 < step < num_steps else ""))
        elif step > 0:
            lines.append(f"step:{step}/{num_steps} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms train_loss:4.1234 "
                         "tokens/s:5242880")
    if finished:
        lines.append("peak memory allocated: 29248 MiB reserved: 50528 MiB")
        lines.append(f"finished: val_loss {val[last_step]:.4f} after {last_step} steps; record: logs/x.txt")
    else:
        lines += ["Traceback (most recent call last):", '  File "train_gpt.py", line 1', "RuntimeError: CUDA error"]
    return "\n".join(lines) + "\n"


def record_json(run_id: str, val: dict[int, float], num_steps: int, last_step: int, status: str,
                max_steps: int = 0, setup: dict | None = None) -> dict:
    points = [{"step": s, "val_loss": v, "train_time_ms": MS_PER_STEP * s} for s, v in sorted(val.items())]
    done = status == "finished"
    return {
        "format": "train_gpt-record/1", "run_id": run_id, "status": status, "started_utc": "2025-11-20T10:00:00Z",
        "log_file": f"{run_id}.txt",
        "config": {**config(max_steps=max_steps, num_scheduled_iterations=num_steps - 40), **(setup or {})},
        "env": {"python": "3.11.9", "torch": "2.13.0", "triton": "3.9.0", "device": "cuda", "world_size": 8,
                "gpu": "NVIDIA H100 80GB HBM3", "hostname": "node1"},
        "num_steps": num_steps, "steps_done": last_step, "val": points,
        "final_val_loss": points[-1]["val_loss"] if done else None,
        "train_time_ms": points[-1]["train_time_ms"] if done else None,
        "step_avg_ms": MS_PER_STEP if done else None,
        "peak_memory_allocated_mib": 29248 if done else None, "peak_memory_reserved_mib": 50528 if done else None,
        "error": {"finished": None, "failed": "RuntimeError: CUDA error", "interrupted": "interrupted by SIGINT",
                  "preempted": f"preempted at step {last_step}: checkpoint checkpoints/step_{last_step:06d}",
                  "running": None}[status],
    }


def write_run(folder: Path, run_id: str, val: dict[int, float], num_steps: int = 400, last_step: int | None = None,
              status: str = "finished", max_steps: int = 0, with_json: bool = True, setup: dict | None = None) -> Path:
    """Write <run_id>.txt (and .json) as train_gpt.py does; return the path of the record to pass."""
    folder.mkdir(parents=True, exist_ok=True)
    last_step = max(val) if last_step is None else last_step
    (folder / f"{run_id}.txt").write_text(log_text(val, num_steps, last_step, status == "finished"))
    if not with_json:
        return folder / f"{run_id}.txt"
    path = folder / f"{run_id}.json"
    path.write_text(json.dumps(record_json(run_id, val, num_steps, last_step, status, max_steps, setup)))
    return path


def curve(final: float) -> dict[int, float]:
    return {0: 10.8258, 100: 4.1, 200: 3.6, 300: 3.35, 400: final}


def cli(*args: str) -> tuple[int, str, str]:
    """Run compare.main in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = compare.main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def cli_json(*args: str) -> dict:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


# Student's t distribution by hand: density integrated with Simpson's rule.

def t_cdf(t: float, df: float, intervals: int = 4000) -> float:
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: norm * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = abs(t) / intervals
    area = h / 3 * sum((1 if i in (0, intervals) else 4 if i % 2 else 2) * pdf(i * h) for i in range(intervals + 1))
    return 0.5 + math.copysign(area, t)


def mean_and_std(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


# -----------------------------------------------------------------------------
# Published figures

def test_published_record43_summary():
    s = cli_json("summary", "record43")
    assert s["num_runs"] == 10
    assert round(s["t_test_below_target"]["p"], 4) == 0.0018
    assert round(s["val_loss"]["mean"], 4) == 3.2784 and round(s["val_loss"]["std"], 4) == 0.0013
    times = s["train_time"][0]
    assert times["n"] == 10 and round(times["mean_s"], 4) == 137.6385 and round(times["std_s"], 4) == 0.0970
    assert s["num_steps"] == [2245] and s["hardware"] == ["8x H100"]
    assert s["ms_per_step"] == pytest.approx(137638.5 / 2245)
    assert s["peak_memory_mib"] == {"allocated": 29248, "reserved": 50528}
    # The runs are those of the write-up, in its order.
    assert [r["final_val_loss"] for r in s["runs"]] == LOSSES_43
    assert [r["train_time_s"] for r in s["runs"]] == pytest.approx(TIMES_43)


def test_published_record42_summary_keeps_both_timings():
    s = cli_json("summary", ROOT / "records/record42")
    assert s["num_runs"] == 10 and s["num_steps"] == [2285]
    assert round(s["t_test_below_target"]["p"], 4) == 0.0083
    own, same_machine = s["train_time"]
    assert own["n"] == 10 and own["label"] == "all runs"
    assert own["mean_s"] == pytest.approx(sum([139.441, 139.780, 139.889, 139.464, 139.761, 139.411, 139.555,
                                               139.570, 139.804, 139.847]) / 10)
    # The write-up of record 43: mean 139.8600, std 0.0499 for the five runs timed on its machine.
    assert same_machine["n"] == 5 and "record43" in same_machine["label"]
    assert round(same_machine["mean_s"], 4) == 139.86 and round(same_machine["std_s"], 4) == 0.0499


def test_published_p_value_by_hand():
    mean, std = mean_and_std(LOSSES_43)
    t = (mean - 3.28) / (std / math.sqrt(len(LOSSES_43)))
    assert round(t_cdf(t, len(LOSSES_43) - 1), 4) == 0.0018


def test_summary_table_from_the_command_line():
    done = subprocess.run([sys.executable, "records/compare.py", "summary", "records/record43"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "p = 0.0018" in done.stdout and "mean 3.2784  std 0.0013" in done.stdout
    assert "record43 #10" in done.stdout


def test_help_of_every_command():
    for args in ([], ["summary"], ["diff"], ["plot"]):
        code, out, _ = cli(*args, "--help")
        assert code == 0 and "RUN" in out
    assert "--baseline NAME_OR_PATH" in cli("diff", "--help")[1]
    assert "-o FILE.png" in cli("plot", "--help")[1]


# -----------------------------------------------------------------------------
# Statistics against hand computation

def test_mean_std_and_one_sample_t_test_by_hand():
    losses = [3.2790, 3.2801, 3.2776, 3.2785, 3.2769]
    mean, std = mean_and_std(losses)
    assert compare.mean_std(losses) == pytest.approx((mean, std), rel=1e-12)
    t = (mean - 3.28) / (std / math.sqrt(len(losses)))
    result = compare.t_test_below(losses)
    assert result["t"] == pytest.approx(t, rel=1e-10) and result["df"] == len(losses) - 1
    assert result["p"] == pytest.approx(t_cdf(t, len(losses) - 1), abs=1e-8)


def test_welch_by_hand():
    a, b = [3.2790, 3.2801, 3.2776, 3.2785], [3.2804, 3.2754, 3.2753, 3.2800, 3.2780, 3.2813]
    (ma, sa), (mb, sb) = mean_and_std(a), mean_and_std(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    result = compare.welch(a, b)
    assert result["t"] == pytest.approx(t, rel=1e-10) and result["df"] == pytest.approx(df, rel=1e-10)
    assert result["p"] == pytest.approx(2 * (1 - t_cdf(abs(t), df)), abs=1e-8)


def test_tests_need_two_runs_with_spread():
    assert math.isnan(compare.t_test_below([3.27])["p"])
    assert math.isnan(compare.t_test_below([3.27, 3.27])["p"])
    assert math.isnan(compare.welch([3.27], [3.28, 3.29])["p"])
    assert math.isnan(compare.mean_std([3.27])[1])


def test_first_step_below_target_on_a_constructed_curve():
    points = [(0, 10.0), (100, 3.5), (200, 3.30), (300, 3.20), (400, 3.10)]
    # Crossing between (200, 3.30) and (300, 3.20): 3.28 lies a fifth of the way down.
    assert compare.first_step_below(points) == pytest.approx(220.0)
    assert compare.first_step_below([(0, 3.0), (100, 2.9)]) == 0.0
    assert compare.first_step_below([(0, 10.0), (100, 3.29)]) is None
    assert compare.first_step_below([(0, 10.0), (100, 3.28)]) == 100.0


def test_first_step_of_the_record43_curve():
    d = cli_json("diff", ROOT / "records/record43", "--baseline", "record43")
    expected = 2000 + (3.3237 - 3.28) / (3.3237 - 3.2784) * 245
    assert d["baseline"]["first_step_at_target"] == pytest.approx(expected)


# -----------------------------------------------------------------------------
# Parsing our records and public logs

def test_record_json_and_txt_parse_alike(tmp_path):
    val = curve(3.2790)
    json_path = write_run(tmp_path / "run", "2025-11-20_10-00-00_abc", val)
    txt_path = json_path.with_suffix(".txt")
    from_json, from_txt = compare.load_file(json_path).runs[0], compare.load_file(txt_path).runs[0]
    expected = [compare.ValPoint(s, v, MS_PER_STEP * s) for s, v in sorted(val.items())]
    assert from_json.val == expected and from_txt.val == expected  # not the example line in the source
    for run in (from_json, from_txt):
        assert run.num_steps == 400 and run.steps_done == 400 and run.incomplete is None
        assert run.final == compare.ValPoint(400, 3.2790, 20000.0)
        assert run.peak_memory_mib == (29248, 50528)
    assert from_json.hardware == "8x NVIDIA H100 80GB HBM3" and from_json.name == "2025-11-20_10-00-00_abc"


def test_folder_takes_the_json_over_its_txt(tmp_path):
    for i, final in enumerate([3.2790, 3.2770, 3.2780]):
        write_run(tmp_path, f"run{i}", curve(final))
    s = cli_json("summary", tmp_path)
    assert s["num_runs"] == 3 and s["name"] == tmp_path.name
    assert sorted(r["source"] for r in s["runs"]) == [str(tmp_path / f"run{i}.json") for i in range(3)]
    assert s["val_loss"]["mean"] == pytest.approx(3.2780) and s["val_loss"]["std"] == pytest.approx(0.001)
    assert s["ms_per_step"] == pytest.approx(MS_PER_STEP)
    # The same files named one by one, .txt included, are still three runs.
    assert cli_json("summary", *sorted(tmp_path.iterdir()))["num_runs"] == 3


def test_public_format_log(tmp_path):
    code = 'print0(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{t:.0f}ms")\n'
    lines = [code, "=" * 100, "Running pytorch 2.5.0", "| NVIDIA H100 80GB HBM3 |", "=" * 100,
             "step:0/1390 val_loss:10.8258 train_time:0ms step_avg:nanms",
             "step:1/1390 train_time:34ms step_avg:nanms", "step:2/1390 train_time:160ms step_avg:nanms",
             "step:125/1390 val_loss:4.3612 train_time:16430ms step_avg:133.58ms",
             "step:1390/1390 val_loss:3.2781 train_time:181234ms step_avg:131.33ms",
             "peak memory consumption: 27390 MiB"]
    path = tmp_path / "0a1b2c3d.txt"
    path.write_text("\n".join(lines) + "\n")
    run = compare.load_file(path).runs[0]
    assert [(p.step, p.val_loss, p.train_time_ms) for p in run.val] == [
        (0, 10.8258, 0.0), (125, 4.3612, 16430.0), (1390, 3.2781, 181234.0)]
    assert run.num_steps == 1390 and run.incomplete is None and run.name == "0a1b2c3d"


def test_run_stopped_by_max_steps_is_finished(tmp_path):
    path = write_run(tmp_path, "short", {0: 10.8258, 100: 4.1, 200: 3.6}, num_steps=400, status="finished",
                     max_steps=200)
    s = cli_json("summary", path)
    assert s["runs"][0]["steps_done"] == 200 and s["runs"][0]["num_steps"] == 400
    assert s["runs"][0]["incomplete"] is None
    code, out, _ = cli("summary", path)
    assert code == 0 and "200/400" in out
    # Its log ends with the peak-memory line, so the .txt alone is finished too.
    assert compare.load_file(path.with_suffix(".txt")).runs[0].incomplete is None


# -----------------------------------------------------------------------------
# diff

def test_diff_on_shared_steps_with_welch_and_times(tmp_path):
    runs, base = tmp_path / "runs", tmp_path / "base"
    for i, final in enumerate([3.2790, 3.2770, 3.2780]):
        write_run(runs, f"r{i}", {0: 10.8, 100: 4.0 + i / 100, 200: 3.30, 300: 3.26 + i / 1000, 400: final})
    slow_steps = {0: 10.8, 200: 3.40, 400: 3.2800, 450: 3.2700}  # validates at other steps, runs 450
    for i, final in enumerate([3.2760, 3.2750]):
        write_run(base, f"b{i}", {**slow_steps, 450: final}, num_steps=450)
    d = cli_json("diff", runs, "--baseline", base)
    assert [c["step"] for c in d["curve"]] == [0, 200, 400]
    at_200 = d["curve"][1]
    assert (at_200["runs_n"], at_200["baseline_n"]) == (3, 2)
    assert (at_200["runs"], at_200["baseline"]) == pytest.approx((3.30, 3.40))
    assert at_200["diff"] == pytest.approx(-0.10)
    # Mean curve of the runs: 3.30 at 200, 3.261 at 300, so 3.28 is reached at 200 + 0.02 / 0.039 * 100.
    assert d["runs"]["first_step_at_target"] == pytest.approx(200 + 0.02 / 0.039 * 100)
    assert d["baseline"]["first_step_at_target"] == pytest.approx(400.0)
    a, b = [3.2790, 3.2770, 3.2780], [3.2760, 3.2750]
    (ma, sa), (mb, sb) = mean_and_std(a), mean_and_std(b)
    final = d["final_val_loss"]
    assert final["diff"] == pytest.approx(ma - mb)
    assert final["welch"]["t"] == pytest.approx((ma - mb) / math.sqrt(sa ** 2 / 3 + sb ** 2 / 2))
    (times,) = d["train_time"]
    assert times["diff_s"] == pytest.approx(400 * 0.05 - 450 * 0.05)
    assert times["diff_percent"] == pytest.approx(100 * (400 / 450 - 1))
    code, out, _ = cli("diff", runs, "--baseline", base)
    assert code == 0 and "-0.1000" in out and "Welch t" in out


def test_diff_against_a_baseline_without_curve():
    d = cli_json("diff", ROOT / "records/record43", "--baseline", "record42")
    assert d["curve"] == [] and "record42 has no validation curve" in d["note"]
    assert d["final_val_loss"]["diff"] == pytest.approx(sum(LOSSES_43) / 10 - 3.27816)
    own, same_machine = d["train_time"]
    assert own["diff_s"] == pytest.approx(sum(TIMES_43) / 10 - 139.6522)
    # The write-up's "improvement of ~2.22 seconds", against record 42 timed on the same machine.
    assert same_machine["diff_s"] == pytest.approx(137.6385 - 139.86)
    code, out, _ = cli("diff", "record43", "--baseline", ROOT / "records/record42")
    assert code == 0 and "comparing final losses and times only" in out and "no curve" in out


def test_unknown_baseline_name():
    code, out, err = cli("diff", ROOT / "records/record43", "--baseline", "record99")
    assert code == 1 and "record99" in err and "record43" in err and out == ""


# -----------------------------------------------------------------------------
# Bad input: a message naming the file, a non-zero exit

def assert_refused(args, path, *words):
    code, out, err = cli(*args)
    assert code != 0 and out == ""
    assert str(path) in err
    for word in words:
        assert word in err


def test_not_a_record(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("learning rate 0.03 looked best\n")
    assert_refused(["summary", notes], notes, "not a record")
    other = tmp_path / "config.json"
    other.write_text('{"lr": 0.03}')
    assert_refused(["summary", other], other, "not a record")
    assert_refused(["diff", ROOT / "records/record43", "--baseline", other], other, "not a record")


def test_no_validation_line(tmp_path):
    path = write_run(tmp_path, "early", {0: 10.8}, last_step=5, status="failed", with_json=False)
    path.write_text(path.read_text().replace("step:0/400 val_loss:10.8000", "step:0/400"))
    assert_refused(["summary", path], path, "no validation line")
    record = tmp_path / "early2.json"
    data = record_json("early2", {0: 10.8}, 400, 5, "failed")
    record.write_text(json.dumps({**data, "val": []}))
    assert_refused(["summary", record], record, "no validation")


def test_truncated_txt_is_skipped_unless_allowed(tmp_path):
    path = write_run(tmp_path, "cut", {0: 10.8258, 100: 4.1, 200: 3.6}, num_steps=400, last_step=250,
                     status="failed", with_json=False)
    path.write_text(path.read_text().split("Traceback")[0] + "step:251/400 train_ti")  # cut mid-line
    assert_refused(["summary", path], path, "skipped", "step 250 of 400", "--allow-incomplete")
    assert_refused(["diff", path, "--baseline", "record43"], path, "skipped")
    s = cli_json("summary", path, "--allow-incomplete")
    assert s["runs"][0]["incomplete"] and s["runs"][0]["final_val_loss"] == 3.6
    assert s["num_finished"] == 0 and s["val_loss"]["mean"] is None  # no finished run: no statistics
    code, out, _ = cli("summary", path, "--allow-incomplete")
    assert code == 0 and "cut *" in out and f"* unfinished, not in the statistics, {path}" in out


def logs_folder(folder: Path) -> dict[str, Path]:
    """A logs/ folder as a user has it after a while: three finished runs, a failed, an interrupted and a running
    one, one that failed before its first validation, and notes."""
    paths = {f"done{i}": write_run(folder, f"done{i}", curve(final)) for i, final in enumerate([3.2790, 3.2770, 3.2780])}
    paths["failed"] = write_run(folder, "failed", {0: 10.8258, 100: 4.0, 200: 3.5}, last_step=230, status="failed")
    paths["interrupted"] = write_run(folder, "interrupted", {0: 10.8258, 100: 4.2}, last_step=130, status="interrupted")
    paths["running"] = write_run(folder, "running", {0: 10.8258}, last_step=40, status="running")
    early = record_json("early", {0: 10.8}, 400, 0, "failed")
    paths["early"] = folder / "early.json"
    paths["early"].write_text(json.dumps({**early, "val": []}))
    paths["notes"] = folder / "notes.txt"
    paths["notes"].write_text("learning rate 0.03 looked best\n")
    return paths


def skipped_files(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("skipped ") for line in lines), err
    return sorted(line.split()[1].rstrip(":") for line in lines)


def test_a_real_logs_folder_counts_its_finished_runs(tmp_path):
    paths = logs_folder(tmp_path)
    code, out, err = cli("summary", tmp_path, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert sorted(r["name"] for r in s["runs"]) == ["done0", "done1", "done2"]
    assert s["val_loss"]["mean"] == pytest.approx(3.2780) and s["t_test_below_target"]["p"] < 0.5
    # one line each for the failed, interrupted and running runs, the one without a validation and the notes
    assert skipped_files(err) == sorted(str(paths[k]) for k in ("failed", "interrupted", "running", "early", "notes"))
    assert "interrupted at step 130 of 400" in err and "failed after step 230 of 400" in err
    assert "no validation point" in err and "not a record" in err
    code, out, err = cli("diff", tmp_path, "--baseline", "record43")
    assert code == 0 and len(err.splitlines()) == 5 and f"candidate {tmp_path.name} (--preset=test): 3 runs, 3 with a curve" in out


def test_allow_incomplete_adds_curves_but_never_losses_to_the_tests(tmp_path):
    logs_folder(tmp_path)
    finished_only = cli_json("summary", tmp_path)
    s = cli_json("summary", tmp_path, "--allow-incomplete")
    assert sorted(r["name"] for r in s["runs"] if r["incomplete"]) == ["failed", "interrupted", "running"]
    assert s["num_runs"] == 6 and s["num_finished"] == 3
    assert s["val_loss"] == finished_only["val_loss"]
    assert s["t_test_below_target"] == finished_only["t_test_below_target"]
    assert s["train_time"] == finished_only["train_time"]
    d = cli_json("diff", tmp_path, "--baseline", tmp_path / "done0.json", "--allow-incomplete")
    by_step = {c["step"]: c for c in d["curve"]}
    assert by_step[0]["runs_n"] == 6 and by_step[100]["runs_n"] == 5 and by_step[400]["runs_n"] == 3
    assert by_step[100]["runs"] == pytest.approx((3 * 4.1 + 4.0 + 4.2) / 5)
    assert d["final_val_loss"]["runs"] == pytest.approx(3.2780) and d["runs"]["incomplete"] == 3


def test_differences_in_setup_are_named_before_the_table(tmp_path):
    runs, mixed = tmp_path / "runs", tmp_path / "mixed"
    for i in range(2):
        write_run(runs, f"r{i}", curve(3.279 + i / 1000))
    same = cli("diff", runs, "--baseline", runs / "r0.json")
    assert same[0] == 0 and "warning" not in same[1]
    # record 43's published runs: another machine, and a preset of another name
    code, out, _ = cli("diff", runs, "--baseline", "record43")
    lines = out.splitlines()
    assert lines[lines.index("") + 1:][:5] == [
        "warning: runs and baseline differ in preset: runs test | baseline record43",
        "warning: runs and baseline differ in steps: runs 400 | baseline 2245",
        "warning: runs and baseline differ in hardware: runs 8x NVIDIA H100 80GB HBM3 | baseline 8x H100 (times from "
        "different machines do not compare)",
        "baseline record43 (--preset=record43): 10 runs, 1 with a curve",
        f"candidate {runs.name} (--preset=test): 2 runs, 2 with a curve"]
    tiny = dict(preset="tiny", model_dim=64, num_heads=2, head_dim=32, train_batch_tokens=2048, vocab_size=1024,
                train_files="data/synthetic/train_*.bin", val_files="data/synthetic/val_*.bin", val_tokens=8192)
    write_run(mixed, "big", curve(3.2790))
    write_run(mixed, "small", {0: 6.93, 50: 5.2, 100: 4.5}, num_steps=100, setup=tiny)
    write_run(mixed, "short", {0: 10.8258, 100: 4.1, 200: 3.6}, max_steps=200)
    warnings = [line for line in cli("summary", mixed)[1].splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: the runs differ in preset: test; tiny",
        "warning: the runs differ in steps: 100; 200 of 400; 400",
        "warning: the runs differ in model: dim 64, 2 heads of 32; dim 768, 6 heads of 128",
        "warning: the runs differ in batch: 2048 tokens; 262144 tokens",
        "warning: the runs differ in vocabulary: 1024; 50257",
        "warning: the runs differ in data: fineweb_train_*.bin + fineweb_val_*.bin (10485760 val tokens); "
        "train_*.bin + val_*.bin (8192 val tokens)",
        "warning: the runs of mixed differ in num_scheduled_iterations 360 | 60: their losses are not one setting's; "
        "pass each setting's runs as a set of its own"]
    assert cli_json("summary", mixed)["warnings"] == warnings


def test_invalid_json(tmp_path):
    path = write_run(tmp_path, "broken", curve(3.279))
    path.write_text(path.read_text()[:200])
    assert_refused(["summary", path], path, "not valid JSON", "truncated", f"use the log {path.with_suffix('.txt')}")
    path.write_text("")
    assert_refused(["summary", path], path, "empty")
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({k: v for k, v in record_json("d", curve(3.279), 400, 400, "finished").items()
                                   if k != "env"}))
    assert_refused(["summary", damaged], damaged, "'env'")


def test_empty_set(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(["summary", empty], empty, "no .json or .txt record files")
    assert_refused(["diff", ROOT / "records/record43", "--baseline", empty], empty, "no .json or .txt")
    missing = tmp_path / "missing.json"
    assert_refused(["summary", missing], missing, "no such file")
    code, _, err = cli("summary")
    assert code == 2 and "RUN" in err


def test_damaged_figures_file(tmp_path):
    figures = json.loads((ROOT / "records/record43/figures.json").read_text())
    path = tmp_path / "figures.json"
    path.write_text(json.dumps({**figures, "runs": []}))
    assert_refused(["summary", path], path, "no runs")
    del figures["runs"][3]["train_time_s"]
    path.write_text(json.dumps(figures))
    assert_refused(["summary", path], path, "'train_time_s'")


# -----------------------------------------------------------------------------
# record: a baseline of your own

def test_record_writes_a_baseline_that_diff_takes_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "RECORDS_DIR", tmp_path / "records")
    (tmp_path / "records").mkdir()
    logs = tmp_path / "logs"
    paths = logs_folder(logs)
    code, out, err = cli("record", logs, "--name", "mybox")
    assert code == 0, err
    folder = tmp_path / "records" / "mybox"
    assert out.startswith(f"wrote {folder} from 3 finished runs") and len(err.splitlines()) == 5
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["mybox"]  # no temporary folder left
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "figures.json"]
    figures = json.loads((folder / "figures.json").read_text())
    assert [r["final_val_loss"] for r in figures["runs"]] == [3.2790, 3.2770, 3.2780]
    assert [r["source"] for r in figures["runs"]] == [paths[f"done{i}"].name for i in range(3)]
    assert figures["hardware"] == "8x NVIDIA H100 80GB HBM3" and figures["config"]["preset"] == "test"
    readme = (folder / "README.md").read_text()
    p_value = compare.t_test_below([3.2790, 3.2770, 3.2780])["p"]
    assert "mean 3.2780  std 0.0010" in readme and f"p = {p_value:.4f}" in readme and "done0" in readme
    # the baseline's own runs against it: same setup and machine, so no warning and no difference
    d = cli_json("diff", logs, "--baseline", "mybox")
    assert d["warnings"] == [] and d["final_val_loss"]["diff"] == pytest.approx(0)
    assert d["train_time"][0]["diff_s"] == pytest.approx(0) and len(d["curve"]) == 5


def test_record_refuses_mixed_setups_taken_names_and_bad_names(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "RECORDS_DIR", tmp_path / "records")
    (tmp_path / "records" / "taken").mkdir(parents=True)
    logs = tmp_path / "logs"
    write_run(logs, "a", curve(3.2790))
    write_run(logs, "b", curve(3.2770), setup={"train_batch_tokens": 131072})
    code, out, err = cli("record", logs, "--name", "mixed")
    assert code == 1 and out == ""
    assert err.strip() == ("error: the runs differ in batch: 131072 tokens; 262144 tokens; a baseline holds runs of "
                           "one setup on one machine: pass only those")
    assert cli("record", logs / "a.json", "--name", "taken")[2].strip().endswith("taken already exists; choose another "
                                                                                 "--name or remove that folder")
    assert "--name '../up'" in cli("record", logs / "a.json", "--name", "../up")[2]
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["taken"]


# -----------------------------------------------------------------------------
# plot

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "done", curve(3.2790))
    write_run(runs, "cut", {0: 10.8258, 100: 4.2, 200: 3.7}, last_step=250, status="failed")
    out = tmp_path / "curves.png"
    code, stdout, err = cli("plot", runs, "--baseline", "record43", "-o", out, "--allow-incomplete")
    assert code == 0, err
    assert str(out) in stdout
    assert err.splitlines() == ["warning: runs and baseline differ in preset: runs test | baseline record43",
                                "warning: runs and baseline differ in steps: runs 400 | baseline 2245",
                                "warning: runs and baseline differ in hardware: runs 8x NVIDIA H100 80GB HBM3 | "
                                "baseline 8x H100 (times from different machines do not compare)"]
    assert 10_000 < out.stat().st_size < 2_000_000
    width, height = png_size(out)
    assert 800 <= width <= 3000 and 400 <= height <= 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "runs"]  # no temporary file left


def test_plot_refuses_bad_output(tmp_path):
    bad_suffix = tmp_path / "curves.xyz"
    assert_refused(["plot", ROOT / "records/record43", "-o", bad_suffix], bad_suffix, ".png")
    no_folder = tmp_path / "nowhere" / "curves.png"
    assert_refused(["plot", ROOT / "records/record43", "-o", no_folder], no_folder, "does not exist")
    assert list(tmp_path.iterdir()) == []


def panels(sets):
    fig = compare.figure(sets)
    full, last = fig.axes
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    return full, last, legend


def target_lines(ax) -> int:
    return sum(list(line.get_ydata()) == [compare.TARGET_LOSS] * 2 for line in ax.get_lines())


def test_plot_shows_the_whole_curve_and_the_last_third_without_insets(tmp_path):
    write_run(tmp_path / "runs", "done", curve(3.2790))
    full, last, legend = panels([compare.load_set([str(tmp_path / "runs")], False), compare.load_set(["record43"], False)])
    assert full.child_axes == [] and last.child_axes == []  # no inset drawn over the curves
    assert full.get_xlim()[0] <= 0 and full.get_ylim()[1] >= 10.8258  # step 0 and its loss are in view
    assert 2245 * 2 / 3 - 50 <= last.get_xlim()[0] <= 2245 * 2 / 3 and last.get_xlim()[1] >= 2245
    low, high = last.get_ylim()
    assert low < 3.2771 and 3.4421 <= high < 3.6  # the finish near 3.28, from record 43's step-1500 point
    assert target_lines(full) == target_lines(last) == 1
    assert legend == ["runs (1 run)", "record43 (10 runs)", "target 3.28"]


def test_plot_draws_the_target_only_where_it_is_in_view(tmp_path):
    write_run(tmp_path, "tiny", {0: 6.93, 50: 5.2, 100: 4.5}, num_steps=100)
    write_run(tmp_path, "cut", {0: 6.93, 50: 5.3}, num_steps=100, last_step=60, status="interrupted")
    full, last, legend = panels([compare.load_set([str(tmp_path)], True)])
    assert target_lines(full) == target_lines(last) == 0
    assert legend == [f"{tmp_path.name} (2 runs)", "unfinished run"]
