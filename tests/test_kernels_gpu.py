"""Triton kernels against the PyTorch references on a CUDA GPU (run with -m gpu on an H100/H200).

Every output buffer the kernels allocate is poisoned with NaN bytes first (torch.empty is wrapped),
so an element a kernel forgets to write shows up as NaN.
"""
import zlib

import pytest
import torch

from r1pipe.kernels import FP8Linear, act_quant, fp8_gemm, fp8_grouped_gemm, weight_dequant, weight_quant
from r1pipe.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU with FP8 tensor cores"),
]

_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    out = _real_empty(*args, **kwargs)
    if out.is_cuda and out.is_floating_point():
        out.view(torch.uint8).fill_(0xFF)  # NaN in fp32, bf16, fp16 and e4m3
    return out


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch, request):
    torch.manual_seed(zlib.crc32(request.node.name.encode()))  # fresh inputs per test, reproducible
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


# Hopper's FP8 MMA keeps about 14 bits in its partial sums inside one 128-wide K slice (the reason
# V3 promotes to fp32 every 128), so an fp32 output differs from exact fp32 arithmetic near 1e-4.
FP32_OUT_TOL = 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_same_fp8(q: torch.Tensor, q_ref: torch.Tensor):
    """Bit-identical: same scale arithmetic, IEEE division and round-to-nearest-even in both."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("shape", [(1, 128), (1, 7168), (64, 2048), (4096, 7168), (333, 1000), (2, 3, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant(shape, dtype, pow2):
    x = torch.randn(shape, device="cuda", dtype=dtype) * torch.logspace(-2, 2, shape[-1], device="cuda").to(dtype)
    q, s = act_quant(x, pow2_scale=pow2)
    q_ref, s_ref = ref.act_quant_ref(x, 128, pow2)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("view", ["column_slice", "transposed"])
def test_act_quant_strided_views(view):
    base = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    x = base[:, :256] if view == "column_slice" else base.t()
    q, s = act_quant(x)
    q_ref, s_ref = ref.act_quant_ref(x, 128)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("shape", [(128, 128), (7168, 2048), (2112, 7168), (200, 300), (3, 130, 257), (1, 1),
                                   "transposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_quant_and_dequant(shape, dtype):
    if shape == "transposed":  # what FP8Linear's backward quantizes: W^T straight from W
        w = (torch.randn(300, 200, device="cuda") * 0.02).to(dtype).t()
        q_w, s_w = weight_quant(w.t())
        q_t, s_t = weight_quant(w)
        assert torch.equal(q_t.view(torch.uint8), q_w.t().contiguous().view(torch.uint8))
        assert torch.equal(s_t, s_w.t())
    else:
        w = (torch.randn(shape, device="cuda") * 0.02).to(dtype)
    q, s = weight_quant(w)
    q_ref, s_ref = ref.weight_quant_ref(w)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)
    for out_dtype in (torch.bfloat16, torch.float32):
        deq = weight_dequant(q_ref, s_ref, dtype=out_dtype)
        assert torch.equal(deq, ref.weight_dequant_ref(q_ref, s_ref, 128, out_dtype))


GEMM_SHAPES = [(m, n, k) for m in (1, 64, 130, 256, 4096) for n, k in ((7168, 2048), (2112, 7168), (200, 300))]


def _check_gemm(gemm, m, n, k, m_major_scales=False):
    a, w = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda") * 0.02
    aq, as_ = ref.act_quant_ref(a)
    if m_major_scales:  # the layout the Triton act_quant returns
        as_ = as_.t().contiguous().t()
    wq, ws = ref.weight_quant_ref(w)
    expected = ref.fp8_gemm_ref(aq, as_, wq, ws, torch.float32)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = gemm(aq, as_, wq, ws, out_dtype)
        assert out.dtype == out_dtype and torch.isfinite(out).all()
        assert rel_err(out, expected) < (FP32_OUT_TOL if out_dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("path", ["dispatch", "triton", "triton_pointer"])
@pytest.mark.parametrize("m_major_scales", [False, True])
def test_fp8_gemm(m, n, k, path, m_major_scales, monkeypatch):
    """`dispatch` may pick cuBLAS's blockwise GEMM for large M; `triton` always runs Triton (the TMA
    kernel for large M on Hopper); `triton_pointer` the pointer-load kernel that pre-Hopper GPUs get."""
    from r1pipe.kernels import triton_fp8

    if path == "triton_pointer":
        monkeypatch.setattr(triton_fp8, "_tma_fits", lambda *tensors: False)
    _check_gemm(fp8_gemm if path == "dispatch" else triton_fp8.fp8_gemm, m, n, k, m_major_scales)


def test_act_quant_scales_are_m_major():
    _, s = act_quant(torch.randn(2, 300, 1000, device="cuda"))
    assert s.shape == (2, 300, 8) and s.stride() == (300, 1, 600)


@pytest.mark.parametrize("m,n,k", [(4096, 2112, 7168), (300, 200, 1024), (1000, 7168, 2048)])
def test_fp8_gemm_every_tma_config(m, n, k, monkeypatch):
    """The autotuner may pick any tile configuration, so each one is checked on its own."""
    from r1pipe.kernels import triton_fp8

    kernel = triton_fp8._fp8_gemm_tma_kernel
    for config in triton_fp8.TMA_CONFIGS:
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        _check_gemm(triton_fp8.fp8_gemm, m, n, k, m_major_scales=True)


@pytest.mark.parametrize("m,n,k", [(256, 384, 4096), (7168, 2048, 1000), (130, 200, 77), (2048, 7168, 4096)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_rowwise_b(m, n, k, out_dtype):
    """The weight-gradient GEMM: both operands quantized 1x128 along the (token) K dimension."""
    a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    aq, as_ = ref.act_quant_ref(a)
    bq, bs = ref.act_quant_ref(b)
    out = fp8_gemm(aq, as_, bq, bs, out_dtype)
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    tol = FP32_OUT_TOL if out_dtype == torch.float32 else 5e-3
    assert rel_err(out, ref.fp8_gemm_ref(aq, as_, bq, bs, torch.float32)) < tol


@pytest.mark.parametrize("experts,n,k,tokens,topk", [(8, 256, 384, 100, 2), (64, 4096, 7168, 512, 8),
                                                    (64, 7168, 2048, 512, 8), (4, 200, 300, 37, 1)])
def test_fp8_grouped_gemm(experts, n, k, tokens, topk):
    routes = torch.rand(tokens, experts, device="cuda").topk(topk, dim=-1).indices.flatten()
    counts = torch.bincount(routes, minlength=experts)
    counts[0] = 0  # an expert with no tokens
    offsets = counts.cumsum(0).int()
    m = int(offsets[-1])
    a, w = torch.randn(m, k, device="cuda"), torch.randn(experts, n, k, device="cuda") * 0.02
    aq, as_ = ref.act_quant_ref(a)
    wq, ws = ref.weight_quant_ref(w)
    out = fp8_grouped_gemm(aq, as_, wq, ws, offsets, torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref.fp8_grouped_gemm_ref(aq, as_, wq, ws, offsets, torch.float32)) < FP32_OUT_TOL


@pytest.mark.parametrize("autocast", [False, True])
def test_fp8_linear_grads_on_gpu(autocast):
    linear = FP8Linear(1000, 384, device="cuda")
    x = torch.randn(3, 300, 1000, device="cuda", requires_grad=True)
    upstream = torch.randn(3, 300, 384, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = linear(x)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    (out.float() * upstream).sum().backward()
    x64 = x.detach().double().requires_grad_()
    w64 = linear.weight.detach().double().requires_grad_()
    out64 = torch.nn.functional.linear(x64, w64, linear.bias.detach().double())
    (out64 * upstream.double()).sum().backward()
    assert rel_err(out, out64) < 0.06
    assert rel_err(x.grad, x64.grad) < 0.06
    assert rel_err(linear.weight.grad, w64.grad) < 0.06
    assert linear.weight.grad.dtype == torch.float32


def test_fp8_linear_in_a_cuda_graph_uses_the_weight_at_replay_time():
    """A captured forward re-quantizes the weight in every replay: after a fused AdamW step (in
    place, no version bump) the replay equals an eager forward with the new weight, bit for bit."""
    layer = FP8Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # compile, autotune and pick the GEMM backend outside the graph
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = layer(x)
    layer(x).float().square().sum().backward()
    optimizer.step()
    graph.replay()
    with torch.no_grad():
        expected = layer(x)
    assert torch.equal(out, expected)
