"""train_gpt.py as a user meets it: flags, data loading, bad input, and whole runs of the tiny preset."""
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from data.shards import write_shard
from data.synthetic import generate
from test_download import hub_env, start_hub  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 1024
BOS = VOCAB - 1


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Synthetic tiny-vocabulary shards: one train shard and a validation shard."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, VOCAB, train_shards=1, train_tokens_per_shard=2_000_000, val_tokens=40_000, seed=0)
    return out


def tiny_args(shards, tmp_path, *extra):
    return ["--preset=tiny", f"--train_files={shards}/train_*.bin", f"--val_files={shards}/val_*.bin",
            f"--log_dir={tmp_path / 'logs'}", *extra]


def run_trainer(args, cwd, nproc=1, timeout=600):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(ROOT / "train_gpt.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def record_of(tmp_path):
    (json_path,) = (tmp_path / "logs").glob("*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".txt").read_text()


# --- configuration -----------------------------------------------------------------------------------------

def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tg.parse_config(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for f in dataclasses.fields(tg.Config):
        assert f"--{f.name} " in text
    assert "--muon_lr NUMBER NorMuon lr (block matrices and gates) (default: 0.03)" in text
    assert "(default: 1.2)" in text and "(default: 3,7,11)" in text and "presets: record43: the spec;" in text


def test_flags_take_both_forms_and_the_last_of_a_repeated_flag_wins():
    cfg = tg.parse_config(["--preset", "tiny", "--max_steps=2", "--muon_lr", "0.05", "--max_steps", "7",
                           "--window_schedule", "2,4"])
    assert (cfg.model_dim, cfg.max_steps, cfg.muon_lr, cfg.window_schedule) == (64, 7, 0.05, (2, 4))


def test_presets_and_overrides():
    record43 = tg.parse_config([])
    assert (record43.num_scheduled_iterations, record43.num_iterations, record43.weight_decay) == (2205, 2245, 1.2)
    assert record43.weight_decay_mode == "cautious" and record43.bos_id == 50256
    record42 = tg.parse_config(["--preset=record42"])
    assert (record42.num_scheduled_iterations, record42.num_iterations, record42.weight_decay) == (2245, 2285, 0.0)
    assert (record43.adam_group_optimizer, record43.adam_weight_decay, record43.cautious_mask) == ("adam", 0.0, "ge")
    tiny = tg.parse_config(["--preset=tiny", "--muon_lr=0.05", "--window_schedule=2,4", "--weight_decay_mode=none"])
    assert (tiny.model_dim, tiny.muon_lr, tiny.window_schedule, tiny.weight_decay_mode) == (64, 0.05, (2, 4), "none")


@pytest.mark.parametrize("argv, message", [
    (["--muon_lrr=0.1"], "unknown flag --muon_lrr (did you mean --muon_lr?)"),
    (["--max_steps=ten"], "--max_steps=ten: expected an integer"),
    (["--muon_lr=fast"], "--muon_lr=fast: expected a number"),
    (["--window_schedule=3;7"], "--window_schedule=3;7: expected comma-separated integers"),
    (["--preset=record44"], "--preset=record44: unknown preset"),
    (["--weight_decay_mode=adamw"], "--weight_decay_mode=adamw: choose one of cautious, decoupled, none"),
    (["--adam_weight_decay_mode=none"], "--adam_weight_decay_mode=none: choose one of cautious, decoupled"),
    (["--cautious_mask=gte"], "--cautious_mask=gte: choose one of ge, gt"),
    (["--adam_group_optimizer=sgd"], "--adam_group_optimizer=sgd: choose one of adam, lion"),
    (["--adam_weight_decay=-0.005"], "--adam_weight_decay=-0.005: must not be negative"),
    (["--value_embed_wd_mul=-5"], "--value_embed_wd_mul=-5.0: must not be negative"),
    (["--adam_beta2=1"], "--adam_beta2=1.0: must be in [0, 1) (default 0.95)"),
    (["--lion_beta2=1"], "--lion_beta2=1.0: must be in [0, 1) (default 0.99)"),
    (["--lion_lr_scale=0"], "--lion_lr_scale=0.0: must be positive"),
    (["max_steps=3"], "unexpected argument 'max_steps=3': flags are --name=value or --name value"),
    (["--max_steps"], "argument --max_steps: expected one argument; see --help"),
    (["--max=3"], "unknown flag --max"),  # no abbreviations: --max could be --max_steps or --max_doc_tokens
    (["--model_dim=512"], "--model_dim=512 must equal num_heads * head_dim = 768"),
    (["--val_tokens=1000"], "--val_tokens=1000 is not a multiple of --val_seq_tokens=262144; use --val_tokens=262144"),
])
def test_bad_flags_are_rejected_with_the_fix(argv, message):
    with pytest.raises(tg.ConfigError) as error:
        tg.parse_config(argv)
    assert message in str(error.value)


def test_batch_split_keeps_the_global_batch_at_any_world_size():
    cfg = tg.parse_config([])
    assert tg.batch_split(cfg, 1) == (8, 32768)
    assert tg.batch_split(cfg, 2) == (4, 32768)
    assert tg.batch_split(cfg, 8) == (1, 32768)
    assert tg.batch_split(cfg, 16) == (1, 16384)  # two nodes: smaller micro-batches, same 262,144 tokens
    with pytest.raises(tg.ConfigError, match="cannot be split evenly over 3 processes"):
        tg.batch_split(cfg, 3)


def test_cli_errors_exit_non_zero_with_one_line(tmp_path):
    result = run_trainer(["--muon_lrr=1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown flag --muon_lrr (did you mean --muon_lr?); see --help for the list"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(tmp_path):
    result = run_trainer(["--device=cuda"], tmp_path)
    assert result.returncode == 2
    assert "--device=cuda but no CUDA GPU is visible" in result.stderr and "--device=cpu" in result.stderr


# --- data loading ------------------------------------------------------------------------------------------

def document(index, length):
    """BOS then tokens that name the document and the position, so any piece can be traced back."""
    return [BOS] + [(index * 7 + pos) % BOS for pos in range(1, length)]


def loader_config(*extra):
    return tg.parse_config(["--preset=tiny", "--max_doc_tokens=16", "--micro_batch_tokens=40",
                            "--train_batch_tokens=80", *extra])


def packed_reference(shards, num_batches, sequences_per_batch, budget, max_doc):
    """The packing rule written out plainly: whole documents cut to max_doc, the last cut to fill the budget; a global
    batch that the shard cannot fill is dropped and packing goes on with the next shard's first document."""
    batches, shard, doc = [], 0, 0
    while len(batches) < num_batches:
        pieces = [d[:max_doc] for d in shards[shard]]
        batch, next_doc = [], doc
        for _ in range(sequences_per_batch):
            seq = []
            while len(seq) < budget and next_doc < len(pieces):
                seq += pieces[next_doc][:budget - len(seq)]
                next_doc += 1
            batch.append(seq)
        if len(batch[-1]) == budget:
            batches.append(batch)
            doc = next_doc
        else:
            shard, doc = shard + 1, 0
    return batches


def global_batches(files, cfg, world, steps):
    """Each step's input sequences in global order (micro-step, then rank), gathered from every rank's loader."""
    loaders = [tg.TrainBatches(files, cfg, rank, world, torch.device("cpu")) for rank in range(world)]
    return [[loader.next()[0].tolist() for _ in range(loaders[0].grad_accum) for loader in loaders]
            for _ in range(steps)]


def test_training_batches_are_bos_aligned_cut_and_exactly_budgeted(tmp_path):
    rng = np.random.default_rng(0)
    docs = [document(i, int(n)) for i, n in enumerate(rng.integers(2, 40, size=200))]  # many longer than 16
    write_shard(tmp_path / "train_000001.bin", np.concatenate(docs[:120]))
    write_shard(tmp_path / "train_000002.bin", np.concatenate(docs[120:]))
    cfg = loader_config()
    files = tg.list_shards(str(tmp_path / "train_*.bin"), "train_files")
    batches = tg.TrainBatches(files, cfg, rank=0, world=1, device=torch.device("cpu"))
    assert (batches.grad_accum, batches.micro_tokens) == (2, 40)
    expected = packed_reference([docs[:120], docs[120:]], 10, 2, 41, 16)
    for seq in (seq for batch in expected for seq in batch):
        inputs, targets, cu_seqlens, max_seqlen = batches.next()
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64 and max_seqlen == 16
        assert inputs.tolist() == seq[:-1] and targets.tolist() == seq[1:]
        cu = cu_seqlens.tolist()
        assert len(cu) % 128 == 0
        real = [c for c in cu if c < 40]
        assert real == [i for i, t in enumerate(seq[:-1]) if t == BOS]  # each document starts a segment at its BOS
        assert cu[len(real):] == [40] * (len(cu) - len(real))
        assert max(np.diff(real + [40])) <= 16


def test_a_shard_that_cannot_fill_a_global_batch_is_left_at_every_world_size(tmp_path):
    """As in the 8-GPU record: the partial batch at the end of shard 1 is dropped and the next batch starts at shard
    2's first BOS, not at its first token; 1, 2 and 8 ranks see the same global batches."""
    rng = np.random.default_rng(1)
    first = [document(i, int(n)) for i, n in enumerate(rng.integers(2, 40, size=70))]
    second = [document(100 + i, int(n)) for i, n in enumerate(rng.integers(2, 40, size=80))]
    write_shard(tmp_path / "train_000001.bin", np.concatenate(first))
    write_shard(tmp_path / "train_000002.bin", np.concatenate([[5, 6, 7]] + second))  # tokens before the first BOS
    files = tg.list_shards(str(tmp_path / "train_*.bin"), "train_files")
    cfg = loader_config("--train_batch_tokens=320")  # 8 sequences of 40 tokens per step
    expected = packed_reference([first, second], 4, 8, 41, 16)
    capped = sum(min(len(d), 16) for d in first)
    assert capped // (8 * 41) == 2 and capped % (8 * 41) > 0  # shard 1 holds two batches and part of a third
    assert expected[2][0][:16] == second[0][:16]
    for world in (1, 2, 8):
        assert global_batches(files, cfg, world, 4) == [[seq[:-1] for seq in batch] for batch in expected], world


def test_record_documents_are_cut_at_2048_tokens(tmp_path):
    docs = [document(0, 3000), document(1, 100), document(2, 5000)]
    write_shard(tmp_path / "train_000001.bin", np.concatenate(docs * 3))
    # record43 with this vocabulary and one 4096-token sequence per step: the 2048-token cut
    cfg = tg.parse_config(["--vocab_size=1024", "--train_batch_tokens=4096", "--micro_batch_tokens=4096"])
    batches = tg.TrainBatches([tmp_path / "train_000001.bin"], cfg, 0, 1, torch.device("cpu"))
    inputs, _, cu_seqlens, max_seqlen = batches.next()
    assert max_seqlen == 2048
    assert inputs.tolist() == docs[0][:2048] + docs[1] + docs[2][:4096 - 2148]
    assert cu_seqlens.tolist()[:4] == [0, 2048, 2148, 4096] and len(cu_seqlens) == 128
    assert batches.next()[0].tolist()[:2048] == docs[0][:2048]  # the rest of the 5000-token document was skipped


def test_ranks_take_consecutive_sequences(tmp_path):
    docs = [document(i, 5 + i % 30) for i in range(300)]
    write_shard(tmp_path / "train_000001.bin", np.concatenate(docs))
    files = tg.list_shards(str(tmp_path / "train_*.bin"), "train_files")
    cfg = loader_config()
    cpu = torch.device("cpu")
    single = tg.TrainBatches(files, cfg, rank=0, world=1, device=cpu)
    sequences = [single.next()[0].tolist() for _ in range(8)]
    for rank in range(2):
        ranked = tg.TrainBatches(files, cfg, rank=rank, world=2, device=cpu)
        assert [ranked.next()[0].tolist() for _ in range(4)] == sequences[rank::2]


def test_loader_reset_starts_over_and_running_out_is_an_error(tmp_path):
    docs = [document(i, 20) for i in range(10)]
    write_shard(tmp_path / "train_000001.bin", np.concatenate(docs))
    files = tg.list_shards(str(tmp_path / "train_*.bin"), "train_files")
    batches = tg.TrainBatches(files, loader_config(), rank=0, world=1, device=torch.device("cpu"))
    first = batches.next()[0].tolist()
    batches.reset()
    assert batches.next()[0].tolist() == first
    with pytest.raises(tg.DataError, match="the 1 training shards ran out"):
        for _ in range(10):
            batches.next()


def header(magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=0):
    h = np.zeros(tg.HEADER_INTS, dtype="<i4")
    h[:3] = magic, version, count
    return h.tobytes()


@pytest.mark.parametrize("content, message", [
    (header(magic=1234, count=2) + b"\0" * 4, "magic number 1234 is not 20240520"),
    (header(version=2, count=2) + b"\0" * 4, "shard version 2 is not 1"),
    (header(count=100) + b"\0" * 10, "header says 100 tokens (1224 bytes) but the file has 1034 bytes"),
    (b"\0" * 100, "only 100 bytes, shorter than the 1024-byte shard header"),
])
def test_bad_shards_are_named_with_the_problem(tmp_path, content, message):
    path = tmp_path / "train_000001.bin"
    path.write_bytes(content)
    with pytest.raises(tg.DataError) as error:
        tg.list_shards(str(tmp_path / "*.bin"), "train_files")
    assert str(path) in str(error.value) and message in str(error.value)


def test_shard_contents_are_checked_on_load(tmp_path):
    write_shard(tmp_path / "big.bin", [BOS, 5, VOCAB + 3])
    with pytest.raises(tg.DataError, match=r"holds token 1027, outside --vocab_size=1024"):
        tg.load_shard(tmp_path / "big.bin", VOCAB)
    write_shard(tmp_path / "train_000001.bin", [1, 2, 3, 4])
    batches = tg.TrainBatches([tmp_path / "train_000001.bin"], loader_config(), 0, 1, torch.device("cpu"))
    with pytest.raises(tg.DataError, match=r"no BOS token \(1023\) in the shard"):
        batches.next()


def test_validation_chunks_do_not_depend_on_the_world_size(shards):
    cfg = tg.parse_config(["--preset=tiny", "--val_seq_tokens=1024", "--val_tokens=8192"])
    files = tg.list_shards(str(shards / "val_*.bin"), "val_files")
    cpu = torch.device("cpu")
    single = [b[0].tolist() for b in tg.val_batches(files, cfg, 0, 1, cpu)]
    assert len(single) == 8 and all(len(chunk) == 1024 for chunk in single)
    for world in (3, 4):  # 8 chunks over 3 ranks: 3, 3 and 2
        split = [tg.val_batches(files, cfg, rank, world, cpu) for rank in range(world)]
        assert [len(s) for s in split] == [len(range(rank, 8, world)) for rank in range(world)]
        assert [split[i % world][i // world][0].tolist() for i in range(8)] == single
    tokens = np.fromfile(files[0], dtype="<u2", offset=tg.HEADER_BYTES)
    assert sum(single, []) == tokens[:8192].tolist()  # contiguous, not BOS-aligned


def bad_inputs(shards, tmp_path) -> dict[str, tuple[list[str], str]]:
    """Flags that must stop the run before its first step, and what the error says."""
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    whole = (shards / "train_000001.bin").read_bytes()
    (truncated / "train_000001.bin").write_bytes(whole[:len(whole) // 2])
    not_a_shard = tmp_path / "not_a_shard"
    not_a_shard.mkdir()
    (not_a_shard / "train_000001.bin").write_bytes(header(magic=7, count=1) + b"\0\0")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return {
        "no train files": (["--train_files=/nonexistent/train_*.bin"], "--train_files=/nonexistent/train_*.bin matches no files"),
        "truncated shard": ([f"--train_files={truncated}/train_*.bin"], "but the file has"),
        "not a shard": ([f"--train_files={not_a_shard}/train_*.bin"], "magic number 7 is not 20240520"),
        "tokens beyond the vocabulary": (["--vocab_size=1000"], "holds token 1023, outside --vocab_size=1000"),
        "BOS of another vocabulary": (["--vocab_size=2000"], "no BOS token (1999) in the shard"),
        "too few validation tokens": (["--val_tokens=65536"], "too few validation tokens"),
        "log folder is a file": ([f"--log_dir={a_file}"], f"--log_dir={a_file}: {a_file} is a file, not a folder"),
        "checkpoint folder missing": ([f"--checkpoint={tmp_path}/no/such/model.pt"],
                                      f"folder {tmp_path}/no/such does not exist"),
        "checkpoint is a folder": ([f"--checkpoint={tmp_path}"], f"--checkpoint={tmp_path} is a folder"),
    }


@pytest.mark.parametrize("case", ["no train files", "truncated shard", "not a shard", "tokens beyond the vocabulary",
                                  "BOS of another vocabulary", "too few validation tokens", "log folder is a file",
                                  "checkpoint folder missing", "checkpoint is a folder"])
def test_bad_inputs_stop_the_run_before_it_has_a_record(shards, tmp_path, capsys, case):
    """In this process, through main() as the command runs it (test_cli_errors_exit_non_zero_with_one_line runs the
    command itself)."""
    flags, message = bad_inputs(shards, tmp_path)[case]
    assert tg.main(tiny_args(shards, tmp_path, *flags)) == 2
    out = capsys.readouterr()
    (line,) = out.err.splitlines()  # one line, no traceback
    assert line.startswith("error: ") and message in line
    assert "record:" not in out.out and files_in(tmp_path / "logs") == []


def test_a_world_size_that_does_not_divide_the_batch_is_refused_by_rank_0(shards, tmp_path):
    result = run_trainer(tiny_args(shards, tmp_path), tmp_path, nproc=3)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the global batch of 2048 tokens cannot be split evenly over 3 processes with at most "
                      "256 tokens each per micro-step; use a world size that divides it (1, 2, 4, 8, 16, ...) or "
                      "change --train_batch_tokens"]  # torchrun's own report follows it
    assert files_in(tmp_path / "logs") == []


# --- whole runs --------------------------------------------------------------------------------------------

def test_main_sets_what_the_run_needs_for_the_run_only(shards, tmp_path, monkeypatch):
    """In-process (as a benchmark or a test calls it), main() installs its signal handlers and points the compile
    caches at --compile_cache while the run lasts, and puts all of it back when it returns, here stopped right after
    the start-up."""
    seen = {}

    def stop_when_ready(log, parts):
        seen.update(handlers=[signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
                    cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        raise tg.UserError("stopped once ready")
    monkeypatch.setattr(tg.RunLog, "startup", stop_when_ready)
    ours = [lambda signum, frame: None, signal.SIG_IGN]
    before = [signal.signal(s, handler) for s, handler in zip((signal.SIGINT, signal.SIGTERM), ours)]
    try:
        code = tg.main(tiny_args(shards, tmp_path, "--compile=on", f"--compile_cache={tmp_path / 'cache'}",
                                 "--warmup_steps=0"))
        after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    finally:
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), before):
            signal.signal(s, handler)
    assert code == 2 and record_of(tmp_path)[0]["error"] == "error: stopped once ready"
    assert seen == {"handlers": [tg.SIGNALS.handle] * 2, "cache": str(tmp_path / "cache" / "inductor")}
    assert after == ours
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != seen["cache"]
    assert not torch.distributed.is_initialized()


def test_validation_and_checkpoints_stay_out_of_the_training_time(shards, tmp_path, monkeypatch):
    """Each validation and each checkpoint takes 1000 s more on the run's clock (time.perf_counter, moved on as they
    start): the training time of 4 tiny steps stays below what one of them would add to it."""
    late = [0.0]
    clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + late[0])

    def taking_1000_s(work):
        def run(*args, **kwargs):
            late[0] += 1000
            return work(*args, **kwargs)
        return run
    monkeypatch.setattr(tg, "evaluate", taking_1000_s(tg.evaluate))
    monkeypatch.setattr(tg, "save_checkpoint", taking_1000_s(tg.save_checkpoint))
    assert tg.main(tiny_args(shards, tmp_path, "--max_steps=4", "--warmup_steps=0", "--val_loss_every=2",
                             "--val_tokens=1024", "--save_every=2", f"--checkpoint_dir={tmp_path / 'checkpoints'}")) == 0
    record, text = record_of(tmp_path)
    assert late[0] == 5000 and [v["step"] for v in record["val"]] == [0, 2, 4]  # 3 validations, checkpoints at 2, 4
    assert record["status"] == "finished" and 0 < record["train_time_ms"] < 1e6
    log = text.split(tg.SEPARATOR)[-1]
    times = [int(line.split("train_time:")[1].split("ms")[0]) for line in log.splitlines() if "train_time:" in line]
    assert len(times) == 4 + 3 and max(times) < 1e6


def test_a_non_finite_loss_stops_the_run_with_its_step(shards, tmp_path):
    result = run_trainer(tiny_args(shards, tmp_path, "--warmup_steps=0", "--muon_lr=1e30", "--adam_lr=1e30",
                                   "--max_steps=20"), tmp_path)
    assert result.returncode == 1
    error, where = result.stderr.splitlines()
    assert error.startswith("error: step ") and "training loss is nan; stopping the run" in error
    step = int(error.split("error: step ")[1].split(":")[0])
    record, text = record_of(tmp_path)
    txt_path = tmp_path / "logs" / record["log_file"]
    assert where == f"failed after step {step - 1}; record: {txt_path}"
    assert record["status"] == "failed" and record["steps_done"] == step - 1
    assert f"step {step}: training loss is nan" in record["error"]
    assert text.rstrip().splitlines()[-2:] == [error, where]
    assert f"step:{step - 1}/80 train_time" in text and f"step:{step}/80 train_time" not in text


def step_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("step:") and "val_loss" not in line]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_says_where_it_stopped(shards, tmp_path, signum):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py"), *tiny_args(shards, tmp_path, "--warmup_steps=0")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in trainer.stdout:
        if line.startswith("step:3/"):
            break
    trainer.send_signal(signum)
    _, stderr = trainer.communicate(timeout=300)
    assert trainer.returncode == 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM
    record, text = record_of(tmp_path)
    last_step = int(step_lines(text)[-1].split("/")[0].removeprefix("step:"))
    summary = f"interrupted at step {last_step}; record: {tmp_path / 'logs' / record['log_file']}"
    assert stderr.strip() == summary and last_step >= 3  # one line, no traceback
    assert record["status"] == "interrupted" and record["steps_done"] == last_step
    assert record["error"] == f"interrupted by {signal.Signals(signum).name}"
    assert text.rstrip().splitlines()[-1] == summary


def test_tiny_preset_writes_its_record(tiny_run):  # once per --compile mode
    """The whole tiny preset's record, both files, in the format that public tools and records/compare.py read, with
    the very losses the run computed (tests/test_golden.py holds those to the golden file)."""
    record = json.loads(tiny_run.record.read_text())
    text = tiny_run.record.with_suffix(".txt").read_text()
    txt_path = tiny_run.record.with_suffix(".txt")
    assert f"record: {txt_path}" in tiny_run.stdout and record["log_file"] == txt_path.name
    assert txt_path.name[:19].replace("_", " ").count("-") == 4 and txt_path.stem.endswith(record["run_id"])

    source, header_part, log = text.split(tg.SEPARATOR + "\n")
    assert source == (ROOT / "train_gpt.py").read_text() + "\n"
    assert json.loads(header_part.splitlines()[0].removeprefix("config: "))["preset"] == "tiny"
    assert f"PyTorch {torch.__version__}" in header_part
    lines = log.splitlines()
    val_lines = [line for line in lines if "val_loss:" in line]
    assert [line.split()[0] for line in val_lines] == [f"step:{s}/80" for s in (0, 20, 40, 60, 80)]
    assert "eta" not in val_lines[0] + val_lines[-1]
    assert all(re.fullmatch(r"step:\d+/80 val_loss:\S+ .*ms eta:\d+s", line) for line in val_lines[1:-1])
    assert [line.split()[1] for line in val_lines] == [f"val_loss:{tiny_run.val[str(s)]:.4f}" for s in (0, 20, 40, 60, 80)]
    steps = step_lines(log)
    assert len(steps) == 80
    for step, line in enumerate(steps, 1):  # the public fields first, then the training loss and the throughput
        fields = dict(field.split(":") for field in line.split())
        assert list(fields) == ["step", "train_time", "step_avg", "train_loss", "tokens/s", "eta"]
        assert abs(float(fields["eta"][:-1]) - (80 - step) * float(fields["step_avg"][:-2]) / 1000) <= 0.5 + 1e-3
        assert fields["step"] == f"{step}/80" and fields["train_time"].endswith("ms") and float(fields["tokens/s"]) > 0
        assert fields["train_loss"] == f"{tiny_run.train[step - 1]:.4f}"  # on the CPU, each step's own loss
    assert lines[-2].startswith("peak memory allocated: ") and lines[-2].endswith(" MiB")
    assert lines[-1] == (f"finished: val_loss {record['final_val_loss']:.4f} after 80 steps, "
                         f"{record['train_time_ms'] / 1000:.1f}s of training, {record['startup_s']:.1f}s of start-up; "
                         f"record: {txt_path}, {txt_path.with_suffix('.json')}")

    assert record["status"] == "finished" and record["error"] is None
    assert [(str(v["step"]), v["val_loss"]) for v in record["val"]] == list(tiny_run.val.items())
    assert record["final_val_loss"] == tiny_run.val["80"] and record["steps_done"] == record["num_steps"] == 80
    assert record["train_time_ms"] > 0 and abs(record["step_avg_ms"] - record["train_time_ms"] / 80) < 1e-6
    assert record["env"]["device"] == "cpu" and record["env"]["world_size"] == 1
    assert record["peak_memory_allocated_mib"] > 0
    state = torch.load(tiny_run.checkpoint)
    assert state["lm_head"].shape == (VOCAB, 64) and state["lm_head"].abs().sum() > 0

    # records/compare.py reads both files of the run the same way
    for path in (txt_path, tiny_run.record):
        summary = subprocess.run([sys.executable, str(ROOT / "records" / "compare.py"), "summary", str(path), "--json"],
                                 capture_output=True, text=True, check=True)
        (run,) = json.loads(summary.stdout)["runs"]
        assert run["final_step"] == 80 and run["incomplete"] is None
        assert abs(run["final_val_loss"] - tiny_run.val["80"]) < 1e-4
        assert abs(run["train_time_s"] - record["train_time_ms"] / 1000) < 1e-3


def fake_nvidia_smi(folder, gpus: int, compute_cap: str = "8.0"):
    """An nvidia-smi that lists `gpus` GPUs (none: fails) and answers the compute-capability query, first on PATH;
    then this interpreter as python3, which has all that run.sh needs, so that run.sh uses it as it is; and DATA_PATH
    in the folder, so that run.sh makes its shards there, not in the checkout."""
    listing = "".join(f"echo 'GPU {i}: Fake GPU'; " for i in range(gpus))
    query = f'[ "$1" = --query-gpu=compute_cap ] && {{ echo {compute_cap}; exit 0; }}\n' if gpus else ""
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{query}{listing}exit {0 if gpus else 9}\n")
    (folder / "nvidia-smi").chmod(0o755)
    python = folder / "python-bin"
    python.mkdir(exist_ok=True)
    (python / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # not a link: a venv's Python
    (python / "python3").chmod(0o755)  # finds its environment from the path it is started by
    return {**os.environ, "PATH": f"{folder}:{python}:{os.environ['PATH']}", "DATA_PATH": str(folder)}


def fineweb_named_shards(shards, data_path) -> Path:
    """The tiny shards where run.sh's GPU branch looks for FineWeb's, under their names, all 9 training shards that it
    wants (copies of one), so that it downloads nothing."""
    data = data_path / "data" / "fineweb10B"
    data.mkdir(parents=True)
    (data / "fineweb_val_000000.bin").write_bytes((shards / "val_000000.bin").read_bytes())
    for i in range(1, 10):
        (data / f"fineweb_train_{i:06d}.bin").write_bytes((shards / "train_000001.bin").read_bytes())
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_sh_on_two_nodes_trains_as_two_processes_on_one(shards, tmp_path, three_steps):
    """run.sh's multi-node launch: two nodes of one (stand-in) GPU each, NNODES=2 and NODE_RANK 0 and 1, both on
    127.0.0.1, started as on two machines, run the tiny preset on the CPU: the same run as two processes on one node,
    to the validation losses."""
    fineweb_named_shards(shards, tmp_path)
    env = {**fake_nvidia_smi(tmp_path, 1), "OMP_NUM_THREADS": "1", "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    flags = ["--preset=tiny", "--device=cpu", "--max_steps=3", "--val_loss_every=0", "--warmup_steps=0",
             f"--log_dir={tmp_path / 'logs'}"]
    nodes = [subprocess.Popen([str(ROOT / "run.sh"), *flags], cwd=tmp_path, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert all("1 NVIDIA GPU(s) found: running tiny under torchrun on them" in out for out, _ in outputs)
    record, _ = record_of(tmp_path)  # rank 0's, on node 0
    two_processes, _ = three_steps(2, "--warmup_steps=0")
    assert record["env"]["world_size"] == 2 and record["status"] == "finished"
    assert [(v["step"], v["val_loss"]) for v in record["val"]] == [(v["step"], v["val_loss"]) for v in two_processes["val"]]


def test_run_sh_with_gpus_launches_torchrun_on_the_local_shards(shards, tmp_path):
    """The GPU branch's wiring: shards already in $DATA_PATH/data/fineweb10B are not downloaded again, torchrun
    starts one process per listed GPU, and the arguments pass through (here: the tiny preset, run on the CPU). On a
    Hopper without flash-attn-4 it says how to add it to python3, which it uses as it is, and goes on without it."""
    data = fineweb_named_shards(shards, tmp_path)
    env = {**fake_nvidia_smi(tmp_path, 2, compute_cap="9.0"), "OMP_NUM_THREADS": "1",
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    result = subprocess.run([str(ROOT / "run.sh"), "--preset=tiny", "--device=cpu", "--max_steps=2",
                             f"--log_dir={tmp_path / 'logs'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"note: python3 ({tmp_path / 'python-bin' / 'python3'}) has no flash-attn-4, so attention runs on "
            "varlen_attn; python3 -m pip install -r requirements-gpu.txt adds it") in result.stderr.splitlines()
    assert "2 NVIDIA GPU(s) found: running tiny under torchrun on them" in result.stdout
    record, _ = record_of(tmp_path)
    assert record["env"]["world_size"] == 2 and record["status"] == "finished"
    assert record["config"]["train_files"] == f"{data}/fineweb_train_*.bin"


def test_run_sh_with_gpus_downloads_the_missing_shards_into_data_path(shards, tmp_path, start_hub):
    """With no shards in $DATA_PATH/data/fineweb10B, the GPU branch downloads the validation shard and the record's 9
    training shards there (from a stand-in for the Hub on 127.0.0.1 that serves the tiny shards under FineWeb's
    names) and trains on them."""
    names = ["fineweb_val_000000.bin", *(f"fineweb_train_{i:06d}.bin" for i in range(1, 10))]
    served = {name: (shards / ("val_000000.bin" if "val" in name else "train_000001.bin")).read_bytes() for name in names}
    hub = start_hub(served)
    env = {**hub_env(hub, tmp_path / "data"), "PATH": fake_nvidia_smi(tmp_path, 1)["PATH"], "DATA_PATH": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(ROOT / "run.sh"), "--preset=tiny", "--device=cpu", "--max_steps=1", "--warmup_steps=0",
                             f"--log_dir={tmp_path / 'logs'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = tmp_path / "data" / "fineweb10B"
    assert sorted(p.name for p in data.iterdir()) == sorted(names)
    assert [name for name in names if (data / name).read_bytes() != served[name]] == []
    record, _ = record_of(tmp_path)
    assert record["status"] == "finished" and record["config"]["train_files"] == f"{data}/fineweb_train_*.bin"


def test_run_sh_without_a_gpu_runs_the_tiny_preset_once_per_seed(tmp_path):
    """The main job's CPU branch, cut short, with --runs=2: it makes its synthetic shards in $DATA_PATH/data/synthetic
    and leaves a record per run, each with its own seed."""
    env = fake_nvidia_smi(tmp_path, 0)  # whatever the machine has, no GPU answers
    result = subprocess.run([str(ROOT / "run.sh"), "--max_steps=2", "--runs", "2", f"--log_dir={tmp_path / 'logs'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("No NVIDIA GPU found: running the tiny preset")
    assert "run 1 of 2, seed 0" in result.stdout and "run 2 of 2, seed 1" in result.stdout
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "logs").glob("*.json"))]
    assert sorted(r["config"]["seed"] for r in records) == [0, 1]
    for record in records:
        assert record["status"] == "finished" and record["config"]["preset"] == "tiny" and record["steps_done"] == 2
        assert record["config"]["train_files"] == f"{tmp_path}/data/synthetic/train_*.bin"
    assert records[0]["final_val_loss"] != records[1]["final_val_loss"]


@pytest.mark.parametrize("args, preset", [(["--preset=record42"], "record42"), (["--preset", "record43"], "record43"),
                                          (["--preset=tiny", "--preset=record43", "--max_steps=5"], "record43")])
def test_run_sh_without_a_gpu_refuses_a_record_preset_in_one_line(tmp_path, args, preset):
    result = subprocess.run([str(ROOT / "run.sh"), *args], cwd=tmp_path, env=fake_nvidia_smi(tmp_path, 0),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --preset={preset} is a GPU run, and no NVIDIA GPU is visible here (nvidia-smi "
                             "lists none); on this CPU, ./run.sh without --preset runs the tiny preset (a few minutes)\n")


@pytest.mark.parametrize("runs", ["0", "two", ""])
def test_run_sh_refuses_a_bad_number_of_runs(tmp_path, runs):
    result = subprocess.run([str(ROOT / "run.sh"), "--runs=" + runs], cwd=tmp_path, env=fake_nvidia_smi(tmp_path, 0),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: --runs={runs}: give the number of runs as a positive whole number, e.g. --runs=5\n"


def final_state(tmp_path, shards, name, nproc=1, *extra):
    run_dir = tmp_path / name
    run_dir.mkdir()
    result = run_trainer(tiny_args(shards, run_dir, "--max_steps=3", "--val_loss_every=0",
                                   f"--checkpoint={run_dir / 'model.pt'}", *extra), run_dir, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    record, _ = record_of(run_dir)
    return record, torch.load(run_dir / "model.pt")


@pytest.fixture(scope="module")
def three_steps(shards, tmp_path_factory):
    """final_state of three steps, by the number of processes and the flags: each run once for the module's tests."""
    made = {}

    def get(nproc, *extra):
        if (nproc, extra) not in made:
            made[nproc, extra] = final_state(tmp_path_factory.mktemp("three_steps"), shards, "run", nproc, *extra)
        return made[nproc, extra]
    return get


def test_warmup_leaves_no_trace(three_steps):
    """The warm-up steps train and then restore parameters, optimizer state and data order exactly."""
    cold_record, cold = three_steps(1, "--warmup_steps=0")
    warm_record, warm = three_steps(1, "--warmup_steps=5")
    assert cold_record["final_val_loss"] == warm_record["final_val_loss"]
    assert all(torch.equal(cold[k], warm[k]) for k in cold)


def relative_differences(a, b):
    out = {}
    for name in a:
        x, y = a[name].float().flatten(), b[name].float().flatten()
        n = min(x.numel(), y.numel())  # the scalar vector is padded to a multiple of the world size
        out[name] = ((x[:n] - y[:n]).norm() / x[:n].norm().clamp_min(1e-12)).item()
    return out


def test_world_sizes_2_and_8_match_one_process_with_accumulation(three_steps):
    """Same data, same steps: 1 process x 8 micro-steps, 2 x 4 and 8 x 1 give the same run within float noise.
    Adam's first steps are sign-like, so bf16 rounding in the gradient sums moves near-zero coordinates by up
    to +-lr; over three steps that leaves per-tensor differences of at most ~0.08 (measured), against ~1.4 for
    a run on other data."""
    single_record, single = three_steps(1, "--warmup_steps=0")
    for nproc in (2, 8):
        record, state = three_steps(nproc, "--warmup_steps=0")
        assert record["env"]["world_size"] == nproc
        assert abs(record["final_val_loss"] - single_record["final_val_loss"]) < 2e-4
        differences = relative_differences(single, state)
        assert max(differences.values()) < 0.15, sorted(differences.items(), key=lambda kv: -kv[1])[:3]
        assert torch.equal(state["scalars"][62:], torch.ones(state["scalars"].numel() - 62))  # padding untouched


def test_the_whole_schedule_compiles_one_training_and_one_evaluation_graph(tiny_run):  # once per --compile mode
    """The tiny preset trains at every window of its schedule (3, 7 and 11 blocks, then the extension's 13) and
    validates at four of them and at the final 20: compiled, that is one training graph and one evaluation graph,
    both made in the warm-up, and the record says so."""
    record = json.loads(tiny_run.record.read_text())
    graphs = 2 if tiny_run.mode == "on" else 0
    config = record["config"]
    assert (config["window_schedule"], config["window_extension"], config["window_final_val"]) == ([3, 7, 11], 13, 20)
    assert config["compile"] == tiny_run.mode and record["steps_done"] == 80
    assert [v["step"] for v in record["val"]] == [0, 20, 40, 60, 80]
    # on its empty compile cache, inductor compiled the training graph's forward and backward and the evaluation graph
    assert record["compile"] == {"model_graphs": graphs, "recompiles_after_warmup": 0, "cache_hits": 0,
                                 "cache_misses": 3 if graphs else 0}
    assert "warning" not in tiny_run.record.with_suffix(".txt").read_text().split(tg.SEPARATOR)[-1]


def test_cold_start_sh_compiles_on_an_empty_cache_and_reuses_it_on_the_second_start(tmp_path):
    """benchmarks/cold_start.sh, cut to 2 steps: the tiny preset compiled on the CPU, first on an empty compile cache,
    where inductor compiles the model's three graphs (training forward and backward, evaluation) into it, then on
    that cache, where it finds all three and compiles none. Its shards go to $DATA_PATH, not the checkout."""
    result = subprocess.run([str(ROOT / "benchmarks" / "cold_start.sh"), "--max_steps=2", "--val_loss_every=0"],
                            env={**os.environ, "DATA_PATH": str(tmp_path), "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    empty, warm = result.stdout.splitlines()
    assert empty.startswith("empty cache: 2 model graphs (0 after the warm-up), 3 graphs compiled into the cache and 0 "
                            "found there, ")
    assert warm.startswith("warm cache: 2 model graphs (0 after the warm-up), 0 graphs compiled into the cache and 3 "
                           "found there, ")
    assert all(line.endswith(f"; cpu, torch {torch.__version__}") for line in (empty, warm))
    assert (tmp_path / "data" / "synthetic" / "val_000000.bin").is_file()
