"""Plain PyTorch references for the FP8 block-quantization kernels.

They run anywhere (the CPU path of `r1pipe.kernels.fp8`) and are the oracle the Triton kernels are
tested against. Formats follow the released DeepSeek-V3 weights (their `weight_scale_inv` safetensors): e4m3 values,
fp32 scales with `dequantized = fp8 * scale`, activations in 1x128 tiles, weights in 128x128 blocks.
Edge tiles (a dimension that is not a multiple of the block) get their own scale over the valid part.
"""
import functools

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INV_FP8_MAX = 1.0 / FP8_MAX
# An all-zero tile would give scale 0 and 0/0 = NaN; flooring amax keeps it finite (zeros stay zeros).
AMAX_FLOOR = 1e-4
GEMM_BLOCK_K = 128  # the K width of one scale: fp8_gemm promotes partial sums to fp32 every 128 elements


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def device_capability(device_index: int) -> tuple[int, int]:
    """The CUDA compute capability of a device (which kernels it runs), asked once per device."""
    return torch.cuda.get_device_capability(device_index)


def ceil_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two by bit arithmetic (bit-identical in Triton)."""
    bits = scale.view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """scale = amax / 448, so the largest magnitude of the tile lands on the largest e4m3 value.

    Computed as amax * fp32(1/448): a multiplication rounds the same on CPU, in PyTorch CUDA (which
    turns a division by a scalar into this very multiplication) and in Triton, so scales match bit
    for bit everywhere.
    """
    scale = amax.float().clamp_min(AMAX_FLOOR) * INV_FP8_MAX
    return ceil_pow2(scale) if pow2_scale else scale


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def act_quant_ref(x: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """x [..., K] -> (e4m3 [..., K], fp32 scales [..., ceil(K/block)]), one scale per 1 x block tile."""
    k = x.shape[-1]
    nb = cdiv(k, block)
    xf = F.pad(x.float(), (0, nb * block - k)).unflatten(-1, (nb, block))
    scale = scale_from_amax(xf.abs().amax(-1), pow2_scale)
    q = to_fp8(xf, scale.unsqueeze(-1)).flatten(-2)[..., :k].contiguous()
    return q, scale


def weight_quant_ref(w: torch.Tensor, block: int = 128):
    """w [..., N, K] -> (e4m3 [..., N, K], fp32 scale_inv [..., ceil(N/block), ceil(K/block)])."""
    n, k = w.shape[-2:]
    nbn, nbk = cdiv(n, block), cdiv(k, block)
    wf = F.pad(w.float(), (0, nbk * block - k, 0, nbn * block - n))
    tiles = wf.unflatten(-1, (nbk, block)).unflatten(-3, (nbn, block))  # [..., nbn, B, nbk, B]
    scale = scale_from_amax(tiles.abs().amax(dim=(-3, -1)))
    q = to_fp8(tiles, scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k].contiguous(), scale


def expand_scale(scale: torch.Tensor, rows: int, cols: int, row_block: int, col_block: int) -> torch.Tensor:
    """Broadcast a [.., R, C] grid of block scales to [.., rows, cols] elements."""
    return scale.repeat_interleave(row_block, -2)[..., :rows, :].repeat_interleave(col_block, -1)[..., :cols]


def weight_dequant_ref(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    n, k = w_fp8.shape[-2:]
    return (w_fp8.float() * expand_scale(scale_inv.float(), n, k, block, block)).to(dtype)


def b_scale_rows(b_scale: torch.Tensor, n: int) -> int:
    """How many rows of B share one scale: 1 (per-row 1x128 tiles) or 128 (128x128 blocks)."""
    return 1 if b_scale.shape[-2] == n else GEMM_BLOCK_K


def fp8_gemm_ref(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out[..., N] = sum over 128-wide K slices of (A_k @ B_k^T) * a_scale_k * b_scale_k, in fp32.

    A is [..., K] with 1x128 scales; B is [N, K] with either 128x128 block scales (a weight) or
    1x128 per-row scales (a transposed activation, as in the FP8 weight-gradient GEMM).
    """
    k = a_fp8.shape[-1]
    n = b_fp8.shape[0]
    a = a_fp8.float() * a_scale.float().repeat_interleave(GEMM_BLOCK_K, -1)[..., :k]
    b = b_fp8.float() * expand_scale(b_scale.float(), n, k, b_scale_rows(b_scale, n), GEMM_BLOCK_K)
    return (a @ b.t()).to(out_dtype)


def fp8_grouped_gemm_ref(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                         b_scale: torch.Tensor, offsets: torch.Tensor,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows offsets[e-1]:offsets[e] of A (tokens sorted by expert) multiply expert e's B[e]^T."""
    out = torch.empty(a_fp8.shape[0], b_fp8.shape[1], dtype=out_dtype, device=a_fp8.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = fp8_gemm_ref(a_fp8[start:end], a_scale[start:end], b_fp8[e], b_scale[e], out_dtype)
        start = end
    return out
