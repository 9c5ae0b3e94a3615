"""The CUDA paths against the CPU-checked ones: varlen attention, FP8 lm_head, the Triton kernels in bf16,
compiled Polar Express and optimizer steps, and a compiled training step. Runs only where a CUDA GPU is visible."""
import pytest
import torch

import train_gpt as tg
from test_numerics import (ADAM_BETAS, ADAM_EPS, ADAM_GROUP_LRS, ADAM_GROUP_WD, BETA2, LR, NORMUON_TOLERANCE,
                           POLAR_TOLERANCE, STEPS, WEIGHT_DECAY, adam_group_case, adam_group_optimizer,
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
    cpu = tg.attention(q, k, v, tg.cu_seqlens_from_starts(starts, T, torch.device("cpu")), 2048, window)
    cuda = torch.device("cuda")
    cu = tg.cu_seqlens_from_starts(starts, T, cuda)
    got = tg.attention(*(t.to(cuda, torch.bfloat16) for t in (q, k, v)), cu, 2048, window)
    assert (got.float().cpu() - cpu).abs().max() < 3e-2


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


def test_compiled_tiny_model_matches_eager_on_the_gpu():
    cfg = tg.parse_config(["--preset=tiny"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 1024, 1).cuda()
    with torch.no_grad():
        model.lm_head.normal_(0, 0.02)  # a zero head would hide everything behind it
    model.fp8_head = False
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size - 1, (1025,), generator=g)
    tokens[[0, 300, 700]] = cfg.bos_id
    inputs, targets = tokens[:-1].int().cuda(), tokens[1:].long().cuda()
    cu = tg.cu_seqlens_from_starts([0, 300, 700], 1024, torch.device("cuda"))
    eager = model(inputs, targets, cu, 512, 3, 7)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)(inputs, targets, cu, 512, 3, 7)
    assert abs(eager.item() - compiled.item()) < 1e-2 * abs(eager.item())


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
    cfg = tg.parse_config(["--preset=tiny"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 1024, 1).cuda()
    with torch.no_grad():
        model.lm_head.normal_(0, 0.02)
    model.fp8_head = True
    tokens = torch.randint(0, cfg.vocab_size - 1, (1025,), generator=torch.Generator().manual_seed(3))
    tokens[[0, 500]] = cfg.bos_id
    inputs, targets = tokens[:-1].int().cuda(), tokens[1:].long().cuda()
    cu = tg.cu_seqlens_from_starts([0, 500], 1024, torch.device("cuda"))
    losses = []
    for run in (model, torch.compile(model, dynamic=False, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = run(inputs, targets, cu, 512, 3, 7)
        loss.backward()
        losses.append((loss.item(), model.lm_head.grad.float().norm().item()))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = losses
    assert abs(eager_loss - compiled_loss) < 1e-2 * eager_loss and abs(eager_grad - compiled_grad) < 5e-2 * eager_grad


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


def test_compiled_model_with_flash_attn_4_trains_like_eager_varlen_attn():
    skip_without_flash_attn_4()
    cfg = tg.parse_config(["--preset=tiny"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 1024, 1).cuda()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output matrices would hide the attention
            p.normal_(0, 0.05)
    tokens = torch.randint(0, cfg.vocab_size - 1, (1025,), generator=torch.Generator().manual_seed(4))
    tokens[[0, 300, 700]] = cfg.bos_id
    inputs, targets = tokens[:-1].int().cuda(), tokens[1:].long().cuda()
    cu = tg.cu_seqlens_from_starts([0, 300, 700], 1024, torch.device("cuda"))
    results = []
    for kernel, run in (("varlen_attn", model), ("flash-attn-4", torch.compile(model, dynamic=False, fullgraph=True))):
        model.use_attention(kernel)
        model.zero_grad(set_to_none=True)
        loss = run(inputs, targets, cu, 512, 3, 7)
        loss.backward()
        results.append((loss.item(), model.blocks["1"].attn.qkvo.grad.float()))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    assert abs(eager_loss - compiled_loss) < 1e-2 * eager_loss
    assert (compiled_grad - eager_grad).norm() < 5e-2 * eager_grad.norm()
