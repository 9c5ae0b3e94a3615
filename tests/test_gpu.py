"""The CUDA paths against the CPU-checked ones: varlen attention, FP8 lm_head, the Triton kernels in bf16,
compiled Polar Express and optimizer steps, and a compiled training step. Runs only where a CUDA GPU is visible."""
import pytest
import torch
from torch.nn.attention.varlen import varlen_attn

import train_gpt as tg
from test_numerics import (ADAM_BETAS, ADAM_EPS, ADAM_GROUP_LRS, ADAM_GROUP_WD, BETA2, LR, NORMUON_TOLERANCE,
                           POLAR_TOLERANCE, STEPS, WEIGHT_DECAY, CountingLog, adam_group_case, adam_group_optimizer,
                           adam_group_reference, graphs_after_each_step, graphs_made, make_muon_params,
                           normuon_update_errors, polar_reference, relative_error, run_adam_group, set_grads)
from test_numerics import process_group  # noqa: F401 (a fixture, requested by name)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_documents(lengths, heads=6, dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, dim, generator=g) * 0.3 for _ in range(3))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return q, k, v, starts, T


@pytest.mark.parametrize("window", [64, 384, 2048])
def test_varlen_attention_matches_the_masked_cpu_path(window):
    q, k, v, starts, T = packed_documents([700, 130, 1, 1500, 317])
    window = torch.tensor(window)
    cpu = tg.attention(q, k, v, tg.cu_seqlens_from_starts(starts, T, torch.device("cpu")), 2048, window)
    cuda = torch.device("cuda")
    cu = tg.cu_seqlens_from_starts(starts, T, cuda)
    got = tg.attention(*(t.to(cuda, torch.bfloat16) for t in (q, k, v)), cu, 2048, window)
    assert (got.float().cpu() - cpu).abs().max() < 3e-2


@pytest.mark.parametrize("window", [64, 384, 2048])
def test_varlen_custom_ops_compute_what_varlen_attn_does(window):
    """The custom ops call the aten kernels that varlen_attn calls, with the same arguments: the same output and key
    and value gradients bit for bit, eager and compiled; dq within the rounding of the atomic adds that accumulate it
    in FlashAttention-2's backward, in no fixed order."""
    q, k, v, starts, T = packed_documents([700, 130, 1, 1500, 317])
    cu = tg.cu_seqlens_from_starts(starts, T, torch.device("cuda"))
    grad = torch.randn(T, 6, 128, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)

    def output_and_grads(fn):
        qkv = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = fn(*qkv)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in qkv)]
    want = output_and_grads(lambda *qkv: varlen_attn(*qkv, cu, cu, 2048, 2048, scale=1.0, window_size=(window, 0)))
    ops = lambda q, k, v, window: tg.attention(q, k, v, cu, 2048, window, "varlen_attn")
    for run in (ops, torch.compile(ops, fullgraph=True, dynamic=False)):
        out, dq, dk, dv = output_and_grads(lambda *qkv: run(*qkv, torch.tensor(window)))
        assert torch.equal(out, want[0]) and torch.equal(dk, want[2]) and torch.equal(dv, want[3])
        assert (dq.float() - want[1].float()).norm() < 1e-2 * want[1].float().norm()


def skip_without_flash_attn_4():
    if torch.cuda.get_device_capability()[0] not in tg.FLASH_ATTN_4_ARCHS:
        pytest.skip("flash-attn-4 runs on Hopper and Blackwell GPUs")
    try:
        tg.load_flash_attn_4()
    except ModuleNotFoundError:
        pytest.skip("flash-attn-4 is not installed (pip install -r requirements-gpu.txt)")


@pytest.mark.parametrize("window", [64, 384, 2048])
def test_flash_attn_4_matches_the_masked_cpu_path(window):
    skip_without_flash_attn_4()
    q, k, v, starts, T = packed_documents([700, 130, 1, 1500, 317])
    cpu_qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    window = torch.tensor(window)
    cpu = tg.attention(*cpu_qkv, tg.cu_seqlens_from_starts(starts, T, torch.device("cpu")), 2048, window)
    grad = torch.randn_like(cpu)
    cpu.backward(grad)
    cuda_qkv = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    cu = tg.cu_seqlens_from_starts(starts, T, torch.device("cuda"))
    got = tg.attention(*cuda_qkv, cu, 2048, window, "flash-attn-4")
    got.backward(grad.to("cuda", torch.bfloat16))
    assert (got.float().cpu() - cpu).abs().max() < 3e-2
    for on_gpu, on_cpu in zip(cuda_qkv, cpu_qkv):
        assert ((on_gpu.grad.float().cpu() - on_cpu.grad).norm() / on_cpu.grad.norm()) < 2e-2


def test_flash_attn_4_passes_the_start_up_check():
    skip_without_flash_attn_4()
    assert tg.attention_mismatch("flash-attn-4", torch.device("cuda"), 6, 128) is None
    version = tg.load_flash_attn_4()
    assert tg.choose_attention(tg.parse_config([]), torch.device("cuda")) == ("flash-attn-4", version, None)


def normuon_packed_against_alone(preset: str, device, steps: int = 2) -> dict[str, float]:
    """NorMuon's packed groups (make_optimizers) against one NorMuon per matrix, from the same weights and
    gradients: the relative difference of each parameter's total update, by name."""
    cfg = tg.parse_config([f"--preset={preset}"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 64, 1).to(device)
    packed, _ = tg.make_optimizers(cfg, model)
    names = {p: name for name, p in model.named_parameters()}
    params = [p for group in packed.param_groups for p in group["params"]]
    gen = torch.Generator(device=device).manual_seed(5)
    with torch.no_grad():
        for p in params:  # weights of both signs and sizes, so that the cautious decay matters
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
    start = {p: p.detach().clone() for p in params}
    alone = {}
    for p in params:
        copy = torch.nn.Parameter(p.detach().clone())
        copy.__dict__.update({k: v for k, v in p.__dict__.items() if k in ("matrices", "lr_mul")})
        alone[p] = (copy, tg.NorMuon([dict(params=[copy])], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                     weight_decay_mode=cfg.weight_decay_mode, momentum=cfg.muon_momentum,
                                     beta2=cfg.muon_beta2, cautious_mask=cfg.cautious_mask))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=device).to(p.dtype)
            alone[p][0].grad = p.grad.clone()
        packed.step()
        for copy, optimizer in alone.values():
            optimizer.step()
    errors = {}
    for p in params:
        want = alone[p][0].detach().float() - start[p].float()
        errors[names[p]] = ((p.detach().float() - start[p].float() - want).norm() / want.norm()).item()
    return errors


def test_packed_normuon_groups_update_each_matrix_as_if_alone(process_group):
    """Record 43's shapes on the GPU: batched Polar Express (Triton) and the batched normalisation and decay give
    each matrix the update it gets on its own."""
    errors = normuon_packed_against_alone("record43", torch.device("cuda"))
    assert len(errors) == 1 + 10 + 32
    assert max(errors.values()) < 1e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_fp8_lm_head_matches_bf16_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = tg.norm(torch.randn(4096, 768, device="cuda", generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(50304, 768, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    out = tg.fp8_mm(x, w, **tg.LM_HEAD_FP8_SCALES)[0]
    reference = x.float() @ w.float().T
    assert ((out.float() - reference).norm() / reference.norm()) < 0.08
    grad = torch.randn_like(out) * 1e-2
    out.backward(grad)
    assert ((x.grad.float() - grad.float() @ w.float()).norm() / (grad.float() @ w.float()).norm()) < 0.15
    assert ((w.grad.float() - grad.float().T @ x.float()).norm() / (grad.float().T @ x.float()).norm()) < 0.15


@pytest.mark.parametrize("shape", [(4, 768, 768), (3, 768, 3072), (768, 3072)])
def test_triton_symmetric_products_in_bf16(shape):
    X = torch.randn(shape, device="cuda")
    X = (X / X.norm(dim=(-2, -1), keepdim=True)).bfloat16()
    A = tg.xxt(X, out=X.new_empty((*shape[:-1], shape[-2])))
    reference = X.float() @ X.float().mT
    assert torch.equal(A, A.mT)
    assert (A.float() - reference).abs().max() < 1e-2 * reference.abs().max()
    B = tg.ba_plus_caa(A, alpha=2.0, beta=-1.5, out=torch.empty_like(A))
    reference_b = 2.0 * A.float() @ A.float() - 1.5 * A.float()
    assert (B.float() - reference_b).abs().max() < 2e-2 * reference_b.abs().max()


def test_polar_express_triton_path_matches_the_torch_path():
    G = torch.randn(4, 768, 3072)
    on_gpu = tg.polar_express.__wrapped__(G.cuda()).float().cpu()  # eager, as the CPU's
    on_cpu = tg.polar_express(G).float()
    assert ((on_gpu - on_cpu).norm() / on_cpu.norm()) < 2e-2


@pytest.mark.parametrize("shape", [(4, 768, 3072), (16, 768, 768), (6, 12)])
def test_polar_express_compiled_on_the_gpu_matches_float64(shape):
    """What NorMuon runs: compiled, with the Triton kernels inside the graph from 128 rows on."""
    G = torch.randn(shape, device="cuda")
    error = relative_error(tg.polar_express(G), polar_reference(G))
    assert error < POLAR_TOLERANCE, f"relative error {error:.3f}"


@pytest.mark.parametrize("mode", ["cautious", "decoupled", "none"])
def test_compiled_normuon_on_the_gpu_matches_reference_and_compiles_once(process_group, mode):
    """New lr and momentum at every step, and no new graph after the first."""
    torch._dynamo.reset()  # a function keeps at most 8 graphs: those of the other modes would crowd these out
    graphs = {}
    for step, p, error in normuon_update_errors(mode, device="cuda"):
        assert error < NORMUON_TOLERANCE[p.dtype], f"step {step}, {p.test_name}: update error {error:.3f}"
        graphs[step] = graphs_made()
    assert graphs[len(STEPS) - 1] == graphs[0], graphs


@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_compiled_adam_group_on_the_gpu_matches_reference_and_compiles_once(process_group, kind):
    """A falling lr and Adam's bias correction change at every step; no new graph after the first."""
    torch._dynamo.reset()
    params, grads = adam_group_case(seed=14)
    start = [p.detach().clone() for p in params]
    expected = adam_group_reference(kind, params, grads, ADAM_GROUP_WD, "cautious", "ge")
    params, _ = adam_group_case(seed=14, device="cuda")
    opt = adam_group_optimizer(kind, params, ADAM_GROUP_WD, "cautious", "ge")
    graphs = graphs_after_each_step(opt)
    for step, (weights, reference) in enumerate(zip(run_adam_group(opt, params, grads), expected)):
        for w, w0, ref in zip(weights, start, reference):
            error = relative_error(w.cpu() - w0, ref - w0.double())
            assert error < 2e-5, f"step {step}, {tuple(w.shape)}: update error {error:.2e}"
    assert graphs[-1] == graphs[0], graphs


def decay_counts_against_signs(device) -> tuple[int, int]:
    """(miscounted coordinates, coordinates) of the mask counts that compiled NorMuon and Adam steps make on `device`.
    NorMuon's normalised update does not depend on the weights, so a step without decay from the same state shows
    its signs; Adam's first update has the sign of the gradient."""
    def normuon_step(mode: str, count: bool):
        groups = [g for g in make_muon_params(seed=9, device=device) if g[0].dtype == torch.float32]
        set_grads(groups, seed=10)
        before = [p.detach().clone() for group in groups for p in group]
        opt = tg.NorMuon([dict(params=g) for g in groups], lr=LR, weight_decay=WEIGHT_DECAY, weight_decay_mode=mode,
                         momentum=0.95, beta2=BETA2, count_decayed=count)
        opt.step()
        return opt, [p.detach() for group in groups for p in group], before
    counting, _, before = normuon_step("cautious", True)
    _, without_decay, _ = normuon_step("none", False)
    counted = [counting.decayed[run[0]] for group in counting.param_groups for run in counting.my_runs(group)]
    params = [p for group in counting.param_groups for p in group["params"]]
    expected = [((w0 - plain) * w0 >= 0).view(getattr(p, "matrices", 1), -1).sum(-1)
                for p, w0, plain in zip(params, before, without_decay)]
    miscounted = (torch.cat(counted) - torch.cat(expected)).abs().sum().item()
    coordinates = sum(p.numel() for p in params)

    params, grads = adam_group_case(seed=11, device=device)
    adam = tg.DistAdam(params, lr=ADAM_GROUP_LRS[0], betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=ADAM_GROUP_WD,
                       count_decayed=True)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads[0]):
        p.grad = g.to(device)
    adam.step()
    for p, w0, g in zip(params, before, grads[0]):
        if p.wd_mul:
            miscounted += abs(adam.decayed[p].item() - (g.to(device) * w0 >= 0).sum().item())
            coordinates += p.numel()
    assert set(adam.decayed) == {p for p in params if p.wd_mul}
    return miscounted, coordinates


def test_the_compiled_optimizer_steps_count_the_coordinates_they_decay(process_group):
    """A sign can differ between the two NorMuon graphs only where the update is within a rounding of zero."""
    torch._dynamo.reset()
    miscounted, coordinates = decay_counts_against_signs(torch.device("cuda"))
    assert coordinates > 2000 and miscounted <= 1e-3 * coordinates, (miscounted, coordinates)


# How far the compiled model may be from the eager one, and the FP8 lm_head from the bf16 one: relative errors of
# the loss and, norm-wise, of each parameter's gradient, from the unit roundoffs of the formats involved.
BF16_U, E4M3_U, E5M2_U = 2.0 ** -8, 2.0 ** -4, 2.0 ** -3
COMPILED_LOSS, COMPILED_GRAD = 4 * BF16_U, 16 * BF16_U
FP8_LOSS, FP8_GRAD = 2 * E4M3_U / 1024 ** 0.5, (E5M2_U ** 2 + 2 * E4M3_U ** 2) ** 0.5


def test_compiled_tiny_model_matches_eager_on_the_gpu():
    """Every matrix random (the zero-initialised output matrices would leave attention and MLP out of the loss), and
    the loss and every parameter's gradient compared. Inductor runs the same matmuls as eager but fuses the
    elementwise work between them in fp32, rounding to bf16 only where a fused kernel writes, where eager rounds
    each op's output: the two differ by roundings of intermediates, each within u = 2^-8 of the value. A gradient's
    path runs forward and back through 11 blocks with about four such roundings each way per block, some 90 in all;
    as independent errors (RMS u / sqrt(3) each) they add up to about 5.5 u norm-wise, and COMPILED_GRAD allows 16 u
    (6.3%) for correlated ones. The loss is a float32 mean over 1024 tokens, which averages its logits' rounding
    errors: COMPILED_LOSS allows 4 u (1.6%). tests/test_model_checks.py runs this check on the CPU and shows that it
    fails when one block's attention is off in the compiled model only."""
    model, inputs, targets, cu = random_tiny_model_and_batch(1)
    eager = loss_and_grads(model, model, inputs, targets, cu)
    compiled = loss_and_grads(torch.compile(model, dynamic=False, fullgraph=True), model, inputs, targets, cu)
    assert mismatches(compiled, eager, COMPILED_LOSS, COMPILED_GRAD) == []


def test_an_fp8_step_matches_a_bf16_step_on_the_same_weights():
    """The FP8 lm_head against the bf16 one, eager, on the same random weights and batch. FP8 rounds the head's input
    and weights to e4m3 (u = 2^-4) in the forward and the logits' gradient to e5m2 (u = 2^-3) in the backward, once
    each, so the gradient the head sends into the model (and the head's own) carries three independent roundings:
    within sqrt(u(e5m2)^2 + 2 u(e4m3)^2) = 15% norm-wise, FP8_GRAD, which the rest of the model passes on through
    linear maps; a wrong scale or a transposed operand is off by 50% or more. A logit is within 2 u(e4m3) of the bf16
    one, and the loss averages 1024 tokens' unbiased errors: FP8_LOSS is 2 u(e4m3) / sqrt(1024), 0.4%. Measured on
    the CPU's FP8 matmul (tests/test_model_checks.py): gradients 1.8% to 4.3% off, the loss 0.003%."""
    model, inputs, targets, cu = random_tiny_model_and_batch(8)
    assert fp8_against_bf16(model, inputs, targets, cu) == []


def fp8_against_bf16(model, inputs, targets, cu) -> list[str]:
    """What differs beyond FP8_LOSS and FP8_GRAD between a training step with the FP8 head and one with the bf16 head."""
    found = {}
    for fp8 in (False, True):
        model.fp8_head = fp8
        found[fp8] = loss_and_grads(model, model, inputs, targets, cu)
    return mismatches(found[True], found[False], FP8_LOSS, FP8_GRAD)


def test_fp8_op_bodies_compiled_on_the_gpu_match_their_eager_form():
    """The custom ops' bodies are compiled on CUDA (fused scaling and casts): same numbers as the eager bodies, up
    to a rare one-step difference in an FP8 rounding."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = tg.norm(torch.randn(2048, 768, device="cuda", generator=g)).bfloat16()
    w = (torch.randn(4096, 768, device="cuda", generator=g) * 0.02).bfloat16()
    grad = (torch.randn(2048, 4096, device="cuda", generator=g) * 1e-3).bfloat16()
    scales = tg.LM_HEAD_FP8_SCALES
    compiled = tg._fp8_forward(x, w, scales["x_s"], scales["w_s"])
    eager = tg._fp8_forward.__wrapped__(x, w, scales["x_s"], scales["w_s"])
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype and c.shape == e.shape and c.stride() == e.stride()
        assert (c.float() - e.float()).norm() <= 1e-2 * e.float().norm()
    backward = [f(grad, eager[1], eager[2], *scales.values())
                for f in (tg._fp8_backward_body, tg._fp8_backward_body.__wrapped__)]
    for c, e in zip(*backward):
        assert c.dtype == e.dtype and c.shape == e.shape and c.stride() == e.stride()
        assert (c.float() - e.float()).norm() <= 1e-2 * e.float().norm()


def test_compiled_tiny_model_with_the_fp8_head_trains_like_eager():
    """As the bf16 check, with the FP8 head in both: the same FP8 op bodies run in both, but on bf16 inputs that
    differ by the roundings above, which moves some FP8 roundings by a step; each side stays within one FP8 rounding
    of the exact product, so they differ by at most the FP8 bound on top of the bf16 one."""
    model, inputs, targets, cu = random_tiny_model_and_batch(3)
    model.fp8_head = True
    eager = loss_and_grads(model, model, inputs, targets, cu)
    compiled = loss_and_grads(torch.compile(model, dynamic=False, fullgraph=True), model, inputs, targets, cu)
    assert mismatches(compiled, eager, COMPILED_LOSS + FP8_LOSS, COMPILED_GRAD + FP8_GRAD) == []

def test_this_gpu_passes_the_checks_and_gets_the_head_its_capability_allows():
    device = torch.device("cuda", 0)
    name, capability = tg.gpu_name_and_capability(device)
    cfg = tg.parse_config([])
    tg.check_gpu(cfg, device)  # a GPU that runs these tests runs the attention kernels
    assert tg.fp8_head_enabled(cfg, device) == (capability >= (8, 9)), name
    flops = tg.training_flops_per_token(cfg, 1, 3)
    peak = tg.peak_bf16_flops(device)
    assert peak is None or 1e14 < peak < 1e16, (name, peak)
    assert 7.0e8 < flops < 7.1e8


def random_tiny_model_and_batch(seed: int, device=torch.device("cuda")):
    """The tiny preset's model with random weights (its zero-initialised output matrices would hide the attention and
    the MLP), in fp32 on the CPU as the trainer runs it there, and a batch of three documents."""
    cfg = tg.parse_config(["--preset=tiny"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 1024, 1).to(device)
    if device.type == "cpu":
        model.float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    tokens = torch.randint(0, cfg.vocab_size - 1, (1025,), generator=torch.Generator().manual_seed(seed))
    tokens[[0, 300, 700]] = cfg.bos_id
    cu = tg.cu_seqlens_from_starts([0, 300, 700], 1024, device)
    return model, tokens[:-1].int().to(device), tokens[1:].long().to(device), cu


def loss_and_grads(run, model, inputs, targets, cu) -> tuple[float, dict[str, torch.Tensor]]:
    """One training forward and backward of `run` (the model or a compiled form of it): the loss and the gradient of
    each of the model's parameters, by name."""
    model.zero_grad(set_to_none=True)
    loss = run(inputs, targets, cu, 512, *model.windows(3, 7))
    loss.backward()
    return loss.item(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


def mismatches(got, want, loss_tolerance: float, grad_tolerance: float) -> list[str]:
    """What differs between two loss_and_grads results beyond the relative tolerances: the loss, and each gradient
    norm-wise."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    found = [f"loss {got_loss:.5f} against {want_loss:.5f}"] if abs(got_loss - want_loss) > loss_tolerance * abs(want_loss) else []
    for name, grad in want_grads.items():
        error = ((got_grads[name] - grad).norm() / grad.norm()).item()
        if not error <= grad_tolerance:
            found.append(f"{name}: gradient off by {error:.1%}")
    return found


def test_compiled_model_with_flash_attn_4_trains_like_eager_varlen_attn():
    """Every gradient, within the compiled model's tolerances plus the 2% by which the start-up check lets the two
    kernels differ."""
    skip_without_flash_attn_4()
    model, inputs, targets, cu = random_tiny_model_and_batch(4)
    results = []
    for kernel, run in (("varlen_attn", model), ("flash-attn-4", torch.compile(model, dynamic=False, fullgraph=True))):
        model.use_attention(kernel)
        results.append(loss_and_grads(run, model, inputs, targets, cu))
    assert mismatches(results[1], results[0], COMPILED_LOSS + 0.02, COMPILED_GRAD + 0.02) == []


@pytest.mark.parametrize("kernel", ["varlen_attn", "flash-attn-4"])
def test_one_training_graph_and_one_evaluation_graph_serve_every_window_on_cuda(kernel):
    """The tiny model compiled as the trainer compiles it, trained at each window of the record's schedule and
    evaluated at the final validation's: two graphs in all, and the compiled losses are the eager ones."""
    if kernel == "flash-attn-4":
        skip_without_flash_attn_4()
    model, inputs, targets, cu = random_tiny_model_and_batch(6)
    model.use_attention(kernel)
    log = CountingLog()
    graphs = tg.ModelGraphs(log)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=graphs, dynamic=False, fullgraph=True)
    for i, long in enumerate((3, 7, 11, 13, 20)):
        training = long != 20
        model.train(training)
        for run in (model, compiled):
            with torch.set_grad_enabled(training):
                loss = run(inputs, targets, cu, 512, *model.windows(long // 2, long))
            if training:
                loss.backward()
            if run is model:
                eager = loss.item()
        assert abs(loss.item() - eager) < 1e-2 * eager, long
        if i == 0:
            graphs.warmed_up()
    assert log.counts == (2, 1) and len(log.lines) == 1  # the evaluation graph came after the "warm-up" here
    assert "model graph 2 was compiled after the warm-up" in log.lines[0]
