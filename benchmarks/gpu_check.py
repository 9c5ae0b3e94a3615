"""The GPU check in one command: the machine, tests/test_gpu.py, record 43 at world size 1 on synthetic GPT-2-shaped
shards with a cold compile cache and again with a warm one, torchrun on NCCL, and a profile of a few steps. Each
stage runs under a time limit, so that one that hangs or fails leaves the others' results; DIR/summary.md (the table
to read) and DIR/summary.json are rewritten as each stage starts and ends, and every stage's log lies beside them
with each line's time since the stage started. Without a GPU it is a dry run of every stage on the CPU with the tiny
preset, compiled in stages 3 and 4. Arguments after -- go to train_gpt.py in stages 3 to 6 (e.g.
-- --attention=varlen_attn).

    benchmarks/gpu_check.sh [--out DIR] [--stages 1,3] [--steps N] [--limit STAGE=SECONDS ...] [-- FLAGS]
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
MACHINE = """
import importlib.metadata, json, subprocess, sys
import torch
sys.path.insert(0, sys.argv[1])
import train_gpt as tg
facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
         "triton": getattr(tg.triton, "__version__", None), "gpu": None}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    facts.update(gpu=props.name, capability="%d.%d" % (props.major, props.minor), gpus=torch.cuda.device_count(),
                 memory_gib=round(props.total_memory / 2**30, 1),
                 driver=subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.split("\\n")[0].strip())
try:
    facts["flash_attn_4"] = tg.load_flash_attn_4()
except Exception as e:
    facts["flash_attn_4"] = None
    facts["flash_attn_4_problem"] = tg.first_line(e)
print(json.dumps(facts, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump(facts, f)
"""


@dataclasses.dataclass
class Stage:
    number: int
    name: str
    gpu_limit_s: int  # on one cold H100 or H200: the six sum to 530 s, so that the check ends within 9 minutes
    cpu_limit_s: int  # the dry run's, roomy for a busy 2-core machine
    purpose: str
    run: Callable


class Check:
    """What the stages share: where they write, the device, the flags for train_gpt.py, and the summary so far."""

    def __init__(self, args):
        self.out, self.work, self.flags = args.out, args.work, args.flags
        self.out.mkdir(parents=True, exist_ok=True)
        self.gpu = shutil.which("nvidia-smi") is not None and subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
        # timed steps of stages 3, 4 and 5, and the profile's warm-up and profiled steps; fewer in the dry run
        self.steps = {3: args.steps or 60, 4: 5, 5: 3, "profile": (4, 2)} if self.gpu else {
            3: args.steps or 4, 4: 2, 5: 2, "profile": (2, 1)}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not self.gpu:
            self.env.setdefault("OMP_NUM_THREADS", "1")  # the tiny model gains nothing from threads
        self.started = time.time()
        self.summary = {"format": "gpu_check/1", "dry_run": not self.gpu, "started_utc": utc_now(),
                        "train_gpt_flags": self.flags, "total_s": 0.0, "stages": []}

    @property
    def shards(self) -> Path:
        return self.work / ("shards" if self.gpu else "tiny_shards")

    @property
    def compile_cache(self) -> Path:
        return self.work / "compile_cache"

    def trainer_flags(self, stage: int, *flags: str) -> list[str]:
        data = [f"--train_files={self.shards}/train_*.bin", f"--val_files={self.shards}/val_*.bin",
                f"--log_dir={self.out / f'{stage}_records'}", f"--compile_cache={self.compile_cache}"]
        # on a GPU machine where torch sees no GPU, --device=cuda stops each run at once, saying so
        return [*(["--device=cuda"] if self.gpu else ["--preset=tiny"]), *data, *flags, *self.flags]

    def write_summary(self):
        self.summary["total_s"] = round(time.time() - self.started, 1)
        write_atomic(self.out / "summary.json", json.dumps(self.summary, indent=1) + "\n")
        write_atomic(self.out / "summary.md", summary_markdown(self.summary))


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_logged(command: list[str], log, started: float, deadline: float, env: dict) -> str:
    """Run command with its output in log, each line after its time since the stage started. Returns 'ok', 'failed'
    (non-zero exit) or 'timed out': 5 s before the deadline its process group gets SIGTERM, so that a trainer writes
    its record, and SIGKILL at the deadline."""
    grace = min(5.0, (deadline - started) / 5)
    if time.time() > deadline - grace:
        log.write(f"[{time.time() - started:7.1f}s] no time left for: {' '.join(command)}\n")
        return "timed out"
    log.write(f"[{time.time() - started:7.1f}s] $ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def copy():
        for line in proc.stdout:
            log.write(f"[{time.time() - started:7.1f}s] {line}")
            log.flush()
    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    status = None
    for sig, until in ((signal.SIGTERM, deadline - grace), (signal.SIGKILL, deadline)):
        try:
            proc.wait(timeout=max(until - time.time(), 0.1))
            break
        except subprocess.TimeoutExpired:
            status = "timed out"
            os.killpg(proc.pid, sig)
    proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what it left running (compile workers): the next stage gets the machine
    reader.join(timeout=10)
    if status is None:
        status = "ok" if proc.returncode == 0 else "failed"
    log.write(f"[{time.time() - started:7.1f}s] {status} (exit status {proc.returncode})\n")
    log.flush()
    return status


def run_python(check: Check, log, started, deadline, *args: str) -> str:
    return run_logged([sys.executable, *args], log, started, deadline, check.env)


# --- the stages: each returns (status, figures) -----------------------------------------------------------------

def machine(check, log, started, deadline):
    status = run_python(check, log, started, deadline, "-c", MACHINE, str(ROOT), str(check.out / "1_machine.json"))
    facts = json.loads((check.out / "1_machine.json").read_text()) if status == "ok" else {}
    return status, facts


def gpu_tests(check, log, started, deadline):
    """Its summary line, and each failure's first line (pytest's short summary); cut short, what ran until then."""
    status = run_python(check, log, started, deadline, "-m", "pytest", "tests/test_gpu.py", "-v", "-rfE",
                        "--tb=short", "-p", "no:cacheprovider")
    lines = log_lines(log.name)
    counts = next((line.strip("= ") for line in reversed(lines) if " in " in line and any(
        word in line for word in ("passed", "failed", "skipped", "error"))), None)
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if counts is None:  # stopped before its summary: the tests' own lines say how far it got
        outcomes = [line.split()[1] for line in lines if line.startswith("tests/test_gpu.py::") and len(line.split()) > 1]
        counts = "until stopped: " + (", ".join(f"{outcomes.count(o)} {o.lower()}" for o in (
            "PASSED", "FAILED", "SKIPPED", "ERROR") if o in outcomes) or "no test finished")
        failures = [line.split()[0] for line in lines if line.startswith("tests/test_gpu.py::") and " FAILED" in line]
    return status, {"result": counts, "failures": failures}


def log_lines(path) -> list[str]:
    """The log's lines without their time stamps."""
    return [line.split("] ", 1)[-1] for line in Path(path).read_text().splitlines()]


def make_shards(check, log, started, deadline) -> str:
    """Synthetic shards (kept in the work folder between checks): GPT-2-shaped on a GPU, the tiny preset's here."""
    train_shards = 4 if check.gpu else 1
    wanted = ["val_000000.bin"] + [f"train_{i:06d}.bin" for i in range(1, train_shards + 1)]
    if all((check.shards / name).is_file() for name in wanted):
        return "ok"
    shape = ["--vocab_size", "50257"] if check.gpu else [
        "--vocab_size", "1024", "--train_tokens_per_shard", "1000000", "--val_tokens", "20000"]
    shape += ["--train_shards", str(train_shards)]
    return run_python(check, log, started, deadline, "data/synthetic.py", *shape, "--out", str(check.shards))


def training_run(check, log, started, deadline, stage: int, *flags, torchrun=False):
    status = make_shards(check, log, started, deadline)
    if status == "ok":
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else []
        status = run_python(check, log, started, deadline, *launcher, "train_gpt.py",
                            *check.trainer_flags(stage, *flags))
    return status, record_figures(check.out / f"{stage}_records")


def record_figures(folder: Path) -> dict:
    """The figures of the trainer's record in folder: start-up split, speed, memory, validation, kernels."""
    records = sorted(folder.glob("*.json"))
    if not records:
        return {}
    record = json.loads(records[-1].read_text())
    val = record.get("val") or []
    env = record.get("env") or {}
    return {"record": str(records[-1]), "status": record.get("status"), "steps_done": record.get("steps_done"),
            "startup_s": record.get("startup_s"), "startup": record.get("startup"),
            "step_avg_ms": record.get("step_avg_ms"), "tokens_per_s": record.get("tokens_per_s"),
            "mfu": record.get("mfu"), "peak_memory_allocated_mib": record.get("peak_memory_allocated_mib"),
            "peak_memory_reserved_mib": record.get("peak_memory_reserved_mib"),
            "val_first": val[0] if val else None, "val_last": val[-1] if len(val) > 1 else None,
            "kernels": {k: env.get(k) for k in ("lm_head", "attention", "torch_compile")},
            "compile": record.get("compile"), "error": record.get("error")}


def compiled_on_the_cpu(check) -> list[str]:
    """In the dry run, stages 3 and 4 compile the tiny model, so that the cold and the warm compile cache differ there
    as on a GPU, where --compile=auto is on; the later stages run it eagerly, to keep the dry run short."""
    return [] if check.gpu else ["--compile=on"]


def cold_run(check, log, started, deadline):
    shutil.rmtree(check.compile_cache, ignore_errors=True)
    return training_run(check, log, started, deadline, 3, f"--max_steps={check.steps[3]}", *compiled_on_the_cpu(check))


def short_val(check) -> list[str]:
    """Validation in 4 forwards of the record's shape instead of 40, where only the start-up and steps matter (the
    tiny preset's is short already)."""
    return ["--val_tokens=1048576"] if check.gpu else []


def warm_run(check, log, started, deadline):
    return training_run(check, log, started, deadline, 4, f"--max_steps={check.steps[4]}", *short_val(check),
                        *compiled_on_the_cpu(check))


def torchrun_run(check, log, started, deadline):
    return training_run(check, log, started, deadline, 5, f"--max_steps={check.steps[5]}", "--warmup_steps=0",
                        *short_val(check), torchrun=True)


def profile(check, log, started, deadline):
    status = make_shards(check, log, started, deadline)
    table = check.out / "6_profile.json"
    if status == "ok":
        warmup, steps = check.steps["profile"]
        status = run_python(check, log, started, deadline, "benchmarks/profile_steps.py", f"--out={table}",
                            f"--warmup={warmup}", f"--steps={steps}", *check.trainer_flags(6, *short_val(check)))
    return status, json.loads(table.read_text()) if status == "ok" else {}


STAGES = [
    Stage(1, "machine", 30, 120, "GPU, capability, memory, driver, torch / Triton / CUDA, flash-attn-4: one Python "
          "that imports them (CUDA's start and flash-attn-4's import take seconds)", machine),
    Stage(2, "tests/test_gpu.py", 80, 180, "the CUDA paths against the CPU-checked ones; its compiled tests compile "
          "small graphs from scratch", gpu_tests),
    Stage(3, "record 43, cold compile cache", 270, 240, "world size 1 on synthetic GPT-2-shaped shards (made in about "
          "10 s): start-up with the model's training and evaluation graphs and the optimizers' steps compiled from "
          "scratch in the warm-up of two steps and one validation batch (most of the limit), validation at step 0 "
          "and at the end, and the 60 timed steps between (about 30 s)", cold_run),
    Stage(4, "record 43, warm compile cache", 70, 180, "the same start-up with the kernels stage 3 left in the "
          "compile cache, then 5 steps and short validations", warm_run),
    Stage(5, "torchrun, 1 process", 40, 180, "the NCCL path: no warm-up, 3 steps, kernels from the cache",
          torchrun_run),
    Stage(6, "profile", 40, 180, "the training graph from the cache, 4 warm-up steps, then 2 (an even and an odd "
          "one) under torch.profiler, whose tables take seconds to build", profile),
]


def run_stage(check: Check, stage: Stage, limit: float) -> float:
    """Run the stage within its limit, with the summary rewritten as it starts and ends; returns its seconds."""
    entry = {"number": stage.number, "name": stage.name, "purpose": stage.purpose, "limit_s": limit,
             "status": "running", "seconds": None, "log": f"{stage.number}_log.txt", "figures": {}, "problem": None}
    check.summary["stages"].append(entry)
    check.write_summary()
    started = time.time()
    with open(check.out / entry["log"], "w") as log:
        try:
            status, figures = stage.run(check, log, started, started + limit)
        except Exception as e:  # the driver's own mistake, kept to this stage
            status, figures = "failed", {}
            log.write(f"gpu_check: {type(e).__name__}: {e}\n")
    entry.update(status=status, seconds=round(time.time() - started, 1), figures=figures)
    if status != "ok":
        entry["problem"] = problem_line(check.out / entry["log"], status, limit)
    check.write_summary()
    print(f"stage {stage.number} {stage.name}: {status} in {entry['seconds']:.0f} s"
          + (f": {entry['problem']}" if entry["problem"] else ""), flush=True)
    return min(entry["seconds"], limit)


def problem_line(log: Path, status: str, limit: float) -> str:
    """What stopped a stage: its error line, or, past its limit, the last thing it said and when."""
    stamped = [line for line in Path(log).read_text().splitlines()
               if line.split("] ", 1)[-1].strip() and not line.split("] ", 1)[-1].startswith(
                   ("$ ", "ok (", "failed (", "timed out ("))]
    lines = [line.split("] ", 1)[-1].strip() for line in stamped]
    if status == "timed out":
        last = f"its last line, at {stamped[-1].split('] ', 1)[0].strip('[ ')}: {lines[-1]}" if lines else "no output"
        return f"stopped at its limit of {limit:.0f} s; {last}"
    for wanted in (lambda line: line.startswith("error: "), lambda line: line.startswith(("FAILED ", "ERROR ")),
                   lambda line: "Error" in line, bool):
        found = [line for line in lines if wanted(line)]
        if found:
            return found[-1]
    return "no output"


# --- the summary ------------------------------------------------------------------------------------------------

def figures_text(number: int, f: dict) -> str:
    if not f:
        return ""
    if number == 1:
        if not f.get("gpu"):
            gpu = "no GPU (dry run on the CPU)"
        else:
            gpu = f"{f['gpu']} x{f['gpus']} (capability {f['capability']}), {f['memory_gib']} GiB, driver {f['driver']}"
        fa4 = f["flash_attn_4"] or f"not importable ({f.get('flash_attn_4_problem')})"
        return (f"{gpu}; Python {f['python']}, torch {f['torch']}, Triton {f['triton']}, CUDA {f['cuda']}; "
                f"flash-attn-4: {fa4}")
    if number == 2:
        return f.get("result") or ""
    if number == 6:
        top = f["rows"][0] if f["rows"] else None
        return (f"{f['steps']} steps at {f['step_ms']:.1f} ms; top {len(f['rows'])} {f['kind']} below"
                + (f"; first: {top['name'][:60]} {100 * top['share']:.1f}%" if top else ""))
    parts = []
    if f.get("startup"):
        s = f["startup"]
        parts.append(f"ready to train in {f['startup_s']:.1f} s (data and checks {s['data_s']:.1f}, model "
                     f"{s['model_s']:.1f}, compilation and warm-up {s['compile_and_warmup_s']:.1f})")
    elif f.get("status"):
        parts.append("never ready to train")
    if f.get("steps_done"):
        avg = f"{f['step_avg_ms']:.1f} ms/step, " if f.get("step_avg_ms") else ""
        parts.append(f"{f['steps_done']} steps: {avg}{f['tokens_per_s']:,.0f} tokens/s"
                     + (f", MFU {100 * f['mfu']:.1f}%" if f.get("mfu") else ""))
    if f.get("peak_memory_allocated_mib"):
        parts.append(f"peak {f['peak_memory_allocated_mib']:,} MiB allocated, {f['peak_memory_reserved_mib']:,} reserved")
    if f.get("val_first"):
        last = f" -> {f['val_last']['val_loss']:.4f} at {f['val_last']['step']}" if f.get("val_last") else ""
        parts.append(f"val loss {f['val_first']['val_loss']:.4f} at step {f['val_first']['step']}{last}")
    if f.get("compile"):
        parts.append(f"{f['compile'].get('model_graphs')} model graphs, "
                     f"{f['compile'].get('recompiles_after_warmup')} recompiles after warm-up, "
                     f"{f['compile'].get('cache_misses')} graphs compiled into the compile cache and "
                     f"{f['compile'].get('cache_hits')} found there")
    kernels = ", ".join(f"{k} {v}" for k, v in (f.get("kernels") or {}).items() if v)
    if kernels:
        parts.append(kernels)
    if f.get("status") not in (None, "finished"):
        parts.append(f"record: {f['status']}")
    return "; ".join(parts)


def summary_markdown(summary: dict) -> str:
    title = "GPU check" + (" (dry run on the CPU, tiny preset)" if summary["dry_run"] else "")
    lines = [f"# {title}, {summary['started_utc']}", "",
             f"{sum(s['status'] == 'ok' for s in summary['stages'])} of {len(summary['stages'])} stages ok in "
             f"{summary['total_s']:.0f} s" + (f"; train_gpt.py flags: {' '.join(summary['train_gpt_flags'])}"
                                              if summary["train_gpt_flags"] else ""), "",
             "| stage | result | seconds (limit) | figures |", "|---|---|---|---|"]
    for s in summary["stages"]:
        result = s["status"] + (f": {s['problem']}" if s["problem"] else "")
        seconds = f"{s['seconds']:.0f}" if s["seconds"] is not None else "..."
        lines.append(f"| {s['number']} {s['name']} | {cell(result)} | {seconds} ({s['limit_s']:.0f}) | "
                     f"{cell(figures_text(s['number'], s['figures']))} |")
    for s in summary["stages"]:
        if s["number"] == 2 and s["figures"].get("failures"):
            lines += ["", "## tests/test_gpu.py failures", ""] + [f"- {cell(f)}" for f in s["figures"]["failures"]]
        if s["number"] == 6 and s["figures"].get("rows"):
            f = s["figures"]
            lines += ["", f"## The {len(f['rows'])} {f['kind']} that take the most time ({f['step_ms']:.1f} ms "
                          "per step)", "", "| ms per step | share of the step | calls | name |", "|---|---|---|---|"]
            lines += [f"| {r['ms_per_step']:.3f} | {100 * r['share']:.1f}% | {r['calls']} | {cell(r['name'][:120])} |"
                      for r in f["rows"]]
    lines += ["", "Logs: `<stage>_log.txt` beside this file, each line with its time since the stage started."]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- the command ------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder of the summary and the logs "
                        "(default: logs/gpu_check/<UTC time>)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check",
                        help="folder of the synthetic shards, kept between checks, and of the compile cache, emptied "
                             "when stage 3 starts (default: $TMPDIR/gpu_check)")
    parser.add_argument("--stages", default="1,2,3,4,5,6", help="which stages to run, e.g. 3 (default: all)")
    parser.add_argument("--steps", type=int, help="timed steps of stage 3 (default: 60 on a GPU, 4 on the CPU)")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage, e.g. 3=400 on a slower GPU")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.flags = argv[split + 1:]
    numbers = {stage.number for stage in STAGES}
    try:
        args.stages = sorted({int(n) for n in args.stages.split(",")})
        args.limits = {int(k): float(v) for k, v in (item.split("=") for item in args.limit)}
    except ValueError:
        parser.error("--stages takes stage numbers, e.g. --stages=3,4; --limit takes STAGE=SECONDS, e.g. --limit=3=400")
    if not set(args.stages) | set(args.limits) <= numbers:
        parser.error(f"stages are numbered 1 to {len(STAGES)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1 (train_gpt.py's --max_steps=0 would run the whole record)")
    if args.out is None:
        args.out = ROOT / "logs" / "gpu_check" / utc_now().replace(":", "-")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args)
    print(("GPU check" if check.gpu else "No GPU: dry run of the GPU check on the CPU with the tiny preset")
          + f", stages {','.join(map(str, args.stages))}; summary: {check.out / 'summary.md'}", flush=True)
    spare = 0.0  # what earlier stages left of their limits goes to the next: the total stays within their sum
    for stage in STAGES:
        if stage.number in args.stages:
            limit = args.limits.get(stage.number, stage.gpu_limit_s if check.gpu else stage.cpu_limit_s) + spare
            spare = limit - run_stage(check, stage, limit)
    print((check.out / "summary.md").read_text(), end="")
    return 0 if all(s["status"] == "ok" for s in check.summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
