"""slurm/train.sbatch on a real SLURM cluster of this one machine, started for these tests (Debian's slurm-wlm and
munge, installed here where missing, as root): the tiny preset submitted on the CPU, preempted with
`scancel --signal=TERM`, checkpoints and stops with a preempted record, is requeued by its script, resumes and ends
with every validation loss of a run never stopped."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import tiny_run_of
from test_train import ROOT

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")


def slurm_missing() -> str | None:
    """Why SLURM cannot run here, after installing it where it is missing; None where it can."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed, and only root with apt-get can install them here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    return f"could not install slurm-wlm and munge (missing: {', '.join(missing)})" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path, host: str) -> str:
    return f"""ClusterName=traingpt
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
PlugStackConfig=/dev/null
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """munged, slurmctld and slurmd of a one-node cluster with their own key, ports and folders; the environment that
    SLURM's commands need to reach it. Stopped, by their process ids, after the module's tests."""
    missing = slurm_missing()
    if missing:
        pytest.skip(f"no SLURM: {missing}")
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(slurm_conf(folder, host))
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    daemons = [["munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
                f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge.seed"],
               ["slurmctld", "-i"], ["slurmd"]]
    try:
        for daemon in daemons:
            subprocess.run(daemon, env=env, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while sinfo_state(env) != "idle":
            assert time.monotonic() < deadline, f"the node did not come up: {sinfo_state(env)!r}"
            time.sleep(0.5)
        yield env
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def sinfo_state(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()


# The states of a job that has ended, as squeue shows it for a while after (MinJobAge, 5 minutes by default).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_state(env, job: str) -> str:
    """The job's state and reason, e.g. 'PENDING BeginTime'; '' where squeue did not answer (a busy controller), which
    must not pass for a job that has ended."""
    result = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T %r"], env=env, capture_output=True,
                            text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def slurm_story(env, job: str) -> str:
    """What SLURM says of the job now, and its controller's and node's log lines about it: why a test went wrong."""
    folder = Path(env["SLURM_CONF"]).parent
    lines = [f"job {job}: {job_state(env, job)!r}, node: {sinfo_state(env)!r}"]
    for log in ("slurmctld.log", "slurmd.log"):
        lines += [f"{log}: {line}" for line in (folder / log).read_text().splitlines()
                  if f"JobId={job}" in line or f"job {job}" in line or f"[{job}." in line]
    return "\n".join(lines)


def wait_for(condition, what: str, story=lambda: "", timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{story()}"
        time.sleep(0.5)


def test_a_job_preempted_by_scancel_checkpoints_is_requeued_and_ends_like_an_unbroken_run(
        cluster, tmp_path, tiny_shards, tmp_path_factory):
    output = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={output}", "slurm/train.sbatch",
                                f"--log_dir={tmp_path / 'logs'}", f"--checkpoint_dir={tmp_path / 'ck'}"],
                               cwd=ROOT, env=cluster, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip()
    wait_for(lambda: output.exists() and "\nstep:10/80 " in output.read_text(), "step 10")
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster, check=True)
    wait_for(lambda: "requeueing the job" in output.read_text(), "the requeue")
    (json_path,) = (tmp_path / "logs").glob("*.json")
    record = json.loads(json_path.read_text())
    step = record["steps_done"]
    assert record["status"] == "preempted" and record["preempted"]["checkpoint"] == str(tmp_path / "ck" / f"step_{step:06d}")
    # SLURM holds a requeued job back for a while before it starts again; not this one. The requeue revokes the job's
    # credential as of its second (whole seconds), and slurmd refuses a credential of that second: a start in the
    # same second fails with "Job credential revoked" and ends the job
    wait_for(lambda: job_state(cluster, job).startswith("PENDING"), "the job back in the queue",
             lambda: slurm_story(cluster, job))
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    wait_for(lambda: job_state(cluster, job).startswith(ENDED), "the job's end", lambda: slurm_story(cluster, job),
             timeout=600)

    text = output.read_text()
    assert f"job {job}, attempt 1, on " in text and f"job {job}, attempt 2, on " in text, slurm_story(cluster, job)
    record = json.loads(json_path.read_text())
    assert record["status"] == "finished" and record["resumed"] == [
        {"step": step, "checkpoint": str(tmp_path / "ck" / f"step_{step:06d}"), "world_size": 1}]
    unbroken = tiny_run_of("off", tiny_shards, tmp_path_factory)  # the tiny preset as run.sh runs it on a CPU
    assert {str(v["step"]): v["val_loss"] for v in record["val"]} == unbroken.val
