// Matrix products with low-precision weights read as stored, on the CPU as
// XLA FFI handlers (Python side: terraflax/kernels/lowp_cpu.py).
//
//   int8      x (N, K) f32, w (K, M) int8, scale (M) f32 -> y (N, M) = (x @ w) * scale
//   bfloat16  x (N, K) f32, w (K, M) bf16               -> y (N, M) = x @ w
//
// Batch-1 decoding multiplies a few rows by every weight matrix, so the time
// is the time to read the weights: 1 byte per weight for int8, 2 for
// bfloat16, instead of 4. Each 16 weights are widened to float32 in
// registers (sign extension for int8, a 16-bit shift for bfloat16) and
// multiplied into float32 accumulators; int8's per-output-channel scale is
// applied once to each finished sum. No float copy of a matrix is made.
//
// Threads split the output columns (each reads its own part of every weight
// row, so the matrix is read once in all). Within a thread, rows of w are
// taken kDepth at a time; for each block of kCols columns the sums of up to
// kRowsMax rows of x stay in registers over the kDepth weight rows, and the
// running sums live in y between depth blocks. More than kRowsMax rows of x
// reuse the depth block from cache.

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

using namespace terraflax;  // NOLINT

typedef int8_t v16s8 __attribute__((vector_size(16), aligned(1)));
typedef uint16_t v16u16 __attribute__((vector_size(32), aligned(2)));

#ifdef __AVX512F__
inline vf widen(const int8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
}
inline vf widen(const uint16_t* p) {  // bfloat16 is the top half of a float32
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}
#else
inline vf widen(const int8_t* p) {
  const vi wide = __builtin_convertvector(*reinterpret_cast<const v16s8*>(p), vi);
  return __builtin_convertvector(wide, vf);
}
inline vf widen(const uint16_t* p) {  // bfloat16 is the top half of a float32
  const vu u = __builtin_convertvector(*reinterpret_cast<const v16u16*>(p), vu);
  return reinterpret_cast<vf>(u << 16);
}
#endif
inline float widen1(int8_t v) { return float(v); }
inline float widen1(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

constexpr int kRowsMax = 8;       // rows of x per register block (8 x 2 accumulators)
constexpr int64_t kCols = 2 * kLanes;  // output columns per register block
constexpr int64_t kDepth = 64;    // weight rows per depth block
constexpr int64_t kAheadBytes = 256;  // prefetch distance along a weight row
constexpr bool kPrefetch = true;
// Below this many weights one thread does everything (threads cost more than they save).
constexpr int64_t kMinParallel = 1 << 16;

// y[r, j0:j1] (+)= x[r, k0:k1] @ w[k0:k1, j0:j1] for R rows; j1 - j0 a multiple of
// kCols. `first`: start the sums from 0; `scale` (not null on the last depth
// block of int8): multiply the finished sums by it.
template <typename W, int R>
void block(int64_t k_size, int64_t k0, int64_t k1, const float* x, int64_t ldx, const W* w,
           int64_t ldw, float* y, int64_t ldy, int64_t j0, int64_t j1, bool first,
           const float* scale) {
  constexpr int64_t ahead = kAheadBytes / sizeof(W);
  for (int64_t j = j0; j < j1; j += kCols) {
    vf acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r][0] = first ? vf{} : load(y + r * ldy + j);
      acc[r][1] = first ? vf{} : load(y + r * ldy + j + kLanes);
    }
    // Prefetch `ahead` bytes further along this thread's part of each row, or where the
    // next depth block starts when that runs past the part's end (never the other
    // thread's columns, which would double the traffic).
    int64_t next = j + ahead;
    int64_t delta = ahead;
    if (next >= j1) delta = (j0 + next - j1 - j) + kDepth * ldw;
    const bool fetch = next < j1 || k0 + kDepth < k_size;
    const W* wp = w + k0 * ldw + j;
    for (int64_t k = k0; k < k1; ++k, wp += ldw) {
      if (kPrefetch && fetch) __builtin_prefetch(wp + delta, 0, 0);
      const vf w0 = widen(wp), w1 = widen(wp + kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf xv = splat(x[r * ldx + k]);
        acc[r][0] += xv * w0;
        acc[r][1] += xv * w1;
      }
    }
    if (scale) {
      const vf s0 = load(scale + j), s1 = load(scale + j + kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r][0] *= s0;
        acc[r][1] *= s1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      store(y + r * ldy + j, acc[r][0]);
      store(y + r * ldy + j + kLanes, acc[r][1]);
    }
  }
}

template <typename W>
void rows_block(int rows, int64_t k_size, int64_t k0, int64_t k1, const float* x,
                int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t j0,
                int64_t j1, bool first, const float* scale) {
  switch (rows) {
#define TERRAFLAX_ROWS(R) \
    case R: block<W, R>(k_size, k0, k1, x, ldx, w, ldw, y, ldy, j0, j1, first, scale); break;
    TERRAFLAX_ROWS(1) TERRAFLAX_ROWS(2) TERRAFLAX_ROWS(3) TERRAFLAX_ROWS(4)
    TERRAFLAX_ROWS(5) TERRAFLAX_ROWS(6) TERRAFLAX_ROWS(7) TERRAFLAX_ROWS(8)
#undef TERRAFLAX_ROWS
    default: break;
  }
}

// The columns [j0, M) left over after the whole blocks, one at a time.
template <typename W>
void tail(int64_t n, int64_t k_size, int64_t m, const float* x, const W* w, float* y,
          int64_t j0, const float* scale) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = j0; j < m; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < k_size; ++k) sum += x[r * k_size + k] * widen1(w[k * m + j]);
      y[r * m + j] = scale ? sum * scale[j] : sum;
    }
}

template <typename W>
ffi::Error multiply(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x_buf,
                    const void* w_data, ffi::Span<const int64_t> w_dims, const float* scale,
                    float* y) {
  const auto xd = x_buf.dimensions();
  if (xd.size() != 2 || w_dims.size() != 2 || w_dims[0] != xd[1])
    return ffi::Error::InvalidArgument("lowp_cpu: expected x (N, K) and w (K, M)");
  const int64_t n = xd[0], k_size = xd[1], m = w_dims[1];
  const float* x = x_buf.typed_data();
  const W* w = reinterpret_cast<const W*>(w_data);
  const int64_t whole = m / kCols * kCols;  // columns in whole register blocks
  const int64_t chunks = whole / kCols;
  const int parts = int(std::max<int64_t>(
      1, std::min<int64_t>(k_size * m < kMinParallel ? 1 : pool.num_threads(), chunks)));
  parallel_for(pool, parts, [&](int part) {
    const int64_t j0 = chunks * part / parts * kCols, j1 = chunks * (part + 1) / parts * kCols;
    for (int64_t k0 = 0; k0 < k_size; k0 += kDepth) {
      const int64_t k1 = std::min(k_size, k0 + kDepth);
      const float* last_scale = k1 == k_size ? scale : nullptr;
      for (int64_t r0 = 0; r0 < n; r0 += kRowsMax)
        rows_block<W>(int(std::min<int64_t>(kRowsMax, n - r0)), k_size, k0, k1,
                      x + r0 * k_size, k_size, w, m, y + r0 * m, m, j0, j1, k0 == 0, last_scale);
    }
    if (part == parts - 1) tail<W>(n, k_size, m, x, w, y, whole, scale);
  });
  return ffi::Error::Success();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  if (scale.element_count() != size_t(w.dimensions().back()))
    return ffi::Error::InvalidArgument("lowp_cpu: scale must have one entry per column of w");
  return multiply<int8_t>(pool, x, w.untyped_data(), w.dimensions(),
                          scale.typed_data(), y->typed_data());
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  return multiply<uint16_t>(pool, x, w.untyped_data(), w.dimensions(), nullptr,
                            y->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxInt8Matmul, Int8Matmul);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxBf16Matmul, Bf16Matmul);
