"""sample.py on a tiny-preset checkpoint: token ids in, token ids out; greedy decoding against the model's own argmax."""
import json

import pytest
import torch

import sample
import train_gpt as tg
from test_checkpoint import CPU, QuietLog, tiny_run_state
from test_data import small_encoding
from data import hellaswag
from test_hellaswag import example_rows
from test_numerics import process_group  # noqa: F401 (a fixture)
from test_train import shards, tiny_args  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory, process_group):
    """A tiny-preset checkpoint whose model has random weights everywhere, so that its predictions are far from
    uniform (a freshly initialised one has a zero lm_head)."""
    folder = tmp_path_factory.mktemp("sample")
    cfg = tg.parse_config(tiny_args(shards, folder, f"--checkpoint_dir={folder / 'checkpoints'}"))
    model, optimizers, batches = tiny_run_state(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    tg.save_checkpoint(cfg, 8, 0.0, model, optimizers, batches, QuietLog())
    return folder / "checkpoints"


def sample_lines(capsys, *argv):
    assert sample.main([*map(str, argv)]) == 0
    out = capsys.readouterr()
    assert out.err.endswith("step_000008: the model after step 8)\n")
    return out.out.splitlines()


def test_greedy_continuations_take_the_likeliest_token_each_time(checkpoint, capsys):
    (line,) = sample_lines(capsys, checkpoint, "--prompt", "5 17 230", "--temperature", "0", "--tokens", "12")
    continuation = [int(token) for token in line.split()]
    assert 1 <= len(continuation) <= 12
    cfg, model = sample.build_model(tg.read_checkpoint(checkpoint / "step_000008"), CPU, 64)
    ids = [cfg.bos_id, 5, 17, 230]
    for token in continuation:  # each one the argmax of the model's logits after the tokens before it
        logits = model(torch.tensor(ids, dtype=torch.int32), None, tg.cu_seqlens_from_starts([0], len(ids), CPU),
                       len(ids), *model.windows(*tg.final_windows(cfg, 8)))
        assert token == int(logits[-1, :cfg.vocab_size].argmax()) != cfg.bos_id
        ids.append(token)
    assert sample_lines(capsys, checkpoint / "step_000008", "--prompt", "5 17 230", "--temperature", "0",
                        "--tokens", "12") == [line]  # the same again, the checkpoint named directly this time


def test_sampling_follows_the_seed_and_top_k(checkpoint, capsys):
    greedy = sample_lines(capsys, checkpoint, "--temperature", "0", "--tokens", "10")
    assert sample_lines(capsys, checkpoint, "--top_k", "1", "--tokens", "10", "--seed", "3") == greedy
    first = sample_lines(capsys, checkpoint, "--tokens", "10", "--num_samples", "3", "--seed", "3")
    assert len(first) == 3 and len(set(first)) > 1
    assert sample_lines(capsys, checkpoint, "--tokens", "10", "--num_samples", "3", "--seed", "3") == first


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "5 1024"], "--prompt '5 1024': token 1024 is outside the model's vocabulary of 1024 tokens (0 to 1023)"),
    (["--prompt", "hello"], "--prompt 'hello': this model's vocabulary is not GPT-2's, so give token ids, e.g. --prompt '5 17 230'"),
    (["--temperature", "-1"], "--temperature -1.0: give at least 0"),
])
def test_bad_sampling_input_is_one_error_line(checkpoint, capsys, argv, message):
    assert sample.main([str(checkpoint), *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_folder_without_checkpoints_is_refused(tmp_path, capsys):
    assert sample.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: not a checkpoint of train_gpt.py")


def test_hellaswag_of_a_checkpoint(checkpoint, tmp_path, capsys):
    examples = hellaswag.tokenize([{"ctx": c, "endings": e, "label": label} for c, e, label in example_rows(12)],
                                  small_encoding())
    path = tmp_path / "hellaswag_val.json"
    path.write_text(json.dumps({"format": tg.HELLASWAG_FORMAT, "tokenizer": "small", "examples": examples}))
    (line,) = sample_lines(capsys, checkpoint, "--hellaswag", path)
    cfg, model = sample.build_model(tg.read_checkpoint(checkpoint / "step_000008"), CPU, 1024)
    right, total = tg.hellaswag_accuracy(model, examples, cfg.bos_id, tg.final_windows(cfg, 8), 1024)
    assert line == f"hellaswag: {right}/{total} right, accuracy {right / total:.4f}" and total == 12
