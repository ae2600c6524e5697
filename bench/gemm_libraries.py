"""Do the libraries that implement the V3 blockwise FP8 GEMM on Hopper beat cuBLAS's?

    python bench/gemm_libraries.py [--cutlass DIR [--so lib.so]] [--flashinfer [--flashinfer-so m.so]]
                                   [--rounds 5] [--ms 4096] [--json out.json]

Why: at M=4096 `fp8_gemm` runs cuBLAS's blockwise kernel (`F.scaled_mm`), which has no split-K or
stream-K, and (2112, 7168) stays under the issue's 1.5x bf16 (docs/PERFORMANCE.md, section 2).
Contenders, each the same recipe (A in 1x128 tiles, B in 128x128 blocks, fp32 promotion):
- CUTLASS's Hopper blockwise kernel (`--cutlass DIR`, DIR holding `include/` and
  `tools/util/include/`, e.g. the `cutlass_library/source` folder of the `nvidia-cutlass` wheel):
  `bench/cutlass_fp8_gemm.cu` is built with nvcc (one translation unit per configuration, in
  parallel) unless --so names a library that loads; the stream-K configurations run under each
  decomposition CUTLASS has.
- FlashInfer's `fp8_blockscale_gemm_sm90` (`--flashinfer`): TensorRT-LLM's DeepGEMM-derived kernel,
  JIT-compiled per shape. `--flashinfer-so` loads its host module built elsewhere (where the
  machine cannot build it: FlashInfer's full sources are too large to carry to the GPU machine).
Per shape of the issue (M from --ms), the script checks each output against `F.scaled_mm`, then
times bf16 `torch.matmul`, `F.scaled_mm` and each contender in turns (bench/kernels.py's cold-L2
graph-replay timing).
"""
import argparse
import ctypes
import functools
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from r1pipe.kernels.fp8 import _cublas_blockwise_gemm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/kernels.py's timing helpers
import kernels as bench_kernels  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cutlass_fp8_gemm.cu")
# (tile M, tile N, cluster M, cluster N, ping-pong, stream-K scheduler): one build of the source each
CONFIGS = [(128, 128, 1, 2, False, True), (128, 128, 2, 1, False, True), (128, 128, 1, 1, False, True),
           (64, 128, 1, 2, True, False), (64, 128, 2, 1, True, False)]
DECOMPOSITIONS = {"heuristic": 0, "data-parallel": 1, "stream-K": 3}  # CUTLASS's DecompositionMode
WRONG = 1e-2  # relative error against F.scaled_mm beyond bf16 rounding


def config_name(tile_m, tile_n, cluster_m, cluster_n, pingpong, streamk) -> str:
    """The configuration's C symbol, e.g. coop_128x128_c1x2_streamk."""
    schedule = "pingpong" if pingpong else "coop"
    return f"{schedule}_{tile_m}x{tile_n}_c{cluster_m}x{cluster_n}{'_streamk' if streamk else ''}"


def build(cutlass_dir: str, out_dir: str) -> str:
    """nvcc each configuration for sm_90a in parallel and link them into one shared library."""
    flags = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
             "-Xcompiler", "-fPIC", f"-I{cutlass_dir}/include", f"-I{cutlass_dir}/tools/util/include"]

    def compile_one(config) -> str:
        name = config_name(*config)
        tile_m, tile_n, cluster_m, cluster_n, pingpong, streamk = config
        defines = [f"-DR1_NAME={name}", f"-DR1_TILE_M={tile_m}", f"-DR1_TILE_N={tile_n}",
                   f"-DR1_CLUSTER_M={cluster_m}", f"-DR1_CLUSTER_N={cluster_n}",
                   f"-DR1_PINGPONG={int(pingpong)}", f"-DR1_STREAMK={int(streamk)}"]
        obj = os.path.join(out_dir, f"{name}.o")
        subprocess.run(["nvcc", *flags, *defines, "-c", SOURCE, "-o", obj], check=True)
        return obj

    with ThreadPoolExecutor(len(CONFIGS)) as pool:
        objects = list(pool.map(compile_one, CONFIGS))
    library = os.path.join(out_dir, "libr1_cutlass_fp8.so")
    subprocess.run(["nvcc", "-shared", "-cudart", "static", *objects, "-o", library], check=True)
    return library


def bind(library: str):
    lib = ctypes.CDLL(library)
    for name in (config_name(*config) for config in CONFIGS):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2
        getattr(lib, f"{name}_workspace").restype = ctypes.c_size_t
        getattr(lib, f"{name}_workspace").argtypes = [ctypes.c_int] * 4
    return lib


def cutlass_gemm(lib, name: str, decomposition: int):
    """fn(a_fp8, a_scale, b_fp8, b_scale) -> bf16 [M, N] through one configuration."""
    entry, workspace_size = getattr(lib, name), getattr(lib, f"{name}_workspace")

    def gemm(a, a_scale, b, b_scale):
        (m, k), n = a.shape, b.shape[0]
        assert a_scale.t().is_contiguous() and b_scale.is_contiguous(), "scales: A M-major, B row-major"
        out = torch.empty(m, n, device=a.device, dtype=torch.bfloat16)
        workspace = torch.empty(max(1, workspace_size(m, n, k, decomposition)), device=a.device, dtype=torch.uint8)
        status = entry(a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), out.data_ptr(),
                       m, n, k, decomposition, workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
        if status:
            raise RuntimeError(f"{name}: CUTLASS status {status} (100s can_implement, 200s initialize, 300s run)")
        return out
    return gemm


def flashinfer_gemm(prebuilt: str | None):
    """fn(a_fp8, a_scale, b_fp8, b_scale) through FlashInfer's public fp8_blockscale_gemm_sm90."""
    from flashinfer.gemm import fp8_blockscale_gemm_sm90, gemm_base

    if prebuilt:  # what get_fp8_blockscale_gemm_runner_sm90 does after its JIT build
        import tvm_ffi
        from flashinfer.jit import env as jit_env

        def runner():
            module = tvm_ffi.load_module(prebuilt)
            module.set_deepgemm_jit_include_dirs([str(jit_env.FLASHINFER_CSRC_DIR / "nv_internal" / "tensorrt_llm")])
            return module.init()
        gemm_base.get_fp8_blockscale_gemm_runner_sm90 = functools.cache(runner)
    return lambda a, a_scale, b, b_scale: fp8_blockscale_gemm_sm90(a, b, a_scale, b_scale)


def cutlass_contenders(lib) -> dict:
    found = {}
    for config in CONFIGS:
        name, streamk = config_name(*config), config[-1]
        for mode, value in (DECOMPOSITIONS.items() if streamk else [("persistent", 0)]):
            found[f"{name} {mode}"] = cutlass_gemm(lib, name, value)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cutlass", help="CUTLASS source folder (include/, tools/util/include/)")
    parser.add_argument("--so", help="a library built earlier; rebuilt if it does not load")
    parser.add_argument("--build-dir", default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=5, help="turns of the timing")
    parser.add_argument("--flashinfer", action="store_true", help="time FlashInfer's fp8_blockscale_gemm_sm90")
    parser.add_argument("--flashinfer-so", help="FlashInfer's fp8_blockscale_gemm_90 module, built elsewhere")
    parser.add_argument("--ms", type=int, nargs="+", default=[4096], help="M values")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not (args.cutlass or args.flashinfer):
        parser.error("name at least one library: --cutlass DIR and/or --flashinfer")
    gemms = {}
    if args.cutlass:
        lib = None
        if args.so:
            try:
                lib = bind(args.so)
            except (OSError, AttributeError) as err:  # does not load, or was built from an older source
                print(f"{args.so} cannot be used here ({err}); building")
        lib = lib or bind(build(args.cutlass, args.build_dir or tempfile.mkdtemp()))
        gemms.update(cutlass_contenders(lib))
    if args.flashinfer:
        gemms["FlashInfer fp8_blockscale_gemm_sm90"] = flashinfer_gemm(args.flashinfer_so)
    torch.manual_seed(0)
    bench_kernels.GEMM_ROUNDS = args.rounds
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; TFLOP/s, {args.rounds}-round medians, cold L2")
    results = []
    for m in args.ms:
        for n, k in bench_kernels.GEMM_SHAPES:
            x, w, x_fp8, x_scale, w_fp8, w_scale = bench_kernels._random_gemm_inputs(m, n, k)
            expected = _cublas_blockwise_gemm(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16)
            errors = {}
            for label, gemm in gemms.items():
                try:
                    errors[label] = bench_kernels.rel_err(gemm(x_fp8, x_scale, w_fp8, w_scale), expected)
                except Exception as err:  # noqa: BLE001 -- report the contender's failure and time the rest
                    print(f"M={m} N={n} K={k}: {err}")
            timed = {"bf16": (lambda a, b: a @ b.t(), (x, w)),
                     "F.scaled_mm": (lambda *ops: _cublas_blockwise_gemm(*ops, torch.bfloat16),
                                     (x_fp8, x_scale, w_fp8, w_scale))}
            timed.update({label: (gemms[label], (x_fp8, x_scale, w_fp8, w_scale)) for label in errors})
            tf = bench_kernels.tflops_in_turns(timed, m, n, k)
            print(f"\nM={m} N={n} K={k}: bf16 {tf['bf16']:.0f}, F.scaled_mm {tf['F.scaled_mm']:.0f} "
                  f"({tf['F.scaled_mm'] / tf['bf16']:.2f}x bf16)")
            print("| contender | TFLOP/s | vs bf16 | vs F.scaled_mm | rel. err vs F.scaled_mm |\n"
                  "|---|---|---|---|---|")
            for label, err in errors.items():
                wrong = " (WRONG RESULT)" if err > WRONG else ""
                print(f"| {label} | {tf[label]:.0f} | {tf[label] / tf['bf16']:.2f}x | "
                      f"{tf[label] / tf['F.scaled_mm']:.3f}x | {err:.1e}{wrong} |")
            results.append({"m": m, "n": n, "k": k, "tflops": tf, "rel_err": errors})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
