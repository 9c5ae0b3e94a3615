"""Files of dataset repos on the Hugging Face Hub, fetched with huggingface_hub: each through a hidden staging folder
and checked before it takes its name, so that no failure leaves a partial file that looks complete. The Hub address
can be changed with HF_ENDPOINT."""
import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import httpx2
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError)

STAGING_PREFIX = ".download-"  # hidden folders that hold downloads in progress
FETCH_ERRORS = (OSError, httpx2.HTTPError)  # the Hub's errors, network failures, a full disk


def clear_staging(folder: Path):
    """Remove the staging folders that a killed run left in `folder`: they hold nothing reusable."""
    for leftover in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def check_host_resolves():
    """Fail at once, as a failed connection, where the Hub's host name does not resolve (no network): the client
    would retry for half a minute before giving up the same way."""
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise httpx2.ConnectError(f"[Errno {e.errno}] {e.strerror}") from e


def fetch(repo_id: str, filename: str, dest: Path, check):
    """Download `filename` of dataset repo `repo_id` to `dest` through a staging folder beside it. check(path) runs on
    the download before it takes its name and raises to refuse it; fetch returns what it returned."""
    check_host_resolves()
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest.parent))
    try:
        path = Path(hf_hub_download(repo_id, filename, repo_type="dataset", local_dir=staging))
        result = check(path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, dest)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def explain_failure(error: Exception, repo_id: str, name: str, folder: Path, holds: str, size: str) -> str:
    """What went wrong while fetching `name` (one of FETCH_ERRORS), and what to do about it. `holds` says what the repo
    has and what to check when `name` is not there; `size` how much room the files take."""
    repo = f"the dataset repo {repo_id} at {constants.ENDPOINT}"
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        error = error.__cause__  # the Hub could not be reached or answered with an error: report that
    if isinstance(error, RepositoryNotFoundError):
        return f"{repo} was not found; check HF_ENDPOINT (unset it to use huggingface.co), then rerun"
    if isinstance(error, RemoteEntryNotFoundError) or (
            isinstance(error, HfHubHTTPError) and error.response.status_code == 404):
        return f"{name} is not in {repo}, which holds {holds}"
    if isinstance(error, HfHubHTTPError):
        return f"{repo} answered HTTP {error.response.status_code}; wait a little and rerun"
    if isinstance(error, httpx2.HTTPError):
        return (f"the connection to {constants.ENDPOINT} failed ({type(error).__name__}: {error}); check the "
                "internet connection (and HF_ENDPOINT or proxy settings), then rerun")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"the disk holding {folder} is full; free {size}, then rerun"
    return f"{error}; rerun to fetch it again"
