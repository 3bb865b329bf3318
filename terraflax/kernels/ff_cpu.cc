// The feed-forward block's core, act(x W1 + b1) W2 + b2, on the CPU as XLA
// FFI handlers (Python side: terraflax/kernels/ff_cpu.py).
//
// Up to kSmallRows rows (decoding) each product streams the weights in memory
// order, each thread a contiguous range of weight rows (forward_small). More rows
// are split between threads and run in blocks of kBlockRows, so a
// block's hidden activations (rows x d_ff) stay in cache between the two
// products and the activation costs no trip to memory. The weights are
// packed once per call into column panels that the register-blocked
// product streams contiguously.
//
//   forward   x (N, d), w1 (d, f), b1 (f), w2 (f, e), b2 (e) -> y (N, e) [, h (N, f)]
//   backward  x, h (N, f) or recomputed, w1, b1, w2, dy (N, e)
//             -> dx (N, d), dw1 (d, f), db1 (f), dw2 (f, e), db2 (e)
// h is the pre-activation x W1 + b1. Activations: 0 relu, 1 tanh-approximated gelu.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace terraflax;  // NOLINT

constexpr int64_t kBlockRows = 96;
constexpr int64_t kPanel = kMaxVecs * kLanes;  // columns of one packed panel

enum Activation : int64_t { kRelu = 0, kFastGelu = 1 };

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|).
inline vf vtanh(vf u) {
  const vi negative = u < 0.0f;
  const vf e = vexp(select(negative, u, -u) * 2.0f);
  const vf t = (1.0f - e) / (1.0f + e);
  return select(negative, -t, t);
}

// In place: row (n floats, a multiple of 16) = act(row).
inline void activate(int64_t act, float* row, int64_t n) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf x = load(row + j);
    if (act == kRelu) {
      store(row + j, select(x > 0.0f, x, vf{}));
    } else {
      const vf t = vtanh(kGeluScale * (x + kGeluCubic * x * x * x));
      store(row + j, 0.5f * x * (1.0f + t));
    }
  }
}

// grad *= act'(pre); a = act(pre). All rows of n floats.
inline void activation_grad(int64_t act, const float* pre, float* grad, float* a, int64_t n) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf x = load(pre + j);
    if (act == kRelu) {
      const vi positive = x > 0.0f;
      store(a + j, select(positive, x, vf{}));
      store(grad + j, select(positive, load(grad + j), vf{}));
    } else {
      const vf x2 = x * x;
      const vf t = vtanh(kGeluScale * (x + kGeluCubic * x2 * x));
      store(a + j, 0.5f * x * (1.0f + t));
      const vf slope = 0.5f * (1.0f + t) +
                       0.5f * x * (1.0f - t * t) * kGeluScale * (1.0f + 3.0f * kGeluCubic * x2);
      store(grad + j, load(grad + j) * slope);
    }
  }
}

// The right factor B (k x n) of products A B: packed into panels of kPanel
// columns (panel p holds columns [p kPanel, ...) as a (k x width) row-major
// block, read contiguously), or used in place (`view`) when there are too
// few rows of A to pay for packing, as in one-token decoding.
struct Packed {
  std::vector<float> data;
  const float* unpacked = nullptr;
  int64_t k = 0, n = 0;

  // B = b (k x n), or b^T for b given as (n x k) when `transposed`.
  void pack(const float* b, int64_t k_size, int64_t n_size, bool transposed) {
    k = k_size;
    n = n_size;
    unpacked = nullptr;
    data.resize(k * n);
    for (int64_t p0 = 0; p0 < n; p0 += kPanel) {
      const int64_t width = std::min(kPanel, n - p0);
      float* panel = &data[p0 * k];
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t j = 0; j < width; ++j)
          panel[kk * width + j] = transposed ? b[(p0 + j) * k + kk] : b[kk * n + p0 + j];
    }
  }

  void view(const float* b, int64_t k_size, int64_t n_size) {
    k = k_size;
    n = n_size;
    unpacked = b;
  }

  // C (m x n) (+)= A (m x k) B, A(i, j) = a[i a_m + j a_k].
  void multiply(int64_t m, const float* a, int64_t a_m, int64_t a_k, float* c, int64_t ldc,
                bool accumulate) const {
    if (unpacked) {
      gemm(int(m), int(n), int(k), a, a_m, a_k, unpacked, n, c, ldc, accumulate);
      return;
    }
    for (int64_t p0 = 0; p0 < n; p0 += kPanel) {
      const int64_t width = std::min(kPanel, n - p0);
      gemm(int(m), int(width), int(k), a, a_m, a_k, &data[p0 * k], width, c + p0, ldc,
           accumulate);
    }
  }
};

// Below this many rows the weights are read in place instead of packed.
constexpr int64_t kPackRows = 64;

// rows (m x n) = bias broadcast.
inline void fill_rows(float* rows, int64_t m, int64_t n, const float* bias) {
  for (int64_t i = 0; i < m; ++i) std::memcpy(rows + i * n, bias, n * sizeof(float));
}

struct Sizes {
  int64_t n_rows, d, f, e;
};

ffi::Error sizes_of(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w1,
                    const ffi::Buffer<ffi::F32>& w2, Sizes& s) {
  const auto xd = x.dimensions(), w1d = w1.dimensions(), w2d = w2.dimensions();
  if (xd.size() != 2 || w1d.size() != 2 || w2d.size() != 2 || w1d[0] != xd[1] ||
      w2d[0] != w1d[1])
    return ffi::Error::InvalidArgument("ff_cpu: expected x (N, d), w1 (d, f), w2 (f, e)");
  s = Sizes{xd[0], xd[1], w1d[1], w2d[1]};
  if (s.d % kLanes || s.f % kLanes || s.e % kLanes)
    return ffi::Error::InvalidArgument("ff_cpu: widths must be multiples of 16");
  return ffi::Error::Success();
}

// Contiguous row ranges, one per thread, of whole blocks where possible.
int n_parts(ffi::ThreadPool& pool, int64_t n_rows) {
  return int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(),
                                                    (n_rows + kBlockRows - 1) / kBlockRows)));
}

struct Workspace {
  std::vector<float> hidden, grad, act;  // one block's rows of width f
  Packed grad_panels, dy_panels;
};

Workspace& thread_workspace() {
  static thread_local Workspace workspace;
  return workspace;
}

// Up to this many rows (decoding: one token per row) the products stream the
// weights instead (`stream_products`: each thread reads a contiguous range of
// weight rows, in memory order).
constexpr int64_t kSmallRows = 8;

// The forward pass for at most kSmallRows rows (see stream_products).
void forward_small(ffi::ThreadPool& pool, const Sizes& s, const float* xs, const float* w1,
                   const float* bias1, const float* w2, const float* bias2, float* ys, float* hs,
                   int64_t activation) {
  float* hidden = sized(thread_workspace().hidden, s.n_rows * s.f);
  fill_rows(hidden, s.n_rows, s.f, bias1);
  const StreamedProduct first{xs, s.d, w1, s.d, s.f, hidden, s.f};
  stream_products(pool, s.n_rows, &first, 1);
  if (hs) std::memcpy(hs, hidden, s.n_rows * s.f * sizeof(float));
  for (int64_t i = 0; i < s.n_rows; ++i) activate(activation, hidden + i * s.f, s.f);
  fill_rows(ys, s.n_rows, s.e, bias2);
  const StreamedProduct second{hidden, s.f, w2, s.f, s.e, ys, s.e};
  stream_products(pool, s.n_rows, &second, 1);
}

// y = act(x W1 + b1) W2 + b2, and h = x W1 + b1 when hs is not null.
ffi::Error forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                   const ffi::Buffer<ffi::F32>& w1, const ffi::Buffer<ffi::F32>& b1,
                   const ffi::Buffer<ffi::F32>& w2, const ffi::Buffer<ffi::F32>& b2, float* ys,
                   float* hs, int64_t activation) {
  Sizes s;
  ffi::Error error = sizes_of(x, w1, w2, s);
  if (error.failure()) return error;
  if (s.n_rows <= kSmallRows) {
    forward_small(pool, s, x.typed_data(), w1.typed_data(), b1.typed_data(), w2.typed_data(),
                  b2.typed_data(), ys, hs, activation);
    return ffi::Error::Success();
  }
  // The calling thread's packed weights, kept between calls (no fresh pages each
  // time). Bound to references here: inside the parallel loop a thread_local
  // name would mean the worker thread's own copy.
  static thread_local Packed packed_1, packed_2;
  Packed& p1 = packed_1;
  Packed& p2 = packed_2;
  if (s.n_rows < kPackRows) {
    p1.view(w1.typed_data(), s.d, s.f);
    p2.view(w2.typed_data(), s.f, s.e);
  } else {
    p1.pack(w1.typed_data(), s.d, s.f, false);
    p2.pack(w2.typed_data(), s.f, s.e, false);
  }
  const float* xs = x.typed_data();
  const float* bias1 = b1.typed_data();
  const float* bias2 = b2.typed_data();
  const int parts = n_parts(pool, s.n_rows);
  parallel_for(pool, parts, [&](int part) {
    float* hidden = sized(thread_workspace().hidden, kBlockRows * s.f);
    const int64_t first = s.n_rows * part / parts, last = s.n_rows * (part + 1) / parts;
    for (int64_t r0 = first; r0 < last; r0 += kBlockRows) {
      const int64_t m = std::min(kBlockRows, last - r0);
      fill_rows(hidden, m, s.f, bias1);
      p1.multiply(m, xs + r0 * s.d, s.d, 1, hidden, s.f, true);
      if (hs) std::memcpy(hs + r0 * s.f, hidden, m * s.f * sizeof(float));
      for (int64_t i = 0; i < m; ++i) activate(activation, hidden + i * s.f, s.f);
      fill_rows(ys + r0 * s.e, m, s.e, bias2);
      p2.multiply(m, hidden, s.f, 1, ys + r0 * s.e, s.e, true);
    }
  });
  return ffi::Error::Success();
}

// The calls' attributes.
struct ForwardOptions {
  int64_t activation;
};
struct BackwardOptions {
  int64_t activation;
  bool recompute;  // h is a placeholder: recompute it from x
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                   ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                   ffi::ResultBuffer<ffi::F32> y, ForwardOptions options) {
  return forward(pool, x, w1, b1, w2, b2, y->typed_data(), nullptr, options.activation);
}

ffi::Error ForwardHidden(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                         ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2,
                         ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> y,
                         ffi::ResultBuffer<ffi::F32> h, ForwardOptions options) {
  return forward(pool, x, w1, b1, w2, b2, y->typed_data(), h->typed_data(), options.activation);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                    ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dw1, ffi::ResultBuffer<ffi::F32> db1,
                    ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> db2,
                    BackwardOptions options) {
  const int64_t activation = options.activation;
  const bool recompute = options.recompute;
  Sizes s;
  ffi::Error error = sizes_of(x, w1, w2, s);
  if (error.failure()) return error;
  if (!recompute && (h.dimensions().size() != 2 || h.dimensions()[0] != s.n_rows ||
                     h.dimensions()[1] != s.f))
    return ffi::Error::InvalidArgument("ff_cpu: h must be (N, f) unless recomputed");
  static thread_local Packed packed_1, packed_1_t, packed_2_t;  // as in forward()
  Packed& p1 = packed_1;
  Packed& p1_t = packed_1_t;
  Packed& p2_t = packed_2_t;
  if (recompute) p1.pack(w1.typed_data(), s.d, s.f, false);
  p1_t.pack(w1.typed_data(), s.f, s.d, true);   // W1^T (f x d)
  p2_t.pack(w2.typed_data(), s.e, s.f, true);   // W2^T (e x f)
  const float* xs = x.typed_data();
  const float* hs = h.typed_data();
  const float* bias1 = b1.typed_data();
  const float* dys = dy.typed_data();
  float* dxs = dx->typed_data();
  const int parts = n_parts(pool, s.n_rows);
  // Weight and bias gradients, one partial sum per part.
  const int64_t grads_size = s.d * s.f + s.f + s.f * s.e + s.e;
  std::vector<float> partial(parts * grads_size, 0.0f);
  parallel_for(pool, parts, [&](int part) {
    Workspace& w = thread_workspace();
    Packed& grad_panels = w.grad_panels;
    Packed& dy_panels = w.dy_panels;
    float* pre = sized(w.hidden, kBlockRows * s.f);
    float* grad = sized(w.grad, kBlockRows * s.f);
    float* act = sized(w.act, kBlockRows * s.f);
    float* g_w1 = &partial[part * grads_size];
    float* g_b1 = g_w1 + s.d * s.f;
    float* g_w2 = g_b1 + s.f;
    float* g_b2 = g_w2 + s.f * s.e;
    const int64_t first = s.n_rows * part / parts, last = s.n_rows * (part + 1) / parts;
    for (int64_t r0 = first; r0 < last; r0 += kBlockRows) {
      const int64_t m = std::min(kBlockRows, last - r0);
      const float* x_rows = xs + r0 * s.d;
      const float* dy_rows = dys + r0 * s.e;
      const float* pre_rows = pre;
      if (recompute) {
        fill_rows(pre, m, s.f, bias1);
        p1.multiply(m, x_rows, s.d, 1, pre, s.f, true);
      } else {
        pre_rows = hs + r0 * s.f;
      }
      p2_t.multiply(m, dy_rows, s.e, 1, grad, s.f, false);  // d act = dy W2^T
      for (int64_t i = 0; i < m; ++i)
        activation_grad(activation, pre_rows + i * s.f, grad + i * s.f, act + i * s.f, s.f);
      p1_t.multiply(m, grad, s.f, 1, dxs + r0 * s.d, s.d, false);  // dx = d pre W1^T
      // dW1 += x^T d pre, dW2 += act^T dy: the transposes are read through
      // strides; the right factors are packed (their rows are 4 KiB apart,
      // which would thrash the L1 sets).
      grad_panels.pack(grad, m, s.f, false);
      grad_panels.multiply(s.d, x_rows, 1, s.d, g_w1, s.f, true);
      dy_panels.pack(dy_rows, m, s.e, false);
      dy_panels.multiply(s.f, act, 1, s.f, g_w2, s.e, true);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < s.f; j += kLanes)
          store(g_b1 + j, load(g_b1 + j) + load(grad + i * s.f + j));
        for (int64_t j = 0; j < s.e; j += kLanes)
          store(g_b2 + j, load(g_b2 + j) + load(dy_rows + i * s.e + j));
      }
    }
  });
  float* outs[] = {dw1->typed_data(), db1->typed_data(), dw2->typed_data(), db2->typed_data()};
  const int64_t sizes[] = {s.d * s.f, s.f, s.f * s.e, s.e};
  for (int64_t g = 0, offset = 0; g < 4; offset += sizes[g], ++g) {
    std::memcpy(outs[g], &partial[offset], sizes[g] * sizeof(float));
    for (int part = 1; part < parts; ++part) {
      const float* src = &partial[part * grads_size + offset];
      for (int64_t i = 0; i < sizes[g]; ++i) outs[g][i] += src[i];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(ForwardOptions, ffi::StructMember<int64_t>("activation"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(BackwardOptions, ffi::StructMember<int64_t>("activation"),
                                      ffi::StructMember<bool>("recompute"));

// Bindings inferred from the signatures above.
XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxFfForward, Forward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxFfForwardHidden, ForwardHidden);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxFfBackward, Backward);
