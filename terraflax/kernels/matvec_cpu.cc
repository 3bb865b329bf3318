// Few-row float32 products that stream the weights, on the CPU as an XLA FFI
// handler (Python side: terraflax/kernels/matvec_cpu.py).
//
//   x (N, K), w_1 (K, M_1), ..., w_n (K, M_n) -> y_i (N, M_i) = x @ w_i
//
// Batch-1 decoding multiplies one row per sequence by every weight matrix,
// so a product's time is the time to read its weights. The products of one
// call (a layer's query, key and value projections share x) are streamed
// together by `stream_products`: each thread reads a contiguous range of
// rows of every w in memory order into its own running sums. M_i must be a
// multiple of 16.

#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace terraflax;  // NOLINT

constexpr int64_t kMaxProducts = 8;

ffi::Error StreamMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                        ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("matvec_cpu: expected x (N, K)");
  const int64_t m = xd[0], k = xd[1];
  const int64_t n_products = int64_t(ws.size());
  if (n_products < 1 || n_products > kMaxProducts || ys.size() != ws.size())
    return ffi::Error::InvalidArgument("matvec_cpu: expected 1 to 8 weights, one result each");
  StreamedProduct products[kMaxProducts];
  for (int64_t i = 0; i < n_products; ++i) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error()) return w.error();
    if (y.has_error()) return y.error();
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[0] != k || wd[1] % kLanes)
      return ffi::Error::InvalidArgument(
          "matvec_cpu: each w must be (K, M) with K = x's width and M a multiple of 16");
    float* out = (*y)->typed_data();
    std::memset(out, 0, m * wd[1] * sizeof(float));
    products[i] = StreamedProduct{x.typed_data(), k, w->typed_data(), k, wd[1], out, wd[1]};
  }
  stream_products(pool, m, products, int(n_products));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TerraflaxStreamMatmul, StreamMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
