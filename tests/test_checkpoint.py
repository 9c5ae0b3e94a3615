"""Checkpoints: a tiny run killed after a checkpoint and resumed ends bit for bit where the same run ends unbroken, at
world sizes 1 and 2; resuming at another world size; what is refused, before any compute, and why."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import train_gpt as tg
from data.shards import write_shard
from test_numerics import process_group  # noqa: F401 (a fixture)
from test_train import ROOT, document, loader_config, record_of, run_trainer, shards, tiny_args  # noqa: F401

STEPS = 6
KILLED_AT = 3  # odd: Adam's gradients of step 3 are still accumulating, so they are in the checkpoint too
FAST = ["--warmup_steps=0", "--val_tokens=1024", "--val_loss_every=2"]
CPU = torch.device("cpu")


def killed_after_checkpoint(args, cwd, nproc, step):
    """Start a run, SIGKILL it (every process) as soon as it reports its checkpoint of `step`; returns its output."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen([*launcher, str(ROOT / "train_gpt.py"), *args], cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"checkpoint checkpoints/step_{step:06d} written"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    return proc.returncode, "".join(lines)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """Per world size, made once: an unbroken run of STEPS steps, and a run killed after its checkpoint of step
    KILLED_AT (checkpoints every step, the newest three kept)."""
    made = {}

    def get(world):
        if world not in made:
            base = tmp_path_factory.mktemp(f"world{world}")
            straight, killed = base / "straight", base / "killed"
            straight.mkdir()
            killed.mkdir()
            result = run_trainer(tiny_args(shards, straight, *FAST, f"--max_steps={STEPS}", "--checkpoint=model.pt"),
                                 straight, nproc=world)
            assert result.returncode == 0, result.stderr[-3000:]
            code, out = killed_after_checkpoint(tiny_args(shards, killed, *FAST, "--save_every=1", "--keep_checkpoints=3"),
                                                killed, world, KILLED_AT)
            assert code == -signal.SIGKILL, out
            made[world] = straight, killed
        return made[world]
    return get


def resume(shards, run_dir, nproc, checkpoint, *extra):
    return run_trainer(tiny_args(shards, run_dir, *FAST, f"--max_steps={STEPS}", f"--resume={checkpoint}",
                                 "--checkpoint=model.pt", *extra), run_dir, nproc=nproc)


@pytest.mark.parametrize("world", [1, 2])
def test_a_killed_and_resumed_run_ends_bit_for_bit_like_an_unbroken_one(runs, shards, world):
    """Resumed from the checkpoint of step 3 by name at world size 1, and with --resume=auto, from the newest
    complete checkpoint, at world size 2."""
    straight, killed = runs(world)
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    complete = [p.name for p in tg.checkpoint_folders(killed / "checkpoints")]
    # The newest three, and no temporary folder: the kill follows the line of step 3's checkpoint, and on a busy
    # machine the run may go on meanwhile, to a checkpoint of step 4 or a hidden unfinished one.
    last = int(complete[-1].removeprefix("step_"))
    assert complete == [f"step_{s:06d}" for s in range(last - 2, last + 1)] and KILLED_AT <= last < KILLED_AT + 2
    assert kept in (complete, sorted([*complete, f".step_{last + 1:06d}.tmp"]))
    killed_record, _ = record_of(killed)
    assert killed_record["status"] == "running"  # SIGKILL left no time to write anything

    start = KILLED_AT if world == 1 else last
    result = resume(shards, killed, world, "checkpoints/step_000003" if world == 1 else "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, resumed = torch.load(straight / "model.pt"), torch.load(killed / "model.pt")
    assert expected.keys() == resumed.keys()
    assert [k for k in expected if not torch.equal(expected[k], resumed[k])] == []

    straight_record, _ = record_of(straight)
    record, text = record_of(killed)  # the killed run's record, continued
    assert record["run_id"] == killed_record["run_id"] and record["status"] == "finished"
    assert [(v["step"], v["val_loss"]) for v in record["val"]] == [(v["step"], v["val_loss"]) for v in straight_record["val"]]
    assert [v["step"] for v in record["val"]] == [0, 2, 4, 6]  # 0 and 2 from the killed run, carried by the checkpoint
    assert record["final_val_loss"] == straight_record["final_val_loss"]
    checkpoint = f"checkpoints/step_{start:06d}"
    assert record["resumed"] == [{"step": start, "checkpoint": checkpoint, "world_size": world}]
    total = tg.parse_config(["--preset=tiny"]).num_iterations
    resumed_at = text.index(f"resumed from {checkpoint} at step {start}")
    # the killed run's lines, then the resumed run's (the killed one may have logged a step more before the kill landed)
    assert (text.index(f"step:{start}/{total} train_time") < resumed_at
            < text.index(f"step:{start + 1}/{total} train_time", resumed_at))


def test_a_preempted_run_checkpoints_where_it_stops_and_resumes_bit_for_bit(runs, shards, tmp_path):
    """SIGTERM to torchrun, as SLURM sends it, after step 1 of a run that saves only at its end: torchrun passes it
    to both ranks, which agree on a step, write a checkpoint of it and stop with a preempted record that gives the
    command to go on; that command ends where the unbroken run ends, bit for bit."""
    straight, _ = runs(2)
    args = tiny_args(shards, tmp_path, *FAST, f"--max_steps={STEPS}", "--checkpoint=model.pt", "--save_every=100")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt.py"), *args], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step:1/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=120)
    record, text = record_of(tmp_path)
    step = record["steps_done"]
    assert record["status"] == "preempted" and 2 <= step < STEPS, stderr[-3000:]
    assert record["preempted"] == {"step": step, "checkpoint": f"checkpoints/step_{step:06d}",
                                   "resume": tg.resume_command(args)}
    assert [p.name for p in tg.checkpoint_folders(tmp_path / "checkpoints")] == [f"step_{step:06d}"]
    assert text.rstrip().splitlines()[-1] == (f"preempted at step {step}; record: {tmp_path}/logs/{record['log_file']}; to go on, "
                                              f"launch it again as before with: {tg.resume_command(args)}")

    result = run_trainer([*args, "--resume=auto"], tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, resumed = torch.load(straight / "model.pt"), torch.load(tmp_path / "model.pt")
    assert [k for k in expected if not torch.equal(expected[k], resumed[k])] == []
    record = record_of(tmp_path)[0]
    assert record["status"] == "finished" and record["final_val_loss"] == record_of(straight)[0]["final_val_loss"]
    assert record["resumed"] == [{"step": step, "checkpoint": f"checkpoints/step_{step:06d}", "world_size": 2}]


def overall_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors of two state_dicts together (the scalar vector over its common part)."""
    common = [(a[k].float().flatten(), b[k].float().flatten()) for k in a]
    common = [(x[:min(x.numel(), y.numel())], y[:min(x.numel(), y.numel())]) for x, y in common]
    return (sum((x - y).square().sum() for x, y in common) / sum(x.square().sum() for x, _ in common)).sqrt().item()


def test_an_odd_step_checkpoint_is_refused_at_another_world_size(runs, shards, tmp_path):
    _, killed = runs(2)
    cfg = tg.parse_config(tiny_args(shards, tmp_path, *FAST, f"--resume={killed / 'checkpoints' / 'step_000003'}"))
    assert tg.find_resume(cfg, CPU, 2)["step"] == 3
    with pytest.raises(tg.CheckpointError) as error:
        tg.find_resume(cfg, CPU, 1)
    assert str(error.value) == (
        f"{killed}/checkpoints/step_000003 was saved after an odd step, when Adam's gradients are still accumulating "
        "in each of its 2 processes; resume it with 2 processes, or resume from a checkpoint at an even step")


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_fields(runs, shards, tmp_path):
    _, killed = runs(1)
    result = resume(shards, tmp_path, 1, killed / "checkpoints" / "step_000002", "--muon_lr=0.05", "--window_schedule=2,4")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"error: {killed}/checkpoints/step_000002 belongs to a run with another configuration: "
                    "--window_schedule is [3, 7, 11] there, [2, 4] here; --muon_lr is 0.03 there, 0.05 here; resume "
                    "with that run's flags (its meta.json lists them) or start afresh without --resume")
    assert not (tmp_path / "logs").exists()  # refused before anything was started


def read_whole(path) -> dict:
    """Every tensor of a checkpoint, read whole, straight through torch.distributed.checkpoint."""
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, dcp.metadata.TensorStorageMetadata)
             else None for key, m in metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # that this reads without a process group, as intended
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


class QuietLog:
    record = {"run_id": "test"}

    def line(self, text):
        pass


def tiny_run_state(cfg, world=1):
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg, cfg.val_seq_tokens, world).float()
    batches = tg.TrainBatches(tg.list_shards(cfg.train_files, "train_files"), cfg, 0, 1, CPU)
    return model, tg.make_optimizers(cfg, model), batches


def test_a_checkpoint_of_2_processes_goes_on_with_1(runs, shards, tmp_path, process_group):
    """Reading deals NorMuon's per-parameter state into this rank's runs and DistAdam's slices into whole tensors, and
    writing splits them again: the round trip from 2 processes to 1 changes no number. Trained on, the run ends as
    close to the unbroken runs at either size as they are to each other. Measured: the unbroken runs of 1 and 2
    processes differ by 0.021 overall after 6 steps, one resumed at the other size by 0.015 to 0.022 from either; the
    tiny gates, near zero, differ by up to 0.2 each, which is why they are not compared one by one."""
    straight_1, _ = runs(1)
    straight_2, killed = runs(2)
    original = killed / "checkpoints" / "step_000002"
    meta = tg.read_checkpoint(original)
    cfg = dataclasses.replace(tg.parse_config(tiny_args(shards, tmp_path, *FAST)), checkpoint_dir=str(tmp_path / "again"))
    model, optimizers, batches = tiny_run_state(cfg)
    assert tg.load_checkpoint(meta, model, optimizers, batches) == (2, meta["train_time_ms"])
    assert batches.position() == tuple(meta["loader"])
    tg.save_checkpoint(cfg, 2, meta["train_time_ms"], model, optimizers, batches, QuietLog())
    before, after = read_whole(original), read_whole(tmp_path / "again" / "step_000002")
    assert before.keys() == after.keys()
    matrices = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
    # every NorMuon parameter's state is there, whichever of the 2 ranks wrote it
    assert {key.split("/")[1] for key in before if key.startswith("normuon/")} == {
        name for name, p in model.named_parameters() if id(p) in matrices}
    assert [key for key in before if not same(before[key], after[key])] == []
    again = json.loads((tmp_path / "again" / "step_000002" / "meta.json").read_text())
    assert (again["world_size"], again["loader"], again["pending_grads"]) == (1, meta["loader"], False)

    windows = (tg.long_window(cfg, 0) // 2, tg.long_window(cfg, 0))  # the same for the tiny preset's first 100 steps
    for step in range(2, STEPS):
        tg.train_step(cfg, model, optimizers, batches, tg.batch_split(cfg, 1)[0], step, windows)
    val_data = tg.val_batches(tg.list_shards(cfg.val_files, "val_files"), cfg, 0, 1, CPU)
    val_loss = tg.evaluate(model, val_data, tg.final_windows(cfg, STEPS), CPU)
    for straight in (straight_1, straight_2):
        assert abs(val_loss - record_of(straight)[0]["final_val_loss"]) < 2e-4
        assert overall_difference(torch.load(straight / "model.pt"), model.state_dict()) < 0.05


# --- refused up front, and the files --------------------------------------------------------------------------

def write_meta(folder, cfg, **changes):
    """A checkpoint folder as far as find_resume reads it."""
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    meta = {"format": tg.CHECKPOINT_FORMAT, "step": 4, "train_time_ms": 1.0, "loader": [1, 0], "world_size": 1,
            "device": "cpu", "pending_grads": False, "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
            "record": {}, **changes}
    (folder / "meta.json").write_text(json.dumps(meta))


def resume_config(tmp_path, *flags):
    return tg.parse_config(["--preset=tiny", f"--checkpoint_dir={tmp_path / 'ck'}", *flags])



@pytest.mark.parametrize("make, flags, message", [
    (lambda d: None, ["--resume={d}/nowhere"], "{d}/nowhere: no such checkpoint folder; give a step_<S> folder"),
    (lambda d: (d / "notes").mkdir(), ["--resume={d}/notes"], "{d}/notes: not a checkpoint of train_gpt.py"),
    (lambda d: (d / "bad").mkdir() or (d / "bad" / "meta.json").write_text("{"), ["--resume={d}/bad"],
     "{d}/bad: not a checkpoint of train_gpt.py (no readable meta.json"),
    (lambda d: write_meta(d / "ck" / "step_000004", resume_config(d)), ["--save_every=2"],
     "--checkpoint_dir={d}/ck already holds checkpoints of a run (newest: step_000004); continue that run with "
     "--resume=auto, or give this one another --checkpoint_dir"),
    (lambda d: write_meta(d / "ck" / "step_000004", resume_config(d), device="cuda"), ["--resume=auto"],
     "{d}/ck/step_000004 was written on cuda and holds that device's number formats; resume it on cuda"),
    (lambda d: write_meta(d / "ck" / "step_000004", resume_config(d)), ["--resume=auto", "--max_steps=4"],
     "{d}/ck/step_000004 is at step 4, and --max_steps=4 stops the run there; raise --max_steps to train on (0: all "
     "80 steps)"),
    (lambda d: write_meta(d / "ck" / "step_000080", resume_config(d), step=80), ["--resume=auto"],
     "{d}/ck/step_000080 is the end of a finished run (step 80), so there is nothing left to train"),
])
def test_what_cannot_be_resumed_is_refused_with_the_fix(tmp_path, make, flags, message):
    make(tmp_path)
    cfg = resume_config(tmp_path, *(f.format(d=tmp_path) for f in flags))
    with pytest.raises(tg.CheckpointError) as error:
        tg.find_resume(cfg, CPU, 1)
    assert message.format(d=tmp_path) in str(error.value)


def test_resume_auto_takes_the_newest_complete_checkpoint_or_starts_afresh(tmp_path):
    cfg = resume_config(tmp_path, "--resume=auto", "--save_every=2")
    assert tg.find_resume(cfg, CPU, 1) is None  # nothing there yet
    for step in (2, 10, 4):
        write_meta(tmp_path / "ck" / f"step_{step:06d}", cfg, step=step)
    (tmp_path / "ck" / ".step_000012.tmp").mkdir()  # a save cut short by a crash
    (tmp_path / "ck" / "step_000011").mkdir()  # no meta.json: not a checkpoint
    assert tg.find_resume(cfg, CPU, 1)["path"] == str(tmp_path / "ck" / "step_000010")


def test_a_crash_while_saving_leaves_the_earlier_checkpoints(shards, tmp_path, process_group, monkeypatch):
    cfg = tg.parse_config(tiny_args(shards, tmp_path, "--keep_checkpoints=1", f"--checkpoint_dir={tmp_path / 'ck'}"))
    model, optimizers, batches = tiny_run_state(cfg)
    tg.save_checkpoint(cfg, 2, 0.0, model, optimizers, batches, QuietLog())
    saved = (tmp_path / "ck" / "step_000002" / "__0_0.distcp").read_bytes()

    def crash(state, checkpoint_id):
        checkpoint_id.mkdir(parents=True)
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half")
        raise OSError("the machine went down")
    monkeypatch.setattr(tg.dcp, "save", crash)
    with pytest.raises(OSError):
        tg.save_checkpoint(cfg, 4, 0.0, model, optimizers, batches, QuietLog())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".step_000004.tmp", "step_000002"]
    assert (tmp_path / "ck" / "step_000002" / "__0_0.distcp").read_bytes() == saved
    monkeypatch.undo()
    tg.save_checkpoint(cfg, 6, 0.0, model, optimizers, batches, QuietLog())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000006"]  # the leftover went too


def test_the_loader_goes_on_from_its_position_at_any_world_size(tmp_path):
    """A position taken between steps at one world size, sought at another, gives the batches that follow, across a
    shard change (a global batch of 8 sequences of 40 tokens; the first shard holds two and a part)."""
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "train_000001.bin", np.concatenate([document(i, int(n)) for i, n in enumerate(rng.integers(2, 40, 70))]))
    write_shard(tmp_path / "train_000002.bin", np.concatenate([document(i, int(n)) for i, n in enumerate(rng.integers(2, 40, 200))]))
    files = tg.list_shards(str(tmp_path / "train_*.bin"), "train_files")
    cfg = loader_config("--train_batch_tokens=320")

    def global_batch(loaders):
        return [loader.next()[0].tolist() for _ in range(loaders[0].grad_accum) for loader in loaders]
    unbroken = tg.TrainBatches(files, cfg, 0, 1, CPU)
    expected = [global_batch([unbroken]) for _ in range(5)]
    for taken_at, world in ((1, 2), (2, 4), (3, 1)):
        first = tg.TrainBatches(files, cfg, 0, 1, CPU)
        for _ in range(taken_at):
            global_batch([first])
        position = first.position()
        loaders = [tg.TrainBatches(files, cfg, rank, world, CPU) for rank in range(world)]
        for loader in loaders:
            loader.seek(position)
        assert [global_batch(loaders) for _ in range(taken_at, 5)] == expected[taken_at:], (taken_at, world)
    assert first.position() == (2, first.stream.doc)  # the last position was in the second shard
