"""The CUDA path checked without a GPU, on a CUDA build of torch (./test.sh --torch=VERSION runs it on the ends of the
supported range). What a GPU would run is traced on fake CUDA tensors, which carry shape, dtype and device but no data:

- the model compiled as the trainer compiles it (dynamo, the trainer's ModelGraphs), inductor's lowering replaced by
  running dynamo's graph on the fake tensors, since inductor wants a CUDA driver: the training forward with the FP8
  lm_head and the attention custom ops, and the evaluation forward, over the window schedule;
- the custom ops' real bodies (the aten FlashAttention-2 ops with this torch's schema, torch._scaled_mm) against the
  fakes that compiled graphs are traced with;
- the backward through the custom ops' autograd formulas, on the meta device (the autograd engine refuses fake CUDA
  tensors without a driver);
- both optimizers' steps, traced by dynamo like their compiled bodies on a GPU, Triton kernel included;
- the Polar Express Triton kernel compiled to cubin for Hopper and Blackwell.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg
from conftest import ROOT
from test_numerics import CountingLog

if not torch.backends.cuda.is_built():
    pytest.skip(f"torch {torch.__version__} is a CPU build; the CUDA path is checked on a CUDA build: ./test.sh "
                "--torch=VERSION", allow_module_level=True)

CUDA = torch.device("cuda", 0)
PRESETS = ["tiny", "record43"]


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile as on a GPU up to inductor, whose place is taken by running dynamo's graph as it is; returns the
    graphs it was handed. Dynamo treats Triton kernels as kernels only where torch finds a GPU for them: it is told
    there is one."""
    import torch._inductor.compile_fx
    import torch.utils._triton
    graphs = []

    def run_the_graph(graph, example_inputs, **options):
        graphs.append(graph)
        return graph.forward
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", run_the_graph)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda **kwargs: True)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


@pytest.fixture
def gpu_kernels(monkeypatch):
    """train_gpt's Triton kernels as Triton builds them for a GPU: where the suite runs them in Triton's CPU interpreter
    (tests/conftest.py), the same functions are made JIT kernels again."""
    from triton.runtime.jit import JITFunction
    for name in ("_lower_tile", "_sym_product_kernel"):
        kernel = getattr(tg, name)
        if not isinstance(kernel, JITFunction):
            monkeypatch.setattr(tg, name, JITFunction(kernel.fn))


@pytest.fixture(params=[1, 8])
def world(request):
    """A process group of one rank (gloo), or rank 0 of the record's eight with collectives that move nothing."""
    if request.param == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.param)
    yield request.param
    dist.destroy_process_group()


def fake_cuda():
    return FakeTensorMode(allow_non_fake_inputs=True)


def model_on(fake: FakeTensorMode | None, preset: str, world: int = 1) -> tuple[tg.GPT, tg.Config]:
    """The preset's model as build_model leaves it on a GPU (bf16 embeddings and head, fp32 matrices, the FP8 head),
    with no data: made on the meta device, and given storage on the fake GPU of `fake` unless that is None. Call it
    outside `fake`: a meta tensor made inside it would be fake, and could not be given new storage."""
    cfg = tg.parse_config([f"--preset={preset}"])
    with torch.device("meta"):
        model = tg.GPT(cfg, max(tg.batch_split(cfg, world)[1], cfg.val_seq_tokens), world)
    if fake is not None:
        with fake:
            model = model.to_empty(device=CUDA)
    model.fp8_head = True
    return model, cfg


def batch(cfg: tg.Config, tokens: int, device) -> tuple:
    """inputs, targets, cu_seqlens and max_seqlen of a packed sequence of three documents, as the loaders make them."""
    starts = [0, tokens // 3, tokens // 2]
    inputs, targets = tg.to_device(torch.zeros(tokens + 1, dtype=torch.uint16), torch.device("cpu"))
    cu_seqlens = tg.cu_seqlens_from_starts(starts, tokens, torch.device("cpu"))
    return inputs.to(device), targets.to(device), cu_seqlens.to(device), cfg.max_doc_tokens


def schedule_windows(cfg: tg.Config) -> list[tuple[int, int]]:
    """Every (short, long) window pair the preset trains at, in blocks."""
    longs = dict.fromkeys(tg.long_window(cfg, step) for step in range(cfg.num_iterations))
    return [(long // 2, long) for long in longs]


def assert_fake_cuda(t: torch.Tensor, shape, dtype):
    assert (tuple(t.shape), t.dtype, t.device) == (tuple(shape), dtype, CUDA)


@pytest.mark.parametrize("preset", PRESETS)
def test_one_training_graph_and_one_evaluation_graph_serve_the_schedule_on_cuda(preset, traced_compile):
    """The model compiled with the trainer's backend trains at every window pair of the schedule, its rotary widened
    between them, and evaluates at the final validation's windows: two graphs, each calling the attention ops and, in
    training, the FP8 head."""
    log = CountingLog()
    graphs = tg.ModelGraphs(log)
    fake = fake_cuda()
    model, cfg = model_on(fake, preset)
    with fake:
        compiled = torch.compile(model, backend=graphs, dynamic=False, fullgraph=True)
        train_batch = batch(cfg, tg.batch_split(cfg, 1)[1], CUDA)
        val_batch = batch(cfg, cfg.val_seq_tokens, CUDA)
        windows = schedule_windows(cfg)
        assert len(windows) > 1
        for i, pair in enumerate(windows):
            if i:  # as train() widens the window
                model.rotary.extend_window(windows[i - 1][1], pair[1])
            assert_fake_cuda(compiled(*train_batch, *model.windows(*pair)), (), torch.float32)
            if i == 0:  # the trainer's warm-up: a training step, then a validation
                model.eval()
                loss = compiled(*val_batch, *model.windows(*tg.final_windows(cfg, cfg.num_iterations)))
                assert_fake_cuda(loss, (), torch.float32)
                model.train()
                graphs.warmed_up()
    assert log.counts == (2, 0), log.lines
    training, evaluation = (ops_called(graph) for graph in traced_compile)
    attention_layers = len(tg.ATTENTION_LAYERS)
    assert training["train_gpt.flash_attention"] == evaluation["train_gpt.flash_attention"] == attention_layers
    assert training["train_gpt.fp8_mm"] == 1 and "train_gpt.fp8_mm" not in evaluation


def ops_called(graph: torch.fx.GraphModule) -> dict[str, int]:
    """How often each custom or aten op is called in a dynamo graph, by its name (namespace.op)."""
    counts = {}
    for node in graph.graph.nodes:
        name = getattr(node.target, "_qualified_op_name", None) or getattr(node.target, "name", lambda: None)()
        if node.op == "call_function" and isinstance(name, str):
            name = name.split(".default")[0].replace("::", ".")
            counts[name] = counts.get(name, 0) + 1
    return counts


def real_body(op):
    """The function a custom op runs on a GPU, callable on fake tensors (calling the op there would run its fake)."""
    return op._init_fn


def attention_case(fake: FakeTensorMode, cfg: tg.Config, tokens: int):
    """q, k, v and an output gradient of the preset's attention shape in bf16 on the fake GPU, with cu_seqlens."""
    with fake:
        q, k, v, grad = (torch.empty(tokens, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device=CUDA)
                         for _ in range(4))
        cu_seqlens = batch(cfg, tokens, CUDA)[2]
    return q, k, v, grad, cu_seqlens


def same_layout(got, want) -> list[str]:
    """Where two outputs (tensors or tuples of them) differ in shape, dtype, device or strides."""
    got, want = (list(x) if isinstance(x, (tuple, list)) else [x] for x in (got, want))
    if len(got) != len(want):
        return [f"{len(got)} outputs, the fake gives {len(want)}"]
    return [f"output {i}: {g.shape} {g.dtype} {g.device} strides {g.stride()}, the fake gives {w.shape} {w.dtype} "
            f"{w.device} strides {w.stride()}" for i, (g, w) in enumerate(zip(got, want))
            if (g.shape, g.dtype, g.device, g.stride()) != (w.shape, w.dtype, w.device, w.stride())]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_custom_ops_bodies_match_their_fakes_on_cuda(preset, gpu_kernels, traced_compile):
    """Compiled graphs are traced with the ops' fakes and run with their bodies: on fake CUDA tensors, the varlen
    attention ops (aten's FlashAttention-2 forward and backward, called with this torch's schema) and the FP8 head's
    _scaled_mm forward and backward (traced by dynamo, as they are compiled on a GPU) give what the fakes promise, in
    shape, dtype, device and strides."""
    fake = fake_cuda()
    cfg = tg.parse_config([f"--preset={preset}"])
    tokens = tg.batch_split(cfg, 1)[1]
    q, k, v, grad, cu_seqlens = attention_case(fake, cfg, tokens)
    with fake:
        window = torch.tensor(cfg.window_block)
        args = (q, k, v, cu_seqlens, cfg.max_doc_tokens, window, "varlen_attn")
        out, lse = real_body(tg.flash_attention)(*args)
        assert same_layout((out, lse), tg.flash_attention(*args)) == []
        assert_fake_cuda(lse, (cfg.num_heads, tokens), torch.float32)
        args = (grad, q, k, v, out, lse, cu_seqlens, cfg.max_doc_tokens, window, "varlen_attn")
        assert same_layout(real_body(tg.flash_attention_backward)(*args), tg.flash_attention_backward(*args)) == []

        vocab = tg.next_multiple(cfg.vocab_size, 128)
        x = torch.empty(tokens, cfg.model_dim, dtype=torch.bfloat16, device=CUDA)
        w = torch.empty(vocab, cfg.model_dim, dtype=torch.bfloat16, device=CUDA)
        scales = tuple(tg.LM_HEAD_FP8_SCALES.values())
        forward = real_body(tg.fp8_mm)(x, w, *scales)
        assert same_layout(forward, tg.fp8_mm(x, w, *scales)) == []
        assert_fake_cuda(forward[0], (tokens, vocab), torch.bfloat16)
        g = torch.empty(tokens, vocab, dtype=torch.bfloat16, device=CUDA)
        args = (g, *forward[1:], *scales)
        assert same_layout(real_body(tg.fp8_mm_backward)(*args), tg.fp8_mm_backward(*args)) == []


class OpCounter(TorchDispatchMode):
    """Counts the calls of each op by name (namespace.op) as they are dispatched."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split(".default")[0].replace("::", ".")
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def meta_gradients(preset: str, world: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Each parameter's gradient (shape, dtype) from a training forward and backward of the GPU's model on the meta
    device, through the custom ops' autograd formulas; asserts that their backward ops ran."""
    model, cfg = model_on(None, preset, world)
    model.use_attention("flash-attn-4")  # on meta, this is what routes attention through the custom ops
    counter = OpCounter()
    with counter:
        loss = model(*batch(cfg, tg.batch_split(cfg, world)[1], torch.device("meta")), *model.windows(1, 3))
        loss.backward()
    assert counter.counts["train_gpt.flash_attention_backward"] == len(tg.ATTENTION_LAYERS)
    assert counter.counts["train_gpt.fp8_mm_backward"] == 1
    return {name: (p.grad.shape, p.grad.dtype) for name, p in model.named_parameters()}


@pytest.mark.parametrize("preset", PRESETS)
def test_backward_through_the_custom_ops_gives_each_parameter_its_gradient(preset):
    """On the meta device, where the autograd engine runs without a GPU: every parameter gets a gradient of its own
    shape and dtype, the bf16 lm_head's included although the FP8 backward computes it in float32."""
    model, _ = model_on(None, preset)
    grads = meta_gradients(preset, 1)
    for name, p in model.named_parameters():
        assert grads[name] == (p.shape, p.dtype), name
    attention = tg.parse_config([f"--preset={preset}"])
    q, k, v = (torch.empty(64, attention.num_heads, attention.head_dim, dtype=torch.bfloat16, device="meta",
                           requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 20, 64], dtype=torch.int32, device="meta")
    out = tg.flash_attention(q, k, v, cu_seqlens, 64, torch.tensor(8), "varlen_attn")[0]
    out.backward(torch.empty_like(out))
    assert all((t.grad.shape, t.grad.dtype) == (t.shape, t.dtype) for t in (q, k, v))


# At one rank, all_gather_into compares data pointers, which a fake tensor has none of (a real GPU's have)
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor:UserWarning")
@pytest.mark.parametrize("preset", PRESETS)
def test_optimizer_steps_keep_parameters_on_cuda_in_their_dtypes(preset, world, gpu_kernels, traced_compile):
    """NorMuon and Adam stepped as their compiled bodies would be on a GPU, at one rank or rank 0 of eight, over
    steps that differ in lr, momentum and which optimizers step: parameters and state stay on the GPU in their
    dtypes, and every step after the first two reuses their graphs."""
    grads = meta_gradients(preset, world)
    fake = fake_cuda()
    model, cfg = model_on(fake, preset, world)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    with fake:
        optimizers = tg.make_optimizers(cfg, model)
        graphs_after = []
        for step in (0, 1, 2, 3, cfg.num_iterations - 2, cfg.num_iterations - 1):
            for name, p in model.named_parameters():
                p.grad = torch.empty(grads[name][0], dtype=grads[name][1], device=CUDA)
            tg.set_schedules(cfg, optimizers, step)
            optimizers[0].step()
            if step % 2:
                optimizers[1].step()
            graphs_after.append(len(traced_compile))
    for name, p in model.named_parameters():
        assert (p.device, p.dtype) == (CUDA, dtypes[name]), name
    for optimizer in optimizers:
        for state in optimizer.state.values():
            assert all(t.device == CUDA for t in state.values() if isinstance(t, torch.Tensor))
    assert graphs_after[1] > graphs_after[0] > 0 and len(set(graphs_after[1:])) == 1, graphs_after


# Run in a Python of its own: in the suite's process Triton's CPU interpreter has patched triton.language.
COMPILE_POLAR_EXPRESS_KERNELS = """
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import train_gpt as tg


class LaunchRecorder:
    # stands for the kernel: kernel[grid](*args, **options) records the launch instead of running it
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.launches.append((args, options))


def triton_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float32: "fp32"}[value.dtype]
    return "fp32" if isinstance(value, float) else "i32"


kernel, tg._sym_product_kernel = tg._sym_product_kernel, LaunchRecorder()
dim = tg.parse_config([]).model_dim
for cols in (dim, 4 * dim):  # an attention matrix (qkvo holds four) and an MLP matrix
    X = torch.zeros(2, dim, cols, dtype=torch.bfloat16)
    A = tg.xxt(X, out=X.new_empty(2, dim, dim))
    tg.ba_plus_caa(A, alpha=1.0, beta=1.0, out=torch.empty_like(A))
results = []
for arch in map(int, sys.argv[1:]):
    for args, options in tg._sym_product_kernel.launches:
        constants = {name: options[name] for name in ("K", "ADD_LEFT", "BLOCK", "BLOCK_K")}
        names = [name for name in kernel.arg_names if name not in constants]
        signature = {name: triton_type(value) for name, value in zip(names, args)}
        signature.update(dict.fromkeys(constants, "constexpr"))
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=options["num_warps"], num_stages=options["num_stages"]))
        results.append(dict(arch=arch, constants=constants, ptx_target=".target sm_%d" % arch in compiled.asm["ptx"],
                            cubin_bytes=len(compiled.asm["cubin"])))
print(json.dumps(results))
"""


def test_the_polar_express_kernels_compile_for_hopper_and_blackwell():
    """Each launch Polar Express makes for record 43's matrices (X X^T of the attention's and the MLP's, then b A + c A^2),
    with the arguments and options its launcher passes, compiled by Triton to PTX and cubin for compute capability 9.0
    and 10.0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_POLAR_EXPRESS_KERNELS, "90", "100"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    dim = tg.parse_config([]).model_dim
    launched = [(c["K"], c["ADD_LEFT"]) for c in (r["constants"] for r in results if r["arch"] == 90)]
    assert launched == [(dim, False), (dim, True), (4 * dim, False), (dim, True)]
    assert [r["arch"] for r in results] == [90] * 4 + [100] * 4
    for r in results:
        assert r["ptx_target"] and r["cubin_bytes"] > 1000, r
