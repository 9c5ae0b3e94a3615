"""HellaSwag: the completion scoring on a hand-made example whose answer is known, the data tool against a local
stand-in for the Hub, and --hellaswag at the end of a run."""
import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import train_gpt as tg
from train_gpt import UserError
from data import hellaswag
from test_data import small_encoding
from test_download import hub_env, listing, start_hub  # noqa: F401 (start_hub: a fixture)
from test_train import ROOT, record_of, run_trainer, shards, tiny_args  # noqa: F401 (shards: a fixture)

BOS = 7


class Bigram(torch.nn.Module):
    """A stand-in for the GPT whose log-probabilities are written out: the next token depends only on this one. It
    also checks what the scoring hands a model: documents that start at their BOS, none longer than max_seqlen."""

    def __init__(self, log_probs: dict[int, dict[int, float]]):
        super().__init__()
        self.lm_head = torch.nn.Parameter(torch.zeros(1))  # where the scoring looks for the device
        probs = torch.zeros(8, 8)
        for token, following in log_probs.items():
            for nxt, log_p in following.items():
                probs[token, nxt] = math.exp(log_p)
            probs[token, 0] = 1 - probs[token].sum()  # token 0, in no example, takes the rest
        self.table = probs.log()

    def windows(self, short, long):
        return short, long

    def forward(self, inputs, targets, cu_seqlens, max_seqlen, short_window, long_window):
        assert targets is None and not self.training
        starts = cu_seqlens[cu_seqlens < len(inputs)].tolist()
        assert starts == (inputs == BOS).nonzero().flatten().tolist()
        assert max(torch.tensor(starts + [len(inputs)]).diff().tolist()) <= max_seqlen
        return self.table[inputs.long()]


LOG = math.log
# After the context [BOS, 1]: ending [2] has log-probability log 0.4 = -0.92, the best sum; ending [3, 4, 5] has
# (log 0.2 + 2 log 0.9) / 3 = -0.61 per token, the best mean; [6]: log 0.3 = -1.20; [2, 2]: (log 0.4 + log 0.1) / 2
# = -1.61. Length-normalised scoring picks [3, 4, 5].
MODEL = {BOS: {1: LOG(0.9)}, 1: {2: LOG(0.4), 3: LOG(0.2), 6: LOG(0.3)}, 3: {4: LOG(0.9)}, 4: {5: LOG(0.9)},
         2: {2: LOG(0.1)}}
ENDINGS = [[2], [3, 4, 5], [6], [2, 2]]


@pytest.mark.parametrize("batch_tokens", [1, 8192])  # one example per forward, or all in one
def test_the_ending_with_the_best_mean_log_probability_is_the_answer(batch_tokens):
    examples = [{"context": [1], "endings": ENDINGS, "label": label} for label in (1, 0, 1, 3)]
    model = Bigram(MODEL).train()
    assert tg.hellaswag_accuracy(model, examples, BOS, (1, 2), batch_tokens) == (2, 4)
    assert model.training  # left as it was


def write_served_file(path, rows):
    """A parquet file in the layout of the Hub's HellaSwag validation split."""
    pq.write_table(pa.table({
        "ind": [i for i in range(len(rows))], "activity_label": ["Cooking"] * len(rows),
        "ctx_a": [r[0] for r in rows], "ctx_b": [""] * len(rows), "ctx": [r[0] for r in rows],
        "endings": [r[1] for r in rows], "source_id": ["x"] * len(rows), "split": ["val"] * len(rows),
        "split_type": ["indomain"] * len(rows), "label": [str(r[2]) for r in rows]}), path)


def example_rows(count):
    return [(f"A cook {i} takes the pan.", [f"She fries egg {i}.", "He sings.", f"They run {i % 7} miles.",
                                           "It rains."], i % 4) for i in range(count)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The validation split as the Hub serves it: 10,042 small examples."""
    path = tmp_path_factory.mktemp("served") / "validation.parquet"
    write_served_file(path, example_rows(hellaswag.NUM_EXAMPLES))
    return path.read_bytes()


# The data tool itself, with GPT-2's tokenizer (whose files come from the internet) swapped for a small local one.
RUN_TOOL = """
import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import data.fineweb
from test_data import small_encoding
data.fineweb.gpt2_encoding = small_encoding
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_tool(hub, folder):
    return subprocess.run([sys.executable, "-c", RUN_TOOL, str(ROOT), str(ROOT / "data" / "hellaswag.py"),
                           "--dir", str(folder)], cwd=ROOT, env=hub_env(hub, folder), capture_output=True, text=True,
                          timeout=300)


def test_the_tool_downloads_once_and_tokenizes(tmp_path, start_hub, served):
    hub = start_hub({hellaswag.FILENAME: served}, repo=hellaswag.REPO_ID)
    folder = tmp_path / "hellaswag"
    first = run_tool(hub, folder)
    assert first.returncode == 0, first.stderr
    assert listing(folder) == ["hellaswag_val.json", "hellaswag_val.parquet"]
    assert (folder / "hellaswag_val.parquet").read_bytes() == served
    assert hub.requests == [("HEAD", hellaswag.FILENAME), ("GET", hellaswag.FILENAME)]
    data = json.loads((folder / "hellaswag_val.json").read_text())
    assert (data["format"], data["tokenizer"], len(data["examples"])) == (tg.HELLASWAG_FORMAT, "gpt2", 10042)
    encoding = small_encoding()
    for example, (ctx, endings, label) in zip(data["examples"][:50], example_rows(50)):
        assert encoding.decode(example["context"]) == ctx and example["label"] == label
        assert [encoding.decode(ending) for ending in example["endings"]] == [" " + e for e in endings]

    hub.requests.clear()
    again = run_tool(hub, folder)
    assert "hellaswag_val.json: already prepared, skipped" in again.stdout and hub.requests == []
    (folder / "hellaswag_val.json").unlink()
    retokenized = run_tool(hub, folder)
    assert "hellaswag_val.parquet: already downloaded" in retokenized.stdout and hub.requests == []
    assert json.loads((folder / "hellaswag_val.json").read_text()) == data


def test_a_file_missing_on_the_hub_is_named_and_leaves_nothing(tmp_path, start_hub):
    """(A download cut short leaves nothing either: data/hub.py, tested with the FineWeb downloader.)"""
    hub = start_hub({}, repo=hellaswag.REPO_ID)
    folder = tmp_path / "hellaswag"
    result = run_tool(hub, folder)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {hellaswag.FILENAME}: download failed: {hellaswag.FILENAME} is not in the dataset repo Rowan/hellaswag "
        f"at {hub.url}, which holds HellaSwag's splits; if the dataset's layout changed on the Hub, set FILENAME in "
        "data/hellaswag.py. No partial file was left behind.")
    assert listing(folder) == []


@pytest.mark.parametrize("rows, content, message", [
    (10, b"<html>a login page</html>", "not a parquet file with HellaSwag's ctx, endings and label columns"),
    (1000, None, "1000 examples, not the 10042 of HellaSwag's validation split"),
    (10042, "bad label", "example 3 is not a context, four endings and a label from 0 to 3"),
])
def test_a_served_file_that_is_not_the_validation_split_is_discarded(tmp_path, rows, content, message):
    path = tmp_path / "download.parquet"
    served = example_rows(rows)
    if content == "bad label":
        served[3] = (served[3][0], served[3][1], 4)
    write_served_file(path, served)
    if isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(UserError) as error:
        hellaswag.checked_download(path)
    assert str(error.value).startswith(f"{hellaswag.FILENAME}: the Hub sent a file that is not HellaSwag's validation "
                                       "split, so it was discarded") and message in str(error.value)


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read (No such file or directory); make it with `python data/hellaswag.py`"),
    ("{", "not JSON, so damaged"),
    ('{"format": "other"}', "not a file of tokenized HellaSwag examples (train_gpt-hellaswag/1)"),
    (json.dumps({"format": tg.HELLASWAG_FORMAT, "tokenizer": "gpt2",
                 "examples": [{"context": [5, 50000], "endings": [[1]] * 4, "label": 0}]}),
     "holds token 50000, outside --vocab_size=1024; it was tokenized for gpt2, so score a model of that vocabulary"),
])
def test_unusable_example_files_are_refused(tmp_path, content, message):
    path = tmp_path / "hellaswag_val.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(tg.DataError) as error:
        tg.load_hellaswag(path, 1024)
    assert f"--hellaswag={path}: {message}" in str(error.value)


def test_hellaswag_at_the_end_of_a_run_is_in_its_record(shards, tmp_path):
    """At world size 2 each rank scores half the examples; the counts match the scoring of the saved model here."""
    examples_path = tmp_path / "hellaswag_val.json"
    rows = example_rows(40)
    examples = hellaswag.tokenize([{"ctx": c, "endings": e, "label": label} for c, e, label in rows], small_encoding())
    examples_path.write_text(json.dumps({"format": tg.HELLASWAG_FORMAT, "tokenizer": "small", "examples": examples}))
    result = run_trainer(tiny_args(shards, tmp_path, "--max_steps=2", "--warmup_steps=0", "--val_tokens=1024",
                                   f"--hellaswag={examples_path}", f"--checkpoint={tmp_path / 'model.pt'}"),
                         tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    record, text = record_of(tmp_path)

    cfg = tg.parse_config(tiny_args(shards, tmp_path))
    # the trainer's model: rotary tables for its validation chunks or the longest example, whichever is longer;
    # the rotary state is the initial one for these 2 steps
    table = max(cfg.val_seq_tokens, max(map(tg.hellaswag_example_tokens, examples)))
    model = tg.GPT(cfg, table, 2).float()
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    windows = tg.final_windows(cfg, 2)
    batch_tokens = min(tg.HELLASWAG_BATCH_TOKENS, table)
    right = sum(tg.hellaswag_accuracy(model, examples[rank::2], cfg.bos_id, windows, batch_tokens)[0] for rank in range(2))
    assert record["hellaswag"] == {"right": right, "examples": 40, "accuracy": right / 40}
    assert f"hellaswag: {right}/40 right, accuracy {right / 40:.4f}" in text
    assert record["status"] == "finished"


def test_a_missing_example_file_stops_the_run_before_training(shards, tmp_path):
    result = run_trainer(tiny_args(shards, tmp_path, f"--hellaswag={tmp_path / 'none.json'}"), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --hellaswag={tmp_path / 'none.json'}: cannot be read (No such file or "
                                     "directory); make it with `python data/hellaswag.py`")
    assert not list(tmp_path.glob("logs/*"))  # an input error leaves no record
