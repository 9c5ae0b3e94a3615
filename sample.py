"""Continue prompts with a model trained by train_gpt.py, read from one of its checkpoints (written with --save_every).

    python sample.py checkpoints                                   # the newest checkpoint in the folder, from scratch
    python sample.py checkpoints/step_002245 --prompt "The capital of France is" --tokens 50 --temperature 0.8
    python sample.py checkpoints --prompt "Once upon a time" --temperature 0        # greedy: the same text every time
    python sample.py checkpoints --prompt "1023 5 17"              # a tiny-preset model: token ids in, token ids out
    python sample.py checkpoints --hellaswag data/hellaswag/hellaswag_val.json     # its HellaSwag accuracy instead

With the GPT-2 vocabulary (50257 tokens) prompts are text, encoded with tiktoken's gpt2 tokenizer, and continuations
are decoded; with any other vocabulary (the tiny preset's synthetic one) prompts and continuations are token ids.
Every prompt starts with BOS, as every training document does, and a continuation ends where the model writes the
next BOS. The model runs as in the final validation, on a GPU when there is one, else on the CPU.
"""
import argparse
import dataclasses
import sys

import torch

import train_gpt as tg
from data.fineweb import GPT2_VOCAB_SIZE, gpt2_encoding


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step_<S> folder written with --save_every, or a folder of them (the newest)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue, or token ids for a vocabulary other than GPT-2's; repeat for several "
                             "(default: none, a sample from scratch)")
    parser.add_argument("--num_samples", type=int, default=1, help="continuations of each prompt (default 1)")
    parser.add_argument("--tokens", type=int, default=64, help="most tokens per continuation (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy, the likeliest token every time (default 1)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens, 0: all (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if there is one")
    parser.add_argument("--hellaswag", default="", help="score the model on these tokenized HellaSwag examples (made by "
                                                        "data/hellaswag.py) instead of sampling")
    args = parser.parse_args(argv)
    for name, low in (("num_samples", 1), ("tokens", 1), ("temperature", 0), ("top_k", 0)):
        if getattr(args, name) < low:
            raise tg.UserError(f"--{name} {getattr(args, name)}: give at least {low}")
    return args


def open_checkpoint(path) -> dict:
    """The meta of checkpoint `path`, or of the newest checkpoint in the folder `path`."""
    found = tg.checkpoint_folders(path)
    return tg.read_checkpoint(found[-1] if found else path)


def build_model(meta: dict, device, max_seq_len: int) -> tuple[tg.Config, tg.GPT]:
    """The checkpoint's configuration and its model, ready to evaluate on `device` (in fp32 on a CPU, as trained there)."""
    saved = meta["config"]
    cfg = tg.Config(**{f.name: tuple(saved[f.name]) if isinstance(f.default, tuple) else saved[f.name]
                       for f in dataclasses.fields(tg.Config) if f.name in saved})
    model = tg.GPT(cfg, max_seq_len, world_size=1).to(device)
    if device.type == "cpu":
        model.float()
    tg.load_model(tg.read_checkpoint_tensors(meta["path"], lambda key: key.startswith(("model/", "rotary/"))), model)
    return cfg, model.eval()


def prompt_ids(prompt: str, vocab_size: int, encoding) -> list[int]:
    if encoding is not None:
        return encoding.encode_ordinary(prompt)
    try:
        ids = [int(token) for token in prompt.replace(",", " ").split()]
    except ValueError:
        raise tg.UserError(f"--prompt {prompt!r}: this model's vocabulary is not GPT-2's, so give token ids, "
                           "e.g. --prompt '5 17 230'") from None
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise tg.UserError(f"--prompt {prompt!r}: token {outside[0]} is outside the model's vocabulary of "
                           f"{vocab_size} tokens (0 to {vocab_size - 1})")
    return ids


@torch.no_grad()
def generate(model: tg.GPT, cfg: tg.Config, windows, prompt: list[int], tokens: int, temperature: float, top_k: int,
             generator: torch.Generator) -> list[int]:
    """Up to `tokens` tokens after BOS + prompt, one at a time; stops before a BOS, where a new document would start."""
    device = model.lm_head.device
    ids, out = [cfg.bos_id, *prompt], []
    windows = model.windows(*windows)
    for _ in range(tokens):
        inputs = torch.tensor(ids, dtype=torch.int32, device=device)
        cu_seqlens = tg.cu_seqlens_from_starts([0], len(ids), device)
        logits = model(inputs, None, cu_seqlens, len(ids), *windows)[-1, :cfg.vocab_size]  # the padding is never a target
        token = next_token(logits, temperature, top_k, generator)
        if token == cfg.bos_id:
            break
        ids.append(token)
        out.append(token)
    return out


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """The likeliest token at temperature 0; else a draw from the softmax of logits / temperature, among the top_k
    likeliest tokens when top_k is not 0."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        logits[logits < logits.topk(min(top_k, logits.numel())).values[-1]] = -float("inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def score_hellaswag(args, meta: dict, device):
    examples = tg.load_hellaswag(args.hellaswag, meta["config"]["vocab_size"])
    cfg, model = build_model(meta, device, tg.HELLASWAG_BATCH_TOKENS)
    windows = tg.final_windows(cfg, meta["step"])
    print(tg.hellaswag_report(*tg.hellaswag_accuracy(model, examples, cfg.bos_id, windows, tg.HELLASWAG_BATCH_TOKENS)))


def continue_prompts(args, meta: dict, device):
    vocab_size = meta["config"]["vocab_size"]
    encoding = gpt2_encoding() if vocab_size == GPT2_VOCAB_SIZE else None
    prompts = args.prompt or [""]
    ids = [prompt_ids(prompt, vocab_size, encoding) for prompt in prompts]
    cfg, model = build_model(meta, device, 1 + max(map(len, ids)) + args.tokens)
    windows = tg.final_windows(cfg, meta["step"])
    generator = torch.Generator(device).manual_seed(args.seed)
    for prompt, prompt_tokens in zip(prompts, ids):
        for _ in range(args.num_samples):
            out = generate(model, cfg, windows, prompt_tokens, args.tokens, args.temperature, args.top_k, generator)
            print(f"{prompt}{encoding.decode(out)}\n{'-' * 40}" if encoding else " ".join(map(str, out)), flush=True)


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda" and not torch.cuda.is_available():
            raise tg.UserError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu")
        meta = open_checkpoint(args.checkpoint)
        (score_hellaswag if args.hellaswag else continue_prompts)(args, meta, torch.device(kind))
        print(f"({meta['path']}: the model after step {meta['step']})", file=sys.stderr)
        return 0
    except tg.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
