// CUTLASS's Hopper blockwise-scaled FP8 GEMM (the V3 recipe: A in 1x128 tiles, B in 128x128
// blocks, fp32 promotion every 128 of K), instantiated for a few tiles, clusters and tile
// schedulers, behind a C ABI that bench/gemm_libraries.py loads with ctypes. CUTLASS is used as a
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
                                            int m, int n, int k, int decomposition, int splits) {
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
      args.scheduler.splits = splits;
    }
    return args;
  }

  static size_t workspace(int m, int n, int k, int decomposition, int splits) {
    auto args = arguments(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, decomposition, splits);
    return Gemm::get_workspace_size(args);
  }

  // 0 on success; otherwise a cutlass::Status (can_implement / initialize / run) + 100 * stage.
  static int run(const void* a, const float* sa, const void* b, const float* sb, void* d, int m, int n, int k,
                 int decomposition, int splits, void* workspace, cudaStream_t stream) {
    auto args = arguments(a, sa, b, sb, d, m, n, k, decomposition, splits);
    Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) return 100 + int(status);
    status = gemm.initialize(args, workspace, stream);
    if (status != cutlass::Status::kSuccess) return 200 + int(status);
    status = gemm.run(stream);
    return status == cutlass::Status::kSuccess ? 0 : 300 + int(status);
  }
};

namespace sched = cutlass::gemm;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;

// One C entry pair per configuration: <name>_workspace(...) and <name>(...).
#define R1_VARIANT(NAME, TILE, CLUSTER, SCHEDULE, EPI, SCHED)                                              \
  using NAME##_t = BlockwiseGemm<TILE, CLUSTER, SCHEDULE, EPI, SCHED>;                                    \
  extern "C" size_t NAME##_workspace(int m, int n, int k, int decomposition, int splits) {               \
    return NAME##_t::workspace(m, n, k, decomposition, splits);                                           \
  }                                                                                                       \
  extern "C" int NAME(const void* a, const float* sa, const void* b, const float* sb, void* d, int m, int n, \
                      int k, int decomposition, int splits, void* workspace, cudaStream_t stream) {        \
    return NAME##_t::run(a, sa, b, sb, d, m, n, k, decomposition, splits, workspace, stream);             \
  }

using Tile128x128 = Shape<_128, _128, _128>;
using Tile64x128 = Shape<_64, _128, _128>;
using Cluster1x1 = Shape<_1, _1, _1>;
using Cluster1x2 = Shape<_1, _2, _1>;
using Cluster2x1 = Shape<_2, _1, _1>;

// Each configuration is its own translation unit when built with -DR1_ONLY=<n> (they compile in
// parallel); without it, all of them.
#if !defined(R1_ONLY) || R1_ONLY == 1
R1_VARIANT(coop_128x128_c1x2_streamk, Tile128x128, Cluster1x2, Coop, CoopEpi, sched::StreamKScheduler)
#endif
#if !defined(R1_ONLY) || R1_ONLY == 2
R1_VARIANT(coop_128x128_c2x1_streamk, Tile128x128, Cluster2x1, Coop, CoopEpi, sched::StreamKScheduler)
#endif
#if !defined(R1_ONLY) || R1_ONLY == 3
R1_VARIANT(coop_128x128_c1x1_streamk, Tile128x128, Cluster1x1, Coop, CoopEpi, sched::StreamKScheduler)
#endif
#if !defined(R1_ONLY) || R1_ONLY == 4
R1_VARIANT(pingpong_64x128_c1x2, Tile64x128, Cluster1x2, Pingpong, PingpongEpi, sched::PersistentScheduler)
#endif
#if !defined(R1_ONLY) || R1_ONLY == 5
R1_VARIANT(pingpong_64x128_c2x1, Tile64x128, Cluster2x1, Pingpong, PingpongEpi, sched::PersistentScheduler)
#endif
