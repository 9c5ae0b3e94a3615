"""Record 43 of the NanoGPT speedrun: a 124M-parameter GPT trained on FineWeb GPT-2 tokens to 3.28
validation loss, with NorMuon + Adam and cautious weight decay scheduled as lr x wd.

    torchrun --standalone --nproc_per_node=8 train_gpt.py    # the record on 8 GPUs (any world size works)
    python train_gpt.py --preset=tiny                        # a small run on synthetic shards, CPU is fine
    python train_gpt.py --help                               # every hyperparameter with its default

Sections follow a batch: configuration, kernels, optimizers, model, data loading, training loop, checkpoints,
HellaSwag, analysis, logging.
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import functools
import glob
import importlib.metadata
import itertools
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# As the record: fewer fragmented blocks in the CUDA allocator. Read when CUDA starts, so it is set before torch loads.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.distributed.tensor import DTensor, Shard

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch paths below serve instead
    triton = None

# -----------------------------------------------------------------------------
# Configuration


class UserError(Exception):
    """A problem with the user's input: reported as one message and a non-zero exit, no traceback."""


class ConfigError(UserError):
    pass


def _arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = _arg("record43", "record43 | record42 | tiny: the base that the other flags override")
    # data
    train_files: str = _arg("data/fineweb10B/fineweb_train_*.bin", "glob of training shards, read in sorted order")
    val_files: str = _arg("data/fineweb10B/fineweb_val_*.bin", "glob of validation shards")
    val_tokens: int = _arg(10_485_760, "tokens per validation, a multiple of val_seq_tokens")
    val_seq_tokens: int = _arg(4 * 64 * 1024, "contiguous validation tokens per rank per forward")
    train_batch_tokens: int = _arg(8 * 16 * 2048, "training tokens per optimizer step, summed over ranks")
    micro_batch_tokens: int = _arg(16 * 2048, "most tokens per rank per forward; gradient accumulation does the rest")
    max_doc_tokens: int = _arg(2048, "training documents are cut to this many tokens")
    # model
    vocab_size: int = _arg(50257, "tokenizer vocabulary, BOS is its last token; the model pads it to a multiple of 128")
    model_dim: int = _arg(768, "width of the residual stream, = num_heads * head_dim")
    num_heads: int = _arg(6, "attention heads")
    head_dim: int = _arg(128, "width of one attention head")
    # schedules
    num_scheduled_iterations: int = _arg(2205, "steps over which lr and attention windows follow their schedules")
    num_extension_iterations: int = _arg(40, "steps after the schedule, at the floor lr and the extension window")
    cooldown_frac: float = _arg(0.5, "final fraction of the scheduled steps over which lr falls linearly")
    final_lr_frac: float = _arg(0.1, "lr multiplier at the end of the cooldown")
    window_block: int = _arg(128, "tokens per attention-window unit")
    window_schedule: tuple = _arg((3, 7, 11), "long window (blocks) in each equal part of the scheduled steps")
    window_extension: int = _arg(13, "long window (blocks) during the extension steps")
    window_final_val: int = _arg(20, "long window (blocks) of the final validation, without YaRN")
    # optimizers
    adam_lr: float = _arg(0.008, "Adam lr (embeddings, value embeddings, lm_head, scalars)")
    adam_beta1: float = _arg(0.65, "Adam beta1")
    adam_beta2: float = _arg(0.95, "Adam beta2")
    adam_eps: float = _arg(1e-8, "Adam eps")
    embed_lr_mul: float = _arg(75.0, "Adam lr multiplier of the token and value embeddings")
    scalar_lr_mul: float = _arg(5.0, "Adam lr multiplier of the scalar vector")
    muon_lr: float = _arg(0.03, "NorMuon lr (block matrices and gates)")
    mlp_in_lr_mul: float = _arg(2.0, "NorMuon lr multiplier of the MLP input matrices")
    weight_decay: float = _arg(1.2, "NorMuon weight decay; the applied decay is lr(t) x weight_decay")
    weight_decay_mode: str = _arg("cautious", "cautious (only where update and weight agree in sign) | decoupled | none")
    muon_momentum: float = _arg(0.95, "NorMuon momentum after warm-up")
    muon_momentum_min: float = _arg(0.85, "NorMuon momentum at the first step and the last")
    momentum_warmup_steps: int = _arg(300, "steps of linear momentum warm-up")
    momentum_cooldown_steps: int = _arg(50, "final steps of linear momentum cool-down")
    muon_beta2: float = _arg(0.95, "NorMuon second-moment decay")
    cautious_mask: str = _arg("ge", "where cautious decay applies, in NorMuon and the Adam group: "
                                    "ge (update x weight >= 0, record 43) | gt (> 0: not where the update is zero)")
    adam_group_optimizer: str = _arg("adam", "adam | lion: the optimizer of the embeddings, value embeddings, lm_head "
                                             "and scalars (the Adam group)")
    adam_weight_decay: float = _arg(0.0, "weight decay of the Adam group (Adam or Lion), applied as lr(t) x this x the "
                                         "parameter's wd_mul (0: none, as record 43)")
    adam_weight_decay_mode: str = _arg("cautious", "cautious (only where update and weight agree in sign) | decoupled")
    embed_wd_mul: float = _arg(150.0, "Adam-group weight-decay multiplier of the token embedding")
    value_embed_wd_mul: float = _arg(5.0, "Adam-group weight-decay multiplier of the value embeddings")
    lm_head_wd_mul: float = _arg(150.0, "Adam-group weight-decay multiplier of lm_head")
    scalar_wd_mul: float = _arg(0.0, "Adam-group weight-decay multiplier of the scalar vector")
    lion_beta1: float = _arg(0.9, "Lion: the update is sign(beta1 m + (1 - beta1) g)")
    lion_beta2: float = _arg(0.99, "Lion: the momentum is m = beta2 m + (1 - beta2) g")
    lion_lr_scale: float = _arg(0.3, "Lion's lr is adam_lr x this, with Adam's per-parameter multipliers (the Lion "
                                     "paper: 3 to 10 times smaller than AdamW's, as a sign step is larger)")
    # run
    target_val_loss: float = _arg(3.28, "the validation loss the run aims at: records/compare.py judges runs against "
                                        "it (the speedrun's 3.28; the tiny preset sets its own)")
    warmup_steps: int = _arg(2, "untimed training steps, then a validation of one batch, before the run; then all "
                                "state is reset. An even and an odd step compile every graph")
    val_loss_every: int = _arg(250, "steps between validations (0: only at the start and the end)")
    dense_val_every: int = _arg(0, "steps between validations over the last --dense_val_steps steps as well, to find "
                                   "the earliest step at which the loss reaches its target (0: none)")
    dense_val_steps: int = _arg(0, "the last steps before the run stops in which --dense_val_every applies")
    max_steps: int = _arg(0, "stop after this many steps with a final validation, schedules unchanged (0: no limit)")
    seed: int = _arg(0, "seed of the parameter initialisation")
    device: str = _arg("auto", "auto | cuda | cpu")
    compile: str = _arg("auto", "auto (on with CUDA) | on | off: torch.compile of the model; Polar Express, the "
                        "optimizers' math and the FP8 op bodies are compiled on CUDA either way")
    compile_cache: str = _arg("auto", "where compiled kernels persist between runs, so a second start is fast: auto "
                              "(.compile_cache/ beside this script) | off (compile from scratch) | a folder")
    fp8_head: str = _arg("auto", "auto (on GPUs of compute capability 8.9+: H100, H200, B200, L40S, RTX 4090) | on | "
                         "off: the lm_head's FP8 matmul in training; bf16 when off")
    attention: str = _arg("auto", "auto (flash-attn-4 where it is installed, the GPU is a Hopper or Blackwell and it "
                          "passes a start-up check against varlen_attn; else varlen_attn) | flash-attn-4 | varlen_attn: "
                          "the CUDA attention kernel")
    log_dir: str = _arg("logs", "folder of the record files")
    checkpoint: str = _arg("", "where rank 0 saves the final model's state_dict (empty: not saved)")
    save_every: int = _arg(0, "steps between checkpoints that resume the run exactly, plus one at the end (0: none)")
    keep_checkpoints: int = _arg(2, "how many of the newest checkpoints to keep")
    checkpoint_dir: str = _arg("checkpoints", "folder of the run's checkpoints, step_<S>/ each; one run per folder")
    resume: str = _arg("", "checkpoint folder to continue, or auto: the newest in --checkpoint_dir (none there: start afresh)")
    collective_timeout: int = _arg(120, "seconds a rank waits in a collective for the others after the warm-up before "
                                        "the run stops naming it (start-up and warm-up, which compile, get 30 minutes)")
    hellaswag: str = _arg("", "tokenized HellaSwag examples to score after training, as data/hellaswag.py makes them "
                              "(data/hellaswag/hellaswag_val.json); empty: none")
    analysis: str = _arg("on", "on | off: at every validation, outside the training time, each parameter group's mean "
                               "square, the share of coordinates cautious decay reached on the step before, and the "
                               "matrices' condition numbers, in the log and the record")

    @property
    def num_iterations(self) -> int:
        return self.num_scheduled_iterations + self.num_extension_iterations

    @property
    def bos_id(self) -> int:
        return self.vocab_size - 1


PRESETS = {
    "record43": {},
    "record42": dict(num_scheduled_iterations=2245, weight_decay=0.0),
    # a smoke run that learns: about 2 minutes on a CPU core, val loss 6.93 -> about 4.7 (data/synthetic.py shards).
    # Its target is the top of a healthy run's range: seeds 0-3 ended at 4.7159, 4.6316, 4.7161, 4.7041 (mean 4.692,
    # std 0.041), so a healthy run reaches 4.8 and a broken one (a bad learning rate: above 5) does not.
    "tiny": dict(train_files="data/synthetic/train_*.bin", val_files="data/synthetic/val_*.bin",
                 vocab_size=1024, model_dim=64, num_heads=2, head_dim=32,
                 train_batch_tokens=8 * 256, micro_batch_tokens=256, val_seq_tokens=512, val_tokens=16 * 512,
                 max_doc_tokens=256, window_block=16, num_scheduled_iterations=72, num_extension_iterations=8,
                 adam_lr=0.03, embed_lr_mul=20.0, momentum_warmup_steps=30, momentum_cooldown_steps=5,
                 val_loss_every=20, target_val_loss=4.8),
}
CHOICES = {"preset": tuple(PRESETS), "device": ("auto", "cuda", "cpu"), "compile": ("auto", "on", "off"),
           "fp8_head": ("auto", "on", "off"), "attention": ("auto", "flash-attn-4", "varlen_attn"),
           "weight_decay_mode": ("cautious", "decoupled", "none"),
           "cautious_mask": ("ge", "gt"), "adam_group_optimizer": ("adam", "lion"),
           "adam_weight_decay_mode": ("cautious", "decoupled"), "analysis": ("on", "off")}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
METAVARS = {str: "TEXT", int: "INT", float: "NUMBER", tuple: "INT,INT,..."}


class FlagParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message}; see --help")


def flag_parser() -> FlagParser:
    """A flag per Config field, as --name=value or --name value; the last of a repeated flag wins."""
    presets = "; ".join(f"{name}: {over or 'the spec'}" for name, over in PRESETS.items())
    parser = FlagParser(prog="train_gpt.py", usage="[torchrun ...] train_gpt.py [--name=value | --name value ...]",
                        description="Every hyperparameter, with its record43 default (a --preset changes some of them).",
                        epilog=f"presets: {presets}", allow_abbrev=False)
    for f in dataclasses.fields(Config):
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        parser.add_argument(f"--{f.name}", type=lambda text, name=f.name: parse_value(name, text),
                            default=argparse.SUPPRESS, metavar=METAVARS[type(f.default)],
                            help=f"{f.metadata['help']} (default: {default})")
    return parser



def parse_value(name: str, text: str):
    kind = type(FIELDS[name].default)
    try:
        if kind is tuple:
            return tuple(int(part) for part in text.split(","))
        return kind(text)
    except ValueError:  # raised as ConfigError, which argparse lets through with this message
        expected, example = {tuple: ("comma-separated integers", "3,7,11"), int: ("an integer", "42"),
                             float: ("a number", "0.5")}[kind]
        raise ConfigError(f"--{name}={text}: expected {expected}, for example --{name}={example}")


def unknown_argument(arg: str) -> str:
    if not arg.startswith("--"):
        return f"unexpected argument {arg!r}: flags are --name=value or --name value; see --help"
    name = arg[2:].split("=", 1)[0]
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"unknown flag --{name}{hint}; see --help for the list"


def parse_config(argv) -> Config:
    """Build the Config: the preset's values, then each flag given on top."""
    given, extra = flag_parser().parse_known_args(argv)
    if extra:
        raise ConfigError(unknown_argument(extra[0]))
    given = vars(given)
    preset = given.get("preset", "record43")
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset}: unknown preset, choose one of {', '.join(PRESETS)}")
    cfg = dataclasses.replace(Config(), **PRESETS[preset])
    cfg = dataclasses.replace(cfg, **given)
    check_config(cfg)
    return cfg


# The valid range of every numeric setting, checked before any compute: each is in exactly one of these.
POSITIVE = ("val_tokens", "val_seq_tokens", "train_batch_tokens", "micro_batch_tokens", "max_doc_tokens", "vocab_size",
            "model_dim", "num_heads", "head_dim", "num_scheduled_iterations", "window_block", "window_extension",
            "window_final_val", "adam_lr", "adam_eps", "muon_lr", "lion_lr_scale", "keep_checkpoints",
            "target_val_loss", "collective_timeout")
NON_NEGATIVE = ("num_extension_iterations", "embed_lr_mul", "scalar_lr_mul", "mlp_in_lr_mul", "weight_decay",
                "momentum_warmup_steps", "momentum_cooldown_steps", "adam_weight_decay", "embed_wd_mul",
                "value_embed_wd_mul", "lm_head_wd_mul", "scalar_wd_mul", "warmup_steps", "val_loss_every",
                "dense_val_every", "dense_val_steps", "max_steps", "seed", "save_every")
FRACTIONS = ("cooldown_frac", "final_lr_frac")  # [0, 1]
MOMENTA = ("adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_min", "muon_beta2", "lion_beta1",
           "lion_beta2")  # [0, 1): 1 would never forget


def preset_value(cfg: Config, name: str):
    """The value of a setting in the run's preset: what a bad value is best replaced by."""
    return PRESETS.get(cfg.preset, {}).get(name, FIELDS[name].default)


def check_ranges(cfg: Config):
    for name in POSITIVE + NON_NEGATIVE + FRACTIONS + MOMENTA:
        value = getattr(cfg, name)
        if name in POSITIVE:
            wrong, allowed = not value > 0, "must be positive"
        elif name in NON_NEGATIVE:
            wrong, allowed = not value >= 0, "must not be negative"
        elif name in FRACTIONS:
            wrong, allowed = not 0 <= value <= 1, "must be in [0, 1]"
        else:
            wrong, allowed = not 0 <= value < 1, "must be in [0, 1)"
        if wrong or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"--{name}={value}: {allowed} (default {preset_value(cfg, name)})")


def check_config(cfg: Config):
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: choose one of {', '.join(allowed)}")
    check_ranges(cfg)
    if bool(cfg.dense_val_every) != bool(cfg.dense_val_steps):
        raise ConfigError(f"--dense_val_every={cfg.dense_val_every} --dense_val_steps={cfg.dense_val_steps}: give both "
                          "(validate every K steps over the last M), e.g. --dense_val_every=25 --dense_val_steps=200")
    if cfg.val_tokens % cfg.val_seq_tokens:
        raise ConfigError(f"--val_tokens={cfg.val_tokens} is not a multiple of --val_seq_tokens={cfg.val_seq_tokens}; "
                          f"use --val_tokens={max(1, cfg.val_tokens // cfg.val_seq_tokens) * cfg.val_seq_tokens}")
    if cfg.model_dim != cfg.num_heads * cfg.head_dim:
        raise ConfigError(f"--model_dim={cfg.model_dim} must equal num_heads * head_dim = {cfg.num_heads * cfg.head_dim}")
    if cfg.head_dim % 4:
        raise ConfigError(f"--head_dim={cfg.head_dim}: must be a multiple of 4 (half-truncated rotary)")
    if cfg.model_dim < GATE_INPUTS:
        raise ConfigError(f"--model_dim={cfg.model_dim}: the gates read the first {GATE_INPUTS} channels, use at least {GATE_INPUTS}")
    if cfg.vocab_size < 2 or cfg.vocab_size > 65536:
        raise ConfigError(f"--vocab_size={cfg.vocab_size}: shards hold uint16 tokens, so use 2..65536")
    if not cfg.window_schedule or min(cfg.window_schedule) <= 0:
        raise ConfigError(f"--window_schedule={cfg.window_schedule}: give positive window sizes, e.g. 3,7,11")


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(gradient-accumulation steps, tokens per rank per micro-step) that make up the global batch exactly."""
    grad_accum = max(1, cfg.train_batch_tokens // (world_size * cfg.micro_batch_tokens))
    micro_tokens, rest = divmod(cfg.train_batch_tokens, world_size * grad_accum)
    if rest or micro_tokens > cfg.micro_batch_tokens:
        per_rank, uneven = divmod(cfg.train_batch_tokens, world_size)
        if uneven:
            fix = "use a world size that divides it (1, 2, 4, 8, 16, ...) or change --train_batch_tokens"
        else:
            fits = max(d for d in range(1, cfg.micro_batch_tokens + 1) if per_rank % d == 0)
            fix = f"use --micro_batch_tokens={fits}, the most that divides the {per_rank} tokens of each process"
        raise ConfigError(f"the global batch of {cfg.train_batch_tokens} tokens cannot be split evenly over {world_size} "
                          f"processes with at most {cfg.micro_batch_tokens} tokens each per micro-step; {fix}")
    return grad_accum, micro_tokens


# -----------------------------------------------------------------------------
# Kernels: Polar Express (with a Triton path for the symmetric products), FP8 lm_head, attention

def compiled_on_cuda(fn):
    """fn compiled when its first argument is on a GPU, so that inductor fuses its elementwise work and casts; run
    eagerly elsewhere. Graphs specialise on Python numbers, so numbers that change between calls (a scheduled lr)
    must come as tensors, from device_scalar."""
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)

    @functools.wraps(fn)  # the eager fn stays reachable as __wrapped__
    def run(*args):
        return (compiled if args[0].is_cuda else fn)(*args)
    return run


def device_scalar(value: float, like: Tensor) -> Tensor:
    """value as a 0-dim float32 tensor on like's device, filled there: the host queues the fill and goes on."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
TRITON_MIN_ROWS = 128  # smaller matrices (the gates) are not worth a kernel launch per tile


@compiled_on_cuda
def polar_express(G: Tensor) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix in G (..., rows, cols), in bf16."""
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)).contiguous()
    use_triton = triton is not None and X.is_cuda and X.size(-2) >= TRITON_MIN_ROWS
    if use_triton:
        A = X.new_empty((*X.shape[:-1], X.size(-2)))
        B = torch.empty_like(A)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if use_triton:
            xxt(X, out=A)
            ba_plus_caa(A, alpha=c, beta=b, out=B)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.dim() == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a) if X.dim() == 3 else torch.addmm(X, B, X, beta=a)
    return X.mT if tall else X


if triton is not None:
    # A = X X^T and c A A + b A are symmetric: each program computes one output tile on or below the diagonal
    # (T(T+1)/2 of the T*T tiles) and writes it both at (r, c) and at (c, r), so the output is exactly symmetric.

    @triton.jit
    def _lower_tile(pid):
        """Map a program id to the tile pair (i, j) with j <= i, enumerating the lower triangle row by row."""
        i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1) / 2).to(tl.int32)
        # The float estimate can be off by one; fix it with exact integer checks.
        i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
        i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
        return i, pid - i * (i + 1) // 2

    @triton.jit
    def _sym_product_kernel(
        left_ptr, right_ptr, out_ptr, m,
        stride_lb, stride_lr, stride_lk,
        stride_rb, stride_rk, stride_rc,
        stride_ob, stride_or, stride_oc,
        alpha, beta,
        K: tl.constexpr, ADD_LEFT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out = alpha * left @ right (+ beta * left when ADD_LEFT), for one lower-triangle tile, mirrored. The inner
        dimension K is a constant: a run has three (X X^T of the attention's and the MLP's matrices, A A), compiled in
        the warm-up, and Triton 3.6's CPU interpreter cannot loop to a run-time bound under numpy 2.4."""
        tile_i, tile_j = _lower_tile(tl.program_id(0))
        batch = tl.program_id(1).to(tl.int64)
        left_ptr += batch * stride_lb
        right_ptr += batch * stride_rb
        out_ptr += batch * stride_ob

        rows = tile_i * BLOCK + tl.arange(0, BLOCK)
        cols = tile_j * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            # Zero padding past the edges adds nothing to the dot products.
            lhs = tl.load(left_ptr + rows[:, None] * stride_lr + ks[None, :] * stride_lk,
                          mask=(rows[:, None] < m) & (ks[None, :] < K), other=0.0)
            rhs = tl.load(right_ptr + ks[:, None] * stride_rk + cols[None, :] * stride_rc,
                          mask=(ks[:, None] < K) & (cols[None, :] < m), other=0.0)
            acc = tl.dot(lhs, rhs, acc)
        acc *= alpha
        in_bounds = (rows[:, None] < m) & (cols[None, :] < m)
        if ADD_LEFT:  # left is the square symmetric A here
            acc += beta * tl.load(left_ptr + rows[:, None] * stride_lr + cols[None, :] * stride_lk,
                                  mask=in_bounds, other=0.0).to(tl.float32)

        # On a diagonal tile keep only r >= c, so both halves come from the same numbers.
        keep = in_bounds & (rows[:, None] >= cols[None, :])
        result = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, result, mask=keep)
        tl.store(out_ptr + cols[None, :] * stride_or + rows[:, None] * stride_oc, result, mask=keep)

    def _check_block(name, value):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value}: tl.dot needs a power of two of at least 16; pass e.g. {name}=64")

    def _batched(t):
        return t if t.dim() == 3 else t.unsqueeze(0)

    def _launch(left, right, out, alpha, beta, add_left, block, block_k):
        """out = alpha * left @ right (+ beta * left), where the caller guarantees the product is symmetric."""
        _check_block("block", block)
        _check_block("block_k", block_k)
        left, right, out = _batched(left), _batched(right), _batched(out)
        batch, m, k_size = left.shape
        tiles = triton.cdiv(m, block)
        grid = (tiles * (tiles + 1) // 2, batch)
        _sym_product_kernel[grid](
            left, right, out, m,
            *left.stride(), *right.stride(), *out.stride(),
            float(alpha), float(beta),
            K=k_size, ADD_LEFT=add_left, BLOCK=block, BLOCK_K=block_k, num_warps=8, num_stages=3,
        )

    def _check_out(out, expected_shape, source, source_name):
        if out.shape != expected_shape or out.dtype != source.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {tuple(expected_shape)} {source.dtype}; "
                             f"allocate it with torch.empty({tuple(expected_shape)}, dtype={source.dtype})")
        # Tracing knows no data pointers; polar_express, the compiled caller, allocates its outputs apart.
        if not torch.compiler.is_compiling() and out.data_ptr() == source.data_ptr():
            raise ValueError(f"out is the same memory as {source_name}: tiles read {source_name} while others are "
                             "written, so the product cannot be done in place; pass a separate out tensor")

    def xxt(X, out, *, block=128, block_k=64):
        """out = X @ X^T for X of shape (B, m, n) or (m, n) with m <= n, accumulated in fp32, stored in X's dtype.

        Any m works (edges are masked); Polar Express uses it for matrices of 128 rows and more, where half the
        work pays off, and plain torch for the small gates. Defaults suit bf16 with m = 768 on an H100.
        """
        if X.dim() not in (2, 3):
            raise ValueError(f"X has shape {tuple(X.shape)}; expected (m, n) or (batch, m, n)")
        m, n = X.shape[-2:]
        if m > n:
            raise ValueError(f"X has {m} rows > {n} columns; pass X.mT so that rows <= columns (A = X X^T is "
                             "then the smaller Gram matrix)")
        _check_out(out, (*X.shape[:-2], m, m), X, "X")
        _launch(X, X.mT, out, 1.0, 0.0, False, block, block_k)
        return out

    def ba_plus_caa(A, alpha, beta, out, *, block=128, block_k=64):
        """out = alpha * A @ A + beta * A for A of shape (B, m, m) or (m, m), accumulated in fp32, stored in A's dtype.

        A must be symmetric (e.g. the output of xxt): only the lower triangle of the result is computed. Same sizes
        and defaults as xxt. Polar Express's b A + c A^2 is ba_plus_caa(A, alpha=c, beta=b, out=out).
        """
        if A.dim() not in (2, 3) or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"A has shape {tuple(A.shape)}; expected a square (m, m) or (batch, m, m) matrix")
        _check_out(out, A.shape, A, "A")
        _launch(A, A, out, alpha, beta, True, block, block_k)
        return out


# The lm_head in FP8: inputs divided by x_s and weights by w_s before the e4m3 cast, the product rescaled by both;
# in backward the output gradient is divided by grad_s before an e5m2 cast.
LM_HEAD_FP8_SCALES = {"x_s": 768 ** 0.5 / 448, "w_s": 2.0 ** -9, "grad_s": 1 / 448}


# The custom ops below are opaque to the model's compile, so their bodies are compiled on their own.
@compiled_on_cuda
def _fp8_forward(x: Tensor, w: Tensor, x_s: float, w_s: float):
    x_f8 = x.div(x_s).to(torch.float8_e4m3fn)
    w_f8 = w.div(w_s).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=device_scalar(x_s, x),
                           scale_b=device_scalar(w_s, x), use_fast_accum=True)
    return out, x_f8, w_f8


@compiled_on_cuda
def _fp8_backward_body(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float):
    g_f8 = g.div(grad_s).to(torch.float8_e5m2)
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                              scale_a=device_scalar(grad_s, g), scale_b=device_scalar(w_s, g), use_fast_accum=False)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=device_scalar(x_s, g), scale_b=device_scalar(grad_s, g), use_fast_accum=False).T
    return grad_x, grad_w


@torch.library.custom_op("train_gpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fp8_forward(x, w, x_s, w_s)


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    return x.new_empty((x.size(0), w.size(0))), x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)


@torch.library.custom_op("train_gpt::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor]:
    return _fp8_backward_body(g, x_f8, w_f8, x_s, w_s, grad_s)


@fp8_mm_backward.register_fake
def _(g, x_f8, w_f8, x_s, w_s, grad_s):
    return x_f8.new_empty(x_f8.shape, dtype=torch.bfloat16), w_f8.new_empty(w_f8.shape[::-1], dtype=torch.float32).T


def _fp8_setup_context(ctx, inputs, output):
    ctx.scales = inputs[2:]
    ctx.save_for_backward(output[1], output[2])


def _fp8_backward(ctx, grad_out, *_):
    grad_x, grad_w = fp8_mm_backward(grad_out, *ctx.saved_tensors, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_fp8_backward, setup_context=_fp8_setup_context)


# Attention on CUDA runs through two custom ops, a forward and a backward, that call the chosen kernel: varlen_attn's
# (the aten FlashAttention-2 ops that torch.nn.attention.varlen.varlen_attn calls, in the form torch 2.11 and 2.13
# share) or FlashAttention-4's (the flash-attn-4 package: kernels written in Python with CuTe DSL and compiled on first
# use, faster on Hopper and Blackwell, as FlashAttention-3 was for the record; its entry points of the version pinned
# in requirements-gpu.txt). The ops take the window as a 0-dim integer tensor on the CPU and read it on the host: the
# compiled model sees a tensor, whose value it does not guard on, so one graph serves every window and no GPU waits.
FLASH_ATTN_4_ARCHS = (9, 10)  # compute capability majors of Hopper and datacenter Blackwell
flash_attn_4 = None  # the module flash_attn.cute.interface, once loaded


def load_flash_attn_4() -> str:
    """Import FlashAttention-4 and return its version; ModuleNotFoundError where it is not installed."""
    global flash_attn_4
    import flash_attn.cute.interface as module
    flash_attn_4 = module
    return importlib.metadata.version("flash-attn-4")


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


@torch.library.custom_op("train_gpt::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window: Tensor,
                    kernel: str) -> tuple[Tensor, Tensor]:
    """attention() by `kernel`: the output and the log-sum-exp of each row (heads, T) for the backward."""
    left = int(window)
    if kernel == "flash-attn-4":
        return tuple(flash_attn_4._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
            softmax_scale=1.0, window_size_left=left, window_size_right=0, return_lse=True)[:2])
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, return_debug_mask=False, scale=1.0,
        window_size_left=left, window_size_right=0)[:2]
    return out, lse


@flash_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window, kernel):
    return torch.empty_like(q), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


@torch.library.custom_op("train_gpt::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                             max_seqlen: int, window: Tensor, kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    left = int(window)
    if kernel == "flash-attn-4":
        return tuple(flash_attn_4._flash_attn_bwd(
            q, k, v, out, grad.contiguous(), lse, softmax_scale=1.0, window_size_left=left, window_size_right=0,
            cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3])
    # without dropout the kernel reads no random state: these stand for it, as varlen_attn passes them
    seed, offset = torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, seed, offset, scale=1.0,
        window_size_left=left, window_size_right=0)
    return dq, dk, dv


@flash_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, window, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.max_seqlen, window, ctx.kernel = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, window)


def _flash_attention_backward(ctx, grad_out, _grad_lse):
    *saved, window = ctx.saved_tensors
    grads = flash_attention_backward(grad_out, *saved, ctx.max_seqlen, window, ctx.kernel)
    return *grads, None, None, None, None


flash_attention.register_autograd(_flash_attention_backward, setup_context=_flash_attention_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window: Tensor,
              kernel: str = "varlen_attn") -> Tensor:
    """Causal attention within documents, each query seeing at most `window` earlier tokens; (T, heads, dim).
    The caller folds the softmax scale into q. `window` is a 0-dim integer tensor on the CPU (GPT.windows makes it).
    On CUDA `kernel` picks flash-attn-4 or varlen_attn; on the CPU a masked SDPA serves as both, and as their
    reference, with its mask built from the window tensor, which keeps the compiled graph free of its value too."""
    if q.is_cuda or kernel == "flash-attn-4":
        return flash_attention(q, k, v, cu_seqlens, max_seqlen, window, kernel)[0]
    assert int(cu_seqlens.diff().max()) <= max_seqlen, "max_seqlen is below the longest document (CUDA would skip rows)"
    pos = torch.arange(q.size(0), device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    offset = pos[:, None] - pos[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (offset >= 0) & (offset <= window)
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=1.0)
    return y.transpose(0, 1)


def attention_mismatch(kernel: str, device, heads: int, head_dim: int) -> str | None:
    """Run `kernel` against the reference (varlen_attn on CUDA, the masked path on the CPU) on documents of several
    lengths, at a window short enough that an off-by-one shows and at one longer than every document; forward and
    gradients. Returns what differs, or None."""
    lengths = [700, 37, 1, 310]  # one document longer than either window's reach, one of a single token
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(sum(lengths), heads, head_dim, generator=gen, device=device, dtype=dtype)
                     for _ in range(4))
    q = q * head_dim ** -0.5
    for window in (8, 1024):
        results = []
        for name in (kernel, "varlen_attn"):
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            try:
                out = attention(*qkv, cu_seqlens, max(lengths), torch.tensor(window), name)
                out.backward(grad)
            except Exception as e:  # a kernel that fails to compile or launch is a mismatch, not a crash
                return f"{name} raised {first_line(e)}"
            results.append([out.detach().float(), *(t.grad.float() for t in qkv)])
        for what, got, want in zip(("output", "dq", "dk", "dv"), *results):
            error = ((got - want).norm() / want.norm()).item()
            if not error < 0.02:  # bf16 kernels that agree differ by a few tenths of a percent
                return f"its {what} differs from varlen_attn's by {error:.1%} at window {window}"
    return None


# -----------------------------------------------------------------------------
# Optimizers: NorMuon with cautious weight decay for matrices, sharded Adam (or Lion) for the rest


# Their *_single successors are missing from torch 2.11, which GPU images ship.
warnings.filterwarnings("ignore", message=r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")


def reduce_scatter_mean(full: Tensor):
    """Start averaging `full` over ranks along dim 0; returns this rank's slice and a wait() for it."""
    world = dist.get_world_size()
    if world == 1:
        return full, lambda: None
    local = full.new_empty((full.size(0) // world, *full.shape[1:]))
    work = dist.reduce_scatter_tensor(local, full, op=dist.ReduceOp.AVG, async_op=True)
    return local, work.wait


def all_gather_into(full: Tensor, local: Tensor):
    """Start gathering every rank's `local` into `full` along dim 0; returns a wait()."""
    if dist.get_world_size() == 1:
        if local.data_ptr() != full.data_ptr():
            full.copy_(local)
        return lambda: None
    return dist.all_gather_into_tensor(full, local, async_op=True).wait


def cautious_mask(update: Tensor, W: Tensor, mask: str) -> Tensor:
    """Where cautious decay applies, so that it never pulls against the step: update * W >= 0 (mask ge, record 43)
    or > 0 (gt, which also leaves alone the coordinates that the update does not move)."""
    product = update * W
    return product > 0 if mask == "gt" else product >= 0


def decay_term(update: Tensor, W: Tensor, wd, mode: str, mask: str) -> Tensor:
    """What weight decay adds to an update before the lr scales it: wd * W (decoupled), or, cautious, wd * W only
    where the update and W agree in sign (cautious_mask)."""
    if mode == "decoupled":
        return wd * W
    return wd * cautious_mask(update, W, mask) * W


def count_decayed_(decayed: Tensor, update: Tensor, W: Tensor, mask: str):
    """decayed[i] = the coordinates of the i-th of decayed.numel() equal parts of W (one per matrix) where cautious
    decay applies; written on the device, for the analysis at the next validation to read."""
    decayed.copy_(cautious_mask(update, W, mask).reshape(decayed.numel(), -1).sum(-1))


class NorMuon(torch.optim.Optimizer):
    """Momentum, Polar Express orthogonalisation, per-column second-moment normalisation, and weight decay scaled by
    the scheduled lr, optionally masked to coordinates where update and weight agree in sign.

    Each param group holds parameters of one shape, dealt out to ranks whole: gradients are averaged by one
    reduce-scatter per group and updated weights shared by one all-gather. A parameter may carry `lr_mul` and
    `matrices`: that many equal matrices stored back to back (param.view(matrices, rows, cols // matrices)), each
    orthogonalised and normalised on its own. The second moment keeps one value per column of each matrix, so the
    model stores its matrices with the features that the record normalises as columns: the input features of Q, K,
    V, O, the gates and the MLP's output matrix, and the hidden units of the MLP's input matrix.
    """

    def __init__(self, param_groups, lr: float, weight_decay: float, weight_decay_mode: str, momentum: float, beta2: float,
                 cautious_mask: str = "ge", count_decayed: bool = False):
        super().__init__(param_groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2))
        self.weight_decay_mode, self.cautious_mask = weight_decay_mode, cautious_mask
        # count_decayed: per run (keyed by its first parameter), the coordinates cautious decay applied to on the
        # last step, one count per matrix, kept on the device (not in `state`: it is not checkpointed)
        self.decayed = {} if count_decayed else None
        for group in self.param_groups:
            first = group["params"][0]
            if any(p.shape != first.shape or p.dtype != first.dtype for p in group["params"]):
                raise ValueError("NorMuon: every param group must hold matrices of one shape and dtype")

    @torch.no_grad()
    def step(self):
        scattered = [self._scatter_grads(group) for group in self.param_groups]
        gathers = [self._update_group(group, *pending) for group, pending in zip(self.param_groups, scattered)]
        for wait in gathers:
            wait()

    def counts_decayed(self, group) -> bool:
        """Whether the steps count, for `group`, the coordinates cautious decay applies to."""
        return self.decayed is not None and self.weight_decay_mode == "cautious" and bool(group["weight_decay"])

    @staticmethod
    def _per_rank(group) -> int:
        """Slots of `group` per rank: its parameters dealt out whole, the last rank's share padded."""
        return math.ceil(len(group["params"]) / dist.get_world_size())

    def _scatter_grads(self, group):
        params = group["params"]
        per_rank = self._per_rank(group)
        padding = [torch.zeros_like(params[0])] * (per_rank * dist.get_world_size() - len(params))
        return reduce_scatter_mean(torch.stack([p.grad for p in params] + padding))

    def my_runs(self, group) -> list[list[Tensor]]:
        """The parameters of `group` that this rank updates, in runs of one kind (a rank may hold attention and MLP
        matrices), each updated as one batch. A run's state is kept under its first parameter, every tensor of it
        stacking the run's members along dim 0."""
        per_rank = self._per_rank(group)
        mine = group["params"][dist.get_rank() * per_rank:][:per_rank]
        return [list(run) for _, run in itertools.groupby(mine, key=lambda p: getattr(p, "matrices", 1))]

    def _update_group(self, group, local_grads: Tensor, wait_grads):
        params = group["params"]
        per_rank = local_grads.size(0)
        wait_grads()
        done = 0
        for run in self.my_runs(group):
            weights = torch.stack(run)
            self._update(group, run, weights, local_grads[done:done + len(run)])
            local_grads[done:done + len(run)] = weights  # the gradient buffer doubles as the all-gather's send buffer
            done += len(run)
        gathered = local_grads.new_empty((per_rank * dist.get_world_size(), *local_grads.shape[1:]))
        wait_gather = all_gather_into(gathered, local_grads)

        def finish():
            wait_gather()
            torch._foreach_copy_(params, list(gathered.unbind(0)[:len(params)]))
        return finish

    def _update(self, group, run: list, W: Tensor, G: Tensor):
        """One NorMuon step for this rank's parameters W (n, rows, cols), all of one kind, with mean gradients G."""
        matrices = getattr(run[0], "matrices", 1)
        rows, cols = run[0].size(0), run[0].size(1) // matrices  # of each matrix
        state = self.state[run[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
            state["second_moment"] = torch.zeros((len(run) * matrices, 1, cols), dtype=torch.float32, device=W.device)
            # built once: a tensor from a Python list on the GPU makes the host wait for the queue
            state["lr_mul"] = torch.tensor([getattr(p, "lr_mul", 1.0) for p in run], device=W.device).view(-1, 1, 1)
        m, lr = group["momentum"], group["lr"]
        # 1 - m is rounded to float32 from the double, as the record's Python number is; 1 - float32(m) would differ
        U = normuon_momentum(G, state["momentum_buffer"], device_scalar(m, W), device_scalar(1 - m, W))
        O = polar_express(U.view(-1, rows, cols))
        lr_eff = device_scalar(lr * max(1.0, rows / cols) ** 0.5, W)
        wd_eff = device_scalar(lr * group["weight_decay"], W)
        decayed = None
        if self.counts_decayed(group):
            if run[0] not in self.decayed:
                self.decayed[run[0]] = torch.zeros(len(run) * matrices, dtype=torch.int64, device=W.device)
            decayed = self.decayed[run[0]]
        normuon_apply(W, O, state["second_moment"], state["lr_mul"], lr_eff, wd_eff, group["beta2"],
                      self.weight_decay_mode, self.cautious_mask, decayed)


@compiled_on_cuda
def normuon_momentum(G: Tensor, buf: Tensor, m: Tensor, one_minus_m: Tensor) -> Tensor:
    """Update NorMuon's momentum buffer with the mean gradients G; returns the Nesterov blend (1 - m) G + m buf."""
    G = G.float()
    buf.lerp_(G, one_minus_m)
    return G.lerp(buf, m)


@compiled_on_cuda
def normuon_apply(W: Tensor, O: Tensor, v: Tensor, lr_mul: Tensor, lr: Tensor, wd: Tensor, beta2: float, mode: str,
                  mask: str, decayed: Tensor | None = None):
    """The rest of a NorMuon step on W (n, rows, cols), from Polar Express's O (one entry per matrix): the second
    moment v's per-column normalisation, rescaled to O's norm before it, then the decay and the update, with lr the
    scheduled lr times sqrt(max(1, rows / cols)), lr_mul the members' multipliers and wd = scheduled lr x decay.
    decayed, where given, receives the count of coordinates cautious decay applies to, per matrix."""
    O = O.float()
    v.lerp_(O.square().mean(dim=-2, keepdim=True), 1 - beta2)
    norm_before = O.norm(dim=(-2, -1), keepdim=True)
    O = O * v.clamp_min(1e-10).rsqrt()
    O = (O * (norm_before / O.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))).view(W.shape)
    Wf = W.float()
    if decayed is not None:
        count_decayed_(decayed, O, Wf, mask)
    if mode != "none":
        O = O + decay_term(O, Wf, wd, mode, mask)
    W.copy_(Wf - lr * lr_mul * O)


class ShardedOptimizer(torch.optim.Optimizer):
    """The optimizers of the embeddings, lm_head and scalars, sharded along dim 0: the mean gradient is
    reduce-scattered, each rank updates rows [rank * n, (rank + 1) * n) of every tensor (n = rows / world) and the
    slices are all-gathered. A parameter may carry `lr_mul` and `wd_mul`; weight decay follows the scheduled lr
    like NorMuon's: W -= lr * lr_mul * (lr * weight_decay * wd_mul) * (mask) W, with the cautious mask taken from
    the update and the weights of the rank's own slice. Subclasses update one slice in `_update`, given its lr
    (scheduled, times lr_mul) and its decay (see decay_slice_)."""

    def __init__(self, params, defaults: dict, weight_decay_mode: str, cautious_mask: str, count_decayed: bool = False):
        super().__init__(params, defaults)
        self.weight_decay_mode, self.cautious_mask = weight_decay_mode, cautious_mask
        # count_decayed: per parameter, the coordinates of this rank's slice that cautious decay applied to on the
        # last step, on the device (not in `state`: it is not checkpointed)
        self.decayed = {} if count_decayed else None
        world = dist.get_world_size()
        for group in self.param_groups:
            for p in group["params"]:
                if p.size(0) % world:
                    raise ValueError(f"{type(self).__name__}: a {tuple(p.shape)} tensor cannot be split over {world} "
                                     "ranks along dim 0")

    @torch.no_grad()
    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        scattered = iter([reduce_scatter_mean(p.grad) for p in params])  # all launched before any is awaited
        rank = dist.get_rank()
        gathers = []
        for group in self.param_groups:
            for p in group["params"]:
                g, wait = next(scattered)
                wait()
                rows = p.size(0) // dist.get_world_size()
                p_local = p[rank * rows:(rank + 1) * rows]
                lr = group["lr"] * getattr(p, "lr_mul", 1.0)
                self._update(group, p_local, g, self.state[p], lr, self._decay(group, p, lr, p_local))
                gathers.append(all_gather_into(p, p_local))
        for wait in gathers:
            wait()

    def decays(self, group, p) -> bool:
        """Whether p is decayed at all: its group's decay times its own wd_mul."""
        return bool(group["weight_decay"] * getattr(p, "wd_mul", 1.0))

    def counts_decayed(self, group, p) -> bool:
        """Whether the steps count the coordinates of p that cautious decay applies to."""
        return self.decayed is not None and self.weight_decay_mode == "cautious" and self.decays(group, p)

    def _decay(self, group, p, lr: float, W: Tensor):
        """The decay of p's slice W for decay_slice_: None where p is not decayed, which is known without the
        scheduled lr, so that a compiled step keeps one graph."""
        if not self.decays(group, p):
            return None
        wd = group["lr"] * group["weight_decay"] * getattr(p, "wd_mul", 1.0)
        decayed = None
        if self.counts_decayed(group, p):
            if p not in self.decayed:
                self.decayed[p] = torch.zeros(1, dtype=torch.int64, device=W.device)
            decayed = self.decayed[p]
        return device_scalar(lr, W), device_scalar(wd, W), self.weight_decay_mode, self.cautious_mask, decayed


def decay_slice_(W: Tensor, update: Tensor, decay):
    """Decay the slice W in place from its weights before the step, with `update` the step's direction on the same
    slice; decay is None (no decay) or (lr, wd, mode, mask, decayed): W -= lr * decay_term(update, W, wd, mode, mask),
    with the count of coordinates decayed written to `decayed` where it is given."""
    if decay is not None:
        lr, wd, mode, mask, decayed = decay
        if decayed is not None:
            count_decayed_(decayed, update, W.float(), mask)
        # in float32, as NorMuon's: with a bf16 W the term would be rounded to bf16 twice before the step
        W.sub_(lr * decay_term(update, W.float(), wd, mode, mask))


class DistAdam(ShardedOptimizer):
    """Adam, bias-corrected as the record: W -= lr * lr_mul * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps),
    plus the optional weight decay. State has the parameter's dtype."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 weight_decay_mode: str = "cautious", cautious_mask: str = "ge", count_decayed: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), weight_decay_mode,
                         cautious_mask, count_decayed)

    def _update(self, group, W: Tensor, g: Tensor, state: dict, lr: float, decay):
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(W)
            state["exp_avg_sq"] = torch.zeros_like(W)
        state["step"] += 1
        t = state["step"]
        step_size = device_scalar(lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t), W)
        adam_step(W, g, state["exp_avg"], state["exp_avg_sq"], step_size, decay, beta1, beta2, group["eps"])


@compiled_on_cuda
def adam_step(W: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: Tensor, decay, beta1: float, beta2: float,
              eps: float):
    """One Adam step on the slice W in the record's form: eps is added to the raw sqrt(v), both bias corrections go
    into step_size."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt().add_(eps)
    decay_slice_(W, m, decay)  # m / (sqrt(v) + eps) has the sign of m
    # what addcdiv_ with value=-step_size computes on a CPU, in float32 (its value must be a number, not a tensor)
    W.copy_(W.float() - step_size * m.float() / denom.float())


class DistLion(ShardedOptimizer):
    """Lion: W -= lr * lr_mul * sign(beta1 m + (1 - beta1) g), then m = beta2 m + (1 - beta2) g; plus the optional
    weight decay. State has the parameter's dtype."""

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float = 0.0,
                 weight_decay_mode: str = "cautious", cautious_mask: str = "ge", count_decayed: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), weight_decay_mode, cautious_mask,
                         count_decayed)

    def _update(self, group, W: Tensor, g: Tensor, state: dict, lr: float, decay):
        beta1, beta2 = group["betas"]
        if not state:
            state["exp_avg"] = torch.zeros_like(W)
        lion_step(W, g, state["exp_avg"], device_scalar(lr, W), decay, beta1, beta2)


@compiled_on_cuda
def lion_step(W: Tensor, g: Tensor, m: Tensor, lr: Tensor, decay, beta1: float, beta2: float):
    """One Lion step on the slice W, then the momentum m."""
    update = m.lerp(g, 1 - beta1).sign_()
    decay_slice_(W, update, decay)
    W.sub_(lr * update)
    m.lerp_(g, 1 - beta2)


# -----------------------------------------------------------------------------
# Model

NUM_LAYERS = 12
GATE_INPUTS = 12  # the smear and attention gates read the first 12 channels
ATTENTION_LAYERS = [i for i in range(1, NUM_LAYERS) if i != 7]  # layer 0 is skipped, layer 7 has no attention
MLP_LAYERS = list(range(1, NUM_LAYERS))
VALUE_EMBED_OF_LAYER = {1: 1, 2: 2, 9: 0, 10: 1, 11: 2}
LONG_WINDOW_LAYERS = (4, 11)
SKIP_PUSH_LAYERS, SKIP_POP_LAYERS = range(1, 6), range(6, 11)  # U-net: outputs of 1..5 feed 10..6
BACKOUT_LAYER = 8
LOGIT_CAP, LOGIT_TEMPERATURE = 30.0, 7.5


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def next_multiple(n: int, k: int) -> int:
    return -(-n // k) * k


class Rotary(nn.Module):
    """Half-truncated rotary embedding with YaRN frequency scaling when the attention window grows.
    The attention scale lives here too, since YaRN changes it."""

    def __init__(self, head_dim: int, max_len: int, window_block: int):
        super().__init__()
        self.window_block = window_block
        self.register_buffer("angular_freq", torch.zeros(head_dim // 2), persistent=False)
        self.register_buffer("cos", torch.zeros(max_len, head_dim // 2, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("sin", torch.zeros(max_len, head_dim // 2, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("attn_scale", torch.zeros(()), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self):
        quarter = self.angular_freq.numel() // 2
        freq = (1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
        self.angular_freq.copy_(torch.cat([freq, freq.new_zeros(quarter)]))
        self.attn_scale.fill_(0.1)
        self._rebuild()

    @torch.no_grad()
    def _rebuild(self):
        theta = torch.outer(torch.arange(self.cos.size(0), dtype=torch.float32, device=self.cos.device), self.angular_freq)
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())

    @torch.no_grad()
    def extend_window(self, old: int, new: int):
        """YaRN: interpolate the frequencies that turn fewer than ~32 times over the old window."""
        turns = self.window_block * old * self.angular_freq / (2 * math.pi)
        keep = ((turns - 1) / 31).clamp(0, 1)
        ratio = old / new
        self.angular_freq.mul_(ratio + keep * (1 - ratio))
        self._rebuild()
        self.attn_scale.mul_(1 + 0.2 * math.log(new / old))

    def forward(self, x: Tensor) -> Tensor:  # (T, heads, head_dim)
        cos, sin = self.cos[:x.size(0), None, :], self.sin[:x.size(0), None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        # Wq, Wk, Wv, Wo back to back in memory, each (out, in) as F.linear takes it; stored dim x 4 dim like the
        # MLP matrices, so NorMuon can batch them together
        self.qkvo = nn.Parameter(torch.empty(dim, 4 * dim))
        self.qkvo.matrices = 4
        with torch.no_grad():
            self.qkvo.view(4, dim, dim)[:3].uniform_(-bound, bound)
            self.qkvo.view(4, dim, dim)[3].zero_()
        self.gate = nn.Parameter(torch.zeros(num_heads, GATE_INPUTS, dtype=torch.bfloat16))
        self.kernel = "varlen_attn"  # set by GPT.use_attention

    def forward(self, x, ve, v_lambdas, rotary: Rotary, cu_seqlens, max_seqlen: int, window: Tensor):
        T, dim = x.shape
        w = self.qkvo.type_as(x).view(4, dim, dim)
        q, k, v = F.linear(x, w[:3].flatten(0, 1)).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = (rotary(norm(q)).float() * rotary.attn_scale).type_as(x), rotary(norm(k))
        v = v_lambdas[0] * v + v_lambdas[1] * ve.view_as(v) if ve is not None else v_lambdas[0] * v
        y = attention(q, k, v, cu_seqlens, max_seqlen, window, self.kernel)
        y = y * torch.sigmoid(F.linear(x[:, :GATE_INPUTS], self.gate)).unsqueeze(-1)
        return F.linear(y.reshape(T, dim), w[3])


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        self.fc = nn.Parameter(torch.empty(dim, 4 * dim).uniform_(-bound, bound))  # used as x @ fc
        self.proj = nn.Parameter(torch.zeros(dim, 4 * dim))  # used as h @ proj^T

    def forward(self, x):
        return F.relu(x @ self.fc.type_as(x)).square() @ self.proj.type_as(x).T


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.attn = Attention(cfg.model_dim, cfg.num_heads, cfg.head_dim) if layer in ATTENTION_LAYERS else None
        self.mlp = MLP(cfg.model_dim)

    def forward(self, x, x0, lambdas, ve, v_lambdas, rotary, cu_seqlens, max_seqlen, window):
        x = lambdas[0] * x + lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, v_lambdas, rotary, cu_seqlens, max_seqlen, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config, max_seq_len: int, world_size: int):
        super().__init__()
        vocab, dim = next_multiple(cfg.vocab_size, 128), cfg.model_dim
        self.embed = nn.Embedding(vocab, dim).bfloat16()
        self.value_embeds = nn.ModuleList(nn.Embedding(vocab, dim).bfloat16() for _ in range(3))
        self.smear_gate = nn.Parameter(torch.zeros(1, GATE_INPUTS, dtype=torch.bfloat16))
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in MLP_LAYERS})
        self.lm_head = nn.Parameter(torch.zeros(vocab, dim, dtype=torch.bfloat16))
        self.rotary = Rotary(cfg.head_dim, max_seq_len, cfg.window_block)
        # one fp32 vector: skip weights, (a, b) residual mix per layer, value-embedding lambdas, smear, backout
        scalars = [torch.full((NUM_LAYERS,), -1.5), torch.tensor([1.0, 0.0]).repeat(NUM_LAYERS),
                   torch.tensor([0.5, 0.5]).repeat(NUM_LAYERS), torch.tensor([0.0, 0.5])]
        used = sum(s.numel() for s in scalars)
        self.scalars = nn.Parameter(torch.cat(scalars + [torch.ones(next_multiple(used, world_size) - used)]))
        self.fp8_head = False  # FP8 lm_head in training, set on CUDA

    def use_attention(self, kernel: str):
        for block in self.blocks.values():
            if block.attn is not None:
                block.attn.kernel = kernel

    def windows(self, short: int, long: int) -> tuple[Tensor, Tensor]:
        """forward's short_window and long_window for windows of `short` and `long` blocks: tokens, in 0-dim integer
        tensors on the CPU. The compiled graph takes tensors as inputs and guards on no value of theirs, so one graph
        serves every window of the schedule; the attention kernels read the values on the host."""
        return tuple(torch.tensor(blocks * self.rotary.window_block) for blocks in (short, long))

    def forward(self, inputs: Tensor, targets: Tensor | None, cu_seqlens: Tensor, max_seqlen: int, short_window: Tensor,
                long_window: Tensor):
        L = NUM_LAYERS
        s = self.scalars
        skip_weights, lambdas, v_lambdas = s[:L], s[L:3 * L].view(L, 2), s[3 * L:5 * L].view(L, 2)
        smear_lambda, backout_lambda = s[5 * L], s[5 * L + 1]
        value_embeds = [embed(inputs) for embed in self.value_embeds]

        x = self.embed(inputs)
        smear = smear_lambda * torch.sigmoid(F.linear(x[1:, :GATE_INPUTS], self.smear_gate))
        x = x0 = norm(torch.cat([x[:1], x[1:] + smear * x[:-1]]))
        skips, backout = [], None
        for i in MLP_LAYERS:
            if i in SKIP_POP_LAYERS:
                x = x + torch.sigmoid(skip_weights[i]) * skips.pop()
            window = long_window if i in LONG_WINDOW_LAYERS else short_window
            ve = value_embeds[VALUE_EMBED_OF_LAYER[i]] if i in VALUE_EMBED_OF_LAYER else None
            x = self.blocks[str(i)](x, x0, lambdas[i], ve, v_lambdas[i], self.rotary, cu_seqlens, max_seqlen, window)
            if i in SKIP_PUSH_LAYERS:
                skips.append(x)
            if i == BACKOUT_LAYER:
                backout = x
        x = norm(x - backout_lambda * backout)

        if self.training and self.fp8_head:
            logits = fp8_mm(x, self.lm_head, **LM_HEAD_FP8_SCALES)[0]
        else:
            logits = F.linear(x, self.lm_head.type_as(x))
        logits = LOGIT_CAP * torch.sigmoid(logits.float() / LOGIT_TEMPERATURE)
        if targets is None:  # sampling and HellaSwag read the logits themselves
            return logits
        return F.cross_entropy(logits, targets, reduction="sum" if self.training else "mean")


def make_optimizers(cfg: Config, model: GPT) -> tuple[NorMuon, ShardedOptimizer]:
    blocks = [model.blocks[str(i)] for i in MLP_LAYERS]
    for block in blocks:
        block.mlp.fc.lr_mul = cfg.mlp_in_lr_mul
    attn = [b.attn for b in blocks if b.attn is not None]
    # The 32 big matrices (10 attention, 22 MLP, all dim x 4 dim) fill the fewest slots, ceil(32 / world) per rank,
    # in two groups so that the second group's reduce-scatter overlaps the first group's update. On 8 ranks that is
    # the record's [10 attention + 6 MLP], [16 MLP]: no rank mixes the two kinds. Small gates go first, so their
    # communication finishes while the big groups are still on the way.
    big = [a.qkvo for a in attn] + [p for b in blocks for p in (b.mlp.fc, b.mlp.proj)]
    world = dist.get_world_size()
    slots_per_rank = math.ceil(len(big) / world)
    first_size = math.ceil(slots_per_rank / 2) * world
    matrix_groups = [[model.smear_gate], [a.gate for a in attn], big[:first_size], big[first_size:]]
    count_decayed = cfg.analysis == "on"
    normuon = NorMuon([dict(params=g) for g in matrix_groups if g], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                      weight_decay_mode=cfg.weight_decay_mode, momentum=cfg.muon_momentum, beta2=cfg.muon_beta2,
                      cautious_mask=cfg.cautious_mask, count_decayed=count_decayed)
    value_embeds = [e.weight for e in model.value_embeds]
    for p in [model.embed.weight, *value_embeds]:
        p.lr_mul = cfg.embed_lr_mul
    model.scalars.lr_mul = cfg.scalar_lr_mul
    model.embed.weight.wd_mul, model.lm_head.wd_mul = cfg.embed_wd_mul, cfg.lm_head_wd_mul
    model.scalars.wd_mul = cfg.scalar_wd_mul
    for p in value_embeds:
        p.wd_mul = cfg.value_embed_wd_mul
    params = [model.embed.weight, *value_embeds, model.lm_head, model.scalars]
    decay = dict(weight_decay=cfg.adam_weight_decay, weight_decay_mode=cfg.adam_weight_decay_mode,
                 cautious_mask=cfg.cautious_mask, count_decayed=count_decayed)
    if cfg.adam_group_optimizer == "lion":
        adam = DistLion(params, lr=cfg.adam_lr * cfg.lion_lr_scale, betas=(cfg.lion_beta1, cfg.lion_beta2), **decay)
    else:
        adam = DistAdam(params, lr=cfg.adam_lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **decay)
    for opt in (normuon, adam):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return normuon, adam


# -----------------------------------------------------------------------------
# Data loading: shards of uint16 tokens, BOS-aligned training batches, contiguous validation batches

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
HEADER_INTS = 256  # little-endian int32: magic, version, token count, then zeros
HEADER_BYTES = HEADER_INTS * 4


class DataError(UserError):
    pass


def read_shard_header(path) -> int:
    """Check a token shard's header against its size and return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: only {size} bytes, shorter than the {HEADER_BYTES}-byte shard header; "
                        "the file is truncated or not a token shard: delete it and download or generate it again")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: magic number {header[0]} is not {SHARD_MAGIC}, so this is not a token shard; "
                        "point --train_files / --val_files at .bin shards made by the tools in data/")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]} is not {SHARD_VERSION}; regenerate it with the tools in data/")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise DataError(f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
                        "it is truncated or corrupt: delete it and download or generate it again")
    return num_tokens


def list_shards(pattern: str, flag: str) -> list[Path]:
    """The shards matching `pattern`, each header checked, so a bad file fails the run before it starts."""
    files = sorted(Path(f) for f in glob.glob(pattern))
    if not files:
        raise DataError(f"--{flag}={pattern} matches no files; download FineWeb shards with "
                        "`python data/cached_fineweb10B.py`, make synthetic ones with `python data/synthetic.py`, "
                        f"or point --{flag} at your shards")
    for f in files:
        read_shard_header(f)
    return files


def load_shard(path: Path, vocab_size: int) -> Tensor:
    num_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)
    if tokens.size != num_tokens:
        raise DataError(f"{path}: could read only {tokens.size} of {num_tokens} tokens; download or generate it again")
    if num_tokens and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: holds token {int(tokens.max())}, outside --vocab_size={vocab_size}; "
                        "use shards made for this vocabulary or set --vocab_size")
    return torch.from_numpy(tokens)


def cu_seqlens_from_starts(starts: list[int], length: int, device) -> Tensor:
    """Cumulative document boundaries for the attention, padded with `length` to a multiple of 128 entries of
    at least length/300, so that the compiled graphs see few distinct shapes."""
    size = next_multiple(max(len(starts) + 1, length // 300), 128)
    cu = torch.full((size,), length, dtype=torch.int32, pin_memory=device.type == "cuda")
    cu[:len(starts)] = torch.tensor(starts, dtype=torch.int32)
    return cu.to(device, non_blocking=True)


def to_device(buf: Tensor, device) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from a buffer of length + 1 tokens."""
    non_blocking = device.type == "cuda"
    inputs = buf[:-1].to(device=device, dtype=torch.int32, non_blocking=non_blocking)
    targets = buf[1:].to(device=device, dtype=torch.int64, non_blocking=non_blocking)
    return inputs, targets


def document_starts(tokens: Tensor, path: Path, cfg: Config) -> np.ndarray:
    """Positions of the BOS tokens that start the shard's training documents."""
    starts = np.flatnonzero(tokens.numpy() == cfg.bos_id)
    if starts.size == 0:
        raise DataError(f"{path}: no BOS token ({cfg.bos_id}) in the shard, so it has no documents to train on; "
                        "check --vocab_size (BOS is its last token) or regenerate the shard")
    return starts


class DocumentStream:
    """The training shards' documents in order, packed into whole global batches. A shard that cannot fill the next
    global batch is left (that partial batch is dropped) and packing restarts at the next shard's first BOS, as in the
    8-GPU record run; since this is decided per global batch, every world size sees the same batches.
    The next shard is read and indexed on a background thread."""

    def __init__(self, files: list[Path], cfg: Config, next_file: int = 0, doc: int = 0):
        self.files, self.cfg = files, cfg
        self.next_file, self.tokens, self.doc = max(next_file - 1, 0), None, 0
        self._start_loading()
        if next_file:  # a position() of an earlier stream: open its current shard now, prefetch the one after
            self._next_shard()
            self.doc = doc

    def _start_loading(self):
        self._loaded = {}
        if self.next_file < len(self.files):
            path = self.files[self.next_file]
            self._thread = threading.Thread(target=self._load, args=(path,), daemon=True)
            self._thread.start()

    def _load(self, path):
        try:
            tokens = load_shard(path, self.cfg.vocab_size)
            starts = document_starts(tokens, path, self.cfg)
            lengths = np.minimum(np.diff(np.append(starts, tokens.numel())), self.cfg.max_doc_tokens)
            # packed[i]: tokens that the documents before document i contribute, each cut to max_doc_tokens
            self._loaded["shard"] = (tokens, starts, np.concatenate([[0], np.cumsum(lengths)]))
        except BaseException as e:
            self._loaded["error"] = e

    def _next_shard(self):
        if self.next_file >= len(self.files):
            raise DataError(f"the {len(self.files)} training shards ran out (a global batch never spans two shards); "
                            "download more (`python data/cached_fineweb10B.py 18`) or add shards to --train_files")
        self._thread.join()
        if "error" in self._loaded:
            raise self._loaded["error"]
        self.tokens, self.starts, self.packed = self._loaded["shard"]
        self.doc = 0
        self.next_file += 1
        self._start_loading()

    def next_batch(self, num_sequences: int, sequence_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(document starts, piece lengths) of each of the next num_sequences sequences of sequence_tokens tokens:
        whole documents from their BOS, each cut to max_doc_tokens (the rest of a longer one is skipped), the last
        one cut to fill the sequence exactly."""
        while True:
            if self.tokens is not None:
                batch = self._pack(num_sequences, sequence_tokens)
                if batch is not None:
                    return batch
            self._next_shard()

    def _pack(self, num_sequences: int, sequence_tokens: int):
        """The next batch from the current shard, or None (position unchanged) if the shard cannot fill it."""
        packed, doc, batch = self.packed, self.doc, []
        for _ in range(num_sequences):
            end = int(np.searchsorted(packed, packed[doc] + sequence_tokens))  # documents doc..end-1 fill it
            if end >= len(packed):
                return None
            lengths = np.diff(packed[doc:end + 1])
            lengths[-1] = sequence_tokens - (packed[end - 1] - packed[doc])
            batch.append((self.starts[doc:end], lengths))
            doc = end
        self.doc = doc
        return batch

    def tokens_of(self, starts: np.ndarray, lengths: np.ndarray, out: Tensor):
        torch.cat([self.tokens[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())], out=out)


class TrainBatches:
    """Per optimizer step one global batch of world x grad_accum packed sequences: micro-step i takes sequences
    i * world .. i * world + world - 1, one per rank in rank order; this rank keeps its own."""

    def __init__(self, files: list[Path], cfg: Config, rank: int, world: int, device):
        self.files, self.cfg, self.rank, self.world, self.device = files, cfg, rank, world, device
        self.grad_accum, self.micro_tokens = batch_split(cfg, world)
        self.reset()

    def reset(self):
        self.seek((0, 0))

    def position(self) -> tuple[int, int]:
        """Where the next global batch starts, the same on every rank and at every world size: (index of the next
        shard to open, document of the current shard). Taken between optimizer steps, when no sequence is pending."""
        assert not self.mine, "a step's sequences are still pending"
        return self.stream.next_file, self.stream.doc

    def seek(self, position: tuple[int, int]):
        """Go on from a position() of a loader over the same shards."""
        self.stream = DocumentStream(self.files, self.cfg, *position)
        self.mine = []

    def next(self):
        if not self.mine:
            self.mine = self.stream.next_batch(self.world * self.grad_accum, self.micro_tokens + 1)[self.rank::self.world]
        starts, lengths = self.mine.pop(0)
        buf = torch.empty(self.micro_tokens + 1, dtype=torch.uint16, pin_memory=self.device.type == "cuda")
        self.stream.tokens_of(starts, lengths, buf)
        doc_starts = np.cumsum(lengths) - lengths
        inputs, targets = to_device(buf, self.device)
        cu_seqlens = cu_seqlens_from_starts(doc_starts[doc_starts < self.micro_tokens].tolist(), self.micro_tokens, self.device)
        return inputs, targets, cu_seqlens, self.cfg.max_doc_tokens


def val_batches(files: list[Path], cfg: Config, rank: int, world: int, device) -> list[tuple]:
    """Contiguous (not BOS-aligned) chunks of val_seq_tokens, dealt to the ranks in turn and moved to the device
    once. The chunks do not depend on the world size, so neither does the validation loss."""
    need = cfg.val_tokens + 1
    have, shards = 0, []
    for f in files:
        if have >= need:
            break
        shards.append(load_shard(f, cfg.vocab_size))
        have += shards[-1].numel()
    if have < need:
        raise DataError(f"too few validation tokens: {', '.join(map(str, files))} hold {have}, but --val_tokens={cfg.val_tokens} "
                        f"needs {need}; lower --val_tokens (a multiple of --val_seq_tokens={cfg.val_seq_tokens}) "
                        "or add validation shards")
    tokens = torch.cat(shards)[:need]
    length = cfg.val_seq_tokens
    chunks = []
    for offset in range(rank * length, cfg.val_tokens, world * length):
        buf = tokens[offset:offset + length + 1].clone()
        starts = np.flatnonzero(buf[:-1].numpy() == cfg.bos_id).tolist()
        chunks.append((buf, starts if starts[:1] == [0] else [0] + starts))
    # the attention kernel's grid follows max_seqlen: the longest document here, not the whole chunk
    longest = max(int(np.diff(starts + [length]).max()) for _, starts in chunks) if chunks else length
    max_seqlen = min(length, next_multiple(longest, 128))
    return [(*to_device(buf, device), cu_seqlens_from_starts(starts, length, device), max_seqlen) for buf, starts in chunks]


# -----------------------------------------------------------------------------
# Training loop


class TrainingError(Exception):
    pass


def lr_multiplier(cfg: Config, step: int) -> float:
    """1 for the first part of the schedule, then linear down to final_lr_frac; extension steps stay there."""
    x = min(0.9999, step / cfg.num_scheduled_iterations)
    if x < 1 - cfg.cooldown_frac:
        return 1.0
    w = (1 - x) / cfg.cooldown_frac
    return w + (1 - w) * cfg.final_lr_frac


def muon_momentum(cfg: Config, step: int) -> float:
    low, high = cfg.muon_momentum_min, cfg.muon_momentum
    if step < cfg.momentum_warmup_steps:
        return low + (high - low) * step / cfg.momentum_warmup_steps
    cooldown_start = cfg.num_iterations - cfg.momentum_cooldown_steps
    if step > cooldown_start:
        return high - (high - low) * (step - cooldown_start) / cfg.momentum_cooldown_steps
    return high


def final_step(cfg: Config) -> int:
    """The step at which the run stops: the end of the schedule, or --max_steps before it."""
    return min(cfg.num_iterations, cfg.max_steps) if cfg.max_steps else cfg.num_iterations


def validates(cfg: Config, step: int, stop: int) -> bool:
    """Whether the run validates after `step` steps: at the start and at the stop, every --val_loss_every steps, and
    every --dense_val_every steps over the last --dense_val_steps before the stop."""
    if step in (0, stop) or (cfg.val_loss_every and step % cfg.val_loss_every == 0):
        return True
    return bool(cfg.dense_val_every) and step >= stop - cfg.dense_val_steps and step % cfg.dense_val_every == 0


def long_window(cfg: Config, step: int) -> int:
    if step >= cfg.num_scheduled_iterations:
        return cfg.window_extension
    return cfg.window_schedule[step * len(cfg.window_schedule) // cfg.num_scheduled_iterations]


def final_windows(cfg: Config, step: int) -> tuple[int, int]:
    """(short, long) attention windows for evaluating the model after `step` steps, as the final validation does:
    the last training step's short window and the wider final long window (the rotary state stays as trained)."""
    return long_window(cfg, max(step - 1, 0)) // 2, cfg.window_final_val


def set_schedules(cfg: Config, optimizers, step: int):
    normuon, adam = optimizers
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(cfg, step)
    for group in normuon.param_groups:
        group["momentum"] = muon_momentum(cfg, step)


class LossCheck:
    """Stops the run on a NaN or infinite training loss. On CUDA each step's loss is read one step late,
    so the GPU never idles waiting for the host; elsewhere at once. `latest` is the newest loss read."""

    def __init__(self, device):
        self.device, self.pending, self.latest = device, None, None

    def push(self, where: str, loss: Tensor):
        self.check()
        if self.device.type == "cuda":
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (where, host, event)
        else:
            self.pending = (where, loss.detach(), None)
            self.check()

    def check(self):
        if self.pending is None:
            return
        where, loss, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        self.latest = loss.item()
        if not math.isfinite(self.latest):
            raise TrainingError(f"{where}: training loss is {self.latest}; stopping the run. "
                                "Lower the learning rates or check the data of this step")


def train_step(cfg: Config, model, optimizers, batches: TrainBatches, grad_accum: int, step: int, windows) -> Tensor:
    """Forward and backward over the micro-batches, then the optimizers: even steps update the NorMuon matrices only,
    odd steps update everything, so Adam's parameters accumulate two steps of gradient. `windows`: (short, long)
    in blocks."""
    total = 0
    windows = model.windows(*windows)
    for _ in range(grad_accum):
        inputs, targets, cu_seqlens, max_seqlen = batches.next()
        loss = model(inputs, targets, cu_seqlens, max_seqlen, *windows) / grad_accum
        loss.backward()
        total = total + loss.detach()
    set_schedules(cfg, optimizers, step)
    normuon, adam = optimizers
    normuon.step()
    normuon.zero_grad(set_to_none=True)
    if step % 2 == 1:
        adam.step()
        adam.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model, batches: list, windows, device) -> float:
    """Mean loss over all ranks' chunks (a rank may hold one chunk fewer than another), at `windows` (short, long) in
    blocks."""
    model.eval()
    total = torch.zeros((), device=device)
    windows = model.windows(*windows)
    for inputs, targets, cu_seqlens, max_seqlen in batches:
        total += model(inputs, targets, cu_seqlens, max_seqlen, *windows)
    model.train()
    sum_and_count = torch.stack([total, torch.tensor(float(len(batches)), device=device)])
    dist.all_reduce(sum_and_count)
    loss = (sum_and_count[0] / sum_and_count[1]).item()
    if not math.isfinite(loss):
        raise TrainingError(f"validation loss is {loss}; stopping the run")
    return loss


ATTENTION_MIN_CAPABILITY, FP8_MIN_CAPABILITY = (8, 0), (8, 9)
# Dense bf16 tensor-core peaks (TFLOP/s) from the makers' data sheets, by a part of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("B200", 2250), ("A100", 312),
                    ("L40S", 362), ("RTX 4090", 165)]


def gpu_name_and_capability(device) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def check_gpu(cfg: Config, device):
    """Refuse a GPU the attention kernels cannot run on, and --fp8_head=on where there is no FP8."""
    if device.type != "cuda":
        if cfg.fp8_head == "on":
            raise ConfigError("--fp8_head=on needs a CUDA GPU of compute capability 8.9 or newer and this run is on the "
                              "CPU; leave --fp8_head=auto")
        return
    name, capability = gpu_name_and_capability(device)
    version = f"{name} (compute capability {capability[0]}.{capability[1]})"
    if capability < ATTENTION_MIN_CAPABILITY:
        raise ConfigError(f"{version} cannot run the varlen attention kernels, which need compute capability 8.0 or "
                          "newer (A100, RTX 30xx, H100 and later); use such a GPU or --device=cpu")
    if cfg.fp8_head == "on" and capability < FP8_MIN_CAPABILITY:
        raise ConfigError(f"--fp8_head=on: {version} has no FP8 matmuls, which need compute capability 8.9 or newer; "
                          "use --fp8_head=auto or --fp8_head=off (the lm_head then runs in bf16)")


def fp8_head_enabled(cfg: Config, device) -> bool:
    """Whether the lm_head trains in FP8; check_gpu has refused an impossible --fp8_head=on."""
    if device.type != "cuda" or cfg.fp8_head == "off":
        return False
    return cfg.fp8_head == "on" or gpu_name_and_capability(device)[1] >= FP8_MIN_CAPABILITY


class AttentionChoice(NamedTuple):
    kernel: str
    version: str | None = None  # flash-attn-4's, where it runs
    note: str | None = None  # why auto passed flash-attn-4 over, where it did


def choose_attention(cfg: Config, device) -> AttentionChoice:
    """This run's attention kernel. --attention=flash-attn-4 where it cannot run, or where it disagrees with
    varlen_attn, is an input error."""
    if device.type != "cuda":
        if cfg.attention == "flash-attn-4":
            raise ConfigError("--attention=flash-attn-4 needs a CUDA GPU and this run is on the CPU; leave --attention=auto")
        return AttentionChoice("masked_sdpa")
    if cfg.attention == "varlen_attn":
        return AttentionChoice("varlen_attn")
    name, capability = gpu_name_and_capability(device)
    problem = version = None
    if capability[0] not in FLASH_ATTN_4_ARCHS:
        problem = f"{name} is not a Hopper or Blackwell GPU (compute capability 9.x or 10.x)"
    else:
        try:
            version = load_flash_attn_4()
        except ModuleNotFoundError as e:
            problem = ("it is not installed (pip install -r requirements-gpu.txt)" if e.name.startswith("flash_attn")
                       else f"it cannot load: {first_line(e)}")
        except Exception as e:  # a broken install: say so, and train on varlen_attn unless flash-attn-4 was asked for
            problem = f"it cannot load: {first_line(e)}"
    if problem is None:
        problem = attention_mismatch("flash-attn-4", device, cfg.num_heads, cfg.head_dim)
    if problem is None:
        return AttentionChoice("flash-attn-4", version)
    if cfg.attention == "flash-attn-4":
        raise ConfigError(f"--attention=flash-attn-4: {problem}; use --attention=auto or --attention=varlen_attn")
    return AttentionChoice("varlen_attn", note=f"flash-attn-4 not used: {problem}")


def common_attention(choice: AttentionChoice) -> AttentionChoice:
    """The kernel every rank runs: flash-attn-4 only where its check passed on all of them, else varlen_attn with the
    first rank's reason for passing it over."""
    choices = [None] * dist.get_world_size()
    dist.all_gather_object(choices, choice)
    if all(c.kernel == choice.kernel for c in choices):
        return choice
    rank, other = next((r, c) for r, c in enumerate(choices) if c.kernel != "flash-attn-4")
    return AttentionChoice("varlen_attn", note=f"flash-attn-4 not used: on rank {rank}, "
                                               f"{other.note.removeprefix('flash-attn-4 not used: ')}")


def on_every_rank(value: bool) -> bool:
    """Whether `value` holds on all ranks: a choice that each rank could make differently, made once for all."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(values)


def peak_bf16_flops(device) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, where the table knows it."""
    if device.type != "cuda":
        return None
    name = gpu_name_and_capability(device)[0]
    return next((tflops * 1e12 for part, tflops in PEAK_BF16_TFLOPS if part in name), None)


def training_flops_per_token(cfg: Config, short_window: int, long_window: int) -> int:
    """Forward and backward FLOPs per training token: 6 per weight of every matmul (block matrices, gates, lm_head)
    and 12 x model_dim per key each query attends to (the layer's window in tokens, at most a whole document)."""
    dim, vocab = cfg.model_dim, next_multiple(cfg.vocab_size, 128)
    weights = (len(ATTENTION_LAYERS) * (4 * dim * dim + cfg.num_heads * GATE_INPUTS)
               + len(MLP_LAYERS) * 2 * dim * 4 * dim + dim * vocab + GATE_INPUTS)
    keys = sum(min(cfg.max_doc_tokens, (long_window if i in LONG_WINDOW_LAYERS else short_window) * cfg.window_block)
               for i in ATTENTION_LAYERS)
    return 6 * weights + 12 * dim * keys


def compiles(cfg: Config, device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


class ModelGraphs:
    """torch.compile's backend for the model: inductor's compile_fx, as by default, counting the graphs dynamo hands it.
    The warm-up compiles all of them. A graph compiled after it (a recompile, which the timed run pays for) is reported
    in one warning line with dynamo's reason when it first runs, as dynamo has recorded the reason by then. The counts
    go in the record's "compile", with how many graphs inductor found in the compile cache since the run began and
    how many it compiled into it, which tell a cold start from a warm one."""

    def __init__(self, log: "RunLog"):
        self.log, self.graphs, self.late = log, 0, None  # late: graphs compiled after the warm-up, None during it
        self.cache_before = inductor_cache_counts()
        self._report()

    def warmed_up(self):
        self.late = 0
        self._report()

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # loaded only where something compiles
        self.graphs += 1
        compiled = compile_fx(graph, example_inputs)
        if self.late is not None:
            self.late += 1
            compile_id = str(torch._guards.CompileContext.current_compile_id())
            compiled = self._warn_on_first_run(compiled, self.graphs, compile_id)
        self._report()
        return compiled

    def _warn_on_first_run(self, compiled, number: int, compile_id: str):
        pending = [compile_id]

        @functools.wraps(compiled)
        def run(*args):
            if pending:
                self.log.line(f"warning: model graph {number} was compiled after the warm-up, in the timed run; "
                              f"dynamo's reason: {recompile_reason(pending.pop())}")
            return compiled(*args)
        return run

    def _report(self):
        hits, misses = (now - before for now, before in zip(inductor_cache_counts(), self.cache_before))
        self.log.compiled(self.graphs, self.late or 0, hits, misses)


def inductor_cache_counts() -> tuple[int, int]:
    """The graphs inductor has found in its cache in this process (hits: the model's forward, backward and evaluation
    graphs, and on CUDA the optimizers' steps) and those it compiled and stored there (misses); with --compile_cache=off
    it neither looks nor stores."""
    counts = torch._dynamo.utils.counters["inductor"]
    return counts["fxgraph_cache_hit"], counts["fxgraph_cache_miss"]


def recompile_reason(compile_id: str) -> str:
    """The first line of dynamo's reason for compiling `compile_id` again, from its compilation metrics."""
    reasons = [m.recompile_reason for m in torch._dynamo.utils.get_compilation_metrics() if m.compile_id == compile_id]
    reason = reasons[-1] if reasons else None
    return reason.strip().splitlines()[0] if reason else "none, it is the model's first compile"


@contextlib.contextmanager
def persist_compiled_kernels(cfg: Config):
    """While the run lasts, inductor's, Triton's and flash-attn-4's caches in one lasting folder, so that the next run
    of the same configuration loads its kernels instead of compiling them; or the caches off."""
    if cfg.compile_cache == "off":
        import torch._inductor.config  # loaded only where something compiles
        with torch._inductor.config.patch(force_disable_caches=True):
            yield
        return
    folder = Path(__file__).resolve().parent / ".compile_cache" if cfg.compile_cache == "auto" else Path(cfg.compile_cache)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--compile_cache={cfg.compile_cache}: cannot create {folder} ({e.strerror}); "
                          "point it at a writable folder or use --compile_cache=off")
    # FLASH_ATTENTION_*: read when flash-attn-4 loads, which choose_attention does after this
    with environment_variables(TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), TRITON_CACHE_DIR=str(folder / "triton"),
                               FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1",
                               FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=str(folder / "flash_attn_4")):
        yield


@contextlib.contextmanager
def environment_variables(**values: str):
    """os.environ with `values` set, as it was again on exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def smaller_micro_batch(cfg: Config, world: int) -> int | None:
    """The largest --micro_batch_tokens below the current one that still splits the global batch evenly."""
    tokens = batch_split(cfg, world)[1] // 2
    while tokens >= 128:
        try:
            batch_split(dataclasses.replace(cfg, micro_batch_tokens=tokens), world)
            return tokens
        except ConfigError:
            tokens //= 2
    return None


@contextlib.contextmanager
def explain_out_of_memory(cfg: Config, world: int, training: bool):
    """Turn a CUDA out-of-memory error into the flag to change and a value that needs less memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if training:
            smaller = smaller_micro_batch(cfg, world)
            fix = (f"use --micro_batch_tokens={smaller} (the global batch of {cfg.train_batch_tokens} tokens stays, "
                   "in more micro-steps)" if smaller else "use a GPU with more memory or more GPUs")
            raise UserError(f"out of GPU memory in a training step with --micro_batch_tokens={cfg.micro_batch_tokens}; {fix}") from None
        raise UserError(f"out of GPU memory in validation with --val_seq_tokens={cfg.val_seq_tokens}; "
                        f"use --val_seq_tokens={cfg.val_seq_tokens // 2} (the validated tokens stay the same)") from None


# Start-up and warm-up wait longer in collectives than a step would: compiling the graphs takes minutes, not always
# equally on every rank. After the warm-up, --collective_timeout applies.
STARTUP_TIMEOUT = datetime.timedelta(minutes=30)


def setup_device(cfg: Config):
    """Pick the device and start the process group (a group of one without torchrun), before any heavy work; returns
    the store the ranks met through too, where they leave word on why they stop (leave_word)."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device=cuda but no CUDA GPU is visible to PyTorch; check nvidia-smi and "
                              "CUDA_VISIBLE_DEVICES, install a CUDA build of torch, or run with --device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} are visible; "
                              "lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    check_gpu(cfg, device)
    backend = "nccl" if kind == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        store, rank, world = next(dist.rendezvous("env://", timeout=STARTUP_TIMEOUT))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=STARTUP_TIMEOUT,
                                device_id=device if kind == "cuda" else None)
    else:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=STARTUP_TIMEOUT)
    # words of this attempt only: torchrun's store outlives a restarted attempt
    return device, rank, world, dist.PrefixStore(f"train_gpt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)


class Inputs(NamedTuple):
    """What the checks before the start found and training uses."""
    grad_accum: int
    micro_tokens: int
    train_files: list[Path]
    val_data: list[tuple]
    hellaswag: list[dict] | None
    attention: AttentionChoice


def check_inputs(cfg: Config, rank: int, world: int, device, settings: contextlib.ExitStack) -> Inputs:
    """Everything that can be checked before the first step, so that a bad input stops the run before it has a
    record: the batch split, the shards' headers, the first training shard's tokens, the validation data, the
    HellaSwag file, the folders rank 0 writes to, the compile cache (set for the run in `settings`) and the
    attention kernel."""
    grad_accum, micro_tokens = batch_split(cfg, world)
    if device.type == "cpu" and cfg.preset != "tiny" and not glob.glob(cfg.train_files):
        raise DataError(f"--train_files={cfg.train_files} matches no files, and on a CPU the {cfg.preset} preset would "
                        "take days: run the tiny preset (a few minutes) with `./run.sh`, or `python data/synthetic.py "
                        "--vocab_size 1024` then `python train_gpt.py --preset=tiny`")
    train_files = list_shards(cfg.train_files, "train_files")
    check_first_shard(train_files[0], cfg)
    val_data = val_batches(list_shards(cfg.val_files, "val_files"), cfg, rank, world, device)
    hellaswag = load_hellaswag(cfg.hellaswag, cfg.vocab_size) if cfg.hellaswag else None
    if rank == 0:
        check_output_folders(cfg)
    if compiles(cfg, device):
        settings.enter_context(persist_compiled_kernels(cfg))
    return Inputs(grad_accum, micro_tokens, train_files, val_data, hellaswag, choose_attention(cfg, device))


def check_first_shard(path: Path, cfg: Config):
    """Tokens within the vocabulary and documents to train on; later shards are checked as they load."""
    document_starts(load_shard(path, cfg.vocab_size), path, cfg)


def check_output_folders(cfg: Config):
    """The record folder (created if missing) and the checkpoint's folder must be folders rank 0 can write in."""
    log_dir = Path(cfg.log_dir)
    if not log_dir.exists():
        try:
            log_dir.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"--log_dir={cfg.log_dir}: cannot create this folder ({e.strerror}); "
                              "choose a folder you can write in")
    check_writable_folder(log_dir, f"--log_dir={cfg.log_dir}")
    if cfg.checkpoint:
        if Path(cfg.checkpoint).is_dir():
            raise ConfigError(f"--checkpoint={cfg.checkpoint} is a folder; give a file name, "
                              f"e.g. {Path(cfg.checkpoint) / 'model.pt'}")
        check_writable_folder(Path(cfg.checkpoint).absolute().parent, f"--checkpoint={cfg.checkpoint}")


def check_writable_folder(folder: Path, flag: str):
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag}: {folder} is a file, not a folder; choose a folder")
    if not folder.is_dir():
        raise ConfigError(f"{flag}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write in {folder}; choose a folder you can write in")


def agreed(check):
    """Run `check` on every rank and stop all of them if any rank found a bad input: no rank is left waiting in a
    collective for one that quit, and rank 0 reports a problem found elsewhere (a file missing on another node)."""
    try:
        result, problem = check(), None
    except UserError as e:
        result, problem = None, str(e)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise UserError(first)
    return result


def build_model(cfg: Config, device, world: int, inputs: Inputs) -> GPT:
    """The model as every rank trains it, not yet compiled: the seed's initial weights, rank 0's on every rank, for
    sequences up to the longest it will see (a micro-batch, a validation sequence or a HellaSwag example), fp32 on the
    CPU, with its lm_head and attention kernel chosen."""
    torch.manual_seed(cfg.seed)
    longest_example = max(map(hellaswag_example_tokens, inputs.hellaswag)) if inputs.hellaswag else 0
    model = GPT(cfg, max(inputs.micro_tokens, cfg.val_seq_tokens, longest_example), world).to(device)
    if device.type == "cpu":
        model.float()  # most CPUs emulate bf16 arithmetic, several times slower than fp32
    for p in model.parameters():
        dist.broadcast(p.detach(), 0)
    model.fp8_head = on_every_rank(fp8_head_enabled(cfg, device))
    model.use_attention(inputs.attention.kernel)
    return model


def train(cfg: Config, device, rank: int, world: int, inputs: Inputs, log: "RunLog", started: float,
          resume: dict | None = None):
    startup = {"data_s": time.perf_counter() - started}  # set-up, flags and every check of the inputs
    grad_accum, micro_tokens, train_files, val_data, hellaswag, attention = inputs
    batches = TrainBatches(train_files, cfg, rank, world, device)  # starts reading the first shard on a thread
    log.line(f"world size {world}, {grad_accum} micro-steps of {micro_tokens} tokens per rank, "
             f"{len(train_files)} training shards, {cfg.val_tokens} validation tokens")

    raw_model = build_model(cfg, device, world, inputs)
    startup["model_s"] = time.perf_counter() - started - startup["data_s"]
    graphs = ModelGraphs(log)
    model = torch.compile(raw_model, backend=graphs, dynamic=False, fullgraph=True) if compiles(cfg, device) else raw_model
    if attention.note:
        log.line(attention.note)
    log.kernels(lm_head="fp8" if raw_model.fp8_head else "bf16" if device.type == "cuda" else "fp32",
                attention=f"{attention.kernel} {attention.version}" if attention.version else attention.kernel,
                torch_compile="on" if model is not raw_model else "off")
    initial_state = {k: v.clone() for k, v in raw_model.state_dict().items()}
    check = LossCheck(device)

    # Warm-up: an even and an odd step compile the training graph and, on CUDA, every optimizer step; a validation of
    # one batch compiles the evaluation graph. Every window shares them. Then it is all undone.
    optimizers = make_optimizers(cfg, raw_model)
    agreement, stopping = StopAgreement(cfg), False
    if cfg.warmup_steps:
        log.where = "in the warm-up"
        with explain_out_of_memory(cfg, world, training=True):
            for step in range(cfg.warmup_steps):
                stopping = agreement.poll()
                if stopping:
                    break  # the first step boundary stops the run, once the warm-up is undone
                windows = (long_window(cfg, step) // 2, long_window(cfg, step))
                check.push(f"warm-up step {step + 1}", train_step(cfg, model, optimizers, batches, grad_accum, step, windows))
            check.check()
        if not stopping:
            with explain_out_of_memory(cfg, world, training=False):
                evaluate(model, val_data[:1], windows, device)
        check = LossCheck(device)  # step lines show training losses, not the warm-up's
        raw_model.zero_grad(set_to_none=True)
        raw_model.load_state_dict(initial_state)
        batches.reset()
        optimizers = make_optimizers(cfg, raw_model)
    del initial_state
    graphs.warmed_up()
    agreement.set_timeout(datetime.timedelta(seconds=cfg.collective_timeout))

    start, train_ms = 0, 0.0
    if resume is not None:
        start, train_ms = load_checkpoint(resume, raw_model, optimizers, batches)
    elif cfg.resume == "auto":
        log.line(f"--resume=auto: no checkpoint in {cfg.checkpoint_dir}, starting afresh")
    total_steps, stop = cfg.num_iterations, final_step(cfg)
    windows = (long_window(cfg, max(start - 1, 0)) // 2, long_window(cfg, max(start - 1, 0)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # model FLOPs of the steps done, for MFU, those before a resumed run's checkpoint included
    flops = sum(cfg.train_batch_tokens * training_flops_per_token(cfg, long_window(cfg, s) // 2, long_window(cfg, s))
                for s in range(start))
    sync()
    startup["compile_and_warmup_s"] = time.perf_counter() - started - startup["data_s"] - startup["model_s"]
    log.startup(startup)
    t0 = time.perf_counter()
    for step in range(start, stop + 1):
        last = step == stop
        stopping = not last and agreement.poll()  # on SIGTERM or SIGUSR1: a checkpoint of this step, and stop
        # a resumed run validated its first step before the checkpoint was written
        validate = validates(cfg, step, stop) and (resume is None or step > start)
        save = cfg.save_every and step > start and (last or stopping or step % cfg.save_every == 0)
        if validate or save:
            check.check()
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            if validate:
                log.where = f"in the validation at step {step}"
                val_windows = final_windows(cfg, step) if last else windows
                with explain_out_of_memory(cfg, world, training=False):
                    loss = evaluate(model, val_data, val_windows, device)
                log.val(step, stop, total_steps, loss, train_ms)
                if cfg.analysis == "on":
                    log.analysis(step, measure_weights(raw_model, optimizers))
            if save:
                log.where = f"writing the checkpoint of step {step}"
                with agreement.patient():
                    save_checkpoint(cfg, step, train_ms, raw_model, optimizers, batches, log)
            sync()
            t0 = time.perf_counter()
        if stopping:
            agreement.finish()
            raise Preempted(step, str(checkpoint_path(cfg, step)) if save else resume and resume["path"])
        if last:
            break
        log.where = f"in step {step + 1}"
        new_long = long_window(cfg, step)
        if new_long != windows[1]:
            raw_model.rotary.extend_window(windows[1], new_long)
            windows = (new_long // 2, new_long)
        loss = train_step(cfg, model, optimizers, batches, grad_accum, step, windows) / micro_tokens  # per token
        check.push(f"step {step + 1}", loss)
        flops += cfg.train_batch_tokens * training_flops_per_token(cfg, *windows)
        log.step(step + 1, stop, total_steps, train_ms + 1000 * (time.perf_counter() - t0), check.latest, flops)
    agreement.finish()
    log.where = "after training"
    memory = peak_memory(device)  # of the training, as the record reports it
    if hellaswag is not None:
        batch_tokens = min(HELLASWAG_BATCH_TOKENS, raw_model.rotary.cos.size(0))
        log.hellaswag(*hellaswag_accuracy(raw_model, hellaswag, cfg.bos_id, final_windows(cfg, stop), batch_tokens))
    if cfg.checkpoint and rank == 0:
        torch.save(raw_model.state_dict(), cfg.checkpoint)
    log.finish(stop, train_ms, memory)
    dist.barrier()  # no rank tears the group down while another is still in a collective


def peak_memory(device) -> tuple[int, int]:
    """(allocated, reserved) MiB: the CUDA allocator's peaks, or the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() // 2 ** 20, torch.cuda.max_memory_reserved() // 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return rss, rss


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGUSR1 that stops the run where it is, and its record says so. Not an Exception, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Preempted(BaseException):
    """Every rank agreed to stop at `step` on SIGTERM or SIGUSR1; `checkpoint` holds the run at that step (None at the
    step the run started from without a checkpoint: it starts afresh again)."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"preempted at step {step}")
        self.step, self.checkpoint = step, checkpoint


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a temporary stop, to be run again (with --resume=auto)
SAME_NOTICE_S = 5.0  # a signal this soon after the first is the same notice, passed on (Signals)


class Signals:
    """The signals that stop a run, process-wide as signals are (SIGNALS). SIGINT (Ctrl-C) stops the run at once.
    SIGTERM and SIGUSR1, how a cluster announces a preemption or the time limit, do too, unless `deferred` (a run
    that keeps checkpoints, once training has begun): then they only set `requested`, and the ranks agree at a step
    boundary to write a checkpoint and stop (StopAgreement). Within `held()`, a stop waits for the block's end, so
    that the files it writes are whole. A second signal ends the process at once, unless it comes within
    SAME_NOTICE_S of the first, as the same notice passed on by a launcher (SLURM signals every process of a job step,
    torchrun among them, which passes its own on), or the process is `closing`: stopping already, its checkpoint
    written, telling why (torchrun stops every rank with SIGTERM as soon as one ends)."""
    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.reset()

    def reset(self):
        self.requested: int | None = None
        self.requested_at = 0.0
        self.deferred = self.holding = self.closing = False
        self.postponed: int | None = None

    def handle(self, signum, frame):
        if self.closing or (self.requested is not None and time.monotonic() - self.requested_at < SAME_NOTICE_S):
            return
        if self.requested is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self.requested_at = signum, time.monotonic()
        if signum == signal.SIGINT or not self.deferred:
            if self.holding:
                self.postponed = signum
            else:
                raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.postponed is not None:
                signum, self.postponed = self.postponed, None
                raise Interrupted(signum)


SIGNALS = Signals()


class StopAgreement:
    """Whether any rank has been asked to stop (Signals.requested), agreed by all ranks at the same step boundary
    without a GPU synchronisation: each boundary starts an all-reduce of this rank's flag on a CPU (gloo) group and
    reads the one started at the boundary before, which finished meanwhile, so that no step waits on it. A signal is
    acted on one or two steps after it comes. Without checkpoints a signal stops the run at once instead, and
    nothing is reduced."""

    def __init__(self, cfg: Config):
        self.pending, self.timeout = None, STARTUP_TIMEOUT
        self.group = dist.new_group(backend="gloo") if cfg.save_every else None

    def poll(self) -> bool:
        if self.group is None:
            return False
        agreed = self.finish()
        flag = torch.tensor([SIGNALS.requested is not None], dtype=torch.int32)
        self.pending = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag
        return agreed

    def finish(self) -> bool:
        """The outcome of the all-reduce in flight, if any, which is then done with."""
        if self.pending is None:
            return False
        work, flag = self.pending
        work.wait()
        self.pending = None
        return bool(flag.item())

    def set_timeout(self, timeout: datetime.timedelta):
        """How long a rank waits in a collective, in the run's group and this one, before the run stops naming it."""
        self.timeout = timeout
        for group in filter(None, (dist.group.WORLD, self.group)):
            dist.distributed_c10d._set_pg_timeout(timeout, group)  # torch's only way to change a live group's

    @contextlib.contextmanager
    def patient(self):
        """The start-up's timeout meanwhile: a checkpoint takes as long as its filesystem takes to write it."""
        timeout = self.timeout
        self.set_timeout(STARTUP_TIMEOUT)
        try:
            yield
        finally:
            self.set_timeout(timeout)


def resume_command(argv: list[str]) -> str:
    """This run's arguments with --resume=auto in place of any --resume: what continues it, after the same launcher."""
    kept, args = [], iter(argv)
    for arg in args:
        if arg == "--resume":
            next(args, None)  # and its value
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["train_gpt.py", *kept, "--resume=auto"])


# How long rank 0 waits for the others' word on why they stopped, when it stops early itself.
WORD_WAIT_S = 3.0


def leave_word(store, rank: int, word: str):
    """Tell rank 0 why this rank stops (others_words reads it). Best effort: the store may have gone with its host."""
    try:
        store.set(f"word/{rank}", word)
    except Exception:
        pass


def others_words(store, world: int, mine: str) -> str:
    """For rank 0's record of a run that stops early: which other ranks failed otherwise than `mine`, rank 0's own
    word, with their first line, or gave no word within WORD_WAIT_S; '' where every other rank stopped as rank 0 did
    or was stopped (interrupted or preempted)."""
    waiting, words = set(range(1, world)), {}
    deadline = time.monotonic() + WORD_WAIT_S
    try:
        while waiting and time.monotonic() < deadline:
            for rank in [r for r in waiting if store.check([f"word/{r}"])]:
                words[rank] = store.get(f"word/{rank}").decode()
                waiting.discard(rank)
            time.sleep(0.05)
    except Exception:
        return ""  # the store went with torchrun: nothing more can be known
    notes = [f"rank {r} {w}" for r, w in sorted(words.items()) if w.startswith("failed") and w != mine]
    if waiting:
        ranks = ", ".join(map(str, sorted(waiting)))
        notes.append(f"rank{'s' * (len(waiting) > 1)} {ranks} stopped without a word (killed by a signal such as "
                     "SIGKILL or the out-of-memory killer, or stuck)")
    return "; ".join(notes)


def record_for_torchrun(error: BaseException):
    """The error file that torchrun's elastic agent reads, so that its summary names this rank's error."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        ErrorHandler().record_exception(error)


def main(argv=None) -> int:
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    settings = contextlib.ExitStack()  # what the run sets for its whole process, undone when main returns
    SIGNALS.reset()
    for signum in Signals.HANDLED:
        settings.callback(signal.signal, signum, signal.signal(signum, SIGNALS.handle))
    rank, world, store, log = int(os.environ.get("RANK", 0)), 1, None, None

    def stopped(status: str, message: str, error: BaseException) -> str:
        """Leave word for rank 0 and the error file for torchrun; rank 0 adds what the other ranks said."""
        SIGNALS.closing = True
        if world > 1:
            word = f"{status}: {message}"
            leave_word(store, rank, word)
            if rank == 0 and status != "preempted":
                message = "; ".join(filter(None, [message, others_words(store, world, word)]))
        record_for_torchrun(error)
        return message

    try:
        cfg = parse_config(argv)
        device, rank, world, store = setup_device(cfg)
        resume = agreed(lambda: find_resume(cfg, device, world))
        inputs = agreed(lambda: check_inputs(cfg, rank, world, device, settings))
        inputs = inputs._replace(attention=common_attention(inputs.attention))
        log = RunLog(cfg, rank, world, device, resume)
        SIGNALS.deferred = bool(cfg.save_every)
        train(cfg, device, rank, world, inputs, log, started, resume)
        return 0
    except Preempted as e:
        stopped("preempted", str(e), e)
        if log is not None:
            log.preempt(e, resume_command(argv))
        return PREEMPTED_EXIT
    except Interrupted as e:
        message = stopped("interrupted", f"interrupted by {e}", e)
        if log is not None:
            log.interrupt(e, message)
        elif rank == 0:
            print(f"interrupted by {e} before the run started; no record written", file=sys.stderr, flush=True)
        return 128 + e.signum
    except (UserError, TrainingError) as e:
        message = stopped("failed", f"error: {e}", e)
        if isinstance(e, TrainingError) or rank == 0:  # input errors are the same on every rank (see agreed)
            print(f"error: {e}", file=sys.stderr, flush=True)
        if log is not None:
            log.fail(message)
        return 2 if isinstance(e, UserError) else 1
    except Exception as e:  # a bug, or a collective that failed or timed out: where it happened, and the traceback
        where = log.where if log is not None else "at start-up"
        message = stopped("failed", f"error {where}: {first_line(e)}", e)
        traceback.print_exc()
        if log is not None:
            log.fail(f"{message}\n{traceback.format_exc()}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        settings.close()


# -----------------------------------------------------------------------------
# Checkpoints: <checkpoint_dir>/step_<S>/ holds torch.distributed.checkpoint files and a meta.json; a run resumed from
# one goes on exactly as if it had never stopped, at its own world size, and correctly at another

CHECKPOINT_FORMAT = "train_gpt-checkpoint/1"
# Flags that may change when a run resumes: they steer or record the run but do not change what it computes.
RESUMABLE_CHANGES = ("preset", "max_steps", "val_loss_every", "dense_val_every", "dense_val_steps", "warmup_steps",
                     "device", "compile", "compile_cache", "log_dir", "checkpoint", "save_every", "keep_checkpoints",
                     "checkpoint_dir", "resume", "hellaswag", "attention", "analysis", "target_val_loss",
                     "collective_timeout")


# sample.py reads checkpoints in a single process, without a process group, on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(UserError):
    pass


def checkpoint_folders(folder) -> list[Path]:
    """The checkpoints in `folder`, oldest first. A checkpoint gets its step_<S> name only once complete."""
    found = [p for p in Path(folder).glob("step_*") if p.name[5:].isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_checkpoint(path) -> dict:
    """A checkpoint's meta.json, with its folder under "path"; anything else is refused."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder; give a step_<S> folder written with --save_every")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a checkpoint of train_gpt.py (no readable meta.json of format "
                              f"{CHECKPOINT_FORMAT} and .metadata in it); give a step_<S> folder written with --save_every")
    return {**meta, "path": str(path)}


def find_resume(cfg: Config, device, world: int) -> dict | None:
    """The checkpoint that this run continues, checked against the run before any work is done; None to start afresh.
    A fresh run that would write its checkpoints among another run's is refused."""
    existing = checkpoint_folders(cfg.checkpoint_dir)
    if not cfg.resume:
        if cfg.save_every and existing:
            raise CheckpointError(f"--checkpoint_dir={cfg.checkpoint_dir} already holds checkpoints of a run (newest: "
                                  f"{existing[-1].name}); continue that run with --resume=auto, or give this one "
                                  "another --checkpoint_dir")
        return None
    if cfg.resume == "auto" and not existing:
        return None
    meta = read_checkpoint(existing[-1] if cfg.resume == "auto" else cfg.resume)
    here = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as the saved config has them
    differing = [f"--{name} is {meta['config'].get(name)} there, {value} here" for name, value in here.items()
                 if name not in RESUMABLE_CHANGES and meta["config"].get(name) != value]
    if differing:
        raise CheckpointError(f"{meta['path']} belongs to a run with another configuration: {'; '.join(differing)}; "
                              "resume with that run's flags (its meta.json lists them) or start afresh without --resume")
    if meta["device"] != device.type:
        raise CheckpointError(f"{meta['path']} was written on {meta['device']} and holds that device's number formats; "
                              f"resume it on {meta['device']} (sample.py reads it on any device)")
    if meta["pending_grads"] and meta["world_size"] != world:
        raise CheckpointError(f"{meta['path']} was saved after an odd step, when Adam's gradients are still "
                              f"accumulating in each of its {meta['world_size']} processes; resume it with "
                              f"{meta['world_size']} processes, or resume from a checkpoint at an even step")
    if meta["step"] >= cfg.num_iterations:
        raise CheckpointError(f"{meta['path']} is the end of a finished run (step {meta['step']}), so there is "
                              "nothing left to train; sample from it with sample.py, or start afresh")
    if meta["step"] >= final_step(cfg):
        raise CheckpointError(f"{meta['path']} is at step {meta['step']}, and --max_steps={cfg.max_steps} stops the "
                              f"run there; raise --max_steps to train on (0: all {cfg.num_iterations} steps)")
    return meta


def adam_params(adam: ShardedOptimizer) -> list[Tensor]:
    return [p for group in adam.param_groups for p in group["params"]]


def checkpoint_state(raw_model: "GPT", optimizers) -> dict:
    """This rank's part of everything the run's future depends on, keyed so that any world size can read it back:
    the model and the rotary state that YaRN changes (the same on every rank, so written once), NorMuon's state per
    parameter (on the rank that updates it), DistAdam's per-rank slices as one tensor sharded along dim 0, Adam's
    gradients of an odd step (not yet averaged over the processes) and the random number generators."""
    normuon, adam = optimizers
    names = {p: name for name, p in raw_model.named_parameters()}
    state = {f"model/{name}": t for name, t in raw_model.state_dict().items()}
    state |= {f"rotary/{name}": buf for name, buf in raw_model.rotary.named_buffers()}
    # nothing draws random numbers after the initialisation today; kept so that something that does resumes exactly
    state["rng/cpu"] = torch.get_rng_state()
    if raw_model.lm_head.is_cuda:
        state["rng/cuda"] = torch.cuda.get_rng_state()
    for group in normuon.param_groups:
        for run in normuon.my_runs(group):
            for key, value in normuon.state[run[0]].items():
                state |= {f"normuon/{names[p]}/{key}": part for p, part in zip(run, value.chunk(len(run)))}
    world = dist.get_world_size()
    mesh = init_device_mesh(raw_model.lm_head.device.type, (world,))
    for p in adam_params(adam):
        for key, value in adam.state[p].items():
            sliced = torch.is_tensor(value) and value.dim() > 0 and value.size(0) * world == p.size(0)
            state[f"adam/{names[p]}/{key}"] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False) if sliced else value
        if p.grad is not None:
            state[f"grad/{dist.get_rank()}/{names[p]}"] = p.grad
    return state


def checkpoint_path(cfg: Config, step: int) -> Path:
    return Path(cfg.checkpoint_dir) / f"step_{step:06d}"


def save_checkpoint(cfg: Config, step: int, train_ms: float, raw_model: "GPT", optimizers, batches: TrainBatches,
                    log: "RunLog"):
    """Write <checkpoint_dir>/step_<step> through a hidden temporary folder renamed once complete, so that a crash
    mid-save leaves the earlier checkpoints as they were; then keep the newest --keep_checkpoints."""
    started = time.perf_counter()
    folder = Path(cfg.checkpoint_dir)
    path, tmp = checkpoint_path(cfg, step), folder / f".step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        for leftover in folder.glob(".step_*.tmp"):  # saves cut short by a crash
            shutil.rmtree(leftover)
    dist.barrier()
    dcp.save(checkpoint_state(raw_model, optimizers), checkpoint_id=tmp)  # returns once every rank's files are written
    if dist.get_rank() == 0:
        pending = any(p.grad is not None for p in adam_params(optimizers[1]))
        meta = {"format": CHECKPOINT_FORMAT, "step": step, "train_time_ms": train_ms, "loader": batches.position(),
                "world_size": dist.get_world_size(), "device": raw_model.lm_head.device.type, "pending_grads": pending,
                "config": dataclasses.asdict(cfg), "record": log.record}
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(path, ignore_errors=True)  # this step saved by an earlier attempt that crashed later
        os.replace(tmp, path)
        for old in checkpoint_folders(folder)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    dist.barrier()
    log.line(f"checkpoint {path} written in {time.perf_counter() - started:.1f}s")


def read_checkpoint_tensors(path, wanted) -> dict:
    """The entries of a checkpoint whose keys pass `wanted`, read whole onto the CPU (sharded ones reassembled)."""
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
             for key, m in metadata.items() if wanted(key)}
    dcp.load(state, checkpoint_id=path)
    return state


def copy_common(dst: Tensor, src: Tensor):
    """dst[:n] = src[:n] over the rows both have: the scalar vector is padded to a multiple of the world size, so its
    length can differ between a checkpoint and the run reading it (the padding is never trained)."""
    n = min(dst.size(0), src.size(0))
    dst[:n].copy_(src[:n])


@torch.no_grad()
def load_model(saved: dict, raw_model: "GPT"):
    """Parameters and rotary state from read_checkpoint_tensors."""
    for name, t in raw_model.state_dict().items():
        copy_common(t, saved[f"model/{name}"])
    rotary = raw_model.rotary
    rotary.angular_freq.copy_(saved["rotary/angular_freq"])
    rotary.attn_scale.copy_(saved["rotary/attn_scale"])
    rotary._rebuild()  # for positions beyond the saved tables, in a model made for longer sequences
    # the saved tables where they reach: on a CPU those made before .float() hold bf16-rounded values, rebuilt ones do not
    copy_common(rotary.cos, saved["rotary/cos"])
    copy_common(rotary.sin, saved["rotary/sin"])


@torch.no_grad()
def load_checkpoint(meta: dict, raw_model: "GPT", optimizers, batches: TrainBatches) -> tuple[int, float]:
    """Put the run in the state of checkpoint `meta` (from find_resume), the optimizers' state dealt out to this world
    size; returns the step to go on from and the training time so far in ms."""
    normuon, adam = optimizers
    rank, world = dist.get_rank(), dist.get_world_size()
    names = {p: name for name, p in raw_model.named_parameters()}
    mine = {names[p] for group in normuon.param_groups for run in normuon.my_runs(group) for p in run}

    def wanted(key: str) -> bool:  # everything but other ranks' NorMuon parameters and gradients
        kind, name = key.split("/")[:2]
        return {"normuon": name in mine, "grad": name == str(rank)}.get(kind, True)

    saved = read_checkpoint_tensors(meta["path"], wanted)
    load_model(saved, raw_model)
    for group in normuon.param_groups:
        for run in normuon.my_runs(group):
            keys = [key.rsplit("/", 1)[1] for key in saved if key.startswith(f"normuon/{names[run[0]]}/")]
            normuon.state[run[0]] = {key: torch.cat([saved[f"normuon/{names[p]}/{key}"] for p in run]).to(run[0].device)
                                     for key in keys}
    for p in adam_params(adam):
        saved_rows = saved[f"model/{names[p]}"].size(0)
        rows = p.size(0) // world
        for key in [key for key in saved if key.startswith(f"adam/{names[p]}/")]:
            value = saved[key]
            if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == saved_rows:  # saved sharded: take our slice
                local = torch.zeros((rows, *value.shape[1:]), dtype=value.dtype, device=p.device)
                copy_common(local, value[rank * rows:(rank + 1) * rows])
                value = local
            adam.state[p][key.rsplit("/", 1)[1]] = value.to(p.device) if torch.is_tensor(value) else value
        if f"grad/{rank}/{names[p]}" in saved:
            p.grad = saved[f"grad/{rank}/{names[p]}"].to(p.device)
    torch.set_rng_state(saved["rng/cpu"])
    if "rng/cuda" in saved:
        torch.cuda.set_rng_state(saved["rng/cuda"])
    batches.seek(tuple(meta["loader"]))
    return meta["step"], meta["train_time_ms"]


# -----------------------------------------------------------------------------
# HellaSwag: which of four endings the model finds likeliest, per token, after each context

HELLASWAG_FORMAT = "train_gpt-hellaswag/1"
HELLASWAG_BATCH_TOKENS = 8192  # tokens per forward: their logits over GPT-2's vocabulary take 1.6 GB


def load_hellaswag(path, vocab_size: int) -> list[dict]:
    """Tokenized examples {"context", "endings", "label"} from data/hellaswag.py, checked against the vocabulary."""
    fix = "make it with `python data/hellaswag.py`"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DataError(f"--hellaswag={path}: cannot be read ({e.strerror}); {fix}") from None
    except ValueError:
        raise DataError(f"--hellaswag={path}: not JSON, so damaged; {fix}") from None
    if not isinstance(data, dict) or data.get("format") != HELLASWAG_FORMAT or not data.get("examples"):
        raise DataError(f"--hellaswag={path}: not a file of tokenized HellaSwag examples ({HELLASWAG_FORMAT}); {fix}")
    examples = data["examples"]
    largest = max(max(ex["context"] + sum(ex["endings"], [])) for ex in examples)
    if largest >= vocab_size:
        raise DataError(f"--hellaswag={path}: holds token {largest}, outside --vocab_size={vocab_size}; it was "
                        f"tokenized for {data['tokenizer']}, so score a model of that vocabulary")
    return examples


def hellaswag_report(right: int, examples: int) -> str:
    return f"hellaswag: {right}/{examples} right, accuracy {right / examples:.4f}"


@torch.no_grad()
def hellaswag_example_tokens(example: dict) -> int:
    """Tokens of one example's forward: BOS + context + ending, for each ending."""
    return sum(1 + len(example["context"]) + len(ending) for ending in example["endings"])


def hellaswag_accuracy(model: "GPT", examples: list[dict], bos_id: int, windows, batch_tokens: int) -> tuple[int, int]:
    """(right answers, examples) over all ranks, each scoring its share. An ending's score is the mean log-probability
    of its tokens after BOS + context (the length-normalised completion score); the answer is the best-scoring ending.
    Each context + ending is a document of its own, and the documents of several examples share a forward of at most
    batch_tokens tokens (at most the model's rotary tables, HELLASWAG_BATCH_TOKENS at most)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = model.lm_head.device
    mine = examples[rank::world]
    groups, size = [], 0  # examples per forward: as many as fit in batch_tokens, at least one
    for ex in mine:
        tokens = hellaswag_example_tokens(ex)
        if not groups or size + tokens > batch_tokens:
            groups.append([])
            size = 0
        groups[-1].append(ex)
        size += tokens
    was_training = model.training
    model.eval()
    right = 0
    model_windows = model.windows(*windows)
    for group in groups:
        docs = [[bos_id, *ex["context"], *ending] for ex in group for ending in ex["endings"]]
        lengths = [len(doc) for doc in docs]
        starts = np.cumsum([0] + lengths[:-1]).tolist()
        flat = torch.tensor(list(itertools.chain(*docs)), dtype=torch.int32, device=device)
        logits = model(flat, None, cu_seqlens_from_starts(starts, len(flat), device), max(lengths), *model_windows)
        # an ending's tokens are the last len(ending) of its document, each predicted at the position before it
        ending_lengths = [len(ending) for ex in group for ending in ex["endings"]]
        targets = torch.tensor([start + length - n + i for start, length, n in zip(starts, lengths, ending_lengths)
                                for i in range(n)], device=device)
        log_probs = logits[targets - 1].log_softmax(-1).gather(1, flat[targets].long()[:, None]).squeeze(1)
        scores = torch.stack([part.mean() for part in log_probs.split(ending_lengths)]).view(len(group), -1)
        right += sum(int(scores[i].argmax()) == ex["label"] for i, ex in enumerate(group))
    model.train(was_training)
    counts = torch.tensor([right, len(mine)], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


# -----------------------------------------------------------------------------
# Analysis: the figures record 43's write-up argues from, at every validation: each group's mean square, the share of
# coordinates cautious decay reached on the step before, and the matrices' condition numbers

ANALYSIS_METRICS = ("mean_square", "cautious_fraction", "condition_number", "max_singular_value")
# groups that pool others: all of the attention's matrices, all of the MLP's; the log line shows these
ANALYSIS_SUMMARIES = {"attn": ("attn_q", "attn_k", "attn_v", "attn_o"), "mlp": ("mlp_in", "mlp_out")}


def analysis_parts(model: GPT) -> dict[Tensor, list[tuple[str, str]]]:
    """(name, group) of every part the analysis measures, per parameter in the order of its memory: the attention's
    qkvo is its four matrices Q, K, V, O; every other parameter is one part."""
    parts = {model.smear_gate: [("smear_gate", "gates")], model.embed.weight: [("embed", "embed")],
             model.lm_head: [("lm_head", "lm_head")], model.scalars: [("scalars", "scalars")]}
    for i, embed in enumerate(model.value_embeds):
        parts[embed.weight] = [(f"value_embeds.{i}", "value_embed")]
    for i, block in model.blocks.items():
        if block.attn is not None:
            parts[block.attn.qkvo] = [(f"blocks.{i}.attn.{m}", f"attn_{m}") for m in "qkvo"]
            parts[block.attn.gate] = [(f"blocks.{i}.attn.gate", "gates")]
        parts[block.mlp.fc] = [(f"blocks.{i}.mlp.fc", "mlp_in")]
        parts[block.mlp.proj] = [(f"blocks.{i}.mlp.proj", "mlp_out")]
    return parts


def tensor_figures(W: Tensor) -> Tensor:
    """[mean square] of W, and for a matrix [mean square, largest singular value, smallest], in float32."""
    W = W.float()
    figures = [W.square().mean()]
    if W.dim() == 2:
        s = torch.linalg.svdvals(W)
        figures += [s[0], s[-1]]
    return torch.stack(figures)


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


@torch.no_grad()
def measure_weights(model: GPT, optimizers) -> dict[str, dict] | None:
    """Every part's figures, by name, on rank 0 (None on the others): its group, size and mean square; for a matrix
    its largest singular value and condition number (largest over smallest; None for a singular matrix, such as a
    zero one); and where the optimizer counts it, the cautious fraction: the share of coordinates that cautious decay
    applied to on the optimizer's last step (None before its first). Each rank measures what it updates, its NorMuon
    runs and every world-th tensor of the Adam group, so the work shrinks with more ranks as the optimizers' does;
    the Adam group's counts are of each rank's slice, summed here."""
    normuon, adam = optimizers
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = analysis_parts(model)
    mine = []  # (name, group, weights, counted, count on the device or None)
    for group in normuon.param_groups:
        counted = normuon.counts_decayed(group)
        for run in normuon.my_runs(group):
            counts = normuon.decayed.get(run[0]) if counted else None
            matrices = [W for p in run for W in p.view(getattr(p, "matrices", 1), p.size(0), -1)]
            named = [part for p in run for part in parts[p]]
            mine += [(name, kind, W, counted, None if counts is None else counts[i])
                     for i, ((name, kind), W) in enumerate(zip(named, matrices))]
    adam_counted = []  # (name, count of this rank's slice or None), of every tensor whose count the Adam group keeps
    for i, (group, p) in enumerate((group, p) for group in adam.param_groups for p in group["params"]):
        ((name, kind),) = parts[p]
        if i % world == rank:
            mine.append((name, kind, p, False, None))
        if adam.counts_decayed(group, p):
            adam_counted.append((name, adam.decayed.get(p)))
    on_device = []
    for _, _, W, _, count in mine:
        on_device.append(tensor_figures(W).double())
        if count is not None:
            on_device.append(count.double().view(1))
    on_device += [count.double().view(1) for _, count in adam_counted if count is not None]
    values = iter(torch.cat(on_device).tolist() if on_device else [])  # the one read-back, in this order
    figures = {}
    for name, kind, W, counted, count in mine:
        f = figures[name] = {"group": kind, "size": W.numel(), "mean_square": finite_or_none(next(values))}
        if W.dim() == 2:
            largest, smallest = next(values), next(values)
            f["max_singular_value"] = finite_or_none(largest)
            f["condition_number"] = finite_or_none(largest / smallest) if smallest > 0 else None
        if counted:
            f["decayed"] = None if count is None else next(values)
    adam_decayed = {name: None if count is None else next(values) for name, count in adam_counted}
    gathered = [None] * world
    dist.all_gather_object(gathered, (figures, adam_decayed))
    if rank != 0:
        return None
    figures = {name: f for part, _ in gathered for name, f in part.items()}
    for name in adam_decayed:
        counts = [decayed[name] for _, decayed in gathered]
        figures[name]["decayed"] = None if None in counts else sum(counts)
    for f in figures.values():
        if "decayed" in f:
            decayed = f.pop("decayed")
            f["cautious_fraction"] = None if decayed is None else decayed / f["size"]
    return figures


def over_coordinates(figures: list[dict], metric: str) -> float | None:
    """The mean of a per-coordinate figure over all the parts' coordinates (parts without a value left out)."""
    known = [f for f in figures if f[metric] is not None]
    size = sum(f["size"] for f in known)
    return sum(f[metric] * f["size"] for f in known) / size if known else None


def median_over_matrices(figures: list[dict], metric: str) -> float | None:
    known = [f[metric] for f in figures if f[metric] is not None]
    return float(np.median(known)) if known else None


def group_figures(parts: dict[str, dict]) -> dict[str, dict]:
    """Each group's figures from its parts' (measure_weights): the mean square and the cautious fraction over all
    the group's coordinates, the condition number and the largest singular value the median over its matrices."""
    members = {}
    for f in parts.values():
        members.setdefault(f["group"], []).append(f)
    for summary, kinds in ANALYSIS_SUMMARIES.items():
        if all(kind in members for kind in kinds):
            members[summary] = [f for kind in kinds for f in members[kind]]
    combine = {"mean_square": over_coordinates, "cautious_fraction": over_coordinates,
               "condition_number": median_over_matrices, "max_singular_value": median_over_matrices}
    return {name: {metric: combine[metric](figures, metric) for metric in ANALYSIS_METRICS if metric in figures[0]}
            for name, figures in members.items()}


def analysis_line(step: int, groups: dict[str, dict]) -> str:
    """The log line of one validation's analysis: the summary groups' mean square, cautious fraction and condition
    number."""
    line = f"analysis step:{step}"
    for metric, spec in (("mean_square", ".3e"), ("cautious_fraction", ".3f"), ("condition_number", ".4g")):
        shown = [f"{name}:{'n/a' if groups[name][metric] is None else format(groups[name][metric], spec)}"
                 for name in ANALYSIS_SUMMARIES if metric in groups.get(name, {})]
        if shown:
            line += f" {metric} " + " ".join(shown)
    return line


# -----------------------------------------------------------------------------
# Logging: rank 0 writes <log_dir>/<UTC time>_<run id>.txt and a .json beside it, flushed as they go

SEPARATOR = "=" * 100


def environment(device, world: int) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None), "device": device.type, "world_size": world,
            "gpu": gpu, "hostname": socket.gethostname()}


def hardware_report() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return f"no nvidia-smi; CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def time_to_go(step: int, stop: int, train_ms: float) -> float:
    """Seconds of training still to go before step `stop`, at the pace of the `step` steps so far."""
    return (stop - step) * train_ms / step / 1000


class RunLog:
    """The record files of rank 0; on other ranks every method does nothing. The .json is rewritten at each
    validation and when the run ends; `steps_done` follows the step lines. A resumed run continues its record."""

    def __init__(self, cfg: Config, rank: int, world: int, device, resumed: dict | None = None):
        self.enabled = rank == 0
        self.where = "at start-up"  # what the run is doing, on every rank, for the record of a collective that fails
        if not self.enabled:
            return
        with SIGNALS.held():  # an interrupt now comes after both files exist
            self._open(cfg, world, device, resumed)

    def _open(self, cfg: Config, world: int, device, resumed: dict | None):
        self.batch_tokens = cfg.train_batch_tokens
        peak = peak_bf16_flops(device)
        self.peak_flops = peak and peak * world  # of all GPUs together
        folder = Path(cfg.log_dir)  # made by check_output_folders
        env = environment(device, world)
        if resumed is not None:
            self._continue(folder, cfg, env, resumed)
            return
        started = datetime.datetime.now(datetime.timezone.utc)
        run_id = uuid.uuid4().hex[:8]
        stem = f"{started:%Y-%m-%d_%H-%M-%S}_{run_id}"
        self.txt_path, self.json_path = folder / f"{stem}.txt", folder / f"{stem}.json"
        self.record = {"format": "train_gpt-record/1", "run_id": run_id, "status": "running",
                       "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "log_file": self.txt_path.name,
                       "config": dataclasses.asdict(cfg), "env": env, "num_steps": cfg.num_iterations, "steps_done": 0,
                       "startup_s": None, "startup": None, "compile": None, "val": [], "final_val_loss": None,
                       "train_time_ms": None, "step_avg_ms": None, "tokens_per_s": None, "mfu": None,
                       "peak_memory_allocated_mib": None, "peak_memory_reserved_mib": None, "error": None}
        self.file = open(self.txt_path, "w")
        print(f"record: {self.txt_path}", flush=True)
        self.file.write(Path(__file__).read_text() + "\n" + SEPARATOR + "\n")
        self.file.write("config: " + json.dumps(dataclasses.asdict(cfg)) + "\n")
        self.file.write(f"Python {env['python']}, PyTorch {env['torch']}, Triton {env['triton'] or 'not installed'}\n")
        self.file.write(hardware_report() + "\n" + SEPARATOR + "\n")
        self.file.flush()
        self._write_json()

    def _continue(self, folder: Path, cfg: Config, env: dict, resumed: dict):
        """Go on with the record files of the run that checkpoint `resumed` belongs to: the text log grows, and the
        JSON record returns to the checkpoint's (points of the interrupted attempt after it are computed again)."""
        self.record = {**resumed["record"], "status": "running", "error": None, "config": dataclasses.asdict(cfg),
                       "env": env}
        self.record["resumed"] = self.record.get("resumed", []) + [
            {"step": resumed["step"], "checkpoint": resumed["path"], "world_size": env["world_size"]}]
        self.txt_path = folder / self.record["log_file"]
        self.json_path = self.txt_path.with_suffix(".json")
        self.file = open(self.txt_path, "a")
        print(f"record: {self.txt_path} (continued)", flush=True)
        self.file.write(f"{SEPARATOR}\nresumed from {resumed['path']} at step {resumed['step']}\n"
                        f"config: {json.dumps(dataclasses.asdict(cfg))}\n{SEPARATOR}\n")
        self.file.flush()
        self._write_json()

    def line(self, text: str):
        """To the file first: a line on the screen is in the record when an interrupt comes after it."""
        if not self.enabled:
            return
        self.file.write(text + "\n")
        self.file.flush()
        print(text, flush=True)

    def kernels(self, **chosen):
        """Which lm_head, attention and compilation this run uses: in the record's env and the log."""
        self.line("kernels: " + ", ".join(f"{name} {value}" for name, value in chosen.items()))
        if self.enabled:
            self.record["env"].update(chosen)

    def compiled(self, model_graphs: int, recompiles_after_warmup: int, cache_hits: int, cache_misses: int):
        """How many graphs torch.compile made of the model, how many of them after the warm-up, and how many graphs
        inductor found in the compile cache and compiled into it."""
        if self.enabled:
            self.record["compile"] = {"model_graphs": model_graphs, "recompiles_after_warmup": recompiles_after_warmup,
                                      "cache_hits": cache_hits, "cache_misses": cache_misses}

    def startup(self, parts: dict):
        seconds = sum(parts.values())
        self.line(f"ready to train {seconds:.1f}s after start (data and checks {parts['data_s']:.1f}s, model "
                  f"{parts['model_s']:.1f}s, compilation and warm-up {parts['compile_and_warmup_s']:.1f}s)")
        if self.enabled:
            self.record.update(startup_s=seconds, startup=parts)

    def step(self, step: int, stop: int, total_steps: int, train_ms: float, loss: float | None, flops: float):
        """The public step line, then the newest training loss read (None before the first), the throughput,
        where the GPU's peak is known the model FLOPs utilisation, and the training time still to go at this pace."""
        if not self.enabled:
            return
        loss_part = "" if loss is None else f" train_loss:{loss:.4f}"
        seconds = max(train_ms / 1000, 1e-9)
        self.record.update(steps_done=step, tokens_per_s=self.batch_tokens * step / seconds,
                           mfu=self.peak_flops and flops / seconds / self.peak_flops)
        mfu_part = f" mfu:{100 * self.record['mfu']:.1f}%" if self.peak_flops else ""
        eta = time_to_go(step, stop, train_ms)
        self.line(f"step:{step}/{total_steps} train_time:{train_ms:.0f}ms step_avg:{train_ms / step:.2f}ms"
                  f"{loss_part} tokens/s:{self.record['tokens_per_s']:.0f}{mfu_part} eta:{eta:.0f}s")

    def val(self, step: int, stop: int, total_steps: int, loss: float, train_ms: float):
        """The public validation line, with the training time still to go before `stop` when it can be told."""
        if not self.enabled:
            return
        eta = f" eta:{time_to_go(step, stop, train_ms):.0f}s" if 0 < step < stop else ""
        self.line(f"step:{step}/{total_steps} val_loss:{loss:.4f} train_time:{train_ms:.0f}ms "
                  f"step_avg:{train_ms / max(step, 1):.2f}ms{eta}")
        self.record["val"].append({"step": step, "val_loss": loss, "train_time_ms": train_ms})
        self._write_json()

    def analysis(self, step: int, parts: dict[str, dict] | None):
        """measure_weights' figures: a line of the summary groups', and in the record every group's and part's as
        series over the validation steps."""
        if not self.enabled:
            return
        groups = group_figures(parts)
        self.line(analysis_line(step, groups))
        record = self.record.setdefault("analysis", {"steps": [], "groups": {}, "params": {}})
        record["steps"].append(step)
        for name, figures in groups.items():
            for metric, value in figures.items():
                record["groups"].setdefault(name, {}).setdefault(metric, []).append(value)
        for name, figures in parts.items():
            series = record["params"].setdefault(name, {"group": figures["group"], "size": figures["size"]})
            for metric in ANALYSIS_METRICS:
                if metric in figures:
                    series.setdefault(metric, []).append(figures[metric])
        self._write_json()

    def hellaswag(self, right: int, examples: int):
        self.line(hellaswag_report(right, examples))
        if self.enabled:
            self.record["hellaswag"] = {"right": right, "examples": examples, "accuracy": right / examples}
            self._write_json()

    def finish(self, steps: int, train_ms: float, memory: tuple[int, int]):
        if not self.enabled:
            return
        self.line(f"peak memory allocated: {memory[0]} MiB reserved: {memory[1]} MiB")
        final = self.record["val"][-1]["val_loss"]
        self.record.update(status="finished", steps_done=steps, final_val_loss=final, train_time_ms=train_ms,
                           step_avg_ms=train_ms / max(steps, 1), peak_memory_allocated_mib=memory[0],
                           peak_memory_reserved_mib=memory[1])
        with SIGNALS.held():
            self._write_json()
            self.line(f"finished: val_loss {final:.4f} after {steps} steps, {train_ms / 1000:.1f}s of training, "
                      f"{self.record['startup_s']:.1f}s of start-up; record: {self.txt_path}, {self.json_path}")
            self.file.close()

    def fail(self, message: str):
        if self.open:
            self._stop("failed", message, f"failed after step {self.record['steps_done']}; record: {self.txt_path}")

    def interrupt(self, reason: Interrupted, message: str):
        """`message`: the signal, and what the other ranks said (others_words)."""
        if not self.open:
            return
        summary = f"interrupted at step {self.record['steps_done']}; record: {self.txt_path}"
        others_unknown = message == f"interrupted by {reason}"
        if others_unknown and reason.signum == signal.SIGTERM and "TORCHELASTIC_RUN_ID" in os.environ:
            summary += " (torchrun also stops the other ranks this way when one fails: see its error above)"
        self._stop("interrupted", message, summary)

    def preempt(self, reason: Preempted, command: str):
        """A stop on SIGTERM or SIGUSR1 with a checkpoint: where it is and the command that goes on from it."""
        if not self.open:
            return
        self.record["preempted"] = {"step": reason.step, "checkpoint": reason.checkpoint, "resume": command}
        saved = f"checkpoint {reason.checkpoint}" if reason.checkpoint else "no checkpoint yet, so it starts afresh"
        self._stop("preempted", f"{reason}: {saved}",
                   f"{reason}; record: {self.txt_path}; to go on, launch it again as before with: {command}")

    @property
    def open(self) -> bool:
        return self.enabled and not self.file.closed

    def _stop(self, status: str, error: str, summary: str):
        """End both files of a run that stops early; stderr gets where it stopped and where its record is."""
        with SIGNALS.held():
            self.record.update(status=status, error=error)
            self._write_json()
            self.file.write(f"{error.rstrip()}\n{summary}\n")
            self.file.close()
        print(summary, file=sys.stderr, flush=True)

    def _write_json(self):
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, self.json_path)


if __name__ == "__main__":
    sys.exit(main())
