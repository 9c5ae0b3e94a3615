"""sample.py on a tiny-preset checkpoint: token ids in, token ids out; the model it loads against the one saved, greedy
decoding against that model's argmax, and sampling against the distribution its logits give."""
import json

import pytest
import torch
from scipy import stats

import sample
import train_gpt as tg
from test_checkpoint import CPU, QuietLog, tiny_run_state
from test_data import small_encoding
from data import hellaswag
from test_hellaswag import example_rows
from test_numerics import process_group  # noqa: F401 (a fixture)
from test_train import shards, tiny_args  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def saved(shards, tmp_path_factory, process_group):
    """A tiny-preset checkpoint whose model has random weights everywhere, so that its predictions are far from
    uniform (a freshly initialised one has a zero lm_head): its folder, configuration and that model, the reference
    the tests compare sample.py with."""
    folder = tmp_path_factory.mktemp("sample")
    cfg = tg.parse_config(tiny_args(shards, folder, f"--checkpoint_dir={folder / 'checkpoints'}"))
    model, optimizers, batches = tiny_run_state(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    tg.save_checkpoint(cfg, 8, 0.0, model, optimizers, batches, QuietLog())
    return folder / "checkpoints", cfg, model.eval()


@pytest.fixture(scope="module")
def checkpoint(saved):
    return saved[0]


def next_logits(cfg, model, ids: list[int]) -> torch.Tensor:
    """The saved model's logits for the token after BOS + ids, evaluated as after the checkpoint's 8 steps."""
    ids = [cfg.bos_id, *ids]
    return model(torch.tensor(ids, dtype=torch.int32), None, tg.cu_seqlens_from_starts([0], len(ids), CPU), len(ids),
                 *model.windows(*tg.final_windows(cfg, 8)))[-1, :cfg.vocab_size].detach()


def sample_lines(capsys, *argv):
    assert sample.main([*map(str, argv)]) == 0
    out = capsys.readouterr()
    assert out.err.endswith("step_000008: the model after step 8)\n")
    return out.out.splitlines()


def test_the_model_sample_loads_is_the_one_saved(saved):
    folder, cfg, model = saved
    _, loaded = sample.build_model(tg.read_checkpoint(folder / "step_000008"), CPU, 64)
    params = dict(loaded.named_parameters())
    assert params.keys() == dict(model.named_parameters()).keys()
    assert [name for name, p in model.named_parameters() if not torch.equal(params[name], p)] == []
    rotary, saved_rotary = loaded.rotary, model.rotary
    assert torch.equal(rotary.angular_freq, saved_rotary.angular_freq) and torch.equal(rotary.attn_scale, saved_rotary.attn_scale)
    assert torch.equal(rotary.cos, saved_rotary.cos[:len(rotary.cos)]) and torch.equal(rotary.sin, saved_rotary.sin[:len(rotary.sin)])


def test_greedy_continuations_take_the_likeliest_token_each_time(saved, capsys):
    folder, cfg, model = saved
    (line,) = sample_lines(capsys, folder, "--prompt", "5 17 230", "--temperature", "0", "--tokens", "12")
    continuation = [int(token) for token in line.split()]
    assert 1 <= len(continuation) <= 12
    ids = [5, 17, 230]
    for token in continuation:  # each one the argmax of the saved model's logits after the tokens before it
        assert token == int(next_logits(cfg, model, ids).argmax()) != cfg.bos_id
        ids.append(token)
    assert sample_lines(capsys, folder / "step_000008", "--prompt", "5 17 230", "--temperature", "0",
                        "--tokens", "12") == [line]  # the same again, the checkpoint named directly this time


def test_top_k_and_temperature_draw_from_the_softmax_of_the_k_largest_logits_scaled(saved):
    """4000 draws of a next token at a fixed seed against the distribution computed here from the saved model's
    logits, the softmax of the k largest divided by the temperature: a chi-square test accepts it (p > 0.001). The
    same draws are refused against the softmax without the temperature, so a temperature that did nothing would
    fail, and none falls outside the k likeliest tokens, which the scaled softmax of all logits leaves over 5% of its
    mass, so a top_k that filtered nothing would fail too."""
    _, cfg, model = saved
    logits = next_logits(cfg, model, [5, 17, 230])
    k, temperature, draws = 8, 2.0, 4000
    top, ids = logits.topk(k)
    want = (top.double() / temperature).softmax(-1)
    generator = torch.Generator().manual_seed(0)
    drawn = [sample.next_token(logits, temperature, k, generator) for _ in range(draws)]
    counts = [drawn.count(token) for token in ids.tolist()]
    assert sum(counts) == draws and min(draws * want) >= 5  # every draw among the k; the test's expected counts
    assert stats.chisquare(counts, draws * want).pvalue > 1e-3
    assert stats.chisquare(counts, draws * top.double().softmax(-1)).pvalue < 1e-9
    assert 1 - (logits / temperature).softmax(-1)[ids].sum() > 0.05


def test_sampling_follows_the_seed_and_top_k(saved, capsys):
    folder, cfg, model = saved
    greedy = sample_lines(capsys, folder, "--temperature", "0", "--tokens", "10")
    assert sample_lines(capsys, folder, "--top_k", "1", "--tokens", "10", "--seed", "3") == greedy
    first = sample_lines(capsys, folder, "--tokens", "10", "--num_samples", "3", "--seed", "3")
    assert len(first) == 3 and len(set(first)) > 1
    assert sample_lines(capsys, folder, "--tokens", "10", "--num_samples", "3", "--seed", "3") == first
    # one token at a time from the command line: the 3 likeliest only, and more than one of them
    drawn = sample_lines(capsys, folder, "--prompt", "5 17 230", "--tokens", "1", "--num_samples", "40",
                         "--top_k", "3", "--temperature", "2")
    likeliest = set(next_logits(cfg, model, [5, 17, 230]).topk(3).indices.tolist()) - {cfg.bos_id}
    assert {int(line) for line in drawn if line} <= likeliest and len(set(drawn)) > 1


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
