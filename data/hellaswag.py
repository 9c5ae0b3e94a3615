"""Download HellaSwag's validation split (10,042 examples) from the Hugging Face Hub and tokenize it with GPT-2, for
`train_gpt.py --hellaswag=data/hellaswag/hellaswag_val.json` and `sample.py CHECKPOINT --hellaswag ...`.

    python data/hellaswag.py             # -> data/hellaswag/hellaswag_val.json

Each example is a context and four endings, one of them right. The downloaded file (parquet, as the Hub serves the
dataset) is kept beside the tokenized one, so a rerun fetches nothing; a file takes its name only once complete and
checked, so an interrupted run can simply be started again. With DATA_PATH set the files go to
$DATA_PATH/data/hellaswag/, or to --dir. The Hub address can be changed with HF_ENDPOINT.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data.fineweb import GPT2_VOCAB_SIZE, gpt2_encoding
from data.hub import FETCH_ERRORS, clear_staging, explain_failure, fetch
from train_gpt import HELLASWAG_FORMAT, DataError, UserError, load_hellaswag

REPO_ID = "Rowan/hellaswag"
FILENAME = "data/validation-00000-of-00001.parquet"  # the validation split, as the Hub serves the dataset
NUM_EXAMPLES = 10042
RAW_NAME, OUT_NAME = "hellaswag_val.parquet", "hellaswag_val.json"


def read_examples(path: Path) -> list[dict]:
    """The examples of a HellaSwag parquet file as {"ctx", "endings", "label"}, every one checked."""
    try:
        rows = pq.read_table(path, columns=["ctx", "endings", "label"]).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a parquet file with HellaSwag's ctx, endings and label columns ({error})") from None
    examples = []
    for i, row in enumerate(rows):
        ctx, endings, label = row["ctx"], row["endings"], str(row["label"])  # the Hub's labels are strings
        if not (isinstance(ctx, str) and ctx.strip() and isinstance(endings, list) and len(endings) == 4
                and all(isinstance(e, str) and e.strip() for e in endings) and label in ("0", "1", "2", "3")):
            raise DataError(f"{path}: example {i} is not a context, four endings and a label from 0 to 3: {row}")
        examples.append({"ctx": ctx, "endings": endings, "label": int(label)})
    if len(examples) != NUM_EXAMPLES:
        raise DataError(f"{path}: {len(examples)} examples, not the {NUM_EXAMPLES} of HellaSwag's validation split")
    return examples


def tokenize(examples: list[dict], encoding) -> list[dict]:
    """Contexts and endings as token ids; an ending goes on from its context after a space."""
    return [{"context": encoding.encode_ordinary(ex["ctx"]),
             "endings": [encoding.encode_ordinary(" " + ending) for ending in ex["endings"]], "label": ex["label"]}
            for ex in examples]


def checked_download(path: Path) -> None:
    try:
        read_examples(path)
    except DataError as error:
        raise UserError(f"{FILENAME}: the Hub sent a file that is not HellaSwag's validation split, so it was "
                        "discarded; check that HF_ENDPOINT (if set) points at the Hugging Face Hub, then rerun. "
                        f"The check said: {error}") from error


def download(raw: Path) -> None:
    try:
        fetch(REPO_ID, FILENAME, raw, checked_download)
    except FETCH_ERRORS as error:
        holds = "HellaSwag's splits; if the dataset's layout changed on the Hub, set FILENAME in data/hellaswag.py"
        reason = explain_failure(error, REPO_ID, FILENAME, raw.parent, holds, "about 20 MB")
        raise UserError(f"{FILENAME}: download failed: {reason}. No partial file was left behind.") from error


def is_prepared(path: Path) -> bool:
    try:
        return len(load_hellaswag(path, GPT2_VOCAB_SIZE)) == NUM_EXAMPLES
    except DataError:
        return False


def write_json(path: Path, data) -> None:
    """Write `data` to `path` as JSON through a temporary file, so that `path` is only ever complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files (overrides DATA_PATH)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        folder = args.dir
    else:
        folder = Path(os.environ.get("DATA_PATH", REPO_ROOT)) / "data" / "hellaswag"
    folder.mkdir(parents=True, exist_ok=True)
    clear_staging(folder)
    raw, out = folder / RAW_NAME, folder / OUT_NAME
    if is_prepared(out):
        print(f"{out}: already prepared, skipped")
        return
    try:
        examples = read_examples(raw)
        print(f"{raw}: already downloaded")
    except DataError:
        if raw.exists():
            print(f"{raw}: present but not HellaSwag's validation split, downloading it again")
        download(raw)
        examples = read_examples(raw)
        print(f"{raw}: downloaded from the dataset repo {REPO_ID}")
    write_json(out, {"format": HELLASWAG_FORMAT, "tokenizer": "gpt2", "source": f"{REPO_ID}/{FILENAME}",
                     "examples": tokenize(examples, gpt2_encoding())})
    print(f"{out}: {len(examples)} examples tokenized with GPT-2")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
