"""Download the GPT-2 tokenized FineWeb shards of the record runs (dataset repo kjj0/fineweb10B-gpt2).

    python data/cached_fineweb10B.py [N]    # fineweb_val_000000.bin and the first N train shards (default 9)

Each shard holds 100M tokens (about 200 MB); the repo has 103 train shards and a record run reads about 9.
They go to data/fineweb10B/ in the repo, or to $DATA_PATH/data/fineweb10B/ when DATA_PATH is set, or to --dir.
Shards already there and valid are skipped. A shard appears under its name only once completely downloaded and
checked, so an interrupted run can simply be started again. The Hub address can be changed with HF_ENDPOINT.
"""
import argparse
import os
import sys
from pathlib import Path

from huggingface_hub import constants

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data.hub import FETCH_ERRORS, clear_staging, explain_failure, fetch
from data.shards import is_valid_shard
from train_gpt import DataError, UserError, read_shard_header

REPO_ID = "kjj0/fineweb10B-gpt2"
NUM_TRAIN_SHARDS = 103


def shard_names(num_train_shards: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def checked_shard(name: str, path: Path) -> int:
    """The token count of a downloaded shard, or an error if the Hub sent something else."""
    try:
        return read_shard_header(path)
    except DataError as error:
        raise UserError(f"{name}: {constants.ENDPOINT} sent a file that is not a valid token shard, so it was "
                        "discarded; check that HF_ENDPOINT (if set) points at the Hugging Face Hub, then rerun. "
                        f"The check said: {error}") from error


def download_shard(name: str, folder: Path) -> int:
    """Download one shard into `folder`; return its token count."""
    try:
        return fetch(REPO_ID, name, folder / name, lambda path: checked_shard(name, path))
    except FETCH_ERRORS as error:
        holds = (f"fineweb_val_000000.bin and fineweb_train_000001.bin to fineweb_train_{NUM_TRAIN_SHARDS:06d}.bin; "
                 "check the shard count and HF_ENDPOINT")
        reason = explain_failure(error, REPO_ID, name, folder, holds, "about 200 MB per missing shard")
        raise UserError(f"{name}: download failed: {reason}. "
                        f"No partial {name} was left behind; the shards already complete are kept.") from error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", nargs="?", type=int, default=9,
                        help=f"number of train shards to fetch, 0..{NUM_TRAIN_SHARDS} (default 9)")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the shards (overrides DATA_PATH)")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train_shards <= NUM_TRAIN_SHARDS:
        raise UserError(f"{args.num_train_shards} train shards requested, but {REPO_ID} has "
                        f"{NUM_TRAIN_SHARDS}; give a number from 0 to {NUM_TRAIN_SHARDS} (a record run reads about 9)")
    if args.dir is not None:
        folder = args.dir
    elif "DATA_PATH" in os.environ:
        folder = Path(os.environ["DATA_PATH"]) / "data" / "fineweb10B"
    else:
        folder = REPO_ROOT / "data" / "fineweb10B"
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    clear_staging(folder)
    try:
        fetch_shards(folder, args.num_train_shards)
    except UserError:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a first download that failed leaves no empty folder to mistake for data
        raise


def fetch_shards(folder: Path, num_train_shards: int):
    """The validation shard and the first num_train_shards training shards in `folder`, those there kept."""
    for name in shard_names(num_train_shards):
        path = folder / name
        if is_valid_shard(path):
            print(f"{name}: already present, skipped")
            continue
        if path.exists():
            print(f"{name}: present but not a valid shard, downloading it again")
            path.unlink()
        num_tokens = download_shard(name, folder)
        print(f"{name}: downloaded ({num_tokens:,} tokens)")
    print(f"{num_train_shards + 1} shards ready in {folder}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
