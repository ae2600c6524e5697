// CUTLASS's Hopper blockwise-scaled FP8 GEMM (the V3 recipe: A in 1x128 tiles, B in 128x128
// blocks, fp32 promotion every 128 of K), instantiated for one tile, cluster and tile scheduler
// per build (bench/gemm_libraries.py's CONFIGS names them with -D flags), behind a C ABI that bench/gemm_libraries.py loads with ctypes. CUTLASS is used as a
// library (headers from the `nvidia-cutlass` wheel); what is written here is only the choice of
// configuration and the glue. Why: cuBLAS's kernel has no stream-K, so a GEMM whose output tiles
// leave a nearly empty last wave (N=2112, K=7168) pays a whole wave; CUTLASS's stream-K
// scheduler spreads that tail over every SM.
//
// Operands as r1pipe stores them: A [M, K] e4m3 row-major, its scales M-major (element (m, kb) at
// m + kb * M, as act_quant returns them on the GPU); B [N, K] e4m3 row-major (the weight), its
// scales [ceil(N/128), ceil(K/128)] row-major (weight_quant's scale_inv); D [M, N] bf16 row-major.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, class Scheduler>
struct BlockwiseGemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, GMMA::Major::MN, GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 8;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignD,  // no C operand: D = A . B^T
      ElementD, cutlass::layout::RowMajor, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, kAlignAB,
      ElementA, cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const void* a, const float* sa, const void* b, const float* sb, void* d,
                                            int m, int n, int k, int decomposition) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    auto shape = make_shape(m, n, k, 1);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(a), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
         static_cast<const ElementA*>(b), cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1)),
         sa, ScaleConfig::tile_atom_to_shape_SFA(shape), sb, ScaleConfig::tile_atom_to_shape_SFB(shape)},
        {{}, nullptr, cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1)),
         static_cast<ElementD*>(d), cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    if constexpr (cute::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>) {
      using Mode = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
      args.scheduler.decomposition_mode = static_cast<Mode>(decomposition);
    }
    return args;
  }

  static size_t workspace(int m, int n, int k, int decomposition) {
    auto args = arguments(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, decomposition);
    return Gemm::get_workspace_size(args);
  }

  // 0 on success; otherwise a cutlass::Status (can_implement / initialize / run) + 100 * stage.
  static int run(const void* a, const float* sa, const void* b, const float* sb, void* d, int m, int n, int k,
                 int decomposition, void* workspace, cudaStream_t stream) {
    auto args = arguments(a, sa, b, sb, d, m, n, k, decomposition);
    Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) return 100 + int(status);
    status = gemm.initialize(args, workspace, stream);
    if (status != cutlass::Status::kSuccess) return 200 + int(status);
    status = gemm.run(stream);
    return status == cutlass::Status::kSuccess ? 0 : 300 + int(status);
  }
};

// The configuration of this build: -DR1_NAME=<C symbol> -DR1_TILE_M=.. -DR1_TILE_N=.. -DR1_CLUSTER_M=..
// -DR1_CLUSTER_N=.. -DR1_PINGPONG=0|1 -DR1_STREAMK=0|1 (one translation unit each, so they compile
// in parallel). Its C entry points: R1_NAME and R1_NAME_workspace.
using Config = BlockwiseGemm<
    Shape<Int<R1_TILE_M>, Int<R1_TILE_N>, _128>, Shape<Int<R1_CLUSTER_M>, Int<R1_CLUSTER_N>, _1>,
    cute::conditional_t<bool(R1_PINGPONG), cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise,
                        cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>,
    cute::conditional_t<bool(R1_PINGPONG), cutlass::epilogue::TmaWarpSpecialized,
                        cutlass::epilogue::TmaWarpSpecializedCooperative>,
    cute::conditional_t<bool(R1_STREAMK), cutlass::gemm::StreamKScheduler, cutlass::gemm::PersistentScheduler>>;

#define R1_CONCAT(a, b) a##b
#define R1_SYMBOL(name, suffix) R1_CONCAT(name, suffix)

extern "C" size_t R1_SYMBOL(R1_NAME, _workspace)(int m, int n, int k, int decomposition) {
  return Config::workspace(m, n, k, decomposition);
}

extern "C" int R1_NAME(const void* a, const float* sa, const void* b, const float* sb, void* d, int m, int n, int k,
                       int decomposition, void* workspace, cudaStream_t stream) {
  return Config::run(a, sa, b, sb, d, m, n, k, decomposition, workspace, stream);
}
