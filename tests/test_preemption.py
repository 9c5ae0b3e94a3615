"""Runs that survive a cluster: choices every rank makes alike, record files whole whenever a signal comes, a signal
during the warm-up or a validation honoured at the next step boundary, and under torchrun with 2 gloo ranks, the rank
that failed, died or hung named in rank 0's record and in torchrun's summary."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import train_gpt as tg
from test_records import cli, curve, skipped_files, write_run
from test_train import ROOT, record_of, shards, tiny_args  # noqa: F401

FAST = ["--warmup_steps=0", "--val_tokens=1024", "--val_loss_every=2"]


# --- choices made alike on every rank ------------------------------------------------------------------------

def choices_worker(rank: int, world: int, store: str, out: str):
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        passed_over = tg.AttentionChoice("varlen_attn", note="flash-attn-4 not used: it is not installed (pip ...)")
        mine = tg.AttentionChoice("flash-attn-4", "4.0.0b36") if rank == 0 else passed_over
        same = tg.AttentionChoice("flash-attn-4", "4.0.0b36")
        result = [tg.common_attention(mine), tg.common_attention(same), tg.on_every_rank(rank == 0),
                  tg.on_every_rank(True)]
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_the_attention_kernel_and_the_fp8_head_are_chosen_alike_on_every_rank(tmp_path):
    """flash-attn-4 where its check passed on rank 0 but not on rank 1: both train on varlen_attn, saying which rank
    passed it over and why; where it passed everywhere it stays. The FP8 head only where every rank can run it."""
    torch.multiprocessing.spawn(choices_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    results = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    assert results[0] == results[1] == [
        ["varlen_attn", None, "flash-attn-4 not used: on rank 1, it is not installed (pip ...)"],
        ["flash-attn-4", "4.0.0b36", None], False, True]


# --- signals in one process --------------------------------------------------------------------------------------

@pytest.fixture
def handlers():
    """main()'s handlers, installed for a test that sends itself signals, and the ones before put back."""
    before = {s: signal.getsignal(s) for s in tg.Signals.HANDLED}
    tg.SIGNALS.reset()
    for s in tg.Signals.HANDLED:
        signal.signal(s, tg.SIGNALS.handle)
    yield tg.SIGNALS
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_signal_while_the_record_is_created_comes_after_both_files(shards, tmp_path, monkeypatch, handlers):
    """SIGTERM right after the record's text file is opened (its header being written) stops the run only once the
    JSON record exists beside it, whole; compare.py reads the pair."""
    def report_and_signal():
        os.kill(os.getpid(), signal.SIGTERM)
        return "no GPU here"
    monkeypatch.setattr(tg, "hardware_report", report_and_signal)
    cfg = tg.parse_config(tiny_args(shards, tmp_path))
    (tmp_path / "logs").mkdir()
    with pytest.raises(tg.Interrupted):
        tg.RunLog(cfg, 0, 1, torch.device("cpu"))
    (json_path,) = (tmp_path / "logs").glob("*.json")
    record = json.loads(json_path.read_text())
    assert record["status"] == "running" and json_path.with_suffix(".txt").read_text().endswith(
        "no GPU here\n" + tg.SEPARATOR + "\n")


def run_in_process(shards, tmp_path, monkeypatch, name, nth, *flags):
    """main() with tg.<name> sending this process SIGTERM during its nth call; returns the exit status and the record."""
    original, calls = getattr(tg, name), []

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(tg, name, signalling)
    code = tg.main(tiny_args(shards, tmp_path, "--val_tokens=1024", "--val_loss_every=2", "--max_steps=12",
                             f"--checkpoint_dir={tmp_path / 'ck'}", *flags))
    return code, record_of(tmp_path)[0]


def test_sigterm_in_the_warm_up_stops_at_the_first_step_without_a_checkpoint(shards, tmp_path, monkeypatch):
    code, record = run_in_process(shards, tmp_path, monkeypatch, "train_step", 1, "--save_every=5")
    assert code == tg.PREEMPTED_EXIT == 75
    assert record["status"] == "preempted" and record["steps_done"] == 0
    assert record["error"] == "preempted at step 0: no checkpoint yet, so it starts afresh"
    assert record["preempted"]["checkpoint"] is None and record["preempted"]["resume"].endswith(
        f"--checkpoint_dir={tmp_path / 'ck'} --save_every=5 --resume=auto")
    assert not (tmp_path / "ck").exists()


def test_sigterm_in_a_validation_stops_with_a_checkpoint_of_the_next_step_boundaries(shards, tmp_path, monkeypatch):
    """The signal comes in the validation at step 2 (the evaluate call after the warm-up's and step 0's): the run
    stops one or two step boundaries later, with a checkpoint of that step, though --save_every=5 would not save it."""
    code, record = run_in_process(shards, tmp_path, monkeypatch, "evaluate", 3, "--save_every=5", "--warmup_steps=2")
    assert code == 75 and record["status"] == "preempted"
    step = record["preempted"]["step"]
    assert step in (3, 4) and record["steps_done"] == step
    assert record["preempted"]["checkpoint"] == str(tmp_path / "ck" / f"step_{step:06d}")
    assert [p.name for p in tg.checkpoint_folders(tmp_path / "ck")] == [f"step_{step:06d}"]
    assert tg.read_checkpoint(tmp_path / "ck" / f"step_{step:06d}")["step"] == step


def test_without_checkpoints_sigterm_stops_at_once(shards, tmp_path, monkeypatch):
    code, record = run_in_process(shards, tmp_path, monkeypatch, "train_step", 3, "--warmup_steps=0")
    assert code == 128 + signal.SIGTERM and record["status"] == "interrupted" and record["steps_done"] == 2
    assert "preempted" not in record


def test_a_second_signal_ends_the_process_at_once_unless_it_is_the_same_notice(handlers, monkeypatch):
    """A second signal within SAME_NOTICE_S of the first is the same notice passed on (SLURM and torchrun both send
    it), and one while the run closes is torchrun stopping the ranks; any other ends the process with its default."""
    sent, now = [], [1000.0]
    monkeypatch.setattr(tg.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    monkeypatch.setattr(tg.time, "monotonic", lambda: now[0])
    handlers.deferred = True
    handlers.handle(signal.SIGTERM, None)  # the notice: the run goes on to the next step boundary
    now[0] += tg.SAME_NOTICE_S - 1
    handlers.handle(signal.SIGTERM, None)
    assert handlers.requested == signal.SIGTERM and sent == []
    now[0] += 2
    handlers.handle(signal.SIGUSR1, None)
    assert sent == [(os.getpid(), signal.SIGUSR1)] and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    handlers.closing = True
    handlers.handle(signal.SIGTERM, None)
    assert len(sent) == 1


def test_compare_skips_a_preempted_run_saying_where_it_stopped(tmp_path):
    write_run(tmp_path, "done", curve(3.2790))
    preempted = write_run(tmp_path, "preempted", {0: 10.8258, 100: 4.2}, last_step=130, status="preempted")
    code, out, err = cli("summary", tmp_path)
    assert code == 0 and skipped_files(err) == [str(preempted)] and "preempted at step 130 of 400" in err


def test_resume_command_puts_resume_auto_in_place_of_any_resume():
    assert tg.resume_command(["--preset=tiny", "--resume", "ck/step_000004", "--log_dir=my logs"]) == (
        "train_gpt.py --preset=tiny '--log_dir=my logs' --resume=auto")
    assert tg.resume_command(["--resume=auto", "--save_every=4"]) == "train_gpt.py --save_every=4 --resume=auto"


# --- torchrun with 2 gloo ranks: the rank that failed, died or hung -----------------------------------------------

def torchrun(tmp_path, script, args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen([*launcher, str(script), *args], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_line(proc, prefix: str):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"no line starting {prefix!r}")


def rank_1_pid(proc) -> int:
    """torchrun's workers are its children, started in rank order."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return sorted(map(int, children))[1]


def test_a_rank_that_fails_is_named_by_torchrun_and_in_rank_0s_record(shards, tmp_path):
    """Rank 1 raises in its fourth step: torchrun's summary shows its error from the error file (not <N/A>), and
    rank 0, stopped by torchrun, records that rank 1 failed and how."""
    script = tmp_path / "failing_rank.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_gpt as tg
step = tg.train_step
def failing(cfg, model, optimizers, batches, grad_accum, i, windows):
    if i == 3 and os.environ["RANK"] == "1":
        raise RuntimeError("the disk of this node went away")
    return step(cfg, model, optimizers, batches, grad_accum, i, windows)
tg.train_step = failing
sys.exit(tg.main())
""")
    proc = torchrun(tmp_path, script, tiny_args(shards, tmp_path, *FAST, "--max_steps=8"))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "error_file: <N/A>" not in stderr
    assert "RuntimeError: the disk of this node went away" in stderr.split("Root Cause")[1]
    record, _ = record_of(tmp_path)
    assert record["status"] in ("failed", "interrupted")  # by the broken collective, or by torchrun's SIGTERM first
    assert ("rank 1 failed: error in step 4: RuntimeError: the disk of this node went away"
            in record["error"].splitlines()[0])


def test_a_rank_killed_mid_run_is_named_in_rank_0s_record(shards, tmp_path):
    """The probe: SIGKILL to rank 1 at step 3 of a run with checkpoints; rank 0's record names rank 1."""
    proc = torchrun(tmp_path, ROOT / "train_gpt.py", tiny_args(shards, tmp_path, *FAST, "--save_every=4"))
    wait_for_line(proc, "step:3/")
    os.kill(rank_1_pid(proc), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Signal 9 (SIGKILL) received by PID" in stderr
    record, _ = record_of(tmp_path)
    assert record["status"] in ("failed", "interrupted")
    assert ("rank 1 stopped without a word (killed by a signal such as SIGKILL or the out-of-memory killer, or stuck)"
            in record["error"].splitlines()[0])


def test_a_rank_that_stops_answering_is_found_within_the_collective_timeout(shards, tmp_path):
    """Rank 1 frozen (SIGSTOP) after step 2: rank 0 waits --collective_timeout=3 seconds in the collective, not
    torch's 10 minutes, and its record says where it waited, what timed out and which rank gave no word."""
    proc = torchrun(tmp_path, ROOT / "train_gpt.py", tiny_args(shards, tmp_path, *FAST, "--collective_timeout=3"))
    wait_for_line(proc, "step:2/")
    frozen = rank_1_pid(proc)
    os.kill(frozen, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while record_of(tmp_path)[0]["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os.kill(frozen, signal.SIGCONT)  # to take torchrun's SIGTERM
    proc.communicate(timeout=120)
    record, _ = record_of(tmp_path)
    first = record["error"].splitlines()[0]
    assert record["status"] == "failed"
    assert re.match(r"error in (the validation at )?step \d+: RuntimeError: .*Timed out waiting 3000ms", first)
    assert "rank 1 stopped without a word" in first
