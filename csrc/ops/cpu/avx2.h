// What the CPU kernels' hand-written AVX2 code needs: whether this build has it, whether
// the running CPU can execute it, and the markers that compile a region for AVX2+FMA.
//
// Only pointer-level kernels go between RESNET_FUSED_AVX2_BEGIN and _END (nothing from
// ATen, so no inline function shared with other translation units gets AVX2 code), and
// they run only after cpu_has_avx2_fma() said yes.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RESNET_FUSED_AVX2 1
#include <immintrin.h>
#if defined(__clang__)
#define RESNET_FUSED_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define RESNET_FUSED_AVX2_END _Pragma("clang attribute pop")
#else
#define RESNET_FUSED_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define RESNET_FUSED_AVX2_END _Pragma("GCC pop_options")
#endif
#else
#define RESNET_FUSED_AVX2 0
#endif

namespace resnet_fused {
namespace ops {

inline bool cpu_has_avx2_fma() {
#if RESNET_FUSED_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace ops
}  // namespace resnet_fused
