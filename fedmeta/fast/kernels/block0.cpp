// Conv4's first block (3×3 convolution, batch norm, ReLU, 2×2 max-pool) fused into one pass, and its
// backward pass to the weight gradient, for one thread. The block's full-size activations (four times the
// pooled size, larger than a core's L2 cache) are never written: each pooled pixel's four window pixels are
// computed in registers, compared, and only the maximum and which of the four it was are kept.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "vector.h"

using fedmeta::load;
using fedmeta::store;

namespace {

// The 3×3 patches (zero padding 1) of every pooled pixel's four window pixels, for one image x [C_in, H, W]:
// table[(q·4 + o)·K + k] for pooled pixel q = i·(W/2) + j, window offset o = 2·row + column offset (max_pool2d's
// scan order) and k = (input channel, 3×3 tap) as a conv weight flattens.
template <typename T>
void patch_table(const T* x, int64_t cin, int64_t H, int64_t W, std::vector<T>& padded, std::vector<T>& table) {
  const int64_t Hp = H / 2, Wp = W / 2, K = cin * 9, PW = W + 2;
  padded.assign(cin * (H + 2) * PW, T(0));
  for (int64_t ci = 0; ci < cin; ++ci)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t s = 0; s < W; ++s) padded[(ci * (H + 2) + r + 1) * PW + s + 1] = x[(ci * H + r) * W + s];
  table.resize(Hp * Wp * 4 * K);
  T* t = table.data();
  for (int64_t i = 0; i < Hp; ++i)
    for (int64_t j = 0; j < Wp; ++j)
      for (int64_t o = 0; o < 4; ++o)
        for (int64_t ci = 0; ci < cin; ++ci)
          for (int64_t ky = 0; ky < 3; ++ky)
            for (int64_t kx = 0; kx < 3; ++kx) *t++ = padded[(ci * (H + 2) + 2 * i + o / 2 + ky) * PW + 2 * j + o % 2 + kx];
}

// h = ReLU(max over the window of (patch · w + shift)), arg = the first maximum's offset, per pooled pixel and channel.
template <typename T, typename V, int64_t K>
void forward_kernel(const T* x, int64_t n, int64_t cin, int64_t H, int64_t W, const T* w, const T* shift, int64_t C, T* h, T* arg) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t Q = (H / 2) * (W / 2);
  std::vector<T> padded, table;
  for (int64_t b = 0; b < n; ++b) {
    patch_table(x + b * cin * H * W, cin, H, W, padded, table);
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      const V sh = load<V>(shift + c0);
      for (int64_t q = 0; q < Q; ++q) {
        const T* p = table.data() + q * 4 * K;
        V acc[4] = {};
        for (int64_t k = 0; k < K; ++k) {
          const V wk = load<V>(w + k * C + c0);
          for (int64_t o = 0; o < 4; ++o) acc[o] += p[o * K + k] * wk;
        }
        V best = acc[0] + sh, which = V{} + T(0);
        for (int64_t o = 1; o < 4; ++o) {
          const V v = acc[o] + sh;
          const auto more = v > best;  // ties keep the first maximum, as max_pool2d does
          best = more ? v : best;
          which = more ? V{} + T(o) : which;
        }
        const V zero = V{} + T(0);
        store(h + (b * Q + q) * C + c0, best > zero ? best : zero);
        store(arg + (b * Q + q) * C + c0, which);
      }
    }
  }
}

// dw[k, c] = Σ over pooled pixels of ∂h·[h > 0] times tap k of the maximum's patch, dbeta[c] = Σ ∂h·[h > 0]; each image's
// sums in T, added to the float64 totals after it.
template <typename T, typename V, int64_t K>
void backward_kernel(const T* x, int64_t n, int64_t cin, int64_t H, int64_t W, const T* dh, const T* h, const T* arg, int64_t C,
                     double* dw, double* dbeta) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t Q = (H / 2) * (W / 2);
  const V zero = V{} + T(0);
  std::vector<T> padded, table;
  for (int64_t b = 0; b < n; ++b) {
    patch_table(x + b * cin * H * W, cin, H, W, padded, table);
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      V acc[K] = {}, gsum = zero;
      for (int64_t q = 0; q < Q; ++q) {
        const T* p = table.data() + q * 4 * K;
        const int64_t at = (b * Q + q) * C + c0;
        const V which = load<V>(arg + at);
        const V gc = load<V>(h + at) > zero ? load<V>(dh + at) : zero;  // through the ReLU, then to the window's maximum
        gsum += gc;
        V g[4];
        for (int64_t o = 0; o < 4; ++o) g[o] = which == V{} + T(o) ? gc : zero;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t o = 0; o < 4; ++o) acc[k] += g[o] * p[o * K + k];
      }
      T lanes[L];
      for (int64_t k = 0; k < K; ++k) {
        store(lanes, acc[k]);
        for (int64_t c = 0; c < L; ++c) dw[k * C + c0 + c] += double(lanes[c]);
      }
      store(lanes, gsum);
      for (int64_t c = 0; c < L; ++c) dbeta[c0 + c] += double(lanes[c]);
    }
  }
}

void check_images(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && (x.size(1) == 1 || x.size(1) == 3),
              "fedmeta block0: expected CPU images [n, 1 or 3 channels, H, W], got ", x.sizes());
}

// f(channel block, patch length) for 1 or 3 input channels, the block as a type and the length as a compile-time constant.
// A block of channels is one vector register (`Wide`) when the width is a multiple of its lanes, else one channel.
template <typename T, typename F>
void with_shape(int64_t cin, int64_t C, F&& f) {
  using Wide = typename fedmeta::Wide<T>::V;
  const bool wide = C % int64_t(sizeof(Wide) / sizeof(T)) == 0;
  using K9 = std::integral_constant<int64_t, 9>;
  using K27 = std::integral_constant<int64_t, 27>;
  if (cin == 1) {
    if (wide) f(Wide{}, K9{}); else f(T{}, K9{});
  } else {
    if (wide) f(Wide{}, K27{}); else f(T{}, K27{});
  }
}

// (ReLU(max-pool(BN(conv(x)))), each maximum's window offset 0..3 in the same dtype), both [n, C, H/2, W/2] channels last,
// with BN and the convolution folded into weight [9·C_in, C] (conv weight × BN scale, transposed) and shift [C].
std::tuple<at::Tensor, at::Tensor> block0_forward(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& shift_in) {
  check_images(x_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), shift = shift_in.contiguous();
  const int64_t n = x.size(0), cin = x.size(1), H = x.size(2), W = x.size(3), C = weight.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == cin * 9 && shift.numel() == C && weight.scalar_type() == x.scalar_type() &&
                  shift.scalar_type() == x.scalar_type(),
              "fedmeta block0_forward: expected weight [9·C_in, C] and shift [C] of the images' dtype");
  at::Tensor h = at::empty({n, C, H / 2, W / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor arg = at::empty({n, C, H / 2, W / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block0_forward", [&] {
    with_shape<scalar_t>(cin, C, [&](auto v, auto k) {
      forward_kernel<scalar_t, decltype(v), decltype(k)::value>(x.data_ptr<scalar_t>(), n, cin, H, W, weight.data_ptr<scalar_t>(),
                                                                shift.data_ptr<scalar_t>(), C, h.data_ptr<scalar_t>(), arg.data_ptr<scalar_t>());
    });
  });
  return {h, arg};
}

// (Σ over pixels of patch ⊗ ∂BN-output [9·C_in, C], Σ ∂BN-output [C]), in float64, given ∂loss/∂h for h, arg from block0_forward.
std::tuple<at::Tensor, at::Tensor> block0_backward(const at::Tensor& x_in, const at::Tensor& dh_in, const at::Tensor& h_in, const at::Tensor& arg_in) {
  check_images(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dh = dh_in.contiguous(at::MemoryFormat::ChannelsLast), h = h_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor arg = arg_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), cin = x.size(1), H = x.size(2), W = x.size(3), C = h.size(1);
  TORCH_CHECK(dh.sizes() == h.sizes() && h.dim() == 4 && h.size(0) == n && h.size(2) == H / 2 && h.size(3) == W / 2 &&
                  arg.sizes() == h.sizes() && arg.scalar_type() == x.scalar_type() && dh.scalar_type() == x.scalar_type() &&
                  h.scalar_type() == x.scalar_type(),
              "fedmeta block0_backward: expected dh, h and arg [n, C, H/2, W/2] of the images' dtype, h and arg from block0_forward");
  at::Tensor dw = at::zeros({cin * 9, C}, x.options().dtype(at::kDouble));
  at::Tensor dbeta = at::zeros({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block0_backward", [&] {
    with_shape<scalar_t>(cin, C, [&](auto v, auto k) {
      backward_kernel<scalar_t, decltype(v), decltype(k)::value>(x.data_ptr<scalar_t>(), n, cin, H, W, dh.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                                                 arg.data_ptr<scalar_t>(), C, dw.data_ptr<double>(), dbeta.data_ptr<double>());
    });
  });
  return {dw, dbeta};
}

}  // namespace

TORCH_LIBRARY(fedmeta, m) {
  m.def("block0_forward(Tensor x, Tensor weight, Tensor shift) -> (Tensor, Tensor)");
  m.def("block0_backward(Tensor x, Tensor dh, Tensor h, Tensor arg) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fedmeta, CPU, m) {
  m.impl("block0_forward", block0_forward);
  m.impl("block0_backward", block0_backward);
}
