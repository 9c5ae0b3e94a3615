"""A torch.profiler table of a few training steps after warm-up: the model, optimizers and batches are built with
train_gpt's own functions, as train() builds them, and stepped with its train_step. On CUDA the table lists the
kernels that take the most GPU time; on a CPU, the operators that take the most CPU time. Each row's share is of
the profiled steps' wall-clock time.

    python benchmarks/profile_steps.py --out profile.json [--warmup 4] [--steps 3] [--rows 15] [train_gpt.py flags]
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg


def build(cfg: tg.Config, settings: contextlib.ExitStack):
    """Device, model, optimizers, batches and step shape, from train_gpt's checks and constructors, as train() makes them."""
    device, rank, world, _ = tg.setup_device(cfg)
    inputs = tg.check_inputs(cfg, rank, world, device, settings)
    raw_model = tg.build_model(cfg, device, world, inputs)
    model = torch.compile(raw_model, dynamic=False, fullgraph=True) if tg.compiles(cfg, device) else raw_model
    batches = tg.TrainBatches(inputs.train_files, cfg, rank, world, device)
    return device, model, tg.make_optimizers(cfg, raw_model), batches, inputs.grad_accum


def top_rows(profiler, device, seconds: float, rows: int) -> list[dict]:
    """The kernels (CUDA) or operators (CPU) with the most time of their own, in ms per step and share of the step."""
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if e.device_type == kind and getattr(e, own) > 0]
    events.sort(key=lambda e: getattr(e, own), reverse=True)
    return [{"name": e.key, "calls": e.count, "total_ms": getattr(e, own) / 1000,
             "share": getattr(e, own) / 1e6 / seconds} for e in events[:rows]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the table")
    parser.add_argument("--warmup", type=int, default=4, help="steps before the profiled ones (both kinds of step)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=15)
    args, flags = parser.parse_known_args(argv)
    cfg = tg.parse_config(flags)
    with contextlib.ExitStack() as settings:
        try:
            device, model, optimizers, batches, grad_accum = build(cfg, settings)
            windows = (tg.long_window(cfg, 0) // 2, tg.long_window(cfg, 0))
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            for step in range(args.warmup):
                tg.train_step(cfg, model, optimizers, batches, grad_accum, step, windows)
            sync()
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=activities) as profiler:
                started = time.perf_counter()
                for step in range(args.warmup, args.warmup + args.steps):
                    tg.train_step(cfg, model, optimizers, batches, grad_accum, step, windows)
                sync()
                seconds = time.perf_counter() - started
        finally:
            if tg.dist.is_initialized():
                tg.dist.destroy_process_group()
    table = top_rows(profiler, device, seconds, args.rows)
    result = {"device": device.type, "kind": "CUDA kernels" if device.type == "cuda" else "CPU operators",
              "steps": args.steps, "step_ms": 1000 * seconds / args.steps,
              "rows": [{**row, "ms_per_step": row["total_ms"] / args.steps} for row in table]}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.steps} profiled steps after {args.warmup}: {result['step_ms']:.1f} ms per step")
    for row in result["rows"]:
        print(f"{row['ms_per_step']:10.3f} ms/step {100 * row['share']:5.1f}%  {row['calls']:6d} calls  {row['name']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tg.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
