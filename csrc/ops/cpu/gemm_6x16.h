// The register-tile GEMM kernels of the CPU kernels (Winograd's 36 GEMMs, the 1x1
// convs): m[0:6][0:16 or 0:8] = v[0:6][0:C] @ u[0:C][0:16 or 0:8], float32, AVX2+FMA.
//
// Include it only between RESNET_FUSED_AVX2_BEGIN and RESNET_FUSED_AVX2_END (see
// avx2.h): its functions are static, so each translation unit gets its own AVX2 copy.
#pragma once

// One row of the 6x16 tile: lo, hi += v * (b0, b1).
static inline void fma_row(__m256& lo, __m256& hi, const float* v, __m256 b0, __m256 b1) {
  const __m256 a = _mm256_broadcast_ss(v);
  lo = _mm256_fmadd_ps(a, b0, lo);
  hi = _mm256_fmadd_ps(a, b1, hi);
}

// m = v, or m += v where `add` (a later block of channels of the same sum).
static inline void store(float* m, __m256 v, bool add) {
  _mm256_storeu_ps(m, add ? _mm256_add_ps(_mm256_loadu_ps(m), v) : v);
}

static inline void store_row(float* m, __m256 lo, __m256 hi, bool add) {
  store(m, lo, add);
  store(m + 8, hi, add);
}

// m[r][0:16] = sum_c v[r][c] u[c][0:16] for the 6 rows r of a row group (m += that sum
// where `add`, so a caller can sum the channels in blocks: see winograd.cpp): 12 accumulators
// in registers, per c two loads of u and six broadcasts of v (Haswell's 6x16 shape;
// FMA-bound while u's C x 16 slab stays in L1 across the row groups of a block). The
// accumulators are named, not an array: GCC spilled the array to the stack every c.
static inline void gemm_6x16(const float* v, int64_t v_ld, const float* u, int64_t u_ld, float* m, int64_t m_ld,
                             int64_t c_count, bool add = false) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t c = 0; c < c_count; ++c, u += u_ld) {
    const __m256 b0 = _mm256_loadu_ps(u), b1 = _mm256_loadu_ps(u + 8);
    fma_row(a00, a01, v + c, b0, b1);
    fma_row(a10, a11, v + v_ld + c, b0, b1);
    fma_row(a20, a21, v + 2 * v_ld + c, b0, b1);
    fma_row(a30, a31, v + 3 * v_ld + c, b0, b1);
    fma_row(a40, a41, v + 4 * v_ld + c, b0, b1);
    fma_row(a50, a51, v + 5 * v_ld + c, b0, b1);
  }
  store_row(m, a00, a01, add);
  store_row(m + m_ld, a10, a11, add);
  store_row(m + 2 * m_ld, a20, a21, add);
  store_row(m + 3 * m_ld, a30, a31, add);
  store_row(m + 4 * m_ld, a40, a41, add);
  store_row(m + 5 * m_ld, a50, a51, add);
}

// The same for 8 output channels (K % 16 == 8 leaves one such column).
static inline void gemm_6x8(const float* v, int64_t v_ld, const float* u, int64_t u_ld, float* m, int64_t m_ld,
                            int64_t c_count, bool add = false) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  for (int64_t c = 0; c < c_count; ++c, u += u_ld) {
    const __m256 b = _mm256_loadu_ps(u);
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + c), b, a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + v_ld + c), b, a1);
    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 2 * v_ld + c), b, a2);
    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 3 * v_ld + c), b, a3);
    a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 4 * v_ld + c), b, a4);
    a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 5 * v_ld + c), b, a5);
  }
  store(m, a0, add);
  store(m + m_ld, a1, add);
  store(m + 2 * m_ld, a2, add);
  store(m + 3 * m_ld, a3, add);
  store(m + 4 * m_ld, a4, add);
  store(m + 5 * m_ld, a5, add);
}

