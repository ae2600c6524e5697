"""Public FP8 block-quantization ops: checks the inputs, then runs Triton on a CUDA GPU with FP8
tensor cores (sm_89+) and the PyTorch reference anywhere else. On an H100/H200 a dense GEMM runs
on cuBLAS's blockwise-scaled FP8 GEMM (same format, fp32 accumulation) where that is faster for
its shape (measured on first use, see `_gemm_backend`).

Triton is imported only when a CUDA tensor arrives, so CPU machines without a working Triton
never touch it.
"""
import torch
import torch.nn.functional as F
from r1pipe.kernels import reference as ref
from r1pipe.kernels.reference import FP8_DTYPE, GEMM_BLOCK_K, cdiv, device_capability

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FP8InputError(ValueError):
    """A tensor handed to an FP8 op has the wrong shape, dtype or device (one-line message)."""


def _check(cond: bool, message) -> None:
    """`message` is a callable, so the f-string is built only on failure (these checks run per call)."""
    if not cond:
        raise FP8InputError(message())


def _check_dtype(name: str, t: torch.Tensor, allowed) -> None:
    _check(t.dtype in allowed, lambda: f"{name}: dtype {t.dtype} not supported, expected one of {list(allowed)}")


def _use_triton(*tensors: torch.Tensor) -> bool:
    t = tensors[0]
    _check(all(x.device == t.device for x in tensors),
           lambda: f"FP8 op inputs are on different devices: {[str(x.device) for x in tensors]}")
    return t.is_cuda and device_capability(t.get_device()) >= (8, 9)


def _triton():
    from r1pipe.kernels import triton_fp8  # lazy: needs a CUDA-capable Triton

    return triton_fp8


def act_quant(x: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """Quantize activations per token in 1 x `block` tiles: (e4m3 [..., K], fp32 scales [..., ceil(K/block)]).

    On the GPU the scales come back M-major (strides (1, M) in 2-D), the layout the GEMMs read fastest.

    `pow2_scale` rounds each scale up to a power of two, so the rescale is exact (V3 uses it for
    the activations that feed the backward pass).
    """
    _check_dtype("act_quant x", x, FLOAT_DTYPES)
    _check(x.dim() >= 1 and x.shape[-1] > 0, lambda: f"act_quant x: shape {tuple(x.shape)} has no last dimension")
    _check(block > 0 and block & (block - 1) == 0, lambda: f"act_quant block: {block} is not a power of two")
    if _use_triton(x):
        return _triton().act_quant(x, block, pow2_scale)
    return ref.act_quant_ref(x, block, pow2_scale)


def weight_quant(w: torch.Tensor, block: int = 128):
    """Quantize weights [..., N, K] in block x block tiles: (e4m3, fp32 scale_inv [..., ceil(N/b), ceil(K/b)])."""
    _check_dtype("weight_quant w", w, FLOAT_DTYPES)
    _check(w.dim() >= 2, lambda: f"weight_quant w: shape {tuple(w.shape)} must be [..., N, K]")
    _check(block > 0 and block & (block - 1) == 0, lambda: f"weight_quant block: {block} is not a power of two")
    if _use_triton(w):
        return _triton().weight_quant(w, block)
    return ref.weight_quant_ref(w, block)


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `weight_quant`: every element times its block's scale_inv, cast to `dtype`."""
    _check_dtype("weight_dequant w_fp8", w_fp8, (FP8_DTYPE,))
    _check_dtype("weight_dequant scale_inv", scale_inv, (torch.float32,))
    _check(w_fp8.dim() >= 2, lambda: f"weight_dequant w_fp8: shape {tuple(w_fp8.shape)} must be [..., N, K]")
    n, k = w_fp8.shape[-2:]
    want = (*w_fp8.shape[:-2], cdiv(n, block), cdiv(k, block))
    _check(tuple(scale_inv.shape) == want,
           lambda: f"weight_dequant scale_inv: shape {tuple(scale_inv.shape)}, expected {want} for w_fp8 "
           f"{tuple(w_fp8.shape)} with block {block}")
    if _use_triton(w_fp8, scale_inv):
        return _triton().weight_dequant(w_fp8, scale_inv, block, dtype)
    return ref.weight_dequant_ref(w_fp8, scale_inv, block, dtype)


def _check_gemm_operands(op: str, a_fp8, a_scale, b_fp8, b_scale, out_dtype) -> None:
    _check_dtype(f"{op} a_fp8", a_fp8, (FP8_DTYPE,))
    _check_dtype(f"{op} b_fp8", b_fp8, (FP8_DTYPE,))
    _check_dtype(f"{op} a_scale", a_scale, (torch.float32,))
    _check_dtype(f"{op} b_scale", b_scale, (torch.float32,))
    _check(out_dtype in FLOAT_DTYPES, lambda: f"{op} out_dtype: {out_dtype} not one of {list(FLOAT_DTYPES)}")
    k = a_fp8.shape[-1]
    _check(b_fp8.shape[-1] == k,
           lambda: f"{op}: a_fp8 {tuple(a_fp8.shape)} and b_fp8 {tuple(b_fp8.shape)} differ in K (last dimension)")
    nbk = cdiv(k, GEMM_BLOCK_K)
    want_a = (*a_fp8.shape[:-1], nbk)
    _check(tuple(a_scale.shape) == want_a,
           lambda: f"{op} a_scale: shape {tuple(a_scale.shape)}, expected {want_a} (1x{GEMM_BLOCK_K} tiles of a_fp8)")
    n = b_fp8.shape[-2]
    lead = tuple(b_fp8.shape[:-2])
    allowed = {(*lead, cdiv(n, GEMM_BLOCK_K), nbk), (*lead, n, nbk)}
    _check(tuple(b_scale.shape) in allowed,
           lambda: f"{op} b_scale: shape {tuple(b_scale.shape)}, expected one of {sorted(allowed)} "
           f"({GEMM_BLOCK_K}x{GEMM_BLOCK_K} blocks or 1x{GEMM_BLOCK_K} rows of b_fp8 {tuple(b_fp8.shape)})")


def fp8_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A [..., K] x B[N, K]^T -> [..., N] with per-128-K-slice scaling and fp32 accumulation.

    a_scale: [..., ceil(K/128)] (from `act_quant`); b_scale: [ceil(N/128), ceil(K/128)] (from
    `weight_quant`) or [N, ceil(K/128)] (B quantized row-wise by `act_quant`).
    """
    _check(b_fp8.dim() == 2, lambda: f"fp8_gemm b_fp8: shape {tuple(b_fp8.shape)} must be [N, K]")
    _check(a_fp8.dim() >= 1, lambda: f"fp8_gemm a_fp8: shape {tuple(a_fp8.shape)} must be [..., K]")
    _check_gemm_operands("fp8_gemm", a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    if not _use_triton(a_fp8, a_scale, b_fp8, b_scale):
        return ref.fp8_gemm_ref(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    a2 = a_fp8.reshape(-1, a_fp8.shape[-1])
    as2 = a_scale.reshape(a2.shape[0], -1)
    gemm = _cublas_blockwise_gemm if _gemm_backend(a2, as2, b_fp8, b_scale, out_dtype) == "cublas" else _triton().fp8_gemm
    return gemm(a2, as2, b_fp8, b_scale, out_dtype).view(*a_fp8.shape[:-1], b_fp8.shape[0])


def _cublas_blockwise_fits(a2: torch.Tensor, b_fp8: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """cuBLAS (CUDA 12.9+) has the V3 scaling recipes on SM90 only, with a bf16 output, M a multiple
    of 4, K a multiple of 4 x 128 and N of 16."""
    n, k = b_fp8.shape
    return (hasattr(F, "ScalingType") and device_capability(a2.get_device()) == (9, 0) and out_dtype == torch.bfloat16
            and a2.shape[0] % 4 == 0 and k % (4 * GEMM_BLOCK_K) == 0 and n % 16 == 0
            and a2.is_contiguous() and b_fp8.is_contiguous())


# (device, M bucket, N, K, row-wise B) -> "cublas" or "triton", measured on first use
_GEMM_BACKEND: dict[tuple, str] = {}
# Triton must be this much faster on the GPU to be chosen: its launcher costs tens of microseconds
# of host time per call against a few for cuBLAS, which shows wherever the host is the bottleneck
# (eager launches; CUDA-graph replays do not pay it).
TRITON_MIN_GAIN = 0.95


def _gemm_backend(a2, as2, b_fp8, b_scale, out_dtype) -> str:
    """Where both can run, the faster of cuBLAS's blockwise GEMM and the Triton kernel for this
    shape (Triton by at least 5%, see TRITON_MIN_GAIN), timed once. Neither wins everywhere on an
    H100 (docs/PERFORMANCE.md, section 2): cuBLAS takes most large and wide GEMMs, Triton's split-K
    kernel some narrow decode-sized ones. Shapes first seen while a CUDA graph is being captured,
    where nothing can be timed, go to cuBLAS."""
    if a2.shape[0] == 0 or not _cublas_blockwise_fits(a2, b_fp8, out_dtype):
        return "triton"
    m, (n, k) = a2.shape[0], b_fp8.shape
    key = (a2.get_device(), min(1 << (m - 1).bit_length(), 8192), n, k, b_scale.shape[0] == n)
    if key not in _GEMM_BACKEND:
        if torch.cuda.is_current_stream_capturing():
            return "cublas"
        operands = (a2, as2, b_fp8, b_scale, out_dtype)
        with torch.cuda.device(a2.device):
            times = {"cublas": _gpu_ms(lambda: _cublas_blockwise_gemm(*operands)),
                     "triton": _gpu_ms(lambda: _triton().fp8_gemm(*operands))}
        _GEMM_BACKEND[key] = "triton" if times["triton"] < TRITON_MIN_GAIN * times["cublas"] else "cublas"
    return _GEMM_BACKEND[key]


def _gpu_ms(fn, repeats: int = 7) -> float:
    """Median GPU time of fn() with a cold L2 (as for a layer's weights in a model), host launch
    overhead excluded: fn runs as a CUDA-graph replay, queued while a sleep kernel holds the GPU
    behind an L2 flush, so the events around it time only its kernels, back to back. (Timed
    eagerly, the gaps between the three kernels of a split-K Triton GEMM -- zero-fill, GEMM, cast --
    made a 10-13% win at M=128 look like 5%; triton.testing.do_bench would also count the
    launcher's host time.)"""
    fn()  # compile and autotune first, outside the graph
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (data loading, the autograd engine) may use CUDA meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    device = torch.cuda.current_device()
    flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        torch.cuda._sleep(2_000_000)  # ~1 ms at H100 clocks
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[repeats // 2]


def _cublas_blockwise_gemm(a2, a_scale, b_fp8, b_scale, out_dtype):
    """The same GEMM through torch.nn.functional.scaled_mm (cuBLAS): A in 1x128 tiles, B in 128x128
    blocks or 1x128 rows. cuBLAS wants the 1x128 scales M-major (as act_quant returns them on the
    GPU); other layouts are copied."""
    rows_b = b_scale.shape[0] == b_fp8.shape[0]
    b_recipe = F.ScalingType.BlockWise1x128 if rows_b else F.ScalingType.BlockWise128x128
    b_scale = b_scale.t().contiguous().t() if rows_b else b_scale.t()
    return F.scaled_mm(a2, b_fp8.t(), a_scale.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                       b_scale, b_recipe, output_dtype=out_dtype)


def fp8_grouped_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                     b_scale: torch.Tensor, offsets: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MoE experts in one launch: rows offsets[e-1]:offsets[e] of A [M, K] (tokens sorted by
    expert) times B[e]^T, B [E, N, K] with scales [E, ceil(N/128), ceil(K/128)] -> [M, N].

    `offsets` is the int32 cumulative end row of each expert (the `offs` of `torch._grouped_mm`),
    non-decreasing, with offsets[-1] == M. On CUDA that last condition is not checked, because
    checking would synchronise the host with the GPU; rows past offsets[-1] are then left unwritten.
    """
    _check(a_fp8.dim() == 2, lambda: f"fp8_grouped_gemm a_fp8: shape {tuple(a_fp8.shape)} must be [M, K]")
    _check(b_fp8.dim() == 3, lambda: f"fp8_grouped_gemm b_fp8: shape {tuple(b_fp8.shape)} must be [E, N, K]")
    _check_gemm_operands("fp8_grouped_gemm", a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    _check(b_fp8.shape[0] > 0, lambda: f"fp8_grouped_gemm b_fp8: shape {tuple(b_fp8.shape)} has no experts")
    _check(offsets.dtype == torch.int32 and tuple(offsets.shape) == (b_fp8.shape[0],),
           lambda: f"fp8_grouped_gemm offsets: dtype {offsets.dtype} shape {tuple(offsets.shape)}, "
           f"expected int32 [{b_fp8.shape[0]}] (one cumulative end row per expert)")
    if _use_triton(a_fp8, a_scale, b_fp8, b_scale, offsets):
        return _triton().fp8_grouped_gemm(a_fp8, a_scale, b_fp8, b_scale, offsets, out_dtype)
    ends = offsets.tolist()
    _check(all(x <= y for x, y in zip([0, *ends[:-1]], ends, strict=True)) and ends[-1] == a_fp8.shape[0],
           lambda: f"fp8_grouped_gemm offsets: {ends[:8]}{'...' if len(ends) > 8 else ''} must be non-decreasing "
           f"and end at M={a_fp8.shape[0]}")
    return ref.fp8_grouped_gemm_ref(a_fp8, a_scale, b_fp8, b_scale, offsets, out_dtype)
