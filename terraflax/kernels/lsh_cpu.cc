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
//   forward   qv f32 (b, L, h, k + e), perm s32 (b, h, n, L), seg s32 (b, L)
//             -> out f32 (b, L, h, e), lse f32 (b, h, 2, L): log-normaliser as (top, rest)
//   backward  qv, perm, seg, out, lse, d_out f32 (b, L, h, e) -> d_qv (b, L, h, k + e)
// perm[b, h, r] lists the positions of round r in (bucket, position) order;
// seg[b, p] is position p's document in a packed row (all equal when unpacked):
// keys of another document are masked like padding.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace terraflax;  // NOLINT

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
  std::vector<int32_t> pos, seg, chunk_in;           // (R, c), (R, c), (R, n - 1, c)
  std::vector<float> d_o, d_q, d_k, d_v;             // backward: (R, c, e), (R, c, k), (R, c, k), (R, c, e)
  std::vector<int32_t> chunk_of;                     // (n, L)
  std::vector<char> written;                         // (C)
  std::vector<float> logits, grads, chunk_out, chunk_lse, chunk_scale, row_term;
  std::vector<int32_t> shifts;                       // (n - 1)
};

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
             const int32_t* seg, const float* d_out)
      : s_(s), w_(w), table_(s), backward_(d_out != nullptr) {
    const int64_t bi = unit / s.h, hi = unit % s.h;
    qv_ = qv + (bi * s.big_l * s.h + hi) * s.row();
    seg_ = seg + bi * s.big_l;
    d_out_ = backward_ ? d_out + (bi * s.big_l * s.h + hi) * s.dv : nullptr;
    perm_ = perm + unit * s.n * s.big_l;
    const int64_t slots = s.width, c = s.c, dk = s.dk, dv = s.dv;
    sized(w.q, slots * c * dk);
    sized(w.k, slots * c * dk);
    sized(w.k_t, slots * c * dk);
    sized(w.inv_norm, slots * c);
    sized(w.v, slots * c * dv);
    sized(w.pos, slots * c);
    sized(w.seg, slots * c);
    sized(w.chunk_in, slots * std::max<int64_t>(s.n - 1, 1) * c);
    sized(w.logits, c * s.big_w());
    sized(w.grads, c * s.big_w());
    sized(w.chunk_out, c * dv);
    sized(w.chunk_lse, c);
    sized(w.chunk_scale, c);
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

  // logits (c, W) = chunk i's queries . the unit keys of its window (raw).
  void dot_products(int64_t i, float* out) {
    const int64_t c = s_.c, dk = s_.dk, big_w = s_.big_w();
    const float* q = &w_.q[slot(i) * c * dk];
    for (int64_t w = 0; w < s_.width; ++w) {
      const int64_t ks = slot(i - s_.before + w);
      gemm(c, c, dk, q, dk, 1, &w_.k_t[ks * dk * c], c, out + w * c, big_w, false);
    }
  }

  // Calls visit(a, row, q_pos) for every query a of chunk i, where row(j) is
  // the masked, corrected logit vector of window columns j..j+15 computed
  // from the raw dot products in logits (c, W).
  template <typename Visit>
  void for_each_masked_row(int64_t i, const float* logits, Visit&& visit) {
    const Spec& s = s_;
    const int64_t c = s.c, big_w = s.big_w(), nc = s.n_chunks, n_other = s.n - 1;
    const int64_t own = slot(i);
    int32_t* q_shift = w_.shifts.data();  // per other round: the query's chunk - before - C
    for (int64_t a = 0; a < c; ++a) {
      const int32_t q_pos = w_.pos[own * c + a], q_seg = w_.seg[own * c + a];
      for (int64_t o = 0; o < n_other; ++o)
        q_shift[o] = w_.chunk_in[(own * n_other + o) * c + a] - int32_t(s.before) - int32_t(nc);
      const float* row = logits + a * big_w;
      auto masked = [&, row, q_pos, q_seg](int64_t j) -> vf {
        const int64_t w = j / c, j0 = j % c, ks = slot(i - s.before + w);
        vf x = load(row + j);
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
        vi hidden = k_pos >= int32_t(s.length);
        if (s.causal) hidden |= k_pos > q_pos;
        hidden |= loadi(&w_.seg[ks * c + j0]) != q_seg;
        x = select(hidden, splat(kMaskedLogit), x);
        return select(k_pos == q_pos, splat(kSelfLogit), x);
      };
      visit(a, masked, q_pos);
    }
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
      w_.seg[row] = seg_[p];
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

  const MeetingTable table_;
  const bool backward_;
  const float* qv_;
  const float* d_out_;
  const int32_t* perm_;
  const int32_t* seg_;
  int64_t round_ = 0;
};

// ---------------------------------------------------------------- forward

// Attends every round of one (batch, head) and folds the rounds into the
// output as they finish: out holds the normalised combination so far and
// (top, rest) the log-normaliser as a running max and the sum below it (its
// log once all rounds are in). Keeping the normaliser as (top, rest) keeps
// a query that saw only itself exact: its logits sit at kSelfLogit, where
// float32 steps are 2^-7.
void forward_unit(const Spec& s, const float* qv, const int32_t* perm, const int32_t* seg,
                  float* out, float* lse, int64_t unit) {
  Workspace& w = thread_workspace();
  UnitRounds rounds(s, w, unit, qv, perm, seg, nullptr);
  const int64_t c = s.c, dv = s.dv, big_w = s.big_w(), big_l = s.big_l;
  const int64_t bi = unit / s.h, hi = unit % s.h, out_stride = s.h * dv;
  float* out_bh = out + (bi * big_l * s.h + hi) * dv;
  float* top_bh = lse + unit * 2 * big_l;
  float* rest_bh = top_bh + big_l;
  float* logits = w.logits.data();
  float* chunk_out = w.chunk_out.data();
  float* chunk_lse = w.chunk_lse.data();  // each query's log-normaliser in this round
  float* chunk_scale = w.chunk_scale.data();  // and 1 / its sum of weights
  for (int64_t r = 0; r < s.n; ++r) {
    rounds.start_round(r);
    const int32_t* order = rounds.order();
    for (int64_t chunk = 0; chunk < s.n_chunks; ++chunk) {
      if (chunk > 0) rounds.advance(chunk);
      rounds.dot_products(chunk, logits);
      // Unnormalised weights e = exp(logit - max); the output is scaled by 1 / sum after.
      rounds.for_each_masked_row(chunk, logits, [&](int64_t a, auto&& masked, int32_t) {
        float* row = &logits[a * big_w];
        vf top = splat(-INFINITY);
        for (int64_t j = 0; j < big_w; j += kLanes) {
          const vf x = masked(j);
          store(row + j, x);
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
        chunk_scale[a] = 1.0f / sum;
        chunk_lse[a] = m + std::log(sum);
      });
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
        float* src = chunk_out + a * dv;
        for (int64_t d = 0; d < dv; d += kLanes) store(src + d, load(src + d) * chunk_scale[a]);
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
void backward_unit(const Spec& s, const float* qv, const int32_t* perm, const int32_t* seg,
                   const float* out, const float* lse, const float* d_out, float* d_qv,
                   int64_t unit) {
  Workspace& w = thread_workspace();
  UnitRounds rounds(s, w, unit, qv, perm, seg, d_out);
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
      rounds.dot_products(chunk, probs);
      // d_logits = d_o . v of the window (c, W).
      for (int64_t slot = 0; slot < s.width; ++slot) {
        const int64_t vs = rounds.slot(chunk - s.before + slot);
        gemm(c, c, dv, &w.d_o[own * c * dv], dv, 1, &w.v_t[vs * dv * c], c, &d_logits[slot * c],
             big_w, false);
      }
      // The self logit is a constant, yet its gradient needs no mask: its
      // weight is exactly 0 next to any other key, and when a query saw only
      // itself, o = v and d_o . v - term = 0.
      rounds.for_each_masked_row(chunk, probs, [&](int64_t a, auto&& masked, int32_t q_pos) {
        const float top = top_bh[q_pos], rest = rest_bh[q_pos], term = row_term[q_pos];
        float* p_row = &probs[a * big_w];
        float* g_row = &d_logits[a * big_w];
        for (int64_t j = 0; j < big_w; j += kLanes) {
          const vf p = vexp((masked(j) - top) - rest);
          store(p_row + j, p);
          store(g_row + j, p * (load(g_row + j) - term));
        }
      });
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

// The calls' attributes (lsh_cpu.Spec on the Python side).
struct Window {
  int64_t d_qk, length, chunk_len, n_chunks_before, n_chunks_after;
  bool causal;
};

ffi::Error make_spec(const ffi::AnyBuffer::Dimensions& qv_dims,
                     const ffi::AnyBuffer::Dimensions& perm_dims,
                     const ffi::AnyBuffer::Dimensions& seg_dims, const Window& a, Spec& s) {
  if (qv_dims.size() != 4 || perm_dims.size() != 4)
    return ffi::Error::InvalidArgument("lsh_cpu: qv and perm must have rank 4");
  s.b = qv_dims[0];
  s.big_l = qv_dims[1];
  s.h = qv_dims[2];
  s.dk = a.d_qk;
  s.dv = qv_dims[3] - a.d_qk;
  s.n = perm_dims[2];
  s.c = a.chunk_len;
  s.before = a.n_chunks_before;
  s.after = a.n_chunks_after;
  s.width = s.before + 1 + s.after;
  s.length = a.length;
  s.causal = a.causal;
  if (perm_dims[0] != s.b || perm_dims[1] != s.h || perm_dims[3] != s.big_l)
    return ffi::Error::InvalidArgument("lsh_cpu: perm must be (b, h, n, L) for qv (b, L, h, k + e)");
  if (seg_dims.size() != 2 || seg_dims[0] != s.b || seg_dims[1] != s.big_l)
    return ffi::Error::InvalidArgument("lsh_cpu: seg must be (b, L) for qv (b, L, h, k + e)");
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
                   ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, Window window) {
  Spec s;
  ffi::Error error = make_spec(qv.dimensions(), perm.dimensions(), seg.dimensions(), window, s);
  if (error.failure()) return error;
  const float* qv_data = qv.typed_data();
  const int32_t* perm_data = perm.typed_data();
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  parallel_for(pool, int(s.b * s.h), [&](int unit) {
    forward_unit(s, qv_data, perm_data, seg.typed_data(), out_data, lse_data, unit);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qv, ffi::Buffer<ffi::S32> perm,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> d_qv, Window window) {
  Spec s;
  ffi::Error error = make_spec(qv.dimensions(), perm.dimensions(), seg.dimensions(), window, s);
  if (error.failure()) return error;
  const float* qv_data = qv.typed_data();
  const int32_t* perm_data = perm.typed_data();
  const float* out_data = out.typed_data();
  const float* lse_data = lse.typed_data();
  const float* d_out_data = d_out.typed_data();
  float* d_qv_data = d_qv->typed_data();
  parallel_for(pool, int(s.b * s.h), [&](int unit) {
    backward_unit(s, qv_data, perm_data, seg.typed_data(), out_data, lse_data, d_out_data,
                  d_qv_data, unit);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Window, ffi::StructMember<int64_t>("d_qk"),
                                      ffi::StructMember<int64_t>("length"),
                                      ffi::StructMember<int64_t>("chunk_len"),
                                      ffi::StructMember<int64_t>("n_chunks_before"),
                                      ffi::StructMember<int64_t>("n_chunks_after"),
                                      ffi::StructMember<bool>("causal"));

// Bindings inferred from the signatures above.
XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxLshForward, Forward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxLshBackward, Backward);
