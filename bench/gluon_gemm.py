"""Prototype: a warp-specialized blockwise FP8 GEMM for Hopper in Gluon, timed against cuBLAS.

    python bench/gluon_gemm.py [--json out.json]      # H100/H200, Triton 3.6 (Gluon's API moves between releases)

Why this exists: the Triton TMA kernel in `r1pipe.kernels.triton_fp8` reaches 0.75-0.8x cuBLAS's
blockwise GEMM at M=4096 (docs/PERFORMANCE.md, section 2). This script measures how much of that
gap a DeepGEMM-style design closes, written in Gluon (Triton's lower-level language, which exposes
the asynchronous warpgroup MMA, mbarriers and warp specialization):
- one loader warp issues the TMA copies into a STAGES-deep ring of shared-memory buffers and
  refills a buffer as soon as the math warps release it (`empty` barrier);
- the math warps keep two K-slice products in flight: slice k+1 starts on the tensor cores before
  slice k is promoted (`acc += product * a_scale * b_scale`), in groups of UNROLL slices
  (UNROLL=1: no overlap, the promotion waits for the MMA as in the Triton kernel).
It is not used by `fp8_gemm`: at M=4096 it measured 0.83-0.96x cuBLAS's blockwise GEMM, and
Gluon's API changes between Triton releases (Triton 3.9 renamed the TMA store this uses), so it
would tie r1pipe to one Triton version for no gain where cuBLAS's blockwise GEMM exists. Blockwise
(128x128) weight scales only. Results: docs/PERFORMANCE.md, section 2.
"""
import argparse
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
CONFIGS = {  # name: (BM, BN, num_warps, STAGES, UNROLL)
    "ws 128x128 U1": (128, 128, 8, 4, 1), "ws 128x128 U2": (128, 128, 8, 4, 2),
    "ws 128x128 U2 5st": (128, 128, 8, 5, 2), "ws 128x128 U4": (128, 128, 8, 4, 4),
}


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """TMA copies of every K slice of the program's tiles, each into a buffer the math warps released."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BN)
    count = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
        for kk in range(gl.cdiv(K, BK)):
            slot = count % STAGES
            mbarrier.wait(empty.index(slot), ((count // STAGES) & 1) ^ 1)  # the first round passes
            bar = ready.index(slot)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BM, kk * BK], bar, a_bufs.index(slot))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BN, kk * BK], bar, b_bufs.index(slot))
            count += 1


@gluon.jit
def _start_mma(step, a_bufs, b_bufs, ready, dead, STAGES: gl.constexpr):
    """A_k @ B_k^T of slice `step`, asynchronously, into the registers of `dead` (an already
    promoted product; use_acc=False, so its values are not read)."""
    slot = step % STAGES
    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), dead, use_acc=False,
                         is_async=True)


@gluon.jit
def _finish_mma(product, pending: gl.constexpr, step, empty, acc, as_ptrs, b_scale_ptr, stride_ask, stride_bsk, k,
                STAGES: gl.constexpr):
    """Waits until `pending` MMAs are left in flight (so `product` is done), releases its buffer
    and promotes it: acc += product * a_scale[row] * b_scale (V3, every 128 of K)."""
    scale = gl.load(as_ptrs + k * stride_ask) * gl.load(b_scale_ptr + k * stride_bsk)
    product = warpgroup_mma_wait(pending, deps=(product, ))
    mbarrier.arrive(empty.index(step % STAGES))
    return product, acc + product * gl.expand_dims(scale, 1)


@gluon.jit
def _math(a_bufs, b_bufs, ready, empty, c_desc, c_smem, as_ptr, bs_ptr, M, N, K, stride_asm, stride_ask, stride_bsn,
          stride_bsk, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
          UNROLL: gl.constexpr):
    BK: gl.constexpr = a_bufs.type.shape[2]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BN, 32])
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BN)
    k_steps = gl.cdiv(K, BK)
    spare0 = gl.zeros((BM, BN), gl.float32, layout)  # the two product buffers, see _start_mma
    spare1 = gl.zeros((BM, BN), gl.float32, layout)
    step = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
        rows = gl.minimum(pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout)), M - 1)
        as_ptrs = as_ptr + rows * stride_asm
        b_scale_ptr = bs_ptr + (pid_n * BN // 128) * stride_bsn
        acc = gl.zeros((BM, BN), gl.float32, layout)
        for k0 in range(0, k_steps - UNROLL + 1, UNROLL):
            # The waits on `acc` alone keep each promotion ahead of the next MMA that reuses its
            # registers (else the compiler sinks the promotions and copies in-flight products).
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            x = _start_mma(step + k0, a_bufs, b_bufs, ready, spare0, STAGES)
            for u in gl.static_range(1, UNROLL):
                acc = warpgroup_mma_wait(1, deps=(acc, ))
                y = _start_mma(step + k0 + u, a_bufs, b_bufs, ready, spare1, STAGES)
                spare1, acc = _finish_mma(x, 1, step + k0 + u - 1, empty, acc, as_ptrs, b_scale_ptr, stride_ask,
                                          stride_bsk, k0 + u - 1, STAGES)
                x = y
            spare0, acc = _finish_mma(x, 0, step + k0 + UNROLL - 1, empty, acc, as_ptrs, b_scale_ptr, stride_ask,
                                      stride_bsk, k0 + UNROLL - 1, STAGES)
        for kk in range(k_steps - k_steps % UNROLL, k_steps):  # K slices left over: one at a time
            x = _start_mma(step + kk, a_bufs, b_bufs, ready, spare0, STAGES)
            spare0, acc = _finish_mma(x, 0, step + kk, empty, acc, as_ptrs, b_scale_ptr, stride_ask, stride_bsk, kk,
                                      STAGES)
        step += k_steps
        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def fp8_gemm_ws_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, stride_asm, stride_ask, stride_bsn,
                       stride_bsk, STAGES: gl.constexpr, GROUP_M: gl.constexpr, UNROLL: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [BM, BN], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize([(_math, (a_bufs, b_bufs, ready, empty, c_desc, c_smem, as_ptr, bs_ptr, M, N, K, stride_asm,
                                 stride_ask, stride_bsn, stride_bsk, BM, BN, STAGES, GROUP_M, UNROLL)),
                        (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES, GROUP_M))],
                       [1], [LOADER_REGISTERS])


_GL_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}


def fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, config=CONFIGS["ws 128x128 U2"]):
    """A [M, K] x B [N, K]^T with 1x128 A scales (any strides) and 128x128 B scales; persistent grid."""
    bm, bn, warps, stages, unroll = config
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    descs = [TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype]))
             for t, block in ((a, [bm, GEMM_BLOCK_K]), (b, [bn, GEMM_BLOCK_K]), (out, [bm, bn]))]
    fp8_gemm_ws_kernel[(min(triton_fp8._sm_count(a.get_device()), cdiv(m, bm) * cdiv(n, bn)),)](
        *descs, a_scale, b_scale, m, n, k, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        STAGES=stages, GROUP_M=8, UNROLL=unroll, num_warps=warps)
    return out


def check(configs) -> list[str]:
    """Every configuration against the fp32 reference on edge shapes (partial tiles, K < STAGES x 128,
    K slices not a multiple of UNROLL), both output dtypes."""
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
