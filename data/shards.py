"""Token shards on disk: the one place that writes them.

A shard is a header of 256 little-endian int32 (magic, version, token count, zeros) followed by the tokens as
little-endian uint16. Shards are written to a temporary name, fsynced and renamed, so a shard is only ever visible
complete.
"""
import os
from pathlib import Path

import numpy as np

from train_gpt import HEADER_BYTES, HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, DataError, read_shard_header

MAX_TOKEN_ID = 2**16 - 1  # tokens are stored as uint16


def write_shard(path, tokens) -> None:
    """Write integer tokens to `path` as a shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise DataError(f"{path}: token id {bad} does not fit in uint16 (0..{MAX_TOKEN_ID}), the shard token type; "
                        f"use a vocabulary of at most {MAX_TOKEN_ID + 1} tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden, and never matches a *.bin pattern
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(np.ascontiguousarray(tokens, dtype="<u2").data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(path) -> np.ndarray:
    """All tokens of a shard, after checking its header."""
    num_tokens = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)


def is_valid_shard(path) -> bool:
    """Whether `path` exists and is a complete shard."""
    try:
        read_shard_header(path)
        return True
    except (DataError, OSError):
        return False
