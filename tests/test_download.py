"""data/cached_fineweb10B.py run as a script, with the real huggingface_hub client, against a local stand-in for
the Hub that serves tiny shards on 127.0.0.1."""
import errno
import hashlib
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data import cached_fineweb10B, hub
from data.shards import write_shard
from train_gpt import UserError

SCRIPT = REPO_ROOT / "data" / "cached_fineweb10B.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE_PATH = re.compile(r"/datasets/(?P<repo>[\w.-]+/[\w.-]+)/resolve/main/(?P<name>[\w./-]+)")
NAMES = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]


class HubStandIn(ThreadingHTTPServer):
    """Answers the HEAD and GET /datasets/<repo>/resolve/main/<file> requests of hf_hub_download the way the Hub does
    for a file stored in the dataset repo `repo`: 200 with ETag, X-Repo-Commit and Content-Length."""
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], cut: dict[str, int] | None = None, repo: str = "kjj0/fineweb10B-gpt2"):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.repo = files, repo
        self.cut = cut or {}  # file name -> bytes sent before the server dies
        self.requests = []  # (method, file name)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def die(self) -> None:
        """Stop serving and close the listening socket, so that new connections are refused."""
        def stop():
            self.shutdown()  # waits for serve_forever to return: not from a request handler's thread
            self.server_close()
        threading.Thread(target=stop, daemon=True).start()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body: bool) -> None:
        hub = self.server
        match = RESOLVE_PATH.fullmatch(self.path)
        in_repo = match is not None and match["repo"] == hub.repo
        name = match["name"] if in_repo else self.path
        hub.requests.append((self.command, name))
        if name not in hub.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if in_repo else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = hub.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not send_body:
            return
        if name in hub.cut:
            self.wfile.write(data[:hub.cut[name]])
            self.wfile.flush()
            self.close_connection = True
            hub.die()
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def start_hub():
    """Starts HubStandIn servers; stops them all after the test."""
    hubs = []

    def start(files: dict[str, bytes], cut: dict[str, int] | None = None, repo: str = "kjj0/fineweb10B-gpt2") -> HubStandIn:
        hubs.append(HubStandIn(files, cut, repo))
        return hubs[-1]

    yield start
    for hub in hubs:
        hub.shutdown()
        hub.server_close()


def make_shards(tmp_path: Path) -> dict[str, bytes]:
    """Tiny valid shards with different contents, as served files."""
    rng = np.random.default_rng(0)
    files = {}
    for index, name in enumerate(NAMES):
        path = tmp_path / "served" / name
        path.parent.mkdir(exist_ok=True)
        tokens = rng.integers(50257, size=1000 + 500 * index)
        tokens[0] = 50256
        write_shard(path, tokens)
        files[name] = path.read_bytes()
    return files


def hub_env(hub: HubStandIn, folder: Path) -> dict[str, str]:
    """The environment of a process whose huggingface_hub talks to `hub` only."""
    env = {key: value for key, value in os.environ.items()
           if key.upper() not in {"HF_TOKEN", "DATA_PATH", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}}
    # The stand-in answers at once; the timeouts only bound a wait for one that a busy machine starves.
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(folder.parent / "hf_home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="30", HF_HUB_DOWNLOAD_TIMEOUT="30", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1")
    return env


def run_downloader(hub: HubStandIn, folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(folder)], cwd=REPO_ROOT,
                          env=hub_env(hub, folder), capture_output=True, text=True, timeout=300)


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_downloads_then_skips_valid_shards_and_replaces_a_corrupt_one(tmp_path, start_hub):
    files = make_shards(tmp_path)
    hub = start_hub(files)
    folder = tmp_path / "fineweb10B"
    (folder / ".download-killed").mkdir(parents=True)  # left by a killed run
    (folder / ".download-killed" / NAMES[1]).write_bytes(files[NAMES[1]][:100])

    fresh = run_downloader(hub, folder, "2")
    assert fresh.returncode == 0, fresh.stderr
    assert listing(folder) == sorted(NAMES)
    for name in NAMES:
        assert (folder / name).read_bytes() == files[name]
        assert f"{name}: downloaded" in fresh.stdout
    assert sorted(hub.requests) == sorted([("HEAD", name) for name in NAMES] + [("GET", name) for name in NAMES])

    hub.requests.clear()
    again = run_downloader(hub, folder, "2")
    assert again.returncode == 0, again.stderr
    assert all(f"{name}: already present, skipped" in again.stdout for name in NAMES)
    assert hub.requests == []

    (folder / NAMES[2]).write_bytes(files[NAMES[2]][:-2])  # truncated
    repaired = run_downloader(hub, folder, "2")
    assert repaired.returncode == 0, repaired.stderr
    assert f"{NAMES[2]}: present but not a valid shard" in repaired.stdout
    assert [request for request in hub.requests if request[0] == "GET"] == [("GET", NAMES[2])]
    assert (folder / NAMES[2]).read_bytes() == files[NAMES[2]]
    assert listing(folder) == sorted(NAMES)


def test_missing_shard_on_the_hub_fails_naming_it(tmp_path, start_hub):
    files = make_shards(tmp_path)
    del files[NAMES[2]]
    folder = tmp_path / "fineweb10B"
    result = run_downloader(start_hub(files), folder, "2")
    assert result.returncode == 1
    assert f"{NAMES[2]}: download failed: {NAMES[2]} is not in the dataset repo kjj0/fineweb10B-gpt2" in result.stderr
    assert listing(folder) == sorted(NAMES[:2])  # the complete shards stay, nothing else


def test_server_dying_mid_file_leaves_no_partial_shard(tmp_path, start_hub):
    files = make_shards(tmp_path)
    folder = tmp_path / "fineweb10B"
    result = run_downloader(start_hub(files, cut={NAMES[1]: len(files[NAMES[1]]) // 2}), folder, "2")
    assert result.returncode == 1
    assert f"{NAMES[1]}: download failed: the connection to http://127.0.0.1:" in result.stderr
    assert "check the internet connection" in result.stderr
    assert listing(folder) == [NAMES[0]]


def test_served_file_that_is_not_a_shard_is_refused(tmp_path, start_hub):
    files = make_shards(tmp_path)
    files[NAMES[0]] = b"<html>a login page, not a shard</html>"
    folder = tmp_path / "fineweb10B"
    hub = start_hub(files)
    result = run_downloader(hub, folder, "0")
    assert result.returncode == 1
    assert f"{NAMES[0]}: {hub.url} sent a file that is not a valid token shard, so it was discarded" in result.stderr
    assert "shorter than the 1024-byte shard header" in result.stderr
    assert not folder.exists()  # the folder the download made goes with it


@pytest.mark.parametrize("count", ["104", "-1"])
def test_shard_count_out_of_range_is_refused(tmp_path, count):
    with pytest.raises(UserError, match=f"{count} train shards requested, .* give a number from 0 to 103"):
        cached_fineweb10B.main([count, "--dir", str(tmp_path)])


def test_full_disk_names_the_shard_and_leaves_nothing(tmp_path, monkeypatch):
    def fill_disk(repo_id, filename, *, repo_type, local_dir):
        (Path(local_dir) / filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub, "hf_hub_download", fill_disk)
    monkeypatch.setattr(hub.constants, "ENDPOINT", "http://127.0.0.1")  # a host that resolves, offline too
    with pytest.raises(UserError, match=f"{NAMES[0]}: download failed: the disk holding {tmp_path} is full"):
        cached_fineweb10B.main(["0", "--dir", str(tmp_path)])
    assert listing(tmp_path) == []


def test_offline_fails_before_any_request_and_leaves_no_folder(tmp_path, monkeypatch):
    """A host name that does not resolve (no network) fails at once, with the connection's message, not after the
    client's retries; a first download leaves no empty folder behind, an existing folder keeps what it holds."""
    def no_request(*args, **kwargs):
        raise AssertionError("a request was made")

    monkeypatch.setattr(hub, "hf_hub_download", no_request)
    monkeypatch.setattr(hub.constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    folder = tmp_path / "data" / "fineweb10B"
    with pytest.raises(UserError) as e:
        cached_fineweb10B.main(["1", "--dir", str(folder)])
    assert str(e.value).startswith(f"{NAMES[0]}: download failed: the connection to https://hub.invalid failed "
                                   "(ConnectError: [Errno ")
    assert str(e.value).endswith("check the internet connection (and HF_ENDPOINT or proxy settings), then rerun. "
                                 f"No partial {NAMES[0]} was left behind; the shards already complete are kept.")
    assert not folder.exists() and (tmp_path / "data").exists()
    folder.mkdir()
    with pytest.raises(UserError):
        cached_fineweb10B.main(["1", "--dir", str(folder)])
    assert folder.is_dir()
