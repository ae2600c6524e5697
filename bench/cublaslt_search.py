"""Can cuBLAS's blockwise FP8 GEMM be tuned past the configuration torch runs? Times every one.

    python bench/cublaslt_search.py [--json out.json] [--rounds 5]   # H100/H200 with nvcc and cublasLt.h

Why this exists: at M=4096 `fp8_gemm` is cuBLAS's blockwise-scaled kernel, and (2112, 7168) stays
under the issue's 1.5x bf16 (docs/PERFORMANCE.md, section 2). torch's `F.scaled_mm` runs the first
algorithm of cuBLASLt's heuristic only, and TunableOp has no path for these scaling recipes. This
script builds `bench/cublaslt_search.cpp` (a small cuBLASLt binding, linked to the libcublasLt
torch loaded) and, per shape:
1. lists every configuration `cublasLtMatmulAlgoCheck` accepts in the heuristic's kernel: each
   tile x custom option x cluster shape, then stages x CTA swizzle x split-K around the six fastest;
2. times each once (`r1pipe.kernels.fp8._gpu_ms`: graph replay, cold L2);
3. times the heuristic's pick and the five fastest again in turns with bf16 `torch.matmul` and
   `F.scaled_mm` (bench/kernels.py's cold-L2 timing) and checks each output against `F.scaled_mm`
   (AlgoCheck accepts some configurations that compute a wrong result: they are flagged).
"""
import argparse
import json
import os
import re
import sys

import torch
from torch.utils.cpp_extension import load

from r1pipe.kernels.fp8 import _cublas_blockwise_gemm, _gpu_ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/kernels.py's timing helpers
import kernels as bench_kernels  # noqa: E402

M = 4096
CLUSTER_SHAPE_IDS = range(24)  # cublasLtClusterShape_t; AlgoCheck rejects the ones a kernel lacks
WRONG = 1e-2  # relative error against F.scaled_mm beyond bf16 rounding (the same kernel family gives ~0)
SPLIT_K = [(1, 0), (2, 1), (2, 2), (2, 4), (3, 2), (4, 2)]  # (splits, reduction scheme: in place / compute / output type)


def build_binding():
    """Compile the binding against the cublasLt.h and libcublasLt that match the library torch loaded."""
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # loads cuBLASLt
    with open("/proc/self/maps") as maps:
        lib = re.search(r"(/\S*libcublasLt\.so[.\d]*)", maps.read()).group(1)
    includes = [os.path.join(os.path.dirname(os.path.dirname(lib)), "include"), "/usr/local/cuda/include"]
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cublaslt_search.cpp")
    return load("r1pipe_cublaslt_search", [source], extra_include_paths=includes, extra_ldflags=[lib])


def search(lt, n: int, k: int, rounds: int) -> dict:
    x, w, x_fp8, x_scale, w_fp8, w_scale = bench_kernels._random_gemm_inputs(M, n, k)
    expected = _cublas_blockwise_gemm(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16)
    out = torch.empty_like(expected)
    x_scale_storage = x_scale.t()  # act_quant's scales are M-major: [K/128, M] contiguous underneath
    lt.setup(w_fp8, w_scale, x_fp8, x_scale_storage, 32 << 20)
    kernel, _, stages, *_ = lt.describe(0)
    tiles, stage_ids, (custom_max,) = lt.capabilities(kernel)

    def lt_gemm(i: int):
        return lambda w8, ws, x8, xs: lt.run(i, w8, ws, x8, xs, out)

    def quick_ms(i: int) -> float:
        return _gpu_ms(lambda: lt_gemm(i)(w_fp8, w_scale, x_fp8, x_scale_storage), repeats=3)

    seen = {tuple(lt.describe(0))}

    def distinct(indices):  # accepted, and not a configuration already listed
        kept = []
        for i in filter(lambda i: i >= 0, indices):
            config = tuple(lt.describe(i))
            if config not in seen:
                seen.add(config)
                kept.append(i)
        return kept

    first = distinct([lt.add_config(kernel, tile, stages, 1, 0, 0, custom, cluster)
                      for tile in tiles for custom in range(custom_max + 1) for cluster in CLUSTER_SHAPE_IDS])
    ms = {i: quick_ms(i) for i in [0, *first]}
    second = []
    for i in sorted(first, key=ms.get)[:6]:
        _, tile, _, _, _, custom, cluster = lt.describe(i)
        second += [lt.add_config(kernel, tile, st, splits, reduction, swizzle, custom, cluster)
                   for st in stage_ids for swizzle in (0, 1) for splits, reduction in SPLIT_K]
    second = distinct(second)
    ms.update({i: quick_ms(i) for i in second})
    finalists = [0, *[i for i in sorted(ms, key=ms.get) if i != 0][:5]]

    timed = {"bf16": (lambda a, b: a @ b.t(), (x, w)),
             "F.scaled_mm": (lambda *operands: _cublas_blockwise_gemm(*operands, torch.bfloat16),
                             (x_fp8, x_scale, w_fp8, w_scale))}
    timed.update({f"config {i}": (lt_gemm(i), (w_fp8, w_scale, x_fp8, x_scale_storage)) for i in finalists})
    bench_kernels.GEMM_ROUNDS = rounds
    tf = bench_kernels.tflops_in_turns(timed, M, n, k)
    rows = []
    for i in finalists:
        lt_gemm(i)(w_fp8, w_scale, x_fp8, x_scale_storage)
        rows.append({"n": n, "k": k, "config": i, "heuristic_pick": i == 0, "describe": lt.describe(i),
                     "tflops": tf[f"config {i}"], "vs_bf16": tf[f"config {i}"] / tf["bf16"],
                     "vs_scaled_mm": tf[f"config {i}"] / tf["F.scaled_mm"],
                     "err_vs_scaled_mm": bench_kernels.rel_err(out, expected)})
    return {"n": n, "k": k, "configs_accepted": 1 + len(first) + len(second), "kernel": kernel,
            "bf16": tf["bf16"], "scaled_mm": tf["F.scaled_mm"], "finalists": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rounds", type=int, default=5, help="turns of the final timing")
    args = parser.parse_args()
    lt = build_binding()
    results = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, M={M}; configuration = "
          "[kernel, tile, stages, split-K, swizzle, custom option, cluster shape]")
    for n, k in bench_kernels.GEMM_SHAPES:
        shape = search(lt, n, k, args.rounds)
        results.append(shape)
        print(f"\nN={n} K={k}: {shape['configs_accepted']} configurations accepted in kernel {shape['kernel']}; "
              f"bf16 {shape['bf16']:.0f} TFLOP/s, F.scaled_mm {shape['scaled_mm']:.0f} "
              f"({shape['scaled_mm'] / shape['bf16']:.2f}x bf16)")
        print("| configuration | TFLOP/s | vs bf16 | vs F.scaled_mm | rel. err vs F.scaled_mm |\n|---|---|---|---|---|")
        for row in shape["finalists"]:
            label = f"{row['describe']}{' (heuristic pick)' if row['heuristic_pick'] else ''}"
            wrong = " (WRONG RESULT)" if row["err_vs_scaled_mm"] > WRONG else ""
            print(f"| {label} | {row['tflops']:.0f} | {row['vs_bf16']:.2f}x | {row['vs_scaled_mm']:.3f}x "
                  f"| {row['err_vs_scaled_mm']:.1e}{wrong} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
