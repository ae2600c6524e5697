"""Benchmark the FP8 kernels on a CUDA GPU against cuBLAS; prints one table.

    python bench/kernels.py [--json results.json] [--quick] [--tma-configs] [--l2-hot] [--eager] [--shapes NxK ...]

Kernel times are medians of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), so Python
launch overhead is left out (as in a graph-captured decode step); `--eager` times plain launches
instead. Inputs are random (never zeros). The L2 is cold for every contender alike: each replay
runs the op over enough copies of its inputs (4x the L2 size together) that no operand is still
cached from the previous call, as in a model whose layers each bring their own weights;
`--l2-hot` reuses one set of inputs (weights of the M=64/128 rows then stay in the 50 MB L2).
`--tma-configs` also times every tile configuration of the Triton TMA GEMM on its own. Results and
the targets of issue 4 are recorded in docs/PERFORMANCE.md (section 2).
"""
import argparse
import json
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

from r1pipe.kernels import FP8Linear, act_quant, fp8_gemm, fp8_grouped_gemm, weight_dequant, weight_quant
from r1pipe.kernels import reference as ref
from r1pipe.kernels import triton_fp8
from r1pipe.kernels import fp8 as fp8_module
from r1pipe.kernels.fp8 import _cublas_blockwise_gemm
from r1pipe.kernels.reference import cdiv

H100_SXM_PEAK_TFLOPS = {"fp8": 1979.0, "bf16": 989.0}  # dense, datasheet
GEMM_SHAPES = [(7168, 2048), (2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168)]


EAGER = False
L2_HOT = False


def median_ms(fn, *inputs: torch.Tensor) -> float:
    """Median time of one fn(*inputs); with a cold L2 each replay cycles through copies of the inputs."""
    calls = [inputs]
    if not L2_HOT and inputs:
        cold_bytes = 4 * torch.cuda.get_device_properties(0).L2_cache_size
        copies = min(64, cdiv(cold_bytes, sum(t.nbytes for t in inputs)))
        calls += [tuple(t.clone() for t in inputs) for _ in range(copies - 1)]  # clone keeps strides

    def run():
        for args in calls:
            fn(*args)

    run()  # compile and autotune outside the graph
    if EAGER:
        ms = do_bench(run, warmup=25, rep=100, return_mode="median")
    else:
        ms = do_bench_cudagraph(run, rep=50, return_mode="median")
    return ms / len(calls)


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def device_ceilings() -> dict:
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_gbs = 2 * src.numel() * 2 / copy_ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16_peak = tflops(8192, 8192, 8192, median_ms(torch.matmul, a, b))
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "sms": props.multi_processor_count, "copy_gbs": copy_gbs,
            "bf16_8192_tflops": bf16_peak, "torch": torch.__version__}


def bench_quant(copy_gbs: float) -> list[dict]:
    rows = []
    for m, k in ((4096, 7168), (16384, 7168)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for pow2 in (False, True):
            ms = median_ms(lambda t: act_quant(t, pow2_scale=pow2), x)  # noqa: B023
            gbs = (m * k * 3 + m * (k // 128) * 4) / ms / 1e6
            rows.append({"op": f"act_quant{' pow2' if pow2 else ''}", "shape": f"{m}x{k} bf16", "ms": ms,
                         "gbs": gbs, "of_copy": gbs / copy_gbs})
    for n, k in ((7168, 16384), (24576, 1536)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        ms = median_ms(weight_quant, w)
        gbs = (n * k * 3) / ms / 1e6
        rows.append({"op": "weight_quant", "shape": f"{n}x{k} bf16", "ms": ms, "gbs": gbs, "of_copy": gbs / copy_gbs})
        q, s = weight_quant(w)
        ms = median_ms(weight_dequant, q, s)
        gbs = (n * k * 3) / ms / 1e6
        rows.append({"op": "weight_dequant", "shape": f"{n}x{k} -> bf16", "ms": ms, "gbs": gbs,
                     "of_copy": gbs / copy_gbs})
    return rows


def _random_gemm_inputs(m: int, n: int, k: int):
    """bf16 x [m, k] and w [n, k], and their FP8 forms (act_quant, weight_quant)."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return x, w, *act_quant(x), *weight_quant(w)


GEMM_ROUNDS = 3  # contenders take turns; each reports the median of its rounds (clock drift hits all alike)
# (--rounds sets it)


def tflops_in_turns(timed: dict, m: int, n: int, k: int) -> dict:
    """TFLOP/s of each name: (fn, inputs) of an [m, k] x [k, n] GEMM, the contenders taking turns."""
    rounds = {name: [] for name in timed}
    for _ in range(GEMM_ROUNDS):
        for name, (fn, inputs) in timed.items():
            rounds[name].append(median_ms(fn, *inputs))
    return {name: tflops(m, n, k, sorted(ms)[len(ms) // 2]) for name, ms in rounds.items()}


def bench_gemm(ms_list=(64, 128, 4096)) -> list[dict]:
    rows = []
    for n, k in GEMM_SHAPES:
        for m in ms_list:
            x, w, aq, as_, wq, ws = _random_gemm_inputs(m, n, k)
            w_row_q, w_row_s = act_quant(w)  # row-wise scales for torch._scaled_mm's reference point
            w_row_s = w_row_s.amax(-1, keepdim=True).t().contiguous()
            a_row_s = as_.amax(-1, keepdim=True)
            row = {"m": m, "n": n, "k": k}
            timed = {"bf16": (lambda x, w: x @ w.t(), (x, w)),
                     "scaled_mm_rowwise": (lambda *ops: torch._scaled_mm(*ops, out_dtype=torch.bfloat16),
                                           (aq, w_row_q.t(), a_row_s, w_row_s))}
            expected = ref.fp8_gemm_ref(aq, as_, wq, ws, torch.float32)
            contenders = {"cublas_blockwise": lambda *ops: _cublas_blockwise_gemm(*ops, torch.bfloat16),
                          "triton": lambda *ops: triton_fp8.fp8_gemm(*ops, torch.bfloat16),
                          "ours": fp8_gemm}
            for name, fn in contenders.items():
                try:
                    row[f"{name}_err"] = rel_err(fn(aq, as_, wq, ws), expected)
                    timed[name] = (fn, (aq, as_, wq, ws))
                except (RuntimeError, AttributeError, TypeError) as err:
                    row[name], row[f"{name}_err"] = None, str(err).splitlines()[0][:120]
            timed["ours_with_act_quant"] = (lambda x, wq, ws: fp8_gemm(*act_quant(x), wq, ws), (x, wq, ws))
            row.update(tflops_in_turns(timed, m, n, k))
            rows.append(row)
    return rows


def bench_tma_configs(ms_list=(64, 128, 4096)) -> list[dict]:
    """Every tile configuration of the Triton TMA GEMM on its own (the autotuner picks among them)."""
    kernel = triton_fp8._fp8_gemm_tma_kernel
    configs = kernel.configs
    rows = []
    try:
        for n, k in GEMM_SHAPES:
            for m in ms_list:
                _, _, aq, as_, wq, ws = _random_gemm_inputs(m, n, k)
                expected = ref.fp8_gemm_ref(aq, as_, wq, ws, torch.float32)
                row = {"m": m, "n": n, "k": k}
                for config in configs:
                    kernel.configs, name = [config], str(config).split(", maxnreg")[0]
                    kernel.cache.clear()

                    def run(a, a_s, b, b_s):
                        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device=a.device)
                        triton_fp8._fp8_gemm_tma(a, a_s, b, b_s, out)
                        return out
                    try:
                        err = rel_err(run(aq, as_, wq, ws), expected)
                        row[name] = (tflops(m, n, k, median_ms(run, aq, as_, wq, ws)), err)
                    except Exception as error:  # noqa: BLE001 -- e.g. out of shared memory for this tile
                        row[name] = (None, str(error).splitlines()[0][:80])
                rows.append(row)
    finally:
        kernel.configs = configs
        kernel.cache.clear()
    return rows


def host_ms(fn, calls: int = 30) -> float:
    """Host time per fn() alone: a sleep kernel holds the GPU, so the calls only queue work."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s at H100 clocks, longer than the calls take to queue
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def profiled_kernels(fn, calls: int = 10):
    """torch.profiler's per-kernel averages of `calls` runs of fn(), after warm-up runs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernel_ms(fn, calls: int = 10) -> float:
    """GPU time per fn(): the sum of its kernels' times, gaps between them left out."""
    return sum(event.self_device_time_total for event in profiled_kernels(fn, calls)) / calls / 1e3


def graph_ms(fn) -> float:
    """Median time of fn() captured once in a CUDA graph and replayed: no host launch cost."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def bench_linear(tokens: int = 4096) -> list[dict]:
    """A training step's three GEMMs, bf16 nn.Linear vs FP8Linear: forward + backward, the weight's
    version bumped after each (as an optimizer step does, so FP8Linear re-quantizes it). TFLOP/s of
    the eager wall time and of a CUDA-graph replay of the step (FP8Linear re-quantizes the weight in
    every replay), and per eager step the host time alone and the GPU kernel time."""
    rows = []
    for n, k in ((2048, 7168), (7168, 2048), (24576, 1536)):
        bf16 = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8 = FP8Linear.from_linear(bf16)
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        row = {"n": n, "k": k, "m": tokens}
        for name, layer in (("bf16", bf16), ("fp8", fp8)):
            def step(layer=layer, x=x, grad=grad, weight=bf16.weight):
                x.grad = weight.grad = None
                layer(x).backward(grad)
                torch.autograd.graph.increment_version(weight)

            row[name] = tflops(3 * tokens, n, k, do_bench(step, warmup=25, rep=100, return_mode="median"))
            row[f"{name}_graph"] = tflops(3 * tokens, n, k, graph_ms(step))
            row[f"{name}_host_ms"], row[f"{name}_gpu_ms"] = host_ms(step), kernel_ms(step)
        rows.append(row)
    return rows


def profile_linear(tokens: int = 4096, n: int = 2048, k: int = 7168) -> str:
    """Where an FP8Linear training step spends its GPU time (kernel table of torch.profiler)."""
    layer = FP8Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    kernels = profiled_kernels(lambda: layer(x).backward(grad))
    return kernels.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)


def bench_grouped(tokens: int = 4096, experts: int = 256, topk: int = 8) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    routes = torch.rand(tokens, experts, device="cuda", generator=gen).topk(topk, -1).indices.flatten()
    offsets = torch.bincount(routes, minlength=experts).cumsum(0).int()
    m = tokens * topk
    rows = []
    for name, n, k in (("gate+up 7168->2x2048", 4096, 7168), ("down 2048->7168", 7168, 2048)):
        w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wq, ws = weight_quant(w)
        aq, as_ = act_quant(x)
        out = fp8_grouped_gemm(aq, as_, wq, ws, offsets)
        err = rel_err(out, ref.fp8_grouped_gemm_ref(aq, as_, wq, ws, offsets, torch.float32))
        bf16_ms = median_ms(lambda x, w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets), x, w)  # noqa: B023
        ours_ms = median_ms(lambda *ops: fp8_grouped_gemm(*ops, offsets), aq, as_, wq, ws)  # noqa: B023
        e2e_ms = median_ms(lambda x, wq, ws: fp8_grouped_gemm(*act_quant(x), wq, ws, offsets), x, wq, ws)  # noqa: B023
        rows.append({"gemm": name, "m": m, "n": n, "k": k, "err": err,
                     "bf16_grouped_mm": tflops(m, n, k, bf16_ms), "ours": tflops(m, n, k, ours_ms),
                     "ours_with_act_quant": tflops(m, n, k, e2e_ms), "speedup": bf16_ms / ours_ms})
    return rows


def print_tables(result: dict) -> None:
    c = result["ceilings"]
    print(f"\n{'eager launches' if result['eager'] else 'CUDA-graph replays'}, L2 {'hot' if result['l2_hot'] else 'cold'}; "
          f"{c['device']} ({c['sms']} SMs), torch {c['torch']}: copy {c['copy_gbs']:.0f} GB/s, "
          f"bf16 8192^3 {c['bf16_8192_tflops']:.0f} TFLOP/s; FP8 peak (H100 SXM dense) "
          f"{H100_SXM_PEAK_TFLOPS['fp8']:.0f} TFLOP/s")
    print("\n| op | shape | ms | GB/s | of copy |\n|---|---|---|---|---|")
    for r in result["quant"]:
        print(f"| {r['op']} | {r['shape']} | {r['ms']:.3f} | {r['gbs']:.0f} | {r['of_copy']:.0%} |")
    print("\n| M | N | K | bf16 | _scaled_mm rowwise | cuBLAS blockwise | Triton blockwise | fp8_gemm | "
          "fp8_gemm+act_quant | fp8_gemm/bf16 | of FP8 peak | rel err |\n" + "|---" * 12 + "|")
    for r in result["gemm"]:
        cub, tri = (f"{r[c]:.0f}" if r[c] else "n/a" for c in ("cublas_blockwise", "triton"))
        print(f"| {r['m']} | {r['n']} | {r['k']} | {r['bf16']:.0f} | {r['scaled_mm_rowwise']:.0f} | {cub} | {tri} | "
              f"{r['ours']:.0f} | {r['ours_with_act_quant']:.0f} | {r['ours'] / r['bf16']:.2f}x | "
              f"{r['ours'] / H100_SXM_PEAK_TFLOPS['fp8']:.0%} | {r['ours_err']:.1e} |")
    print("\n| linear fwd+bwd, 4096 tokens | eager bf16 / FP8Linear | speedup | CUDA graph bf16 / FP8Linear | "
          "speedup | host ms bf16 / fp8 | GPU ms bf16 / fp8 |\n|---|---|---|---|---|---|---|")
    for r in result["linear"]:
        print(f"| {r['k']}->{r['n']} | {r['bf16']:.0f} / {r['fp8']:.0f} | {r['fp8'] / r['bf16']:.2f}x | "
              f"{r['bf16_graph']:.0f} / {r['fp8_graph']:.0f} | {r['fp8_graph'] / r['bf16_graph']:.2f}x | "
              f"{r['bf16_host_ms']:.2f} / {r['fp8_host_ms']:.2f} | {r['bf16_gpu_ms']:.2f} / {r['fp8_gpu_ms']:.2f} |")
    print("\n| grouped GEMM (256 experts, top-8, 4096 tokens) | M | N | K | bf16 _grouped_mm | ours | "
          "ours+act_quant | speedup | ours of FP8 peak | rel err |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in result["grouped"]:
        print(f"| {r['gemm']} | {r['m']} | {r['n']} | {r['k']} | {r['bf16_grouped_mm']:.0f} | {r['ours']:.0f} | "
              f"{r['ours_with_act_quant']:.0f} | {r['speedup']:.2f}x | "
              f"{r['ours'] / H100_SXM_PEAK_TFLOPS['fp8']:.0%} | {r['err']:.1e} |")


def print_tma_configs(rows: list[dict]) -> None:
    names = [key for key in rows[0] if key not in ("m", "n", "k")]
    print("\nTriton TMA GEMM per configuration (TFLOP/s):")
    for i, name in enumerate(names):
        print(f"  c{i}: {name}")
    print("| M | N | K | " + " | ".join(f"c{i}" for i in range(len(names))) + " |\n" + "|---" * (3 + len(names)) + "|")
    for r in rows:
        cells = [f"{r[name][0]:.0f}" if r[name][0] else "fail" for name in names]
        print(f"| {r['m']} | {r['n']} | {r['k']} | " + " | ".join(cells) + " |")


def gemm_shape(text: str) -> tuple[int, int]:
    """'2112x7168' -> (2112, 7168): N x K of a dense GEMM's weight."""
    try:
        n, k = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NxK, e.g. 2112x7168") from None
    return n, k


def main() -> None:
    global EAGER, L2_HOT, GEMM_ROUNDS, GEMM_SHAPES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--quick", action="store_true", help="only M=4096 for the dense GEMMs")
    parser.add_argument("--eager", action="store_true", help="time plain launches instead of graph replays")
    parser.add_argument("--l2-hot", action="store_true", help="reuse one set of inputs (operands may stay in L2)")
    parser.add_argument("--sections", default="quant,gemm,grouped,linear", help="comma-separated subset to run")
    parser.add_argument("--tma-configs", action="store_true", help="also time each Triton TMA tile configuration")
    parser.add_argument("--rounds", type=int, default=GEMM_ROUNDS, help="turns of the dense GEMM contenders")
    parser.add_argument("--shapes", nargs="+", type=gemm_shape, default=GEMM_SHAPES, metavar="NxK",
                        help="dense GEMM weight shapes, e.g. 2112x7168 (default: the issue's five)")
    args = parser.parse_args()
    EAGER, L2_HOT, GEMM_ROUNDS, GEMM_SHAPES = args.eager, args.l2_hot, args.rounds, args.shapes
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    ceilings = device_ceilings()
    sections = set(args.sections.split(","))
    result = {"eager": EAGER, "l2_hot": L2_HOT, "ceilings": ceilings,
              "quant": bench_quant(ceilings["copy_gbs"]) if "quant" in sections else [],
              "gemm": bench_gemm((4096,) if args.quick else (64, 128, 4096)) if "gemm" in sections else [],
              "grouped": bench_grouped() if "grouped" in sections else [],
              "linear": bench_linear() if "linear" in sections else []}
    if args.tma_configs:
        result["tma_configs"] = bench_tma_configs((4096,) if args.quick else (64, 128, 4096))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if "linear" in sections:
        print(f"FP8Linear fwd+bwd, 4096 tokens, 7168->2048, 10 steps:\n{profile_linear()}")
    print_tables(result)
    choices = getattr(fp8_module, "_GEMM_BACKEND", {})
    print("\nfp8_gemm backend per (device, M bucket, N, K, row-wise B):", {k[1:]: v for k, v in choices.items()})
    if args.tma_configs:
        print_tma_configs(result["tma_configs"])


if __name__ == "__main__":
    main()
