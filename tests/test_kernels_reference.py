"""CPU checks of the FP8 references against float64 arithmetic, edge shapes and input errors."""
import pytest
import torch

from r1pipe.kernels import FP8InputError, act_quant, fp8_gemm, fp8_grouped_gemm, weight_dequant, weight_quant
from r1pipe.kernels.reference import FP8_MAX, expand_scale

# e4m3: 3 mantissa bits, so rounding moves a normal value by at most 2^-4 of itself; subnormals
# (below 2^-6 in scaled units) are spaced 2^-9 apart, so they move by at most 2^-10 of the scale.
REL_ROUNDING = 2.0**-4
SUBNORMAL_STEP = 2.0**-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_fp8_rounding(x: torch.Tensor, dequantized: torch.Tensor, scale_per_element: torch.Tensor):
    x64, d64, s64 = x.double(), dequantized.double(), scale_per_element.double()
    bound = torch.maximum(x64.abs() * REL_ROUNDING, s64 * SUBNORMAL_STEP) * (1 + 1e-6)
    assert ((x64 - d64).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(1, 128), (3, 300), (130, 256), (2, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_float64(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[-1])).to(dtype)
    q, s = act_quant(x)
    k = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], -(-k // 128))
    tiles = torch.nn.functional.pad(x.double(), (0, s.shape[-1] * 128 - k)).unflatten(-1, (-1, 128))
    torch.testing.assert_close(s.double(), tiles.abs().amax(-1) / FP8_MAX, rtol=1e-6, atol=0)
    s_full = s.repeat_interleave(128, -1)[..., :k]
    assert_fp8_rounding(x, q.float() * s_full, s_full)
    # the largest magnitude of every tile lands exactly on +-448
    q_tiles = torch.nn.functional.pad(q.float().abs(), (0, s.shape[-1] * 128 - k)).unflatten(-1, (-1, 128))
    assert torch.all(q_tiles.amax(-1) == FP8_MAX)


def test_act_quant_pow2_scales_are_powers_of_two_above_amax():
    torch.manual_seed(1)
    x = torch.randn(17, 384) * 3
    q, s = act_quant(x, pow2_scale=True)
    mantissa, _ = torch.frexp(s)
    assert torch.all(mantissa == 0.5)
    amax_scale = x.unflatten(-1, (3, 128)).abs().amax(-1) / FP8_MAX
    assert torch.all(s >= amax_scale) and torch.all(s < 2 * amax_scale)
    assert q.float().abs().max() <= FP8_MAX


def test_act_quant_zero_tile_stays_zero():
    x = torch.zeros(2, 256)
    x[1, 128:] = 1.0
    q, s = act_quant(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q.float()[0], torch.zeros(256)) and torch.equal(q.float()[1, 128:], torch.full((128,), 448.0))


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (200, 300), (3, 130, 257)])
def test_weight_quant_dequant_matches_float64(shape):
    torch.manual_seed(2)
    w = torch.randn(shape) * 0.02
    q, s = weight_quant(w)
    n, k = shape[-2:]
    assert s.shape == (*shape[:-2], -(-n // 128), -(-k // 128))
    s_full = expand_scale(s, n, k, 128, 128)
    assert_fp8_rounding(w, q.float() * s_full, s_full)
    w64 = w.double()
    for bn in range(s.shape[-2]):
        for bk in range(s.shape[-1]):
            block = w64[..., bn * 128:(bn + 1) * 128, bk * 128:(bk + 1) * 128]
            torch.testing.assert_close(s[..., bn, bk].double(), block.abs().amax(dim=(-2, -1)) / FP8_MAX,
                                       rtol=1e-6, atol=0)
    deq = weight_dequant(q, s, dtype=torch.float32)
    torch.testing.assert_close(deq, q.float() * s_full, rtol=0, atol=0)
    assert weight_dequant(q, s).dtype == torch.bfloat16


def dequant_act64(q, s):
    return q.double() * s.double().repeat_interleave(128, -1)[..., :q.shape[-1]]


@pytest.mark.parametrize("m,n,k", [(1, 256, 128), (64, 200, 300), (130, 128, 512), (3, 1, 129)])
@pytest.mark.parametrize("b_rowwise", [False, True])
def test_fp8_gemm_matches_float64(m, n, k, b_rowwise):
    torch.manual_seed(3)
    a, b = torch.randn(m, k), torch.randn(n, k) * 0.05
    aq, as_ = act_quant(a)
    bq, bs = act_quant(b) if b_rowwise else weight_quant(b)
    b64 = dequant_act64(bq, bs) if b_rowwise else bq.double() * expand_scale(bs.double(), n, k, 128, 128)
    exact = dequant_act64(aq, as_) @ b64.t()
    out = fp8_gemm(aq, as_, bq, bs, torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, exact) < 1e-5
    assert rel_err(fp8_gemm(aq, as_, bq, bs), exact) < 8e-3  # bf16 output rounding
    assert rel_err(out, a.double() @ b.double().t()) < 0.06  # fp8 inputs vs the unquantized product


def test_fp8_gemm_batched_activation():
    torch.manual_seed(4)
    a, w = torch.randn(2, 3, 256), torch.randn(64, 256)
    aq, as_ = act_quant(a)
    wq, ws = weight_quant(w)
    out = fp8_gemm(aq, as_, wq, ws, torch.float32)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out[1], fp8_gemm(aq[1], as_[1], wq, ws, torch.float32))


def test_fp8_grouped_gemm_matches_per_expert_float64():
    torch.manual_seed(5)
    experts, n, k = 4, 96, 200
    counts = [5, 0, 70, 3]
    offsets = torch.tensor(counts).cumsum(0).int()
    a, w = torch.randn(sum(counts), k), torch.randn(experts, n, k)
    aq, as_ = act_quant(a)
    wq, ws = weight_quant(w)
    out = fp8_grouped_gemm(aq, as_, wq, ws, offsets, torch.float32)
    start = 0
    for e, c in enumerate(counts):
        w64 = wq[e].double() * expand_scale(ws[e].double(), n, k, 128, 128)
        exact = dequant_act64(aq[start:start + c], as_[start:start + c]) @ w64.t()
        if c:
            assert rel_err(out[start:start + c], exact) < 1e-5
        start += c


def test_bad_inputs_raise_one_line_errors():
    q, s = act_quant(torch.randn(4, 256))
    wq, ws = weight_quant(torch.randn(64, 256))
    cases = [
        (lambda: act_quant(torch.ones(4, 8, dtype=torch.int32)), "act_quant x: dtype"),
        (lambda: act_quant(torch.randn(4, 8), block=100), "act_quant block"),
        (lambda: weight_quant(torch.randn(8)), "weight_quant w: shape"),
        (lambda: weight_dequant(wq, ws[:, :1]), "weight_dequant scale_inv: shape"),
        (lambda: weight_dequant(wq.float(), ws), "weight_dequant w_fp8: dtype"),
        (lambda: fp8_gemm(q, s, wq[:, :128], ws), "differ in K"),
        (lambda: fp8_gemm(q, s[:, :1], wq, ws), "fp8_gemm a_scale: shape"),
        (lambda: fp8_gemm(q, s, wq, ws.double()), "fp8_gemm b_scale: dtype"),
        (lambda: fp8_gemm(q, s, wq, ws[:, :1]), "fp8_gemm b_scale: shape"),
        (lambda: fp8_gemm(q, s, wq, ws, torch.int8), "fp8_gemm out_dtype"),
        (lambda: fp8_grouped_gemm(q, s, wq[None], ws[None], torch.tensor([4])), "offsets: dtype"),
        (lambda: fp8_grouped_gemm(q, s, wq[None], ws[None], torch.tensor([3], dtype=torch.int32)), "end at M=4"),
    ]
    for call, needle in cases:
        with pytest.raises(FP8InputError, match=needle) as info:
            call()
        assert "\n" not in str(info.value)


def test_weight_quant_of_transpose_is_transpose_of_blocks():
    """FP8Linear's backward quantizes W^T; its 128x128 blocks are W's, transposed, bit for bit."""
    torch.manual_seed(6)
    w = torch.randn(300, 200)
    q, s = weight_quant(w)
    qt, st = weight_quant(w.t())
    assert torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8)) and torch.equal(st, s.t())
