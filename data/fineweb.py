"""Tokenize text into token shards with the GPT-2 tokenizer, on all CPU cores.

Each document becomes BOS (<|endoftext|>, 50256) followed by its tokens. Documents are packed in order into shards of
--shard_tokens tokens (a document may continue into the next shard); the first shard is the validation shard:
<prefix>_val_000000.bin, then <prefix>_train_000001.bin, ... The whole set appears in --out only once complete.

    python data/fineweb.py --fineweb sample-10BT             # FineWeb's 10B-token sample, downloaded from the Hub
    python data/fineweb.py my_texts/ notes.jsonl --prefix mine   # your own text

Inputs: a .txt file is one document; a .jsonl file holds one JSON object per line with a "text" field; a .parquet
file has a "text" column (reading it needs pyarrow); a folder stands for all such files in it, recursively.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import httpx2
import numpy as np
import tiktoken
from huggingface_hub import HfApi, hf_hub_download

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data.shards import MAX_TOKEN_ID, write_shard
from train_gpt import UserError

FINEWEB_REPO = "HuggingFaceFW/fineweb"
FINEWEB_SAMPLES = {"sample-10BT": "sample/10BT", "sample-100BT": "sample/100BT", "sample-350BT": "sample/350BT"}
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOCUMENTS_PER_TASK = 64


# -----------------------------------------------------------------------------
# Reading documents

def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Input files in order, folders replaced by the supported files they contain."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in INPUT_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path}: folder has no {', '.join(INPUT_SUFFIXES)} files to tokenize")
            files += found
        elif not path.is_file():
            raise UserError(f"{path}: no such file or folder; check the path")
        elif path.suffix not in INPUT_SUFFIXES:
            raise UserError(f"{path}: cannot read {path.suffix or 'suffix-less'} files; give .txt (one document), "
                            '.jsonl (one JSON object with a "text" field per line) or .parquet (a "text" column)')
        else:
            files.append(path)
    return files


def read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                text = None
            if not isinstance(text, str):
                raise UserError(f'{path}:{line_number}: not a JSON object with a string "text" field; '
                                'each line of a .jsonl file must look like {"text": "..."}')
            yield text


def read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # only this input needs pyarrow
    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise UserError(f'{path}: no "text" column (it has {parquet.schema_arrow.names}); '
                        'put the documents in a column named "text"')
    for batch in parquet.iter_batches(columns=["text"]):
        yield from batch.column(0).to_pylist()


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}: not UTF-8 text ({error}); convert it to UTF-8") from None
            yield text
        elif path.suffix == ".jsonl":
            yield from read_jsonl(path)
        else:
            yield from read_parquet(path)


def fineweb_files(sample: str, max_files: int | None) -> Iterator[Path]:
    """Parquet files of a FineWeb sample, each downloaded (into the Hugging Face cache) when first needed."""
    try:
        tree = HfApi().list_repo_tree(FINEWEB_REPO, FINEWEB_SAMPLES[sample], repo_type="dataset")
        names = sorted(entry.path for entry in tree if entry.path.endswith(".parquet"))[:max_files]
        for name in names:
            yield Path(hf_hub_download(FINEWEB_REPO, name, repo_type="dataset"))
    except (OSError, httpx2.HTTPError) as error:  # the Hub's errors, network failures, a full disk
        raise UserError(f"could not fetch {sample} from the dataset repo {FINEWEB_REPO} ({error}); "
                        "check the internet connection (and HF_ENDPOINT if set), then rerun") from None


# -----------------------------------------------------------------------------
# Tokenizing into shards

GPT2_VOCAB_SIZE = 50257  # BOS (<|endoftext|>) is the last token


def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 tokenizer, whose files tiktoken downloads once and caches."""
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as error:
        raise UserError(f"could not load the GPT-2 tokenizer ({error}); tiktoken downloads its files once from "
                        "openaipublic.blob.core.windows.net: check the internet connection, or set "
                        "TIKTOKEN_CACHE_DIR to a folder that already holds them") from None


_encoding = None  # set in each worker process


def _init_worker(encoding) -> None:
    global _encoding
    _encoding = encoding


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    documents = []
    for text in texts:
        tokens = _encoding.encode_ordinary(text)
        document = np.empty(len(tokens) + 1, dtype=np.uint16)
        document[0] = _encoding.eot_token  # BOS
        document[1:] = tokens
        documents.append(document)
    return documents


def tokenize_in_order(pool, texts: Iterable[str], processes: int) -> Iterator[np.ndarray]:
    """Token arrays of the texts, in order. Reads ahead only a few tasks per worker, never the whole corpus."""
    texts = iter(texts)
    tasks = iter(lambda: list(islice(texts, DOCUMENTS_PER_TASK)), [])
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(_tokenize, (task,)))
        if len(pending) == 4 * processes:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_val_{index:06d}.bin" if index == 0 else f"{prefix}_train_{index:06d}.bin"


def pack_shards(documents: Iterable[np.ndarray], shard_tokens: int) -> Iterator[np.ndarray]:
    """Cut the concatenated documents into shards of shard_tokens tokens (the last may be shorter).

    Each yielded array is reused for the next shard: write it before asking for the next one."""
    buffer, filled = np.empty(shard_tokens, dtype=np.uint16), 0
    for document in documents:
        while len(document):
            take = min(len(document), shard_tokens - filled)
            buffer[filled:filled + take] = document[:take]
            filled, document = filled + take, document[take:]
            if filled == shard_tokens:
                yield buffer
                filled = 0
    if filled:
        yield buffer[:filled]


def tokenize_to_shards(documents: Iterable[str], out: Path, prefix: str, shard_tokens: int, encoding,
                       processes: int | None = None) -> list[Path]:
    """Tokenize documents with `encoding` (a tiktoken Encoding) into shards in `out`; return their paths."""
    if encoding.max_token_value > MAX_TOKEN_ID:
        raise UserError(f"tokenizer {encoding.name!r} has token ids up to {encoding.max_token_value}, which do not "
                        f"fit in the uint16 shard format (0..{MAX_TOKEN_ID}); use a tokenizer with at most "
                        f"{MAX_TOKEN_ID + 1} tokens, such as gpt2")
    if shard_tokens < 1:
        raise UserError(f"--shard_tokens {shard_tokens} must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}_val_*.bin")) + sorted(out.glob(f"{prefix}_train_*.bin"))
    if existing:
        raise UserError(f"{out} already has shards named {prefix}_*.bin ({existing[0].name}, ...); mixing two "
                        "tokenizations would corrupt training: delete them or choose another --out or --prefix")
    processes = processes or os.cpu_count()
    # Shards are staged in a hidden folder and moved into `out` together at the end, so an interrupted run leaves
    # no partial set behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-staging-", dir=out))
    try:
        staged = []
        with Pool(processes, initializer=_init_worker, initargs=(encoding,)) as pool:
            tokenized = tokenize_in_order(pool, documents, processes)
            for index, tokens in enumerate(pack_shards(tokenized, shard_tokens)):
                staged.append(staging / shard_name(prefix, index))
                write_shard(staged[-1], tokens)
                print(f"{staged[-1].name}: {len(tokens):,} tokens", flush=True)
        if not staged:
            raise UserError("the inputs hold no documents: nothing to tokenize")
        for path in staged:
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / path.name for path in staged]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help=".txt, .jsonl or .parquet files, or folders of them")
    parser.add_argument("--fineweb", choices=sorted(FINEWEB_SAMPLES),
                        help=f"tokenize this sample of the dataset repo {FINEWEB_REPO} instead of local inputs")
    parser.add_argument("--max_files", type=int, default=None,
                        help="with --fineweb: use only the first N parquet files of the sample")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "tokenized",
                        help="output folder (default: data/tokenized in the repo)")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: fineweb with --fineweb, else text)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.fineweb):
        parser.error("give either input files/folders or --fineweb SAMPLE")
    if args.processes < 1 or (args.max_files is not None and args.max_files < 1):
        parser.error("--processes and --max_files must be at least 1")
    if args.fineweb:
        documents = read_documents(fineweb_files(args.fineweb, args.max_files))
    else:
        documents = read_documents(expand_inputs(args.inputs))
    prefix = args.prefix or ("fineweb" if args.fineweb else "text")
    paths = tokenize_to_shards(documents, args.out, prefix, args.shard_tokens, gpt2_encoding(), args.processes)
    if len(paths) == 1:
        print("only a validation shard was written: lower --shard_tokens to get train shards too")
    print(f"wrote {len(paths)} shards to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
