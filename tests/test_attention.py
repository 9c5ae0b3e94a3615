"""The flash-attn-4 path on the CPU: its custom ops, autograd and compile wiring against the masked attention, with a
plain-torch stand-in for the package's kernels; the start-up check that guards it; and how a run picks its kernel.
The real kernels run in tests/test_gpu.py."""
import itertools
import re

import pytest
import torch

import train_gpt as tg
from test_numerics import CountingLog

CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU
CPU = torch.device("cpu")


def masked_scores(q, k, cu_seqlens, max_seqlen, scale, left, right):
    """FlashAttention's rule: query i sees key j of its own document with i - left <= j <= i + right."""
    assert int(cu_seqlens.diff().max()) <= max_seqlen, "a kernel would skip the rows past max_seqlen"
    pos = torch.arange(q.size(0))
    doc = torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)
    offset = pos[:, None] - pos[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (offset <= left) & (-offset <= right)
    scores = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
    return scores.masked_fill(~allowed, float("-inf"))


class StandInFlashAttn4:
    """flash-attn-4's two entry points as train_gpt calls them (keyword-only, so a misspelt argument fails),
    computed the way FlashAttention does: forward returns the output and each row's log-sum-exp (heads, T),
    backward recomputes the probabilities from that log-sum-exp."""

    def __init__(self, window_slip=0, fail=False):
        self.window_slip, self.fail = window_slip, fail  # to fake a kernel with an off-by-one window, or a crash

    def _flash_attn_fwd(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        window_size_left, window_size_right, return_lse):
        if self.fail:
            raise RuntimeError("cute DSL compilation failed\nsecond line")
        assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k and return_lse
        assert cu_seqlens_q.dtype == torch.int32
        scores = masked_scores(q, k, cu_seqlens_q, max_seqlen_q, softmax_scale, window_size_left + self.window_slip,
                               window_size_right)
        lse = scores.logsumexp(-1)
        out = torch.einsum("hij,jhd->ihd", (scores - lse[..., None]).exp(), v.double())
        return out.to(q.dtype), lse.float(), None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, *, softmax_scale, window_size_left, window_size_right,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        assert dout.is_contiguous() and lse.shape == (q.size(1), q.size(0))
        scores = masked_scores(q, k, cu_seqlens_q, max_seqlen_q, softmax_scale, window_size_left + self.window_slip,
                               window_size_right)
        p = (scores - lse.double()[..., None]).exp()
        dout, out = dout.double(), out.double()
        dv = torch.einsum("hij,ihd->jhd", p, dout)
        dp = torch.einsum("ihd,jhd->hij", dout, v.double())
        ds = p * (dp - (dout * out).sum(-1).T[..., None])
        dq = torch.einsum("hij,jhd->ihd", ds, k.double()) * softmax_scale
        dk = torch.einsum("hij,ihd->jhd", ds, q.double()) * softmax_scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    def install(**kwargs):
        monkeypatch.setattr(tg, "flash_attn_4", StandInFlashAttn4(**kwargs))
    install()
    return install


def documents(lengths, heads=2, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    q, k, v, grad = (torch.randn(sum(lengths), heads, head_dim, generator=gen) for _ in range(4))
    return q * head_dim ** -0.5, k, v, grad, cu_seqlens


def output_and_grads(fn, q, k, v, grad):
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*qkv)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in qkv)]


@pytest.mark.parametrize("window", [0, 3, 40])
def test_flash_attn_4_ops_match_the_masked_attention(stand_in, window):
    q, k, v, grad, cu = documents([30, 1, 17, 12])
    window = torch.tensor(window)
    got = output_and_grads(lambda *qkv: tg.attention(*qkv, cu, 32, window, "flash-attn-4"), q, k, v, grad)
    want = output_and_grads(lambda *qkv: tg.attention(*qkv, cu, 32, window), q, k, v, grad)
    # The masked path is float32. Where a gradient is exactly zero (dq and dk at window 0, where each softmax has one
    # term), it returns the rounding of dS = P (dP - D), dP and D being dot products of size |dO| |V|, times K or Q:
    # a few float32 ulps (1.2e-7) of |dO| |V| |K|, whatever kernel SDPA picks (torch 2.15 picks another than 2.13).
    atol = 1e-6 * (grad.abs().max() * v.abs().max() * torch.maximum(q.abs().max(), k.abs().max())).item()
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=name)


def test_flash_attn_4_ops_compile_with_fake_shapes_and_autograd(stand_in):
    """torch.compile traces the custom ops by their fake implementations; the compiled gradients are the eager ones."""
    q, k, v, grad, cu = documents([25, 39])
    window = torch.tensor(9)
    eager = output_and_grads(lambda *qkv: tg.attention(*qkv, cu, 64, window, "flash-attn-4"), q, k, v, grad)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda *qkv: tg.attention(*qkv, cu, 64, window, "flash-attn-4").sin(), fullgraph=True,
                                 dynamic=False, backend="aot_eager")
        got = output_and_grads(compiled, q, k, v, grad)
    finally:
        torch._dynamo.reset()
    want = output_and_grads(lambda *qkv: tg.attention(*qkv, cu, 64, window, "flash-attn-4").sin(), q, k, v, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(want[0], eager[0].sin())


def test_the_compiled_masked_path_makes_one_graph_for_every_window():
    """Compiled by inductor as the model is, the CPU's attention builds its mask from the window tensor: one graph
    serves every window, each with the eager output within float32 rounding; the check that max_seqlen covers every
    document still runs; and a graph made after the warm-up (here for a shorter input) is reported with dynamo's
    reason."""
    q, k, v, _, cu = documents([30, 1, 17, 12])
    log = CountingLog()
    graphs = tg.ModelGraphs(log)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q, k, v, cu, window: tg.attention(q, k, v, cu, 32, window), backend=graphs,
                                 fullgraph=True, dynamic=False)
        for window in (3, 7, 40):
            got = compiled(q, k, v, cu, torch.tensor(window))
            torch.testing.assert_close(got, tg.attention(q, k, v, cu, 32, torch.tensor(window)), rtol=1e-6, atol=1e-6)
            graphs.warmed_up()
        assert log.counts == (1, 0) and not log.lines
        with pytest.raises(RuntimeError, match="<= 32"):  # a 40-token document
            compiled(q, k, v, torch.tensor([0, 40, 41, 58, 60], dtype=torch.int32), torch.tensor(3))
        compiled(q[:50], k[:50], v[:50], torch.tensor([0, 30, 31, 48, 50], dtype=torch.int32), torch.tensor(3))
    finally:
        torch._dynamo.reset()
    assert log.counts == (2, 1)
    (line,) = log.lines
    assert re.fullmatch(r"warning: model graph 2 was compiled after the warm-up, in the timed run; dynamo's reason: "
                        r"0/0: tensor '[qkv]' size mismatch at index 0\. expected 60, actual 50", line), line


def test_the_varlen_ops_call_the_aten_kernels_as_their_schemas_take_them():
    """On meta tensors the aten FlashAttention ops check their arguments against their schemas and return shapes
    without a GPU: the custom ops' calls fit (positional and keyword arguments both: the ones torch 2.11 and 2.13
    share), and give what the fake implementations promise the compiler."""
    meta = torch.device("meta")
    T, heads, dim = 60, 2, 16
    q, k, v, grad = (torch.empty(T, heads, dim, device=meta, dtype=torch.bfloat16) for _ in range(4))
    cu = torch.empty(5, dtype=torch.int32, device=meta)
    out, lse = tg.flash_attention(q, k, v, cu, 32, torch.tensor(3), "varlen_attn")
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, (heads, T), torch.float32)
    for got, like in zip(tg.flash_attention_backward(grad, q, k, v, out, lse, cu, 32, torch.tensor(3), "varlen_attn"),
                         (q, k, v)):
        assert (got.shape, got.dtype) == (like.shape, like.dtype)


def test_the_model_runs_the_kernel_it_is_given(stand_in):
    cfg = tg.parse_config(["--preset=tiny"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 128, 1).float()
    for p in model.parameters():  # the zero-initialised output matrices would hide the attention
        p.data.normal_(0, 0.05)
    tokens = torch.randint(1, cfg.vocab_size, (129,))
    tokens[[0, 50, 51]] = 0
    cu = tg.cu_seqlens_from_starts([0, 50, 51], 128, CPU)

    def loss_and_grads(kernel):
        model.use_attention(kernel)
        model.zero_grad()
        loss = model(tokens[:-1], tokens[1:], cu, 128, *model.windows(1, 3))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    fwd = tg.flash_attn_4._flash_attn_fwd
    tg.flash_attn_4._flash_attn_fwd = lambda *a, **kw: calls.append(kw["window_size_left"]) or fwd(*a, **kw)
    fa4_loss, fa4_grads = loss_and_grads("flash-attn-4")
    assert sorted(set(calls)) == [16, 48]  # short and long windows of tiny's 16-token blocks, every attention layer
    assert len(calls) == len(tg.ATTENTION_LAYERS)
    loss, grads = loss_and_grads("varlen_attn")
    torch.testing.assert_close(fa4_loss, loss)
    for a, b in zip(fa4_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_start_up_check_passes_a_kernel_that_agrees(stand_in):
    assert tg.attention_mismatch("flash-attn-4", CPU, heads=2, head_dim=32) is None


def test_the_start_up_check_catches_an_off_by_one_window(stand_in):
    stand_in(window_slip=1)
    problem = tg.attention_mismatch("flash-attn-4", CPU, heads=2, head_dim=32)
    assert problem.startswith("its output differs from varlen_attn's by ") and problem.endswith("at window 8")
    assert float(problem.split(" by ")[1].split("%")[0]) > 2


def test_the_start_up_check_reports_a_kernel_that_raises(stand_in):
    stand_in(fail=True)
    assert (tg.attention_mismatch("flash-attn-4", CPU, heads=2, head_dim=32)
            == "flash-attn-4 raised RuntimeError: cute DSL compilation failed")


def fake_gpu(monkeypatch, capability, version="4.0.0b36", problem=None):
    monkeypatch.setattr(tg, "gpu_name_and_capability", lambda device: ("NVIDIA TEST GPU", capability))
    def load():
        if version is None:
            raise ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")
        return version
    monkeypatch.setattr(tg, "load_flash_attn_4", load)
    checked = []
    monkeypatch.setattr(tg, "attention_mismatch", lambda *args: checked.append(args) or problem)
    return checked


def test_auto_takes_flash_attn_4_on_hopper_once_it_passes_the_check(monkeypatch):
    checked = fake_gpu(monkeypatch, (9, 0))
    assert tg.choose_attention(tg.parse_config([]), CUDA) == ("flash-attn-4", "4.0.0b36", None)
    assert checked == [("flash-attn-4", CUDA, 6, 128)]  # record 43's heads and head size


@pytest.mark.parametrize("capability, version, problem, note", [
    ((8, 0), "4.0.0b36", None, "flash-attn-4 not used: NVIDIA TEST GPU is not a Hopper or Blackwell GPU "
                                "(compute capability 9.x or 10.x)"),
    ((12, 0), "4.0.0b36", None, "flash-attn-4 not used: NVIDIA TEST GPU is not a Hopper or Blackwell GPU "
                                 "(compute capability 9.x or 10.x)"),
    ((9, 0), None, None, "flash-attn-4 not used: it is not installed (pip install -r requirements-gpu.txt)"),
    ((10, 0), "4.0.0b36", "its dq differs from varlen_attn's by 7.0% at window 8",
     "flash-attn-4 not used: its dq differs from varlen_attn's by 7.0% at window 8"),
])
def test_auto_falls_back_to_varlen_attn_and_says_why(monkeypatch, capability, version, problem, note):
    fake_gpu(monkeypatch, capability, version, problem)
    assert tg.choose_attention(tg.parse_config([]), CUDA) == ("varlen_attn", None, note)
    flag = tg.parse_config(["--attention=flash-attn-4"])
    expected = f"--attention=flash-attn-4: {note.split(': ', 1)[1]}; use --attention=auto or --attention=varlen_attn"
    with pytest.raises(tg.ConfigError, match=f"^{re.escape(expected)}$"):
        tg.choose_attention(flag, CUDA)


def test_varlen_attn_by_flag_and_the_cpu(monkeypatch):
    checked = fake_gpu(monkeypatch, (9, 0))
    assert tg.choose_attention(tg.parse_config(["--attention=varlen_attn"]), CUDA) == ("varlen_attn", None, None)
    assert tg.choose_attention(tg.parse_config([]), CPU) == ("masked_sdpa", None, None)
    assert not checked
    with pytest.raises(tg.ConfigError, match="--attention=flash-attn-4 needs a CUDA GPU and this run is on the CPU"):
        tg.choose_attention(tg.parse_config(["--attention=flash-attn-4"]), CPU)


@pytest.mark.parametrize("error, note", [
    (ModuleNotFoundError("No module named 'cutlass'", name="cutlass"),
     "it cannot load: ModuleNotFoundError: No module named 'cutlass'"),
    (OSError("libcuda.so.1: cannot open shared object file\ndetails"),
     "it cannot load: OSError: libcuda.so.1: cannot open shared object file"),
])
def test_a_broken_install_is_named_and_auto_trains_on(monkeypatch, error, note):
    fake_gpu(monkeypatch, (9, 0))

    def load():
        raise error
    monkeypatch.setattr(tg, "load_flash_attn_4", load)
    assert tg.choose_attention(tg.parse_config([]), CUDA) == ("varlen_attn", None, f"flash-attn-4 not used: {note}")
    with pytest.raises(tg.ConfigError, match=re.escape(f"--attention=flash-attn-4: {note}; use")):
        tg.choose_attention(tg.parse_config(["--attention=flash-attn-4"]), CUDA)


def test_loading_where_it_is_not_installed_names_the_package():
    try:  # the CPU suite's machines do not install flash-attn-4
        import flash_attn.cute  # noqa: F401
        pytest.skip("flash-attn-4 is installed here")
    except ModuleNotFoundError:
        pass
    with pytest.raises(ModuleNotFoundError) as raised:
        tg.load_flash_attn_4()
    assert raised.value.name.startswith("flash_attn")
