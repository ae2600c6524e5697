"""Triton kernels for FP8 block quantization and blockwise-scaled FP8 GEMMs (Hopper / Ada).

Hand-written because no maintained library covers this exact format: torch._scaled_mm and
torch._scaled_grouped_mm take row-wise or tensor-wise scales, and the DeepSeek-V3 reference Triton
GEMM is several times slower than bf16 cuBLAS (docs/PERFORMANCE.md, section 2). One K-loop
(`_scaled_dot`) serves the plain GEMM and the grouped MoE GEMM: for every 128-wide K slice it
multiplies FP8 tiles on the tensor cores and adds the fp32 partial product times
a_scale[row] * b_scale[col] to an fp32 accumulator (V3's promotion of partial sums every 128).

Numerics match the PyTorch references bit for bit: scales are amax * fp32(1/448), values are
divided by them with IEEE division (`div_rn`), power-of-two scales come from the same bit arithmetic.
Callers go through `r1pipe.kernels.fp8`, which checks shapes and dtypes first.
"""
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from r1pipe.kernels import reference as ref
from r1pipe.kernels.reference import GEMM_BLOCK_K, b_scale_rows, cdiv, device_capability

AMAX_FLOOR = tl.constexpr(ref.AMAX_FLOOR)
FP8_MAX = tl.constexpr(ref.FP8_MAX)
INV_FP8_MAX = tl.constexpr(ref.INV_FP8_MAX)
MAX_TILE = 128  # largest quantization block the tile kernels hold in registers at once


@triton.jit
def _scale_from_amax(amax, POW2: tl.constexpr):
    scale = tl.maximum(amax, AMAX_FLOOR) * INV_FP8_MAX
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _to_fp8(x, scale):
    return tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.autotune(
    configs=[triton.Config({"ROWS": r, "GROUPS": g}, num_warps=w)
             for r, g, w in ((8, 4, 4), (4, 8, 4), (16, 2, 4), (16, 4, 8), (32, 1, 8), (32, 2, 8), (64, 1, 8))],
    key=["K", "BLOCK", "POW2", "stride_xk"],
)
@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, NUM_BLOCKS,
                      BLOCK: tl.constexpr, POW2: tl.constexpr, ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """One program quantizes a [ROWS, GROUPS, BLOCK] tile: ROWS tokens x GROUPS consecutive 1xBLOCK tiles.

    Any 2-D strides: a transposed view (the weight-gradient operands) is quantized without a copy.
    Scales are written M-major (scale of token m, block j at j * M + m), see `act_quant`."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blocks = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [GROUPS, BLOCK]
    row_ok = rows < M
    mask = row_ok[:, None, None] & (cols < K)[None, :, :]
    rows64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :, :].to(tl.int64) * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.abs(x), axis=2), POW2)  # [ROWS, GROUPS]
    tl.store(q_ptr + rows64 * K + cols[None, :, :], _to_fp8(x, scale[:, :, None]), mask=mask)
    scale_mask = row_ok[:, None] & (blocks < NUM_BLOCKS)[None, :]
    tl.store(s_ptr + blocks.to(tl.int64)[None, :] * M + rows[:, None], scale, mask=scale_mask)


def act_quant(x: torch.Tensor, block: int, pow2_scale: bool):
    """The scales come back M-major (a [..., nb] view of an [nb, M] buffer): a GEMM tile then reads
    the scales of its rows for one K slice from consecutive addresses (one transaction instead of a
    gather), and cuBLAS's blockwise GEMM takes them without a transposed copy."""
    if block > MAX_TILE:
        return ref.act_quant_ref(x, block, pow2_scale)
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m, nb = x2.shape[0], cdiv(k, block)
    q = torch.empty(x.shape, dtype=ref.FP8_DTYPE, device=x.device)
    s = torch.empty(nb, m, dtype=torch.float32, device=x.device).t().view(*x.shape[:-1], nb)
    if m:
        grid = lambda meta: (cdiv(m, meta["ROWS"]), cdiv(nb, meta["GROUPS"]))  # noqa: E731
        _act_quant_kernel[grid](x2, q, s, m, k, x2.stride(0), x2.stride(1), nb, BLOCK=block, POW2=pow2_scale)
    return q, s


@triton.jit
def _weight_tile(N, K, stride_n, stride_k, BLOCK: tl.constexpr):
    """Offsets (for the given strides) and mask of the BLOCK x BLOCK tile (program ids 0, 1) of an [N, K] matrix."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_k
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    return offs, mask


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_wk, BLOCK: tl.constexpr):
    """Any 2-D strides for the input: W^T's blocks are quantized straight from W (backward pass)."""
    matrix = tl.program_id(2).to(tl.int64)
    offs, mask = _weight_tile(N, K, K, 1, BLOCK)
    offs += matrix * N * K
    w_offs, _ = _weight_tile(N, K, stride_wn, stride_wk, BLOCK)
    w = tl.load(w_ptr + matrix * N * K + w_offs, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.max(tl.abs(w), axis=1), axis=0), False)
    tl.store(q_ptr + offs, _to_fp8(w, scale), mask=mask)
    scale_index = (matrix * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(1) + tl.program_id(1)
    tl.store(s_ptr + scale_index, scale)


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK: tl.constexpr):
    matrix = tl.program_id(2).to(tl.int64)
    offs, mask = _weight_tile(N, K, K, 1, BLOCK)
    offs += matrix * N * K
    scale_index = (matrix * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(1) + tl.program_id(1)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs, (q * tl.load(s_ptr + scale_index)).to(w_ptr.dtype.element_ty), mask=mask)


def _weight_grid(shape, block: int):
    n, k = shape[-2:]
    return cdiv(n, block), cdiv(k, block), max(1, shape[:-2].numel())


def weight_quant(w: torch.Tensor, block: int):
    if block > MAX_TILE:
        return ref.weight_quant_ref(w, block)
    if w.dim() > 2:
        w = w.contiguous()
    grid = _weight_grid(w.shape, block)
    q = torch.empty(w.shape, dtype=ref.FP8_DTYPE, device=w.device)
    s = torch.empty(*w.shape[:-2], grid[0], grid[1], dtype=torch.float32, device=w.device)
    if w.numel():
        _weight_quant_kernel[grid](w, q, s, w.shape[-2], w.shape[-1], w.stride(-2), w.stride(-1), BLOCK=block,
                                   num_warps=8)
    return q, s


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype):
    if block > MAX_TILE:
        return ref.weight_dequant_ref(w_fp8, scale_inv, block, dtype)
    w_fp8, scale_inv = w_fp8.contiguous(), scale_inv.contiguous()
    out = torch.empty(w_fp8.shape, dtype=dtype, device=w_fp8.device)
    if w_fp8.numel():
        grid = _weight_grid(w_fp8.shape, block)
        _weight_dequant_kernel[grid](w_fp8, scale_inv, out, w_fp8.shape[-2], w_fp8.shape[-1],
                                     BLOCK=block, num_warps=8)
    return out


@triton.jit
def _scale_ptrs(as_ptr, bs_ptr, rows_a, cols_b, col_start, stride_asm, stride_bsn, B_SCALE_ROWS: tl.constexpr,
                BN: tl.constexpr):
    """Pointers to K slice 0 of the tile's scales: [BM] for A; for B one scalar when the tile lies
    inside one 128-row weight block (promotion then costs one FMA per element), else [BN].
    rows_a / cols_b are in-range indices."""
    as_ptrs = as_ptr + rows_a.to(tl.int64) * stride_asm
    if B_SCALE_ROWS % BN == 0:
        bs_ptrs = bs_ptr + (col_start // B_SCALE_ROWS) * stride_bsn
    else:
        bs_ptrs = bs_ptr + (cols_b.to(tl.int64) // B_SCALE_ROWS) * stride_bsn
    return as_ptrs, bs_ptrs


@triton.jit
def _scaled_dot(a_src, b_src, as_ptrs, bs_ptrs, off_m, off_n, K, kb_start, kb_end, stride_ask, stride_bsk,
                B_SCALE_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 [BM, BN] = sum over 128-wide K slices kb_start..kb_end-1 of
    (A_k @ B_k^T) * a_scale_k[row] * b_scale_k[col]: V3's promotion of partial sums every 128.

    With TMA, a_src / b_src are tensor descriptors read at rows off_m / off_n (the copy engine
    zero-fills every edge). Otherwise they point at K slice 0 of a [BM, BK] tile of A and a
    [BK, BN] tile of B^T whose rows the callers clamp into range (results are masked at the store),
    so only a K edge needs masking. as_ptrs / bs_ptrs come from `_scale_ptrs`.
    """
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if not TMA:
        a_src += kb_start * BK
        b_src += kb_start * BK
    as_ptrs += kb_start * stride_ask
    bs_ptrs += kb_start * stride_bsk
    for kb in range(kb_start, kb_end):
        if TMA:
            a = a_src.load([off_m, kb * BK])
            b = b_src.load([off_n, kb * BK]).T
        elif EVEN_K:
            a = tl.load(a_src)
            b = tl.load(b_src)
        else:
            k_left = K - kb * BK
            a = tl.load(a_src, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_src, mask=offs_k[:, None] < k_left, other=0.0)
        a_scale = tl.load(as_ptrs)
        b_scale = tl.load(bs_ptrs)
        if B_SCALE_ROWS % BN == 0:
            acc += tl.dot(a, b) * (a_scale * b_scale)[:, None]
        else:
            acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
        if not TMA:
            a_src += BK
            b_src += BK
        as_ptrs += stride_ask
        bs_ptrs += stride_bsk
    return acc


@triton.jit
def _tile_position(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number `tile`: GROUP_M row tiles walk all column
    tiles together, so their operands are reused from L2."""
    group_size = GROUP_M * tiles_n
    first_m = (tile // group_size) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % rows_in_group, (tile % group_size) // rows_in_group


def _even_k(args) -> bool:
    return args["K"] % args["BK"] == 0


# --- Dense GEMM, M > SMALL_M on Hopper: TMA loads, persistent programs -------------------------

def _set_tma_blocks(nargs) -> None:
    """The descriptors' box shapes follow the autotuned tile (Triton's autotune pre_hook)."""
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    nargs["c_desc"].block_shape = [bm, bn]


TMA_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8, "PROGRAMS_PER_SM": p}, num_warps=w, num_stages=s,
                  pre_hook=_set_tma_blocks)
    for bm, bn, w, s, p in ((128, 128, 8, 4, 1), (128, 128, 8, 5, 1), (128, 64, 4, 4, 2), (64, 128, 4, 4, 2))
]  # docs/PERFORMANCE.md section 2 times each; 128x64 with 6 stages and 128x256 (register spills) never won


@triton.autotune(configs=TMA_CONFIGS, key=["M_BUCKET", "N", "K", "B_SCALE_ROWS"])
@triton.jit
def _fp8_gemm_tma_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, M_BUCKET, stride_asm, stride_ask,
                         stride_bsn, stride_bsk, B_SCALE_ROWS: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr):
    """Each program loops over output tiles (grid = PROGRAMS_PER_SM x the SM count, read by the
    launcher), so tile setup and the store overlap the next tile's loads."""
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
        off_m, off_n = pid_m * BM, pid_n * BN
        rows = tl.minimum(off_m + tl.arange(0, BM), M - 1)
        cols = tl.minimum(off_n + tl.arange(0, BN), N - 1)
        as_ptrs, bs_ptrs = _scale_ptrs(as_ptr, bs_ptr, rows, cols, off_n, stride_asm, stride_bsn, B_SCALE_ROWS, BN)
        acc = _scaled_dot(a_desc, b_desc, as_ptrs, bs_ptrs, off_m, off_n, K, 0, tl.cdiv(K, BK), stride_ask,
                          stride_bsk, B_SCALE_ROWS, BM, BN, BK, True, True)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tma_fits(*tensors: torch.Tensor) -> bool:
    """The copy engine (sm_90+) needs 16-byte aligned bases and row strides, and unit inner strides."""
    return device_capability(tensors[0].get_device()) >= (9, 0) and all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _fp8_gemm_tma(a2, as2, b, bs, out):
    m, k = a2.shape
    n = b.shape[0]
    placeholder = [1, 1]  # _set_tma_blocks sets the real box shapes
    descs = (TensorDescriptor.from_tensor(t, placeholder) for t in (a2, b, out))
    sms = _sm_count(a2.get_device())
    grid = lambda meta: (min(sms * meta["PROGRAMS_PER_SM"], cdiv(m, meta["BM"]) * cdiv(n, meta["BN"])),)  # noqa: E731
    _fp8_gemm_tma_kernel[grid](*descs, as2, bs, m, n, k, min(triton.next_power_of_2(m), 8192), as2.stride(0),
                               as2.stride(1), bs.stride(0), bs.stride(1), B_SCALE_ROWS=b_scale_rows(bs, n),
                               BK=GEMM_BLOCK_K)


# --- Dense GEMM, decode sizes and pre-Hopper: pointer loads, split-K ---------------------------

SMALL_M = 256  # up to this many rows: decode-sized tiles, split-K over an fp32 output
GEMM_CONFIGS = [  # GROUP_M 8: large M; GROUP_M 1: small M (see _prune_gemm_configs)
    *(triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w, num_stages=s)
      for bm, bn, w, s in ((128, 256, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4))),
    *(triton.Config({"BM": bm, "BN": bn, "GROUP_M": 1, "SPLIT_K": split}, num_warps=4, num_stages=4)
      for bm, bn in ((64, 64), (64, 128), (128, 64)) for split in (1, 2, 4, 8)),
]


def _prune_gemm_configs(configs, named_args, **kwargs):
    small = named_args["M_BUCKET"] <= SMALL_M
    k_blocks = cdiv(named_args["K"], GEMM_BLOCK_K)
    return [c for c in configs if (c.kwargs["GROUP_M"] == 1) == small and 2 * c.kwargs["SPLIT_K"] <= max(2, k_blocks)]


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "M_BUCKET", "B_SCALE_ROWS"], reset_to_zero=["c_ptr"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
                     stride_asm, stride_ask, stride_bsn, stride_bsk, B_SCALE_ROWS: tl.constexpr,
                     SPLIT_K: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """Program (tile, split) adds its share of K slices; with SPLIT_K > 1 the shares meet by fp32
    atomic adds in a zeroed output (few output tiles, long K: decode-sized M)."""
    pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows, cols = offs_m % M, offs_n % N
    k_blocks = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = tl.program_id(1) * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)
    offs_k = tl.arange(0, BK)
    a_tile = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_tile = b_ptr + cols.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    as_ptrs, bs_ptrs = _scale_ptrs(as_ptr, bs_ptr, rows, cols, pid_n * BN, stride_asm, stride_bsn, B_SCALE_ROWS, BN)
    acc = _scaled_dot(a_tile, b_tile, as_ptrs, bs_ptrs, 0, 0, K, kb_start, kb_end, stride_ask, stride_bsk,
                      B_SCALE_ROWS, BM, BN, BK, False, EVEN_K)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")


def _unit_k_stride(*operands: torch.Tensor):
    """The FP8 operands with unit stride along K (the kernels' loads assume it); the callers pass
    2-D activations, and the scales keep whichever layout they come in."""
    return (t if t.stride(-1) == 1 else t.contiguous() for t in operands)


def fp8_gemm(a2, as2, b_fp8, bs, out_dtype):
    """A [M, K] (2-D: `r1pipe.kernels.fp8.fp8_gemm` flattens the leading dimensions) x B[N, K]^T."""
    a2, b = _unit_k_stride(a2, b_fp8)
    m, k = a2.shape
    n = b.shape[0]
    if m <= SMALL_M:  # the autotuner may pick a split-K config, which adds into zeros
        out = torch.zeros(m, n, dtype=torch.float32, device=a2.device)
    else:
        out = torch.empty(m, n, dtype=out_dtype, device=a2.device)
    if m and n and m > SMALL_M and _tma_fits(a2, b, out):
        _fp8_gemm_tma(a2, as2, b, bs, out)
    elif m and n:
        grid = lambda meta: (cdiv(m, meta["BM"]) * cdiv(n, meta["BN"]), meta["SPLIT_K"])  # noqa: E731
        _fp8_gemm_kernel[grid](a2, b, out, as2, bs, m, n, k, min(triton.next_power_of_2(m), 4096),
                               a2.stride(0), b.stride(0), out.stride(0), as2.stride(0), as2.stride(1),
                               bs.stride(0), bs.stride(1), B_SCALE_ROWS=b_scale_rows(bs, n), BK=GEMM_BLOCK_K)
    return out.to(out_dtype)


# --- Grouped MoE GEMM ---------------------------------------------------------------------------

GROUPED_CONFIGS = [
    triton.Config({"BN": bn}, num_warps=w, num_stages=s) for bn, w, s in ((128, 4, 4), (128, 8, 4), (256, 8, 3))
]


@triton.autotune(configs=GROUPED_CONFIGS, key=["N", "K", "BM", "B_SCALE_ROWS"])
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offsets_ptr, tile_expert_ptr,
                             tile_row_ptr, N, K, stride_am, stride_be, stride_bn, stride_cm, stride_asm,
                             stride_ask, stride_bse, stride_bsn, stride_bsk, B_SCALE_ROWS: tl.constexpr,
                             BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr):
    """Program (t, n) computes row tile t of the expert schedule (`_expert_tiles`) x column tile n."""
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if expert < 0:  # the schedule is sized for the worst case; spare tiles have no rows
        return
    row_start = tl.load(tile_row_ptr + tl.program_id(0))
    row_end = tl.load(offsets_ptr + expert)
    offs_m = row_start + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows, cols = tl.where(offs_m < row_end, offs_m, row_start), offs_n % N
    offs_k = tl.arange(0, BK)
    a_tile = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_tile = b_ptr + expert.to(tl.int64) * stride_be + cols.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    as_ptrs, bs_ptrs = _scale_ptrs(as_ptr, bs_ptr + expert * stride_bse, rows, cols, tl.program_id(1) * BN,
                                   stride_asm, stride_bsn, B_SCALE_ROWS, BN)
    acc = _scaled_dot(a_tile, b_tile, as_ptrs, bs_ptrs, 0, 0, K, 0, tl.cdiv(K, BK), stride_ask, stride_bsk,
                      B_SCALE_ROWS, BM, BN, BK, False, EVEN_K)
    mask = (offs_m[:, None] < row_end) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _expert_tiles(offsets: torch.Tensor, m: int, bm: int):
    """Row-tile schedule on the device, without a host sync: for each of the cdiv(m, bm) + E
    possible tiles, its expert (-1 if unused) and first row."""
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles_per_expert = (ends - starts + bm - 1) // bm
    tile_end = torch.cumsum(tiles_per_expert, 0)
    tile = torch.arange(cdiv(m, bm) + ends.numel(), device=offsets.device)
    expert = torch.searchsorted(tile_end, tile, right=True).clamp_max(ends.numel() - 1)
    row = starts[expert] + (tile - (tile_end - tiles_per_expert)[expert]) * bm
    used = tile < tile_end[-1]
    return torch.where(used, expert, -1).int(), row.int()


def fp8_grouped_gemm(a2, as2, b_fp8, bs, offsets, out_dtype):
    a2, b = _unit_k_stride(a2, b_fp8)
    m, k = a2.shape
    experts, n = b.shape[:2]
    out = torch.empty(m, n, dtype=out_dtype, device=a2.device)
    if m and n:
        bm = 64 if m <= 128 * experts else 128  # ~<=128 tokens per expert: smaller tiles waste less
        tile_expert, tile_row = _expert_tiles(offsets, m, bm)
        grid = lambda meta: (tile_expert.numel(), cdiv(n, meta["BN"]))  # noqa: E731
        _fp8_grouped_gemm_kernel[grid](a2, b, out, as2, bs, offsets, tile_expert, tile_row, n, k,
                                       a2.stride(0), b.stride(0), b.stride(1), out.stride(0), as2.stride(0),
                                       as2.stride(1), bs.stride(0), bs.stride(1), bs.stride(2),
                                       B_SCALE_ROWS=b_scale_rows(bs, n), BK=GEMM_BLOCK_K, BM=bm)
    return out
