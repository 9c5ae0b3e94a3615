"""What train_gpt.py chooses for a GPU and what it reports about speed, checked on the CPU by faking the GPU
queries: attention and FP8 capability, the FLOPs per token behind MFU, out-of-memory advice, and the compile cache."""
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train_gpt as tg

CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU


def fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(tg, "gpu_name_and_capability", lambda device: (name, capability))


@pytest.mark.parametrize("name, capability, flag, fp8", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "auto", True),
    ("NVIDIA H100 80GB HBM3", (9, 0), "off", False),
    ("NVIDIA GeForce RTX 4090", (8, 9), "auto", True),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "auto", False),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "off", False),
])
def test_fp8_head_follows_the_gpu(monkeypatch, name, capability, flag, fp8):
    fake_gpu(monkeypatch, name, capability)
    cfg = tg.parse_config([f"--fp8_head={flag}"])
    tg.check_gpu(cfg, CUDA)
    assert tg.fp8_head_enabled(cfg, CUDA) is fp8


def test_fp8_head_on_without_fp8_is_refused_naming_the_gpu_and_the_flag(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    with pytest.raises(tg.ConfigError, match=r"--fp8_head=on: NVIDIA A100-SXM4-40GB \(compute capability 8\.0\) has "
                                             r"no FP8 matmuls.*use --fp8_head=auto or --fp8_head=off"):
        tg.check_gpu(tg.parse_config(["--fp8_head=on"]), CUDA)
    with pytest.raises(tg.ConfigError, match="this run is on the CPU"):
        tg.check_gpu(tg.parse_config(["--fp8_head=on"]), torch.device("cpu"))
    assert not tg.fp8_head_enabled(tg.parse_config([]), torch.device("cpu"))


def test_a_gpu_below_the_attention_kernels_minimum_is_refused(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(tg.ConfigError, match=r"Tesla T4 \(compute capability 7\.5\) cannot run the varlen attention "
                                             r"kernels, which need compute capability 8\.0"):
        tg.check_gpu(tg.parse_config(["--fp8_head=off"]), CUDA)


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                          ("NVIDIA GeForce RTX 4090", 165), ("Tesla T4", None)])
def test_peak_flops_by_gpu_name(monkeypatch, name, tflops):
    fake_gpu(monkeypatch, name, (9, 0))
    assert tg.peak_bf16_flops(CUDA) == (tflops and tflops * 1e12)
    assert tg.peak_bf16_flops(torch.device("cpu")) is None


def counted_flops_per_token(cfg, T):
    """FlopCounterMode's count for one forward and backward of T tokens (one document) on the CPU path. Attention runs
    on SDPA's math backend, whose matmuls are the model's own: the counter charges a fused kernel by its algorithm
    (torch 2.15 sends the masked CPU attention to a flash kernel, whose backward it counts with the recomputation of
    the scores, 2 x dim FLOPs per key more than the model does)."""
    torch.manual_seed(0)
    model = tg.GPT(cfg, T, 1).float()
    tokens = torch.randint(0, cfg.vocab_size - 1, (T + 1,))
    tokens[0] = cfg.bos_id
    cu_seqlens = tg.cu_seqlens_from_starts([0], T, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens[:-1].int(), tokens[1:].long(), cu_seqlens, T, *model.windows(64, 64)).backward()
    return counter.get_total_flops() / T


@pytest.mark.parametrize("preset", ["tiny", "record43"])
def test_flops_per_token_agree_with_torchs_flop_counter(preset):
    """The CPU attention is dense (a mask), so the counter sees every query attend to all T keys: the formula with
    documents and windows of T tokens. The smear gate reads T - 1 tokens, the formula counts T: 72 FLOPs per
    sequence apart."""
    T = 128
    cfg = tg.parse_config([f"--preset={preset}", f"--max_doc_tokens={T}"])
    counted = counted_flops_per_token(cfg, T)
    formula = tg.training_flops_per_token(cfg, 64, 64)
    assert formula - counted == pytest.approx(6 * tg.GATE_INPUTS / T)
    print(f"{preset}: formula {formula:,} FLOPs per token, FlopCounterMode {counted:,.2f}")


def test_flops_per_token_follow_the_window():
    """record43: 6 FLOPs per weight of every matrix the model multiplies by (all but the embeddings and scalars),
    then 12 x 768 per attended key; 8 attention layers use the short window, 2 the long one."""
    cfg = tg.parse_config([])
    with torch.device("meta"):
        model = tg.GPT(cfg, 128, 1)
    embeddings = {"embed.weight", "scalars"} | {f"value_embeds.{i}.weight" for i in range(3)}
    matmul_weights = sum(p.numel() for name, p in model.named_parameters() if name not in embeddings)
    at_start, at_end = tg.training_flops_per_token(cfg, 1, 3), tg.training_flops_per_token(cfg, 6, 13)
    per_key = 12 * cfg.model_dim
    assert at_start == 6 * matmul_weights + per_key * 128 * (8 * 1 + 2 * 3)
    assert at_end - at_start == per_key * 128 * (8 * (6 - 1) + 2 * (13 - 3))


def test_out_of_memory_names_the_flag_and_a_value_that_needs_less(monkeypatch):
    cfg = tg.parse_config([])
    with pytest.raises(tg.UserError, match=r"--micro_batch_tokens=32768; use --micro_batch_tokens=16384 \(the global "
                                           r"batch of 262144 tokens stays"):
        with tg.explain_out_of_memory(cfg, world=8, training=True):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(tg.UserError, match=r"--val_seq_tokens=262144; use --val_seq_tokens=131072"):
        with tg.explain_out_of_memory(cfg, world=8, training=False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    tiny = tg.parse_config(["--preset=tiny", "--micro_batch_tokens=128", "--train_batch_tokens=128"])
    with pytest.raises(tg.UserError, match="use a GPU with more memory or more GPUs"):
        with tg.explain_out_of_memory(tiny, world=1, training=True):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED",
                   "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")


def test_compiled_kernels_persist_in_the_cache_folder_while_the_run_lasts(tmp_path, monkeypatch):
    """A real inductor compile on the CPU writes its artifacts under --compile_cache; afterwards the process's
    environment is as it was."""
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    cache = tmp_path / "cache"
    with tg.persist_compiled_kernels(tg.parse_config([f"--compile_cache={cache}"])):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")
        # flash-attn-4 reads these when it loads, after this call
        assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
        assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(cache / "flash_attn_4")
        torch._dynamo.reset()
        try:
            torch.compile(lambda x: (x * 3).sin() + 1, dynamic=False)(torch.randn(8))
        finally:
            torch._dynamo.reset()
    assert any(path.is_file() for path in (cache / "inductor").rglob("*"))
    assert {name: os.environ.get(name) for name in CACHE_VARIABLES} == {
        "TORCHINDUCTOR_CACHE_DIR": None, "TRITON_CACHE_DIR": "/somewhere/else",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": None, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": None}


def test_compile_cache_off_while_the_run_lasts_and_an_unwritable_folder(tmp_path):
    import torch._inductor.config as inductor_config
    with inductor_config.patch(force_disable_caches=False):
        with tg.persist_compiled_kernels(tg.parse_config(["--compile_cache=off"])):
            assert inductor_config.force_disable_caches
        assert not inductor_config.force_disable_caches
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(tg.ConfigError, match=r"--compile_cache=.*cannot create .*use --compile_cache=off"):
        with tg.persist_compiled_kernels(tg.parse_config([f"--compile_cache={blocker / 'sub'}"])):
            pass
