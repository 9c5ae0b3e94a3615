"""Shard writing (data/shards.py), synthetic shards (data/synthetic.py) and tokenizing text (data/fineweb.py)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data import fineweb, synthetic
from data.shards import is_valid_shard, read_shard, write_shard
from train_gpt import DataError, UserError


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def run_script(name: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "data" / name), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


# -----------------------------------------------------------------------------
# data/shards.py

def test_write_shard_writes_header_and_uint16_tokens(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, np.array([65535, 0, 7, 50256], dtype=np.int64))
    raw = path.read_bytes()
    assert len(raw) == 1024 + 8
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, 4)
    assert raw[12:1024] == bytes(1012)
    assert struct.unpack("<4H", raw[1024:]) == (65535, 0, 7, 50256)
    assert read_shard(path).tolist() == [65535, 0, 7, 50256]
    assert listing(tmp_path) == ["a.bin"]  # no temporary file left


@pytest.mark.parametrize("bad", [65536, -1])
def test_write_shard_refuses_ids_outside_uint16_and_writes_nothing(tmp_path, bad):
    path = tmp_path / "a.bin"
    write_shard(path, [1, 2, 3])
    with pytest.raises(DataError, match=f"a.bin: token id {bad} does not fit in uint16 .*at most 65536 tokens"):
        write_shard(path, [1, bad, 3])
    assert read_shard(path).tolist() == [1, 2, 3]  # the previous shard is untouched
    assert listing(tmp_path) == ["a.bin"]


def test_is_valid_shard(tmp_path):
    path = tmp_path / "a.bin"
    assert not is_valid_shard(path)  # missing
    write_shard(path, np.arange(100))
    assert is_valid_shard(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])  # truncated
    assert not is_valid_shard(path)
    path.write_bytes(struct.pack("<i", 1234) + raw[4:])  # wrong magic
    assert not is_valid_shard(path)


# -----------------------------------------------------------------------------
# data/synthetic.py

def make_synthetic(out: Path, vocab_size=1024, train_shards=2, seed=0) -> None:
    synthetic.generate(out, vocab_size, train_shards, train_tokens_per_shard=200_000, val_tokens=50_000, seed=seed)


def held_out_bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Mean cross-entropy on val of add-0.1 smoothed bigram counts from train, over non-BOS targets."""
    counts = np.full((vocab_size, vocab_size), 0.1)
    np.add.at(counts, (train[:-1], train[1:]), 1)
    probs = counts / counts.sum(axis=1, keepdims=True)
    is_target = val[1:] != vocab_size - 1
    return float(-np.log(probs[val[:-1], val[1:]])[is_target].mean())


def test_synthetic_shards_have_realistic_documents_and_learnable_structure(tmp_path):
    make_synthetic(tmp_path)
    assert listing(tmp_path) == ["train_000001.bin", "train_000002.bin", "val_000000.bin"]
    val, train = read_shard(tmp_path / "val_000000.bin"), read_shard(tmp_path / "train_000001.bin")
    assert len(val) == 50_000 and len(train) == 200_000
    assert train.max() == 1023 and train[0] == 1023  # BOS = vocab_size - 1 starts the shard
    starts = np.flatnonzero(train == 1023)
    lengths = np.diff(np.append(starts, len(train)))[:-1]  # the last document is cut by the shard end
    assert 250 < np.median(lengths) < 650
    assert (lengths > 2048).sum() >= 3
    assert lengths.min() >= 2
    # A bigram model fitted on one shard predicts the other far better than chance (ln 1024 = 6.93).
    assert held_out_bigram_loss(np.concatenate([train, read_shard(tmp_path / "train_000002.bin")]), val, 1024) < 5.5


def test_synthetic_is_deterministic_per_seed(tmp_path):
    make_synthetic(tmp_path / "a", seed=1)
    make_synthetic(tmp_path / "b", seed=1)
    make_synthetic(tmp_path / "c", seed=2)
    for name in ["val_000000.bin", "train_000001.bin", "train_000002.bin"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_synthetic_keeps_an_identical_set_and_replaces_a_different_one(tmp_path, capsys):
    make_synthetic(tmp_path, train_shards=3)
    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in listing(tmp_path)}
    capsys.readouterr()
    make_synthetic(tmp_path, train_shards=3)
    assert capsys.readouterr().out.count("unchanged") == 4
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in listing(tmp_path)} == stamps

    make_synthetic(tmp_path, vocab_size=2048, train_shards=1)
    assert "train_000003.bin: removed" in capsys.readouterr().out
    assert listing(tmp_path) == ["train_000001.bin", "val_000000.bin"]
    assert read_shard(tmp_path / "train_000001.bin")[0] == 2047  # the new vocabulary's BOS


def test_synthetic_cli(tmp_path):
    ok = run_script("synthetic.py", "--out", str(tmp_path), "--vocab_size", "64", "--train_tokens_per_shard", "5000",
                    "--val_tokens", "3000")
    assert ok.returncode == 0, ok.stderr
    assert "train_000001.bin: wrote 5,000 tokens" in ok.stdout
    assert len(read_shard(tmp_path / "val_000000.bin")) == 3000


def test_synthetic_refuses_a_vocabulary_beyond_uint16(tmp_path):
    with pytest.raises(UserError, match="--vocab_size 70000 is out of range: give 10..65536"):
        synthetic.main(["--out", str(tmp_path / "x"), "--vocab_size", "70000"])
    assert not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# data/fineweb.py, with a small local BPE in place of GPT-2's (whose files come from the internet)

def small_encoding(eot_token: int | None = None) -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b"th", b"the", b" t", b" the", b"in", b"ing"]:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(name="small", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot_token or len(ranks)})


DOCUMENTS = [
    "The thing in the thing.",
    "Naïve café — 東京 ☕\n\nsecond paragraph of the same document",
    "",
    "singing " * 40,
    "last one",
]


def write_inputs(folder: Path) -> list[Path]:
    """DOCUMENTS spread over the three input kinds, in the order expand_inputs sorts them."""
    folder.mkdir()
    (folder / "a.txt").write_text(DOCUMENTS[0], encoding="utf-8")
    (folder / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": text, "id": i}) for i, text in enumerate(DOCUMENTS[1:3])) + "\n\n",
        encoding="utf-8")
    pq.write_table(pa.table({"text": DOCUMENTS[3:], "url": ["u", "v"]}), folder / "c.parquet")
    (folder / "notes.md").write_text("not an input")
    return [folder]


def test_fineweb_shards_decode_back_to_the_documents(tmp_path):
    encoding = small_encoding()
    bos = encoding.eot_token
    files = fineweb.expand_inputs(write_inputs(tmp_path / "in"))
    assert [path.name for path in files] == ["a.txt", "b.jsonl", "c.parquet"]
    paths = fineweb.tokenize_to_shards(fineweb.read_documents(files), tmp_path / "out", "test", 50, encoding,
                                       processes=2)
    assert [path.name for path in paths] == ["test_val_000000.bin"] + [f"test_train_{i:06d}.bin"
                                                                       for i in range(1, len(paths))]
    assert listing(tmp_path / "out") == sorted(path.name for path in paths)  # no staging folder left
    shards = [read_shard(path) for path in paths]
    assert all(len(shard) == 50 for shard in shards[:-1]) and 1 <= len(shards[-1]) <= 50
    tokens = np.concatenate(shards)
    assert tokens[0] == bos and (tokens == bos).sum() == len(DOCUMENTS)
    documents = np.split(tokens, np.flatnonzero(tokens == bos))[1:]
    assert [encoding.decode(document[1:].tolist()) for document in documents] == DOCUMENTS
    assert len(tokens) == sum(len(encoding.encode_ordinary(text)) + 1 for text in DOCUMENTS)


def test_fineweb_refuses_token_ids_beyond_uint16(tmp_path):
    with pytest.raises(UserError, match="token ids up to 70000, which do not fit in the uint16 shard format"):
        fineweb.tokenize_to_shards(iter(DOCUMENTS), tmp_path / "out", "test", 50, small_encoding(eot_token=70000))
    assert not (tmp_path / "out").exists()


def test_fineweb_refuses_to_mix_with_existing_shards(tmp_path):
    out = tmp_path / "out"
    fineweb.tokenize_to_shards(iter(DOCUMENTS), out, "test", 1000, small_encoding(), processes=1)
    with pytest.raises(UserError, match="already has shards named test_.*delete them or choose another"):
        fineweb.tokenize_to_shards(iter(DOCUMENTS), out, "test", 1000, small_encoding(), processes=1)
    assert listing(out) == ["test_val_000000.bin"]


def test_fineweb_bad_jsonl_line_is_named_and_leaves_no_shards(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r'in.jsonl:2: not a JSON object with a string "text" field'):
        fineweb.tokenize_to_shards(fineweb.read_documents([inputs]), out, "test", 1, small_encoding(), processes=1)
    assert listing(out) == []  # the shards of the first line were staged, then discarded


def test_fineweb_rejects_unknown_inputs(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match=r"notes.md: cannot read .md files; give .txt"):
        fineweb.expand_inputs([tmp_path / "notes.md"])
    with pytest.raises(UserError, match="missing: no such file or folder"):
        fineweb.expand_inputs([tmp_path / "missing"])


def test_fineweb_cli_reports_an_unreachable_tokenizer_download(tmp_path):
    (tmp_path / "doc.txt").write_text("hello")
    # An empty tiktoken cache and a dead proxy: the GPT-2 tokenizer files cannot be fetched, online or not.
    result = run_script("fineweb.py", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "out"),
                        TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9",
                        https_proxy="http://127.0.0.1:9")
    assert result.returncode == 1
    assert "error: could not load the GPT-2 tokenizer" in result.stderr
    assert not (tmp_path / "out").exists()
