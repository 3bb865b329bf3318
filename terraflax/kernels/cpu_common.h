// Shared pieces of terraflax's native CPU kernels: 16-lane float vectors
// (GCC/Clang vector extensions; AVX-512 registers when compiled with
// -march=native on such a machine), a register-blocked matrix product for
// cache-resident blocks, e^x, a 16 x 16 transpose, prefetching, and a
// parallel loop on XLA's intra-op thread pool.

#ifndef TERRAFLAX_KERNELS_CPU_COMMON_H_
#define TERRAFLAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace terraflax {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------- vectors

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi_u __attribute__((vector_size(64), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline vi loadi(const int32_t* p) { return *reinterpret_cast<const vi_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf splat(float x) { return x - vf{}; }  // x - (+0) is x, so no add is emitted
inline vi splati(int32_t x) { return vi{} + x; }
inline vf select(vi mask, vf yes, vf no) { return mask ? yes : no; }

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// e^x, about 1 ulp, for the softmax's shifted logits (x <= ~0); exactly 0
// below -80, where the result is below float32 resolution next to the
// largest term (which is 1).
inline vf vexp(vf x) {
  const vi tiny = x < -80.0f;
  x = select(tiny, splat(-80.0f), x);
  const vf t = x * 1.44269504088896341f;
  const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (vi)p + (__builtin_convertvector(n, vi) << 23);
  return select(tiny, splat(0.0f), (vf)bits);
}

// ---------------------------------------------------------------- products

// C (MR x 16 NV) (+)= A (MR x K) B (K x 16 NV). A is read one element at a
// time through strides (so it may be a transpose); B's rows are contiguous.
template <int MR, int NV>
inline void tile(int k_size, const float* a, int64_t a_m, int64_t a_k, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? load(c + i * ldc + j * kLanes) : vf{};
  for (int k = 0; k < k_size; ++k) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = load(b + k * ldb + j * kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf av = splat(a[i * a_m + k * a_k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * kLanes, acc[i][j]);
}

#ifdef __AVX512F__
constexpr int kRows = 6;     // 6 x 4 accumulators of 16 floats: 24 of 32 registers.
constexpr int kMaxVecs = 4;
#else
constexpr int kRows = 4;     // 16 lanes are two AVX registers: 4 x 1 x 2 of 16.
constexpr int kMaxVecs = 1;
#endif

template <int MR>
inline void tile_rows(int nv, int k_size, const float* a, int64_t a_m, int64_t a_k,
                      const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  switch (nv) {
    case 1: tile<MR, 1>(k_size, a, a_m, a_k, b, ldb, c, ldc, accumulate); break;
#if defined(__AVX512F__)
    case 2: tile<MR, 2>(k_size, a, a_m, a_k, b, ldb, c, ldc, accumulate); break;
    case 3: tile<MR, 3>(k_size, a, a_m, a_k, b, ldb, c, ldc, accumulate); break;
    case 4: tile<MR, 4>(k_size, a, a_m, a_k, b, ldb, c, ldc, accumulate); break;
#endif
  }
}

// C (M x N) (+)= A (M x K) B (K x N); N a multiple of 16. A(m, k) = a[m a_m + k a_k].
inline void gemm(int m_size, int n_size, int k_size, const float* a, int64_t a_m, int64_t a_k,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int n0 = 0; n0 < n_size; n0 += kMaxVecs * kLanes) {
    const int nv = std::min(kMaxVecs, (n_size - n0) / kLanes);
    const float* bn = b + n0;
    float* cn = c + n0;
    int m0 = 0;
    for (; m0 + kRows <= m_size; m0 += kRows)
      tile_rows<kRows>(nv, k_size, a + m0 * a_m, a_m, a_k, bn, ldb, cn + m0 * ldc, ldc,
                       accumulate);
    const float* am = a + m0 * a_m;
    float* cm = cn + m0 * ldc;
    switch (m_size - m0) {
      case 1: tile_rows<1>(nv, k_size, am, a_m, a_k, bn, ldb, cm, ldc, accumulate); break;
      case 2: tile_rows<2>(nv, k_size, am, a_m, a_k, bn, ldb, cm, ldc, accumulate); break;
      case 3: tile_rows<3>(nv, k_size, am, a_m, a_k, bn, ldb, cm, ldc, accumulate); break;
#ifdef __AVX512F__
      case 4: tile_rows<4>(nv, k_size, am, a_m, a_k, bn, ldb, cm, ldc, accumulate); break;
      case 5: tile_rows<5>(nv, k_size, am, a_m, a_k, bn, ldb, cm, ldc, accumulate); break;
#endif
      default: break;
    }
  }
}

// ---------------------------------------------------------------- threads

// Runs f(0..n_items-1) on the caller and on XLA's intra-op pool. A helper
// that starts after every item was claimed touches nothing but `state`.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int n_items, const F& f) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), n_items);
  if (threads <= 1) {
    for (int i = 0; i < n_items; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* fp = &f;
  auto work = [state, fp, n_items]() {
    for (;;) {
      const int i = state->next.fetch_add(1);
      if (i >= n_items) return;
      (*fp)(i);
      if (state->done.fetch_add(1) + 1 == n_items) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n_items; });
}

// ---------------------------------------------------------------- streaming products

// Few-row products (decoding: one token per row) are bound by reading the
// weights once. The fastest way measured to read a matrix from memory is
// in its own order: each thread takes a contiguous range of rows of w (one
// sequential stream), keeps whole output rows as running sums (in L1/L2),
// and the threads' partial sums are added at the end. Splitting the columns
// instead breaks every row into pieces a thread reads with a stride.

// out (m x n, leading dimension ldo) += x (m x k, leading dimension ldx)
// w[k0:k1] (w: k x n, rows contiguous), eight weight rows at a time (one
// load and store of the running sums per eight weight vectors; measured
// ~1.1x four at a time on 64 MiB matrices), then the rest one at a time.
inline void stream_rows(int64_t m, const float* x, int64_t ldx, const float* w, int64_t k0,
                        int64_t k1, int64_t n, float* out, int64_t ldo) {
  constexpr int kStep = 8;
  // Column blocks only when the m running rows would not stay in L2 (512 KiB).
  const int64_t block = std::max<int64_t>(kLanes, std::min<int64_t>(n, (1 << 17) / m) /
                                                      kLanes * kLanes);
  for (int64_t c0 = 0; c0 < n; c0 += block) {
    const int64_t c1 = std::min(n, c0 + block);
    int64_t kk = k0;
    for (; kk + kStep <= k1; kk += kStep) {
      const float* w0 = w + kk * n;
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * ldx + kk;
        float a[kStep];
#pragma GCC unroll 8
        for (int r = 0; r < kStep; ++r) a[r] = xi[r];
        float* o = out + i * ldo;
        for (int64_t j = c0; j < c1; j += kLanes) {
          vf acc = load(o + j);
#pragma GCC unroll 8
          for (int r = 0; r < kStep; ++r) acc += a[r] * load(w0 + r * n + j);
          store(o + j, acc);
        }
      }
    }
    for (; kk < k1; ++kk)
      for (int64_t i = 0; i < m; ++i) {
        const float a = x[i * ldx + kk];
        float* o = out + i * ldo;
        const float* wk = w + kk * n;
        for (int64_t j = c0; j < c1; j += kLanes) store(o + j, load(o + j) + a * load(wk + j));
      }
  }
}

// One product of a streamed call: out (m x n, rows ldo apart) += x (m x k, rows ldx apart) w.
struct StreamedProduct {
  const float* x;
  int64_t ldx;
  const float* w;
  int64_t k, n;
  float* out;
  int64_t ldo;
};

// Below this many weight bytes in all, one thread streams everything: a
// hand-off to a second thread costs more than it saves, and far more when the
// other core is busy (a 0.4 MB model's batch-1 decoding on the loaded 2-core
// machine: 80 us per token with 256 KiB products split, 39 us without).
constexpr int64_t kMinStreamParallelBytes = int64_t(1) << 20;

// Every product's out += x w for m rows, the weights streamed once over the
// threads: part p of P reads rows [k p / P, k (p + 1) / P) of each w, in
// order, into its own partial sums (part 0 into out), added to out at the end.
inline void stream_products(ffi::ThreadPool& pool, int64_t m, const StreamedProduct* products,
                            int n_products) {
  int64_t bytes = 0, outputs = 0;
  for (int i = 0; i < n_products; ++i) {
    bytes += products[i].k * products[i].n * int64_t(sizeof(float));
    outputs += m * products[i].n;
  }
  const int parts = bytes < kMinStreamParallelBytes
                        ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), 8)));
  std::vector<float> partial(size_t(parts - 1) * outputs, 0.0f);
  parallel_for(pool, parts, [&](int part) {
    float* mine = partial.data() + size_t(part - 1) * outputs;
    for (int i = 0; i < n_products; ++i) {
      const StreamedProduct& p = products[i];
      const int64_t k0 = p.k * part / parts / 8 * 8;
      const int64_t k1 = part == parts - 1 ? p.k : p.k * (part + 1) / parts / 8 * 8;
      if (part == 0) {
        stream_rows(m, p.x, p.ldx, p.w, k0, k1, p.n, p.out, p.ldo);
      } else {
        stream_rows(m, p.x, p.ldx, p.w, k0, k1, p.n, mine, p.n);
        mine += m * p.n;
      }
    }
  });
  for (int part = 1; part < parts; ++part) {
    const float* mine = partial.data() + size_t(part - 1) * outputs;
    for (int i = 0; i < n_products; ++i) {
      const StreamedProduct& p = products[i];
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < p.n; j += kLanes)
          store(p.out + r * p.ldo + j, load(p.out + r * p.ldo + j) + load(mine + r * p.n + j));
      mine += m * p.n;
    }
  }
}

// Rows this many positions ahead are prefetched: the gathers and scatters
// of whole rows at random positions are otherwise bound by memory latency.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const float* p, int64_t floats, bool write) {
  for (int64_t o = 0; o < floats; o += kLanes) {
    if (write) {
      __builtin_prefetch(p + o, 1, 3);
    } else {
      __builtin_prefetch(p + o, 0, 3);
    }
  }
}

#if defined(__clang__)
// dst (16 x 16, leading dimension ldd) = src (16 x 16, lds) transposed.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int i = 0; i < kLanes; ++i)
    for (int j = 0; j < kLanes; ++j) dst[j * ldd + i] = src[i * lds + j];
}
#else
// For rows a and b = a + S: the columns of a and b with bit S swapped
// between the row and the column index.
template <int S, int... I>
constexpr vi swap_low(std::integer_sequence<int, I...>) {
  return vi{((I & S) ? kLanes + I - S : I)...};
}
template <int S, int... I>
constexpr vi swap_high(std::integer_sequence<int, I...>) {
  return vi{((I & S) ? kLanes + I : I + S)...};
}

template <int S>
inline void swap_bit(vf* rows) {
  constexpr vi lo = swap_low<S>(std::make_integer_sequence<int, kLanes>());
  constexpr vi hi = swap_high<S>(std::make_integer_sequence<int, kLanes>());
  for (int i = 0; i < kLanes; ++i) {
    if (i & S) continue;
    const vf a = rows[i], b = rows[i + S];
    rows[i] = __builtin_shuffle(a, b, lo);
    rows[i + S] = __builtin_shuffle(a, b, hi);
  }
}

// dst (16 x 16, leading dimension ldd) = src (16 x 16, lds) transposed: each
// stage swaps one bit between the row and the column index.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  vf rows[kLanes];
  for (int i = 0; i < kLanes; ++i) rows[i] = load(src + i * lds);
  swap_bit<8>(rows);
  swap_bit<4>(rows);
  swap_bit<2>(rows);
  swap_bit<1>(rows);
  for (int i = 0; i < kLanes; ++i) store(dst + i * ldd, rows[i]);
}
#endif

// dst (d, c) = src (c, d) transposed (c and d multiples of 16).
inline void transpose_chunk(const float* src, int64_t c, int64_t d_size, float* dst) {
  for (int64_t j = 0; j < c; j += kLanes)
    for (int64_t d = 0; d < d_size; d += kLanes)
      transpose16(src + j * d_size + d, d_size, dst + d * c + j, c);
}

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

}  // namespace terraflax

// Lets XLA infer a handler's binding from its signature (XLA_FFI_DEFINE_HANDLER_SYMBOL
// without a binding) when it takes the intra-op thread pool.
namespace xla::ffi {
template <>
struct CtxBinding<ThreadPool> {
  using Ctx = ThreadPool;
};
}  // namespace xla::ffi

#endif  // TERRAFLAX_KERNELS_CPU_COMMON_H_
