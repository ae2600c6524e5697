// cuBLASLt bindings for bench/cublaslt_search.py: the blockwise-scaled FP8 GEMM that torch's
// F.scaled_mm runs (A = weight [N, K] in 128x128 blocks, op T; B = activations [M, K] in 1x128
// tiles, op N; D = bf16 [N, M] column-major, i.e. row-major [M, N]), but with every configuration
// of its kernel family made available, not only the heuristic's first pick, which is all torch
// runs. Written by hand because no library on the GPU image exposes cuBLASLt's algorithm
// configuration (torch's TunableOp has no scaled-GEMM path for these scaling recipes).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <vector>

#define CHECK_LT(x) do { cublasStatus_t s_ = (x); TORCH_CHECK(s_ == CUBLAS_STATUS_SUCCESS, #x, ": status ", (int)s_); } while (0)

static cublasLtHandle_t handle = nullptr;
static cublasLtMatmulDesc_t desc = nullptr;
static cublasLtMatrixLayout_t layout_w = nullptr, layout_x = nullptr, layout_out = nullptr;
static std::vector<cublasLtMatmulAlgo_t> algos;  // index 0: the heuristic's pick (torch's)
static torch::Tensor workspace;

static void set_scales(const torch::Tensor& w_scale, const torch::Tensor& x_scale) {
  const void* a = w_scale.data_ptr();
  const void* b = x_scale.data_ptr();
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a, sizeof(a)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b, sizeof(b)));
}

static cublasLtMatmulAlgo_t family(int id) {
  cublasLtMatmulAlgo_t algo;
  CHECK_LT(cublasLtMatmulAlgoInit(handle, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_8F_E4M3, CUDA_R_8F_E4M3,
                                  CUDA_R_16BF, CUDA_R_16BF, id, &algo));
  return algo;
}

// Describe the problem (w_scale: [N/128, K/128] row-major; x_scale: M-major, as act_quant returns
// it) and take the heuristic's pick as algorithm 0. Returns how many algorithms the heuristic offers.
int64_t setup(torch::Tensor w, torch::Tensor w_scale, torch::Tensor x, torch::Tensor x_scale, int64_t workspace_bytes) {
  if (!handle) CHECK_LT(cublasLtCreate(&handle));
  if (desc) {
    cublasLtMatmulDescDestroy(desc);
    cublasLtMatrixLayoutDestroy(layout_w);
    cublasLtMatrixLayoutDestroy(layout_x);
    cublasLtMatrixLayoutDestroy(layout_out);
  }
  const int64_t n = w.size(0), k = w.size(1), m = x.size(0);
  CHECK_LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  const cublasLtMatmulMatrixScale_t blocks = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  const cublasLtMatmulMatrixScale_t tiles = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &blocks, sizeof(blocks)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &tiles, sizeof(tiles)));
  set_scales(w_scale, x_scale);
  CHECK_LT(cublasLtMatrixLayoutCreate(&layout_w, CUDA_R_8F_E4M3, k, n, k));
  CHECK_LT(cublasLtMatrixLayoutCreate(&layout_x, CUDA_R_8F_E4M3, k, m, k));
  CHECK_LT(cublasLtMatrixLayoutCreate(&layout_out, CUDA_R_16BF, n, m, n));
  workspace = torch::empty({workspace_bytes}, torch::dtype(torch::kUInt8).device(w.device()));
  cublasLtMatmulPreference_t pref;
  CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t bytes = workspace_bytes;
  CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes, sizeof(bytes)));
  std::vector<cublasLtMatmulHeuristicResult_t> found(64);
  int count = 0;
  CHECK_LT(cublasLtMatmulAlgoGetHeuristic(handle, desc, layout_w, layout_x, layout_out, layout_out, pref, 64,
                                          found.data(), &count));
  cublasLtMatmulPreferenceDestroy(pref);
  TORCH_CHECK(count > 0, "cuBLASLt offers no algorithm for this blockwise FP8 GEMM");
  algos.clear();
  for (int i = 0; i < count; i++) algos.push_back(found[i].algo);
  return count;
}

template <typename T>
static int64_t config_value(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T value = 0;
  size_t written = 0;
  CHECK_LT(cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &value, sizeof(value), &written));
  return (int64_t)value;
}

// [kernel id, tile, stages, split-K, CTA swizzle, custom option, cluster shape] of algorithm i
std::vector<int64_t> describe(int64_t i) {
  const cublasLtMatmulAlgo_t& a = algos.at(i);
  return {config_value<int32_t>(a, CUBLASLT_ALGO_CONFIG_ID), config_value<uint32_t>(a, CUBLASLT_ALGO_CONFIG_TILE_ID),
          config_value<uint32_t>(a, CUBLASLT_ALGO_CONFIG_STAGES_ID), config_value<int32_t>(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
          config_value<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING), config_value<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
          config_value<uint16_t>(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)};
}

// Tile ids, stage ids and the largest custom option of kernel `id`.
std::vector<std::vector<int64_t>> capabilities(int64_t id) {
  const cublasLtMatmulAlgo_t algo = family((int)id);
  std::vector<std::vector<int64_t>> lists;
  for (auto attr : {CUBLASLT_ALGO_CAP_TILE_IDS, CUBLASLT_ALGO_CAP_STAGES_IDS}) {
    size_t written = 0;
    CHECK_LT(cublasLtMatmulAlgoCapGetAttribute(&algo, attr, nullptr, 0, &written));
    std::vector<uint32_t> ids(written / sizeof(uint32_t));
    CHECK_LT(cublasLtMatmulAlgoCapGetAttribute(&algo, attr, ids.data(), written, &written));
    lists.emplace_back(ids.begin(), ids.end());
  }
  int32_t custom_max = 0;
  size_t written = 0;
  CHECK_LT(cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, &custom_max, sizeof(custom_max), &written));
  lists.push_back({custom_max});
  return lists;
}

// Add the configuration if cublasLtMatmulAlgoCheck accepts it for this problem within the
// workspace: its index, or -1.
int64_t add_config(int64_t id, int64_t tile, int64_t stages, int64_t splitk, int64_t reduction, int64_t swizzle,
                   int64_t custom, int64_t cluster) {
  cublasLtMatmulAlgo_t algo = family((int)id);
  const uint32_t t = tile, st = stages, red = reduction, sw = swizzle, cu = custom;
  const int32_t sk = splitk;
  const uint16_t cl = cluster;
  bool ok = cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &t, sizeof(t)) == 0 &&
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &st, sizeof(st)) == 0 &&
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof(sk)) == 0 &&
            (sk == 1 || cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof(red)) == 0) &&
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &sw, sizeof(sw)) == 0 &&
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &cu, sizeof(cu)) == 0 &&
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cl, sizeof(cl)) == 0;
  cublasLtMatmulHeuristicResult_t result;
  if (!ok || cublasLtMatmulAlgoCheck(handle, desc, layout_w, layout_x, layout_out, layout_out, &algo, &result) != 0 ||
      result.workspaceSize > (size_t)workspace.numel())
    return -1;
  algos.push_back(algo);
  return (int64_t)algos.size() - 1;
}

// out = x @ w^T with algorithm i, on torch's current stream (CUDA-graph capturable).
void run(int64_t i, torch::Tensor w, torch::Tensor w_scale, torch::Tensor x, torch::Tensor x_scale, torch::Tensor out) {
  set_scales(w_scale, x_scale);
  const float alpha = 1.f, beta = 0.f;
  CHECK_LT(cublasLtMatmul(handle, desc, &alpha, w.data_ptr(), layout_w, x.data_ptr(), layout_x, &beta, out.data_ptr(),
                          layout_out, out.data_ptr(), layout_out, &algos.at(i), workspace.data_ptr(), workspace.numel(),
                          at::cuda::getCurrentCUDAStream()));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("setup", &setup);
  m.def("describe", &describe);
  m.def("capabilities", &capabilities);
  m.def("add_config", &add_config);
  m.def("run", &run);
}
