// LSH attention on the CPU: the sorted, chunked attention of
// terraflax.layers.lsh_attention (forward and backward) as two XLA FFI
// handlers. Python side: terraflax/kernels/lsh_cpu.py, which also states the
// semantics; this file follows lsh_attention.py's XLA path exactly, except
// that the rounds are combined inside (one softmax over every (round, key)
// pair a query meets), so the backward pass needs only the combined output
// and its log-normaliser.
//
// Work is split by (batch, head): every unit gathers its rows into sorted
// order round by round, attends chunk by chunk with small register-blocked
// matrix products, and writes its own slice of the outputs, so units run in
// parallel on XLA's intra-op thread pool without locks.
//
// Shapes (b batch, L padded length, h heads, n rounds, k = d_qk, e = d_v):
//   forward   qv f32 (b, L, h, k + e), perm s32 (b, h, n, L)
//             -> out f32 (b, L, h, e), lse f32 (b, h, 2, L): log-normaliser as (top, rest)
//   backward  qv, perm, out, lse, d_out f32 (b, L, h, e) -> d_qv (b, L, h, k + e)
// perm[b, h, r] lists the positions of round r in (bucket, position) order.

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

namespace ffi = xla::ffi;

namespace {

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
inline vf splat(float x) { return vf{} + x; }
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
void gemm(int m_size, int n_size, int k_size, const float* a, int64_t a_m, int64_t a_k,
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

// ---------------------------------------------------------------- one unit

constexpr float kMaskedLogit = -1e9f;  // lsh_attention.MASKED_LOGIT
constexpr float kSelfLogit = -1e5f;    // lsh_attention.SELF_LOGIT

struct Spec {
  int64_t b, big_l, h, n, dk, dv, c, n_chunks, before, after, width, length;
  bool causal;
  int64_t row() const { return dk + dv; }
  int64_t big_w() const { return width * c; }
  // The chunk in slot w (0..width-1) of chunk i's window.
  int64_t window_chunk(int64_t i, int64_t w) const {
    return ((i + w - before) % n_chunks + n_chunks) % n_chunks;
  }
};

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

// -log(m) for m = 0..15 meetings (entry 0 unused).
struct MeetingTable {
  vf minus_log;
  bool small;  // every possible count fits the table
  explicit MeetingTable(const Spec& s) {
    for (int m = 0; m < kLanes; ++m) minus_log[m] = m > 0 ? -std::log(float(m)) : 0.0f;
    small = 1 + (s.n - 1) * s.width < kLanes;
  }
};

// Per-thread scratch, kept between calls so that long sequences do not
// fault in fresh pages on every call.
struct Workspace {
  // A ring of `width` chunk slots (see UnitRounds), each slot's rows contiguous.
  std::vector<float> q, k, k_t, v, v_t, inv_norm;  // (R, c, k), (R, c, k), (R, k, c), (R, c, e), (R, e, c), (R, c)
  std::vector<int32_t> pos, chunk_in;                // (R, c), (R, n - 1, c)
  std::vector<float> d_o, d_q, d_k, d_v;             // backward: (R, c, e), (R, c, k), (R, c, k), (R, c, e)
  std::vector<int32_t> chunk_of;                     // (n, L)
  std::vector<char> written;                         // (C)
  std::vector<float> logits, grads, chunk_out, chunk_lse, row_term;
  std::vector<int32_t> shifts;                       // (n - 1)
};

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

Workspace& thread_workspace() {
  static thread_local Workspace workspace;
  return workspace;
}

// One (batch, head): its rows of qv, its permutations, and the round being
// attended. Chunks are gathered into sorted order as windows reach them,
// into a ring of `width` slots, so everything a window touches stays in
// cache. Window slot w of chunk i holds the "virtual" chunk i - before + w,
// which may lie outside [0, C) (the windows wrap around): its slot is
// virtual mod width, its rows those of chunk virtual mod C.
class UnitRounds {
 public:
  UnitRounds(const Spec& s, Workspace& w, int64_t unit, const float* qv, const int32_t* perm,
             const float* d_out)
      : s_(s), w_(w), table_(s), backward_(d_out != nullptr) {
    const int64_t bi = unit / s.h, hi = unit % s.h;
    qv_ = qv + (bi * s.big_l * s.h + hi) * s.row();
    d_out_ = backward_ ? d_out + (bi * s.big_l * s.h + hi) * s.dv : nullptr;
    perm_ = perm + unit * s.n * s.big_l;
    const int64_t slots = s.width, c = s.c, dk = s.dk, dv = s.dv;
    sized(w.q, slots * c * dk);
    sized(w.k, slots * c * dk);
    sized(w.k_t, slots * c * dk);
    sized(w.inv_norm, slots * c);
    sized(w.v, slots * c * dv);
    sized(w.pos, slots * c);
    sized(w.chunk_in, slots * std::max<int64_t>(s.n - 1, 1) * c);
    sized(w.logits, c * s.big_w());
    sized(w.grads, c * s.big_w());
    sized(w.chunk_out, c * dv);
    sized(w.chunk_lse, c);
    sized(w.shifts, std::max<int64_t>(s.n - 1, 1));
    if (backward_) {
      sized(w.v_t, slots * c * dv);
      sized(w.d_o, slots * c * dv);
      sized(w.d_q, slots * c * dk);
      sized(w.d_k, slots * c * dk);
      sized(w.d_v, slots * c * dv);
    }
    // The chunk of every position in every round: chunk_of[r][perm[r][i]] = i / c.
    int32_t* chunk_of = sized(w.chunk_of, s.n * s.big_l);
    for (int64_t r = 0; r < s.n; ++r) {
      const int32_t* order = perm_ + r * s.big_l;
      for (int64_t chunk = 0, i = 0; chunk < s.n_chunks; ++chunk)
        for (int64_t j = 0; j < c; ++j, ++i) chunk_of[r * s.big_l + order[i]] = int32_t(chunk);
    }
  }

  const int32_t* order() const { return perm_ + round_ * s_.big_l; }
  int64_t slot(int64_t virtual_chunk) const {
    return ((virtual_chunk % s_.width) + s_.width) % s_.width;
  }
  int64_t chunk_of_virtual(int64_t virtual_chunk) const {
    return ((virtual_chunk % s_.n_chunks) + s_.n_chunks) % s_.n_chunks;
  }

  // Starts round r with chunk 0's window gathered.
  void start_round(int64_t r) {
    round_ = r;
    for (int64_t v = -s_.before; v <= s_.after; ++v) gather(v);
  }

  // Moves from chunk i - 1's window to chunk i's (i >= 1): gathers the new chunk.
  void advance(int64_t i) { gather(i + s_.after); }

  // logits (c, W) = chunk i's queries . the unit keys of its window, masked
  // and corrected for repeated meetings.
  void logits(int64_t i, float* out) {
    const int64_t c = s_.c, dk = s_.dk, big_w = s_.big_w();
    const float* q = &w_.q[slot(i) * c * dk];
    for (int64_t w = 0; w < s_.width; ++w) {
      const int64_t ks = slot(i - s_.before + w);
      gemm(c, c, dk, q, dk, 1, &w_.k_t[ks * dk * c], c, out + w * c, big_w, false);
    }
    mask(i, out);
  }

  const Spec& s_;
  Workspace& w_;

 private:
  void gather(int64_t virtual_chunk) {
    const int64_t c = s_.c, dk = s_.dk, dv = s_.dv, big_l = s_.big_l, sl = slot(virtual_chunk);
    const int64_t first = chunk_of_virtual(virtual_chunk) * c, n_other = s_.n - 1;
    const int32_t* order = this->order();
    const int32_t* chunk_of = w_.chunk_of.data();
    const int64_t stride = s_.h * s_.row();
    for (int64_t a = 0; a < c; ++a) {
      const int64_t i = first + a;
      if (i + kAhead < big_l) {
        prefetch_row(qv_ + order[i + kAhead] * stride, s_.row(), false);
        if (backward_) prefetch_row(d_out_ + order[i + kAhead] * s_.h * dv, dv, false);
      }
      const int32_t p = order[i];
      const float* src = qv_ + p * stride;
      const int64_t row = sl * c + a;
      float* q = &w_.q[row * dk];
      vf sq = vf{};
      for (int64_t d = 0; d < dk; d += kLanes) {
        const vf x = load(src + d);
        store(q + d, x);
        sq += x * x;
      }
      const float scale = 1.0f / std::sqrt(hsum(sq) + 1e-12f);
      float* k = &w_.k[row * dk];
      for (int64_t d = 0; d < dk; d += kLanes) store(k + d, load(q + d) * scale);
      w_.inv_norm[row] = scale;
      std::memcpy(&w_.v[row * dv], src + dk, dv * sizeof(float));
      w_.pos[row] = p;
      int32_t* chunk_in = &w_.chunk_in[sl * n_other * c + a];
      for (int64_t other = 0, o = 0; other < s_.n; ++other)
        if (other != round_) chunk_in[o++ * c] = chunk_of[other * big_l + p];
      if (backward_) {
        std::memcpy(&w_.d_o[row * dv], d_out_ + p * s_.h * dv, dv * sizeof(float));
        std::memset(&w_.d_q[row * dk], 0, dk * sizeof(float));
        std::memset(&w_.d_k[row * dk], 0, dk * sizeof(float));
        std::memset(&w_.d_v[row * dv], 0, dv * sizeof(float));
      }
    }
    transpose_chunk(&w_.k[sl * c * dk], c, dk, &w_.k_t[sl * dk * c]);
    if (backward_) transpose_chunk(&w_.v[sl * c * dv], c, dv, &w_.v_t[sl * dv * c]);
  }

  void mask(int64_t i, float* logits) {
    const Spec& s = s_;
    const int64_t c = s.c, big_w = s.big_w(), nc = s.n_chunks, n_other = s.n - 1;
    const int64_t own = slot(i);
    int32_t* q_shift = w_.shifts.data();  // per other round: the query's chunk - before - C
    for (int64_t a = 0; a < c; ++a) {
      const int32_t q_pos = w_.pos[own * c + a];
      for (int64_t o = 0; o < n_other; ++o)
        q_shift[o] = w_.chunk_in[(own * n_other + o) * c + a] - int32_t(s.before) - int32_t(nc);
      float* row = logits + a * big_w;
      for (int64_t w = 0; w < s.width; ++w) {
        const int64_t ks = slot(i - s.before + w);
        for (int64_t j0 = 0; j0 < c; j0 += kLanes) {
          float* out = row + w * c + j0;
          vf x = load(out);
          if (n_other > 0) {
            vi count = splati(1);  // the round of this window
            for (int64_t o = 0; o < n_other; ++o) {
              const vu t = (vu)(loadi(&w_.chunk_in[(ks * n_other + o) * c + j0]) - q_shift[o]);
              vu m = t - uint32_t(nc);
              m = m < t ? m : t;
              const vu m2 = m - uint32_t(nc);
              m = m2 < m ? m2 : m;  // (key chunk - query chunk + before) mod C
              count -= (vi)(m <= uint32_t(s.width - 1));
            }
            if (table_.small) {
#if defined(__clang__)
              vf correction = vf{};
              for (int m = 2; m < kLanes; ++m)
                correction = select(count == m, splat(table_.minus_log[m]), correction);
              x += correction;
#else
              x += __builtin_shuffle(table_.minus_log, count);
#endif
            } else {
              for (int l = 0; l < kLanes; ++l) x[l] -= std::log(float(count[l]));
            }
          }
          const vi k_pos = loadi(&w_.pos[ks * c + j0]);
          vi masked = k_pos >= int32_t(s.length);
          if (s.causal) masked |= k_pos > q_pos;
          x = select(masked, splat(kMaskedLogit), x);
          x = select(k_pos == q_pos, splat(kSelfLogit), x);
          store(out, x);
        }
      }
    }
  }

  const MeetingTable table_;
  const bool backward_;
  const float* qv_;
  const float* d_out_;
  const int32_t* perm_;
  int64_t round_ = 0;
};

// ---------------------------------------------------------------- forward

// Attends every round of one (batch, head) and folds the rounds into the
// output as they finish: out holds the normalised combination so far and
// (top, rest) the log-normaliser as a running max and the sum below it (its
// log once all rounds are in). Keeping the normaliser as (top, rest) keeps
// a query that saw only itself exact: its logits sit at kSelfLogit, where
// float32 steps are 2^-7.
void forward_unit(const Spec& s, const float* qv, const int32_t* perm, float* out, float* lse,
                  int64_t unit) {
  Workspace& w = thread_workspace();
  UnitRounds rounds(s, w, unit, qv, perm, nullptr);
  const int64_t c = s.c, dv = s.dv, big_w = s.big_w(), big_l = s.big_l;
  const int64_t bi = unit / s.h, hi = unit % s.h, out_stride = s.h * dv;
  float* out_bh = out + (bi * big_l * s.h + hi) * dv;
  float* top_bh = lse + unit * 2 * big_l;
  float* rest_bh = top_bh + big_l;
  float* logits = w.logits.data();
  float* chunk_out = w.chunk_out.data();
  float* chunk_lse = w.chunk_lse.data();  // each query's log-normaliser in this round
  for (int64_t r = 0; r < s.n; ++r) {
    rounds.start_round(r);
    const int32_t* order = rounds.order();
    for (int64_t chunk = 0; chunk < s.n_chunks; ++chunk) {
      if (chunk > 0) rounds.advance(chunk);
      rounds.logits(chunk, logits);
      for (int64_t a = 0; a < c; ++a) {
        float* row = &logits[a * big_w];
        vf top = splat(-INFINITY);
        for (int64_t j = 0; j < big_w; j += kLanes) {
          const vf x = load(row + j);
          top = select(x > top, x, top);
        }
        const float m = hmax(top);
        vf total = vf{};
        for (int64_t j = 0; j < big_w; j += kLanes) {
          const vf e = vexp(load(row + j) - m);
          store(row + j, e);
          total += e;
        }
        const float sum = hsum(total);
        const float scale = 1.0f / sum;
        for (int64_t j = 0; j < big_w; j += kLanes) store(row + j, load(row + j) * scale);
        chunk_lse[a] = m + std::log(sum);
      }
      for (int64_t slot = 0; slot < s.width; ++slot) {
        const int64_t vs = rounds.slot(chunk - s.before + slot);
        gemm(c, dv, c, &logits[slot * c], big_w, 1, &w.v[vs * c * dv], dv, chunk_out, dv,
             slot > 0);
      }
      for (int64_t a = 0; a < c; ++a) {
        const int64_t i = chunk * c + a;
        if (i + kAhead < big_l) prefetch_row(out_bh + order[i + kAhead] * out_stride, dv, true);
        const int32_t p = order[i];
        float* dst = out_bh + p * out_stride;
        const float* src = chunk_out + a * dv;
        if (r == 0) {
          std::memcpy(dst, src, dv * sizeof(float));
          top_bh[p] = chunk_lse[a];
          rest_bh[p] = 1.0f;
          continue;
        }
        const float old_top = top_bh[p], new_top = std::max(old_top, chunk_lse[a]);
        const float old_weight = rest_bh[p] * std::exp(old_top - new_top);
        const float new_weight = std::exp(chunk_lse[a] - new_top);
        const float total = old_weight + new_weight;
        const float f_old = old_weight / total, f_new = new_weight / total;
        for (int64_t d = 0; d < dv; d += kLanes)
          store(dst + d, load(dst + d) * f_old + load(src + d) * f_new);
        top_bh[p] = new_top;
        rest_bh[p] = total;
      }
    }
  }
  for (int64_t p = 0; p < big_l; ++p) rest_bh[p] = std::log(rest_bh[p]);
}

// ---------------------------------------------------------------- backward

// The gradient of one (batch, head): every round's weights are recomputed
// chunk by chunk as exp(logit - top - rest); a window slot's query, key and
// value gradients are added back in input order when the slot leaves the
// window.
void backward_unit(const Spec& s, const float* qv, const int32_t* perm, const float* out,
                   const float* lse, const float* d_out, float* d_qv, int64_t unit) {
  Workspace& w = thread_workspace();
  UnitRounds rounds(s, w, unit, qv, perm, d_out);
  const int64_t c = s.c, dk = s.dk, dv = s.dv, big_w = s.big_w(), big_l = s.big_l;
  const int64_t bi = unit / s.h, hi = unit % s.h;
  const int64_t row = s.row(), qv_stride = s.h * row, o_stride = s.h * dv;
  float* d_qv_bh = d_qv + (bi * big_l * s.h + hi) * row;
  const float* out_bh = out + (bi * big_l * s.h + hi) * dv;
  const float* d_out_bh = d_out + (bi * big_l * s.h + hi) * dv;
  const float* top_bh = lse + unit * 2 * big_l;
  const float* rest_bh = top_bh + big_l;
  float* row_term = sized(w.row_term, big_l);  // o . d_o, the softmax's row term
  for (int64_t p = 0; p < big_l; ++p) {
    vf acc = vf{};
    for (int64_t d = 0; d < dv; d += kLanes)
      acc += load(out_bh + p * o_stride + d) * load(d_out_bh + p * o_stride + d);
    row_term[p] = hsum(acc);
  }
  char* written = sized(w.written, s.n_chunks);  // chunks whose rows d_qv already holds
  std::fill(written, written + s.n_chunks, 0);
  float* probs = w.logits.data();
  float* d_logits = w.grads.data();
  for (int64_t r = 0; r < s.n; ++r) {
    rounds.start_round(r);
    const int32_t* order = rounds.order();
    // Adds a virtual chunk's gradients to d_qv (the first time a chunk's rows are written).
    auto scatter = [&](int64_t virtual_chunk) {
      const int64_t sl = rounds.slot(virtual_chunk), chunk = rounds.chunk_of_virtual(virtual_chunk);
      const bool add = written[chunk];
      written[chunk] = 1;
      for (int64_t a = 0; a < c; ++a) {
        const int64_t i = chunk * c + a, slot_row = sl * c + a;
        if (i + kAhead < big_l) prefetch_row(d_qv_bh + order[i + kAhead] * qv_stride, row, true);
        float* dst = d_qv_bh + order[i] * qv_stride;
        const float* k = &w.k[slot_row * dk];
        const float* gk = &w.d_k[slot_row * dk];
        const float* gq = &w.d_q[slot_row * dk];
        const float* gv = &w.d_v[slot_row * dv];
        vf along_v = vf{};
        for (int64_t d = 0; d < dk; d += kLanes) along_v += load(k + d) * load(gk + d);
        const float along = hsum(along_v), scale = w.inv_norm[slot_row];
        for (int64_t d = 0; d < dk; d += kLanes) {
          const vf g = load(gq + d) + (load(gk + d) - load(k + d) * along) * scale;
          store(dst + d, add ? load(dst + d) + g : g);
        }
        for (int64_t d = 0; d < dv; d += kLanes)
          store(dst + dk + d, add ? load(dst + dk + d) + load(gv + d) : load(gv + d));
      }
    };
    for (int64_t chunk = 0; chunk < s.n_chunks; ++chunk) {
      if (chunk > 0) rounds.advance(chunk);
      const int64_t own = rounds.slot(chunk);
      rounds.logits(chunk, probs);
      // d_logits = d_o . v of the window (c, W).
      for (int64_t slot = 0; slot < s.width; ++slot) {
        const int64_t vs = rounds.slot(chunk - s.before + slot);
        gemm(c, c, dv, &w.d_o[own * c * dv], dv, 1, &w.v_t[vs * dv * c], c, &d_logits[slot * c],
             big_w, false);
      }
      for (int64_t a = 0; a < c; ++a) {
        const int32_t q_pos = w.pos[own * c + a];
        const float top = top_bh[q_pos], rest = rest_bh[q_pos], term = row_term[q_pos];
        float* p_row = &probs[a * big_w];
        float* g_row = &d_logits[a * big_w];
        // The self logit is a constant, yet its gradient needs no mask: its
        // weight is exactly 0 next to any other key, and when a query saw
        // only itself, o = v and d_o . v - term = 0.
        for (int64_t j = 0; j < big_w; j += kLanes) {
          const vf p = vexp((load(p_row + j) - top) - rest);
          store(p_row + j, p);
          store(g_row + j, p * (load(g_row + j) - term));
        }
      }
      // d_q (own) += d_logits . unit keys; d_k, d_v (window) += d_logits^T q, probs^T d_o.
      for (int64_t slot = 0; slot < s.width; ++slot) {
        const int64_t vs = rounds.slot(chunk - s.before + slot);
        gemm(c, dk, c, &d_logits[slot * c], big_w, 1, &w.k[vs * c * dk], dk, &w.d_q[own * c * dk],
             dk, true);
        gemm(c, dk, c, &d_logits[slot * c], 1, big_w, &w.q[own * c * dk], dk, &w.d_k[vs * c * dk],
             dk, true);
        gemm(c, dv, c, &probs[slot * c], 1, big_w, &w.d_o[own * c * dv], dv, &w.d_v[vs * c * dv],
             dv, true);
      }
      scatter(chunk - s.before);  // leaves the window
    }
    for (int64_t v = s.n_chunks - s.before; v < s.n_chunks + s.after; ++v) scatter(v);
  }
}

// ---------------------------------------------------------------- handlers

ffi::Error make_spec(const ffi::AnyBuffer::Dimensions& qv_dims,
                     const ffi::AnyBuffer::Dimensions& perm_dims, int64_t d_qk, int64_t length,
                     int64_t chunk_len, int64_t before, int64_t after, bool causal, Spec& s) {
  if (qv_dims.size() != 4 || perm_dims.size() != 4)
    return ffi::Error::InvalidArgument("lsh_cpu: qv and perm must have rank 4");
  s.b = qv_dims[0];
  s.big_l = qv_dims[1];
  s.h = qv_dims[2];
  s.dk = d_qk;
  s.dv = qv_dims[3] - d_qk;
  s.n = perm_dims[2];
  s.c = chunk_len;
  s.before = before;
  s.after = after;
  s.width = before + 1 + after;
  s.length = length;
  s.causal = causal;
  if (perm_dims[0] != s.b || perm_dims[1] != s.h || perm_dims[3] != s.big_l)
    return ffi::Error::InvalidArgument("lsh_cpu: perm must be (b, h, n, L) for qv (b, L, h, k + e)");
  if (s.c <= 0 || s.big_l % s.c || s.c % kLanes || s.dk % kLanes || s.dv <= 0 ||
      s.dv % kLanes)
    return ffi::Error::InvalidArgument(
        "lsh_cpu: chunk_len, d_qk and d_v must be multiples of 16 dividing the length");
  s.n_chunks = s.big_l / s.c;
  if (s.n_chunks < s.width)
    return ffi::Error::InvalidArgument("lsh_cpu: fewer chunks than window slots");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qv, ffi::Buffer<ffi::S32> perm,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   int64_t d_qk, int64_t length, int64_t chunk_len, int64_t n_chunks_before,
                   int64_t n_chunks_after, bool causal) {
  Spec s;
  ffi::Error error = make_spec(qv.dimensions(), perm.dimensions(), d_qk, length, chunk_len,
                               n_chunks_before, n_chunks_after, causal, s);
  if (error.failure()) return error;
  const float* qv_data = qv.typed_data();
  const int32_t* perm_data = perm.typed_data();
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  parallel_for(pool, int(s.b * s.h), [&](int unit) {
    forward_unit(s, qv_data, perm_data, out_data, lse_data, unit);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qv, ffi::Buffer<ffi::S32> perm,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_qv, int64_t d_qk,
                    int64_t length, int64_t chunk_len, int64_t n_chunks_before,
                    int64_t n_chunks_after, bool causal) {
  Spec s;
  ffi::Error error = make_spec(qv.dimensions(), perm.dimensions(), d_qk, length, chunk_len,
                               n_chunks_before, n_chunks_after, causal, s);
  if (error.failure()) return error;
  const float* qv_data = qv.typed_data();
  const int32_t* perm_data = perm.typed_data();
  const float* out_data = out.typed_data();
  const float* lse_data = lse.typed_data();
  const float* d_out_data = d_out.typed_data();
  float* d_qv_data = d_qv->typed_data();
  parallel_for(pool, int(s.b * s.h), [&](int unit) {
    backward_unit(s, qv_data, perm_data, out_data, lse_data, d_out_data, d_qv_data, unit);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxLshForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("d_qk")
                                  .Attr<int64_t>("length")
                                  .Attr<int64_t>("chunk_len")
                                  .Attr<int64_t>("n_chunks_before")
                                  .Attr<int64_t>("n_chunks_after")
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxLshBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("d_qk")
                                  .Attr<int64_t>("length")
                                  .Attr<int64_t>("chunk_len")
                                  .Attr<int64_t>("n_chunks_before")
                                  .Attr<int64_t>("n_chunks_after")
                                  .Attr<bool>("causal"));
