"""Write synthetic token shards for tests, smoke runs and benchmarks.

Documents start with BOS (= vocab_size - 1) and have FineWeb-like lengths: lognormal, median 400 tokens, about 5%
longer than 2048. Each document has one of 4 topics; each next token is the previous one plus one of the topic's 8
offsets (Zipf-weighted), modulo vocab_size - 1. The previous token alone narrows the next to at most 32 choices
(~3.2 nats); inferring the topic from the context narrows it to 8 (~1.8 nats); chance is ln(vocab_size). Few topics
keep the bigram table small enough for the tiny preset to learn much of it in a few minutes on a CPU.

    python data/synthetic.py --vocab_size 1024                     # the tiny preset
    python data/synthetic.py --vocab_size 50257 --train_shards 4   # a 150-step record-shaped benchmark
"""
import argparse
import re
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data.shards import MAX_TOKEN_ID, is_valid_shard, read_shard, write_shard
from train_gpt import UserError

MEDIAN_DOC_TOKENS, DOC_LENGTH_SIGMA = 400, 1.0
NUM_TOPICS, OFFSETS_PER_TOPIC = 4, 8
OFFSET_PROBS = 1 / np.arange(1, OFFSETS_PER_TOPIC + 1)
OFFSET_PROBS /= OFFSET_PROBS.sum()
MIN_VOCAB = OFFSETS_PER_TOPIC + 2  # BOS plus room for distinct offsets


def topic_offsets(vocab_size: int, seed: int) -> np.ndarray:
    """The (topic, k) -> token offset table shared by all shards of one seed."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(np.arange(1, vocab_size - 1), OFFSETS_PER_TOPIC, replace=False)
                     for _ in range(NUM_TOPICS)])


def document_lengths(num_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal document lengths (at least 2: BOS and one token), the last one cut to total num_tokens."""
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < num_tokens:
        more = rng.lognormal(np.log(MEDIAN_DOC_TOKENS), DOC_LENGTH_SIGMA, size=num_tokens // MEDIAN_DOC_TOKENS + 1)
        lengths = np.concatenate([lengths, np.maximum(2, more).astype(np.int64)])
    ends = np.cumsum(lengths)
    last = np.searchsorted(ends, num_tokens)
    lengths = lengths[:last + 1]
    lengths[-1] -= ends[last] - num_tokens
    return lengths


def synthetic_tokens(num_tokens: int, vocab_size: int, offsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lengths = document_lengths(num_tokens, rng)
    starts = np.cumsum(lengths) - lengths
    topics = rng.integers(NUM_TOPICS, size=len(lengths))
    steps = offsets[np.repeat(topics, lengths), rng.choice(OFFSETS_PER_TOPIC, size=num_tokens, p=OFFSET_PROBS)]
    steps[starts] = 0
    # Running sum of the steps, restarted at each document from a random first token.
    walk = np.cumsum(steps)
    walk += np.repeat(rng.integers(vocab_size - 1, size=len(lengths)) - walk[starts], lengths)
    tokens = (walk % (vocab_size - 1)).astype(np.uint16)
    tokens[starts] = vocab_size - 1  # BOS
    return tokens


def write_or_keep(path: Path, tokens: np.ndarray) -> None:
    if is_valid_shard(path) and np.array_equal(read_shard(path), tokens):
        print(f"{path}: unchanged ({len(tokens):,} tokens)")
    else:
        write_shard(path, tokens)
        print(f"{path}: wrote {len(tokens):,} tokens")


def generate(out: Path, vocab_size: int, train_shards: int, train_tokens_per_shard: int, val_tokens: int,
             seed: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_TOKEN_ID + 1:
        raise UserError(f"--vocab_size {vocab_size} is out of range: give {MIN_VOCAB}..{MAX_TOKEN_ID + 1} "
                        "(the top id is BOS; shards store uint16 tokens)")
    for flag, value in [("--train_shards", train_shards), ("--train_tokens_per_shard", train_tokens_per_shard),
                        ("--val_tokens", val_tokens)]:
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    offsets = topic_offsets(vocab_size, seed)
    sizes = [val_tokens] + [train_tokens_per_shard] * train_shards
    for index, num_tokens in enumerate(sizes):
        name = f"val_{index:06d}.bin" if index == 0 else f"train_{index:06d}.bin"
        rng = np.random.default_rng([seed, index])
        write_or_keep(out / name, synthetic_tokens(num_tokens, vocab_size, offsets, rng))
    # Train shards beyond the requested count belong to an earlier, larger set: they would be trained on too.
    for path in sorted(out.glob("train_*.bin")):
        match = re.fullmatch(r"train_(\d{6})\.bin", path.name)
        if match and int(match.group(1)) > train_shards:
            path.unlink()
            print(f"{path}: removed (beyond --train_shards {train_shards})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "synthetic",
                        help="output folder (default: data/synthetic in the repo); shards already there with the "
                             "same content are kept, other train_*.bin beyond --train_shards are removed")
    parser.add_argument("--vocab_size", type=int, default=50257, help="vocabulary size; BOS = vocab_size - 1")
    parser.add_argument("--train_shards", type=int, default=1,
                        help="number of train shards (default 1; use 4 for a 150-step record-shaped benchmark, "
                             "which reads about 44M tokens since documents are cut at 2048)")
    parser.add_argument("--train_tokens_per_shard", type=int, default=2**24,
                        help="tokens per train shard (default 2^24 = 16,777,216; the tiny preset reads about 0.5M as "
                             "it keeps only the first 256 tokens of each document)")
    parser.add_argument("--val_tokens", type=int, default=10_500_000,
                        help="tokens in val_000000.bin (default 10,500,000: the record's 10,485,760-token "
                             "validation plus the one-token target shift)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, args.vocab_size, args.train_shards, args.train_tokens_per_shard, args.val_tokens, args.seed)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
