"""benchmarks/gpu_check.sh without a GPU: the dry run of every stage on the CPU with the tiny preset (compiled from a
cold compile cache in stage 3, from the warm one in stage 4), its summary in both forms, and stages that fail or pass
their time limit reported as such while the later ones still run."""
import json
import math
import subprocess

import torch

from test_train import ROOT, fake_nvidia_smi

UNKNOWN_FLAG = "error: unknown flag --muon_lrr (did you mean --muon_lr?); see --help for the list"


def gpu_check(tmp_path, *args):
    out = tmp_path / "out"
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), f"--out={out}", f"--work={tmp_path / 'work'}",
                             *args], env=fake_nvidia_smi(tmp_path, 0), capture_output=True, text=True, timeout=900)
    return result, json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text(), out


def test_the_dry_run_runs_every_stage_and_reports_its_figures(tmp_path):
    result, summary, markdown, out = gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.startswith("No GPU: dry run of the GPU check on the CPU with the tiny preset")
    stages = {s["number"]: s for s in summary["stages"]}
    assert summary["dry_run"] and sorted(stages) == [1, 2, 3, 4, 5, 6]
    assert [s["status"] for s in stages.values()] == ["ok"] * 6 and all(s["problem"] is None for s in stages.values())
    for s in stages.values():
        assert 0 < s["seconds"] <= s["limit_s"] and (out / s["log"]).read_text().startswith("[")

    machine = stages[1]["figures"]
    assert machine["gpu"] is None and machine["torch"] == torch.__version__ and machine["flash_attn_4"] is None
    assert "skipped" in stages[2]["figures"]["result"] and stages[2]["figures"]["failures"] == []
    for number, steps in [(3, 4), (4, 2), (5, 2)]:
        f = stages[number]["figures"]
        assert f["status"] == "finished" and f["steps_done"] == steps and f["tokens_per_s"] > 0
        assert f["startup_s"] == sum(f["startup"].values()) and f["peak_memory_allocated_mib"] > 0
        assert f["val_first"]["step"] == 0 and abs(f["val_first"]["val_loss"] - math.log(1024)) < 0.01
        assert f["val_last"]["step"] == steps and math.isfinite(f["val_last"]["val_loss"])
    # compiled in the dry run too: stage 3 compiles the model's three graphs into the empty cache, stage 4 finds them
    assert stages[3]["figures"]["compile"] == {"model_graphs": 2, "recompiles_after_warmup": 0, "cache_hits": 0,
                                               "cache_misses": 3}
    assert stages[4]["figures"]["compile"] == {"model_graphs": 2, "recompiles_after_warmup": 0, "cache_hits": 3,
                                               "cache_misses": 0}
    assert stages[5]["figures"]["compile"]["model_graphs"] == 0
    assert " -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py " in (out / "5_log.txt").read_text()
    profile = stages[6]["figures"]
    assert profile["kind"] == "CPU operators" and len(profile["rows"]) == 15 and profile["step_ms"] > 0
    shares = [row["share"] for row in profile["rows"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) < 1.05
    assert all(row["name"].startswith("aten::") for row in profile["rows"][:3])

    lines = markdown.splitlines()
    header = lines.index("| stage | result | seconds (limit) | figures |")
    rows = lines[header + 2:lines.index("", header)]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| 1 machine", "ok"], ["| 2 tests/test_gpu.py", "ok"], ["| 3 record 43, cold compile cache", "ok"],
        ["| 4 record 43, warm compile cache", "ok"], ["| 5 torchrun, 1 process", "ok"], ["| 6 profile", "ok"]]
    assert f"val loss 6.9315 at step 0 -> {stages[3]['figures']['val_last']['val_loss']:.4f} at 4" in rows[2]
    assert "2 model graphs, 0 recompiles after warm-up, 0 graphs compiled into the compile cache and 3 found there" in rows[3]
    assert "## The 15 CPU operators that take the most time" in markdown and markdown in result.stdout


def test_a_stage_past_its_limit_or_failing_is_reported_and_the_later_ones_still_run(tmp_path):
    result, summary, markdown, _ = gpu_check(tmp_path, "--stages=3,4,5", "--limit=3=0.5", "--", "--muon_lrr=1")
    assert result.returncode == 1
    stages = {s["number"]: s for s in summary["stages"]}
    assert sorted(stages) == [3, 4, 5]
    assert stages[3]["status"] == "timed out" and stages[3]["problem"].startswith("stopped at its limit of 0 s")
    for number in (4, 5):  # torchrun's own report follows the trainer's line, which is the one reported
        assert (stages[number]["status"], stages[number]["problem"]) == ("failed", UNKNOWN_FLAG)
    assert f"| 4 record 43, warm compile cache | failed: {UNKNOWN_FLAG} |" in markdown
    assert "| 3 record 43, cold compile cache | timed out: stopped at its limit" in markdown
    assert "0 of 3 stages ok" in markdown and "train_gpt.py flags: --muon_lrr=1" in markdown
