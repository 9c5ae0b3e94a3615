"""Half-work symmetric Polar Express kernels, run by Triton's CPU interpreter against float64 references
(tests/conftest.py turns the interpreter on where no GPU is visible).

The interpreter cannot do tl.dot on bf16 (numpy has no bf16), so the kernels are checked in fp32 and fp16.
"""
import pytest
import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:
    pytest.skip(f"triton cannot be imported ({error}); install it to test the Polar Express kernels",
                allow_module_level=True)

import train_gpt  # noqa: E402
from train_gpt import ba_plus_caa, xxt  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("these checks run the kernels in Triton's CPU interpreter; on a GPU see tests/test_gpu.py",
                allow_module_level=True)

SMALL = dict(block=16, block_k=16)  # the interpreter runs one numpy call per tile, so small tiles keep it quick
C0, B0 = 15.878769915207462, -22.48329292557795  # first Polar Express (c, b)


def normalized(shape, dtype=torch.float32, seed=0):
    """A random matrix scaled like Polar Express's input, X / ||X||_F per matrix."""
    X = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (X / X.norm(dim=(-2, -1), keepdim=True)).to(dtype)


def nan_like(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)  # any element the kernel skips stays NaN


def assert_matches(out, reference, rel):
    assert not out.isnan().any(), "some output elements were never written"
    error = (out.double() - reference).abs().max().item()
    assert error <= rel * reference.abs().max().item(), f"max error {error:.3g}"


@pytest.mark.parametrize("shape", [
    (40, 72),      # 2-D, m not a multiple of the block
    (3, 40, 40),   # batched, m == n
    (2, 10, 37),   # m smaller than one block
])
def test_xxt_matches_float64_and_is_exactly_symmetric(shape):
    X = normalized(shape)
    out = nan_like((*shape[:-2], shape[-2], shape[-2]))
    xxt(X, out, **SMALL)
    assert_matches(out, X.double() @ X.double().mT, rel=1e-5)
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("shape", [(40, 72), (3, 40, 40), (2, 10, 37)])
def test_ba_plus_caa_matches_float64_and_is_exactly_symmetric(shape):
    X = normalized(shape).double()
    A = (X @ X.mT).float()
    A = (A + A.mT) / 2  # exactly symmetric in fp32, as xxt's output is
    out = nan_like(A.shape)
    ba_plus_caa(A, C0, B0, out, **SMALL)
    A64 = A.double()
    assert_matches(out, C0 * A64 @ A64 + B0 * A64, rel=1e-5)
    assert torch.equal(out, out.mT)


def test_polar_step_with_h100_blocks_on_a_batched_mlp_like_shape():
    # The default 128 x 128 x 64 tiles on a batch of 256 x 512 matrices: two tile rows, eight k steps.
    X = normalized((2, 256, 512))
    A = xxt(X, nan_like((2, 256, 256)))
    B = ba_plus_caa(A, C0, B0, nan_like((2, 256, 256)))
    X64 = X.double()
    A64 = X64 @ X64.mT
    assert_matches(A, A64, rel=1e-5)
    assert_matches(B, C0 * A64 @ A64 + B0 * A64, rel=1e-5)


def test_fp16_is_loaded_accumulated_in_fp32_and_stored_as_fp16():
    X = normalized((2, 48, 80), dtype=torch.float16)
    out = xxt(X, nan_like((2, 48, 48), dtype=torch.float16), **SMALL)
    assert out.dtype == torch.float16
    # fp32 accumulation leaves only the final fp16 rounding: half an ulp, about 5e-4 relative.
    assert_matches(out, X.double() @ X.double().mT, rel=1e-3)


@triton.jit
def _record_lower_tiles(pairs_ptr, count, IDS: tl.constexpr):
    pid = tl.arange(0, IDS)  # all program ids at once: one interpreted program instead of thousands
    i, j = train_gpt._lower_tile(pid)
    tl.store(pairs_ptr + 2 * pid, i, mask=pid < count)
    tl.store(pairs_ptr + 2 * pid + 1, j, mask=pid < count)


def test_lower_tile_enumerates_each_pair_once_in_row_order():
    tiles = 120  # far more than 768 / 16, so the float square-root estimate is tested on large ids
    pairs = torch.full((tiles * (tiles + 1) // 2, 2), -1, dtype=torch.int32)
    _record_lower_tiles[(1,)](pairs, pairs.shape[0], IDS=triton.next_power_of_2(pairs.shape[0]))
    expected = [(i, j) for i in range(tiles) for j in range(i + 1)]
    assert [tuple(p) for p in pairs.tolist()] == expected


@pytest.mark.parametrize("call, message", [
    (lambda: xxt(torch.ones(8, 4), torch.empty(8, 8)), "8 rows > 4 columns; pass X.mT"),
    (lambda: xxt(torch.ones(2, 4, 8), torch.empty(4, 4)), r"expected \(2, 4, 4\) torch.float32"),
    (lambda: xxt(torch.ones(4, 8), torch.empty(4, 4, dtype=torch.float16)), "expected .* torch.float32"),
    (lambda: xxt(torch.ones(8), torch.empty(1, 1)), r"expected \(m, n\) or \(batch, m, n\)"),
    (lambda: ba_plus_caa(torch.ones(4, 5), 1.0, 1.0, torch.empty(4, 5)), "expected a square"),
    (lambda: ba_plus_caa(A := torch.eye(4), 1.0, 1.0, A), "cannot be done in place; pass a separate out"),
    (lambda: xxt(torch.ones(4, 8), torch.empty(4, 4), block=24), "block=24: tl.dot needs a power of two"),
    (lambda: xxt(torch.ones(4, 8), torch.empty(4, 4), block_k=8), "block_k=8: tl.dot needs a power of two"),
])
def test_bad_inputs_are_rejected_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()
