"""Prototype: a warp-specialized blockwise FP8 GEMM for Hopper in Gluon, timed against cuBLAS.

    python bench/gluon_gemm.py [--json out.json]      # H100/H200, Triton 3.6 (Gluon's API moves between releases)

Why this exists: the Triton TMA kernel in `r1pipe.kernels.triton_fp8` reaches 0.75-0.8x cuBLAS's
blockwise GEMM at M=4096 (docs/PERFORMANCE.md, section 2). This script measures how much of that
gap a DeepGEMM-style design closes, written in Gluon (Triton's lower-level language, which exposes
the asynchronous warpgroup MMA, mbarriers and warp specialization):
- one loader warp issues the TMA copies into a ring of shared-memory stages (KS K blocks each) and
  refills a stage as soon as the math warps release it (`empty` barrier);
- the math warps compute each stage's products (one per K block and SUB_N-column slice of the
  tile) and promote each into its accumulator (`acc += product * a_scale * b_scale`); with
  OVERLAP the next product runs on the tensor cores while the previous one is promoted;
- tiles wider than one product (128 x 256 as four 64-column slices) keep the registers at two
  64-wide products plus the accumulators: a whole 128 x 256 product would not fit beside them.
MATH_PARTITIONS=2 gives each math warpgroup its own partition that releases stages on its own, as
DeepGEMM's math warpgroups do; one partition of 8 warps synchronizes both at every release.
It is not used by `fp8_gemm`: at M=4096 its best configuration measured 0.86-0.98x cuBLAS's
blockwise GEMM, and Gluon's API changes between Triton releases (Triton 3.9 renamed the TMA store
this uses), so it would tie r1pipe to one Triton version for no gain where cuBLAS's blockwise GEMM
exists. Blockwise (128x128) weight scales only. Results: docs/PERFORMANCE.md, section 2.
"""
import argparse
import functools
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/kernels.py's timing helpers
import kernels as bench_kernels  # noqa: E402

from r1pipe.kernels import reference as ref  # noqa: E402
from r1pipe.kernels import triton_fp8  # noqa: E402
from r1pipe.kernels.fp8 import _cublas_blockwise_gemm  # noqa: E402
from r1pipe.kernels.reference import GEMM_BLOCK_K, cdiv  # noqa: E402
from r1pipe.kernels.triton_fp8 import _tile_position  # noqa: E402 (a triton.jit function; Gluon calls it)

LOADER_REGISTERS = gl.constexpr(24)  # the TMA-issuing warp needs few; the math warps get the rest
MATH_REGISTERS = gl.constexpr(232)  # a math warpgroup of its own (MATH_PARTITIONS=2)
BM = 128  # rows per tile: 8 math warps, two warpgroups of 64 rows
CONFIGS = {  # name: (SUB_N, N_SUB, KS, STAGES, OVERLAP, MATH_PARTITIONS); the tile is BM x (N_SUB * SUB_N),
    # a ring stage holds KS K blocks
    "128x128 KS2": (128, 1, 2, 3, True, 1), "128x256 4xn64 KS2": (64, 4, 2, 2, True, 1),
    "2wg 128x128 KS2": (128, 1, 2, 2, False, 2),
}


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """TMA copies of the program's tiles, KS K blocks per stage, each stage into buffers the math
    warps released. The B tile lands as N_SUB slices of SUB_N rows (shared-memory shapes are powers
    of two, tile widths need not be)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    SUB_N: gl.constexpr = b_desc.block_type.shape[0]
    N_SUB: gl.constexpr = len(b_bufs)
    KS: gl.constexpr = a_bufs.type.shape[0] // STAGES
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, N_SUB * SUB_N)
    count = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
        for kk in range(gl.cdiv(K, KS * BK)):
            slot = count % STAGES
            mbarrier.wait(empty.index(slot), ((count // STAGES) & 1) ^ 1)  # the first round passes
            bar = ready.index(slot)
            mbarrier.expect(bar, KS * (a_desc.block_type.nbytes + N_SUB * b_desc.block_type.nbytes))
            for kb in gl.static_range(KS):  # blocks past K arrive as zeros
                k = (kk * KS + kb) * BK
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(slot * KS + kb))
                for s in gl.static_range(N_SUB):
                    tma.async_copy_global_to_shared(b_desc, [(pid_n * N_SUB + s) * SUB_N, k], bar,
                                                    b_bufs[s].index(slot * KS + kb))
            count += 1


@gluon.jit
def _start_mma(wg: gl.constexpr, a_bufs, b_bufs, ready, step, i: gl.constexpr, dead, STAGES: gl.constexpr):
    """MMA i of stage `step` (K block i // N_SUB, columns of slice i % N_SUB) for the rows of
    partition wg, asynchronously, into the registers of `dead`, an already promoted product
    (use_acc=False: its values are not read)."""
    KS: gl.constexpr = a_bufs.type.shape[0] // STAGES
    N_SUB: gl.constexpr = len(b_bufs)
    ROWS: gl.constexpr = dead.type.shape[0]
    slot = step % STAGES
    if i == 0:  # the stage's first MMA waits for its copies
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    buf = slot * KS + i // N_SUB
    return warpgroup_mma(a_bufs.index(buf).slice(wg * ROWS, ROWS), b_bufs[i % N_SUB].index(buf).permute((1, 0)),
                         dead, use_acc=False, is_async=True)


@gluon.jit
def _replace(items, i: gl.constexpr, value):
    return items[:i] + (value, ) + items[i + 1:]


@gluon.jit
def _reorder(accs, last: gl.constexpr, pending: gl.constexpr):
    """A wait (leaving `pending` MMAs in flight) on accs[last], the accumulator promoted last: it
    orders that promotion before the next MMA, which reuses the promoted product's registers
    (else the compiler sinks the promotion past the MMA and copies the product)."""
    return _replace(accs, last, warpgroup_mma_wait(pending, deps=(accs[last], )))


@gluon.jit
def _stage(wg: gl.constexpr, accs, prods, a_bufs, b_bufs, ready, empty, step, kk, as_ptrs, b_scale_ptrs, stride_ask,
           stride_bsk, k_blocks, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
    """Stage kk of the tile (`step` of the ring): KS K blocks x N_SUB products, each promoted into
    its accumulator, accs[s] += product * a_scale[row] * b_scale[s] (V3, every 128 of K).
    OVERLAP (two product buffers): MMA i+1 runs on the tensor cores while product i is promoted.
    Otherwise each MMA is waited for, then promoted. Either way the stage ends with no MMA in flight."""
    KS: gl.constexpr = a_bufs.type.shape[0] // STAGES
    N_SUB: gl.constexpr = len(accs)
    MMAS: gl.constexpr = KS * N_SUB
    if OVERLAP:
        accs = _reorder(accs, N_SUB - 1, 0)
        prods = _replace(prods, 0, _start_mma(wg, a_bufs, b_bufs, ready, step, 0, prods[0], STAGES))
    for i in gl.static_range(MMAS):
        if i % N_SUB == 0:  # a new K block; past K (zeros in shared memory) any scale will do
            k_block = gl.minimum(kk * KS + i // N_SUB, k_blocks - 1)
            a_scale = gl.load(as_ptrs + k_block * stride_ask)
        scale = a_scale * gl.load(b_scale_ptrs[i % N_SUB] + k_block * stride_bsk)
        if OVERLAP:
            if i + 1 < MMAS:
                accs = _reorder(accs, (i + N_SUB - 1) % N_SUB, 1)
                prods = _replace(prods, (i + 1) % 2, _start_mma(wg, a_bufs, b_bufs, ready, step, i + 1,
                                                                prods[(i + 1) % 2], STAGES))
                product = warpgroup_mma_wait(1, deps=(prods[i % 2], ))
            else:
                product = warpgroup_mma_wait(0, deps=(prods[i % 2], ))
            prods = _replace(prods, i % 2, product)
        else:
            accs = _reorder(accs, (i + N_SUB - 1) % N_SUB, 0)
            product = _start_mma(wg, a_bufs, b_bufs, ready, step, i, prods[0], STAGES)
            product = warpgroup_mma_wait(0, deps=(product, ))
            prods = (product, )
        if i == MMAS - 1:
            mbarrier.arrive(empty.index(step % STAGES))  # every MMA reading this stage is done
        accs = _replace(accs, i % N_SUB, accs[i % N_SUB] + product * gl.expand_dims(scale, 1))
    return accs, prods


@gluon.jit
def _math(wg: gl.constexpr, a_bufs, b_bufs, ready, empty, c_desc, c_smem, as_ptr, bs_ptr, M, N, K, stride_asm,
          stride_ask, stride_bsn, stride_bsk, STAGES: gl.constexpr, GROUP_M: gl.constexpr, OVERLAP: gl.constexpr):
    """Rows [wg * ROWS, (wg + 1) * ROWS) of every tile of the program (ROWS: c_desc's block), each
    tile's accumulators promoted K block by K block, then stored through c_smem by TMA."""
    BM: gl.constexpr = a_bufs.type.shape[1]
    ROWS: gl.constexpr = c_desc.block_type.shape[0]
    BK: gl.constexpr = a_bufs.type.shape[2]
    KS: gl.constexpr = a_bufs.type.shape[0] // STAGES
    N_SUB: gl.constexpr = len(b_bufs)
    SUB_N: gl.constexpr = c_desc.block_type.shape[1]
    BN: gl.constexpr = N_SUB * SUB_N
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, SUB_N, 32])
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BN)
    k_blocks = gl.cdiv(K, BK)
    stages = gl.cdiv(k_blocks, KS)
    last_scale_block = gl.cdiv(N, 128) - 1
    zeros = gl.zeros((ROWS, SUB_N), gl.float32, layout)
    prods = (zeros, zeros) if OVERLAP else (zeros, )
    step = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
        row0 = pid_m * BM + wg * ROWS
        rows = gl.minimum(row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout)), M - 1)
        as_ptrs = as_ptr + rows * stride_asm
        b_scale_ptrs = ()  # each slice's columns lie in one 128-column scale block (SUB_N divides 128)
        for s in gl.static_range(N_SUB):
            block = gl.minimum((pid_n * BN + s * SUB_N) // 128, last_scale_block)
            b_scale_ptrs = b_scale_ptrs + (bs_ptr + block * stride_bsn, )
        accs = (zeros, ) * N_SUB
        for kk in range(stages):
            accs, prods = _stage(wg, accs, prods, a_bufs, b_bufs, ready, empty, step + kk, kk, as_ptrs, b_scale_ptrs,
                                 stride_ask, stride_bsk, k_blocks, STAGES, OVERLAP)
        step += stages
        for s in gl.static_range(N_SUB):  # one TMA store per slice, once c_smem has been read
            tma.store_wait(pendings=0)
            c_smem.store(accs[s].to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row0, pid_n * BN + s * SUB_N], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def fp8_gemm_ws_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, stride_asm, stride_ask, stride_bsn,
                       stride_bsk, STAGES: gl.constexpr, KS: gl.constexpr, N_SUB: gl.constexpr, GROUP_M: gl.constexpr,
                       OVERLAP: gl.constexpr, MATH_PARTITIONS: gl.constexpr):
    """MATH_PARTITIONS=1: the kernel's 8 warps do the math in one partition, which synchronizes its
    two warpgroups at every stage release. 2: each warpgroup is its own partition (the kernel's 4
    warps and 4 more) with half the tile's rows, and releases stages on its own."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    SUB_N: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * KS, BM, BK], a_desc.layout)
    b_bufs = ()
    for _ in gl.static_range(N_SUB):
        b_bufs = b_bufs + (gl.allocate_shared_memory(b_desc.dtype, [STAGES * KS, SUB_N, BK], b_desc.layout), )
    c_smem0 = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=MATH_PARTITIONS)
    if MATH_PARTITIONS == 1:
        gl.warp_specialize([(_math, (0, a_bufs, b_bufs, ready, empty, c_desc, c_smem0, as_ptr, bs_ptr, M, N, K,
                                     stride_asm, stride_ask, stride_bsn, stride_bsk, STAGES, GROUP_M, OVERLAP)),
                            (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES, GROUP_M))],
                           [1], [LOADER_REGISTERS])
    else:
        c_smem1 = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        gl.warp_specialize([(_math, (0, a_bufs, b_bufs, ready, empty, c_desc, c_smem0, as_ptr, bs_ptr, M, N, K,
                                     stride_asm, stride_ask, stride_bsn, stride_bsk, STAGES, GROUP_M, OVERLAP)),
                            (_math, (1, a_bufs, b_bufs, ready, empty, c_desc, c_smem1, as_ptr, bs_ptr, M, N, K,
                                     stride_asm, stride_ask, stride_bsn, stride_bsk, STAGES, GROUP_M, OVERLAP)),
                            (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES, GROUP_M))],
                           [4, 1], [MATH_REGISTERS, LOADER_REGISTERS])


_GL_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}


@functools.cache
def _shared_memory(device_index: int) -> int:
    """Shared memory a block may use (227 KB on H100/H200), less 1 KB for the barriers."""
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin - 1024


def fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, config=CONFIGS["128x256 4xn64 KS2"]):
    """A [M, K] x B [N, K]^T with 1x128 A scales (any strides) and 128x128 B scales; persistent grid.
    The ring holds as many stages (up to the configuration's) as fit beside the output buffer."""
    sub_n, n_sub, ks, stages, overlap, partitions = config
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    stage_bytes = ks * (BM + n_sub * sub_n) * GEMM_BLOCK_K
    stages = min(stages, (_shared_memory(a.get_device()) - BM * sub_n * out.element_size()) // stage_bytes)
    blocks = ((a, [BM, GEMM_BLOCK_K]), (b, [sub_n, GEMM_BLOCK_K]), (out, [BM // partitions, sub_n]))
    descs = [TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype]))
             for t, block in blocks]
    fp8_gemm_ws_kernel[(min(triton_fp8._sm_count(a.get_device()), cdiv(m, BM) * cdiv(n, n_sub * sub_n)),)](
        *descs, a_scale, b_scale, m, n, k, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        STAGES=stages, KS=ks, N_SUB=n_sub, GROUP_M=8, OVERLAP=overlap, MATH_PARTITIONS=partitions,
        num_warps=8 // partitions)
    return out


def check(configs) -> list[str]:
    """Every configuration against the fp32 reference on edge shapes (partial tiles, several tiles
    per program, K blocks not a multiple of KS, fewer K blocks than the ring holds), both output dtypes."""
    failures = []
    for m, n, k in ((4000, 2112, 7168), (300, 1000, 1664), (257, 2048, 384)):
        _, _, aq, as_, wq, ws = bench_kernels._random_gemm_inputs(m, n, k)
        expected = ref.fp8_gemm_ref(aq, as_, wq, ws, torch.float32)
        for name, config in configs.items():
            for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 3e-3)):
                err = bench_kernels.rel_err(fp8_gemm_ws(aq, as_, wq, ws, dtype, config), expected)
                if not err < tolerance:
                    failures.append(f"{name} m={m} n={n} k={k} {dtype}: relative error {err:.2e}")
    return failures


def bench(configs, m: int = 4096) -> list[dict]:
    rows = []
    for n, k in bench_kernels.GEMM_SHAPES:
        x, w, aq, as_, wq, ws = bench_kernels._random_gemm_inputs(m, n, k)
        contenders = {"bf16": (lambda x, w: x @ w.t(), (x, w)),
                      "cuBLAS blockwise": (lambda *o: _cublas_blockwise_gemm(*o, torch.bfloat16), (aq, as_, wq, ws)),
                      "Triton TMA": (lambda *o: triton_fp8.fp8_gemm(*o, torch.bfloat16), (aq, as_, wq, ws))}
        contenders.update({name: (lambda *o, c=config: fp8_gemm_ws(*o, torch.bfloat16, c), (aq, as_, wq, ws))
                           for name, config in configs.items()})
        rows.append({"m": m, "n": n, "k": k, **bench_kernels.tflops_in_turns(contenders, m, n, k)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    failures = check(CONFIGS)
    print("correctness:", "all configurations match the reference" if not failures else "; ".join(failures))
    rows = bench(CONFIGS)
    names = [name for name in rows[0] if name not in ("m", "n", "k")]
    print("\n| M | N | K | " + " | ".join(names) + " | best ws / bf16 | cuBLAS / bf16 |")
    print("|---" * (len(names) + 5) + "|")
    for row in rows:
        best = max(row[name] for name in CONFIGS)
        print(f"| {row['m']} | {row['n']} | {row['k']} | " + " | ".join(f"{row[name]:.0f}" for name in names)
              + f" | {best / row['bf16']:.2f}x | {row['cuBLAS blockwise'] / row['bf16']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "failures": failures,
                       "rows": rows}, f, indent=1)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
