// Conv4's later convolutions (3×3, padding 1, stride 1, no bias, channels last) by Winograd's minimal filtering F(2×2, 3×3),
// forward and backward, for one thread. Each 2×2 block of outputs ("tile") comes from its 4×4 input patch d as
// Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A: 16 products per channel pair where the direct convolution needs 36, so the convolutions, which
// are most of a training step's arithmetic, need 2.25 times fewer multiplications. Summed over input channels, the 16
// elementwise products are 16 matrix products [tiles × C_in] · [C_in × C_out], computed here by a register-blocked kernel.
// Tiles are processed in chunks small enough for a core's L2 cache, transform, products and inverse transform in one pass.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vector.h"

using fedmeta::load;
using fedmeta::store;
using fedmeta::Wide;

namespace {

constexpr int64_t XI = 16;     // points of the 4×4 transform domain
constexpr int64_t CHUNK = 48;  // tiles per pass: 16 × 48 × 64 channels × 4 bytes = 192 KB per transformed tensor

// C[r, 0 : NV·L] (+)= Σ_k A[r·rs + k·ks] · B[k·bs, 0 : NV·L] for r < R: R·NV accumulators held in registers.
template <typename T, int R, int NV, bool ACC>
inline void micro(const T* A, int64_t rs, int64_t ks, int64_t K, const T* B, int64_t bs, T* C, int64_t cs) {
  using V = typename Wide<T>::V;
  constexpr int64_t L = Wide<T>::L;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load<V>(C + r * cs + v * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load<V>(B + k * bs + v * L);
    for (int r = 0; r < R; ++r) {
      const T a = A[r * rs + k * ks];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * cs + v * L, acc[r][v]);
}

template <typename T, int NV, bool ACC>
inline void rows(int64_t r, const T* A, int64_t rs, int64_t ks, int64_t K, const T* B, int64_t bs, T* C, int64_t cs) {
  switch (r) {
    case 1: micro<T, 1, NV, ACC>(A, rs, ks, K, B, bs, C, cs); break;
    case 2: micro<T, 2, NV, ACC>(A, rs, ks, K, B, bs, C, cs); break;
    case 3: micro<T, 3, NV, ACC>(A, rs, ks, K, B, bs, C, cs); break;
    case 4: micro<T, 4, NV, ACC>(A, rs, ks, K, B, bs, C, cs); break;
    case 5: micro<T, 5, NV, ACC>(A, rs, ks, K, B, bs, C, cs); break;
    default: micro<T, 6, NV, ACC>(A, rs, ks, K, B, bs, C, cs); break;
  }
}

// Vectors per row of the micro-kernel's 6-row block: its 6·NV_MAX accumulators, NV_MAX loads of B and a broadcast fit the registers
// (24 + 5 of 32 with AVX-512, 12 + 3 of 16 with AVX2).
constexpr int64_t NV_MAX = fedmeta::REGISTERS == 32 ? 4 : 2;

// C [M × N] (+)= Σ_k A(m, k) B[k, :], A(m, k) = A[m·rs + k·ks], B rows bs apart, C rows cs apart; N a multiple of L.
template <typename T, bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs, int64_t ks, const T* B, int64_t bs, T* C, int64_t cs) {
  constexpr int64_t L = Wide<T>::L;
  for (int64_t n0 = 0; n0 < N; n0 += NV_MAX * L) {
    const int64_t nv = std::min<int64_t>(NV_MAX, (N - n0) / L);
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      const int64_t r = std::min<int64_t>(6, M - m0);
      const T* a = A + m0 * rs;
      T* c = C + m0 * cs + n0;
      switch (nv) {
        case 1: rows<T, 1, ACC>(r, a, rs, ks, K, B + n0, bs, c, cs); break;
        case 2: rows<T, 2, ACC>(r, a, rs, ks, K, B + n0, bs, c, cs); break;
        case 3: rows<T, 3, ACC>(r, a, rs, ks, K, B + n0, bs, c, cs); break;
        default: rows<T, NV_MAX, ACC>(r, a, rs, ks, K, B + n0, bs, c, cs); break;
      }
    }
  }
}

// A chunk buffer's distance between transform points ξ, one register more than a chunk's rows [CHUNK, C]: with 64 channels
// of floats those are 12 KB, a multiple of 4 KB, and the 16 points' rows written together would share the same L1 cache
// sets (the transforms ran 2–3 times slower).
template <typename T>
int64_t point_stride(int64_t C) {
  return CHUNK * C + Wide<T>::L;
}

// The layer's geometry: images [n, H, W, C] (channels last), tiles of 2×2 outputs, ⌈H/2⌉ × ⌈W/2⌉ per image.
struct Shape {
  int64_t n, H, W, cin, cout, th, tw;
  int64_t tiles() const { return n * th * tw; }
};

// U[ξ, a, b] = (G g Gᵀ)[ξ] for g = w[a, :, b] (3×3), w [A, 3, 3, B]: with w = weight [C_out, C_in, 3, 3] permuted to
// [C_in, 3, 3, C_out] this is the forward pass's U [ξ, C_in, C_out], permuted to [C_out, 3, 3, C_in] the backward's [ξ, C_out, C_in].
template <typename T>
void weight_transform(const T* w, int64_t A, int64_t B, T* U) {
  using W = typename Wide<T>::V;
  constexpr int64_t L = Wide<T>::L;
  const W half = W{} + T(0.5);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b0 = 0; b0 < B; b0 += L) {
      W g[3][3], t[4][3];
      for (int k = 0; k < 9; ++k) g[k / 3][k % 3] = load<W>(w + (a * 9 + k) * B + b0);
      for (int j = 0; j < 3; ++j) {  // G g: rows g0, (g0 + g1 + g2)/2, (g0 − g1 + g2)/2, g2
        t[0][j] = g[0][j];
        t[1][j] = half * (g[0][j] + g[1][j] + g[2][j]);
        t[2][j] = half * (g[0][j] - g[1][j] + g[2][j]);
        t[3][j] = g[2][j];
      }
      for (int i = 0; i < 4; ++i) {  // (G g) Gᵀ
        T* u = U + ((4 * i) * A + a) * B + b0;
        store(u, t[i][0]);
        store(u + A * B, half * (t[i][0] + t[i][1] + t[i][2]));
        store(u + 2 * A * B, half * (t[i][0] - t[i][1] + t[i][2]));
        store(u + 3 * A * B, t[i][2]);
      }
    }
}

// Gᵀ ∂U[ξ, ci, co] G for every channel pair, the adjoint of `weight_transform`, into dw [C_in, 3, 3, C_out].
template <typename T>
void weight_transform_adjoint(const T* dU, int64_t A, int64_t B, T* dw) {
  using W = typename Wide<T>::V;
  constexpr int64_t L = Wide<T>::L;
  const W half = W{} + T(0.5);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b0 = 0; b0 < B; b0 += L) {
      W u[4][4], t[4][3];
      for (int x = 0; x < XI; ++x) u[x / 4][x % 4] = load<W>(dU + (x * A + a) * B + b0);
      for (int i = 0; i < 4; ++i) {  // ∂U G
        t[i][0] = u[i][0] + half * (u[i][1] + u[i][2]);
        t[i][1] = half * (u[i][1] - u[i][2]);
        t[i][2] = half * (u[i][1] + u[i][2]) + u[i][3];
      }
      T* g = dw + a * 9 * B + b0;
      for (int j = 0; j < 3; ++j) {  // Gᵀ (∂U G)
        store(g + j * B, t[0][j] + half * (t[1][j] + t[2][j]));
        store(g + (3 + j) * B, half * (t[1][j] - t[2][j]));
        store(g + (6 + j) * B, half * (t[1][j] + t[2][j]) + t[3][j]);
      }
    }
}

// Where tile t sits: its image and the top-left corner of its 4×4 input patch (which starts one pixel before its outputs).
struct Tile {
  int64_t b, y, x;
};

// body(tile, its row in the chunk, pixel offset, first channel) for every tile t0 ≤ t < t1 and every register of C
// channels, where pixel(y, x) is the offset of the tile's pixel (y, x) (image coordinates) in a [n, H, W, C] tensor.
template <typename T, typename F>
inline void for_tiles(const Shape& s, int64_t C, int64_t t0, int64_t t1, F&& body) {
  const int64_t per = s.th * s.tw;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r = t % per;
    const Tile p{t / per, 2 * (r / s.tw) - 1, 2 * (r % s.tw) - 1};
    const auto pixel = [=](int64_t y, int64_t x) { return ((p.b * s.H + y) * s.W + x) * C; };
    for (int64_t c0 = 0; c0 < C; c0 += Wide<T>::L) body(p, t - t0, pixel, c0);
  }
}

// V[ξ, t − t0, :] = (Bᵀ d B)[ξ] for the 4×4 patches d of tiles t0 ≤ t < t1 of h (zero outside the image).
template <typename T>
void input_transform(const T* h, const Shape& s, int64_t t0, int64_t t1, T* V) {
  using W = typename Wide<T>::V;
  const int64_t C = s.cin, xs = point_stride<T>(C);
  for_tiles<T>(s, C, t0, t1, [=](const Tile& p, int64_t row, auto pixel, int64_t c0) {
    W d[4][4], e[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const bool in = p.y + i >= 0 && p.y + i < s.H && p.x + j >= 0 && p.x + j < s.W;
        d[i][j] = in ? load<W>(h + pixel(p.y + i, p.x + j) + c0) : W{};
      }
    for (int j = 0; j < 4; ++j) {  // Bᵀ d: rows d0 − d2, d1 + d2, d2 − d1, d1 − d3
      e[0][j] = d[0][j] - d[2][j];
      e[1][j] = d[1][j] + d[2][j];
      e[2][j] = d[2][j] - d[1][j];
      e[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {  // (Bᵀ d) B
      T* v = V + 4 * i * xs + row * C + c0;
      store(v, e[i][0] - e[i][2]);
      store(v + xs, e[i][1] + e[i][2]);
      store(v + 2 * xs, e[i][2] - e[i][1]);
      store(v + 3 * xs, e[i][1] - e[i][3]);
    }
  });
}

// dh[patch of t] += B ∂V[ξ, t − t0] Bᵀ, the adjoint of `input_transform`, dropping what falls outside the image.
template <typename T>
void input_transform_adjoint(const T* dV, const Shape& s, int64_t t0, int64_t t1, T* dh) {
  using W = typename Wide<T>::V;
  const int64_t C = s.cin, xs = point_stride<T>(C);
  for_tiles<T>(s, C, t0, t1, [=](const Tile& p, int64_t row, auto pixel, int64_t c0) {
    W v[4][4], e[4][4];
    for (int x = 0; x < XI; ++x) v[x / 4][x % 4] = load<W>(dV + x * xs + row * C + c0);
    for (int i = 0; i < 4; ++i) {  // ∂V B
      e[i][0] = v[i][0];
      e[i][1] = v[i][1] - v[i][2] + v[i][3];
      e[i][2] = v[i][1] + v[i][2] - v[i][0];
      e[i][3] = -v[i][3];
    }
    for (int j = 0; j < 4; ++j) {  // B (∂V B), added into the patch
      if (p.x + j < 0 || p.x + j >= s.W) continue;
      const W col[4] = {e[0][j], e[1][j] - e[2][j] + e[3][j], e[1][j] + e[2][j] - e[0][j], -e[3][j]};
      for (int i = 0; i < 4; ++i) {
        if (p.y + i < 0 || p.y + i >= s.H) continue;
        T* o = dh + pixel(p.y + i, p.x + j) + c0;
        store(o, load<W>(o) + col[i]);
      }
    }
  });
}

// z[outputs of t] = Aᵀ M[ξ, t − t0] A, the tiles' 2×2 outputs (those inside the image).
template <typename T>
void output_transform(const T* M, const Shape& s, int64_t t0, int64_t t1, T* z) {
  using W = typename Wide<T>::V;
  const int64_t C = s.cout, xs = point_stride<T>(C);
  for_tiles<T>(s, C, t0, t1, [=](const Tile& p, int64_t row, auto pixel, int64_t c0) {
    W m[4][4], r[2][4];
    for (int x = 0; x < XI; ++x) m[x / 4][x % 4] = load<W>(M + x * xs + row * C + c0);
    for (int j = 0; j < 4; ++j) {  // Aᵀ m: rows m0 + m1 + m2, m1 − m2 − m3
      r[0][j] = m[0][j] + m[1][j] + m[2][j];
      r[1][j] = m[1][j] - m[2][j] - m[3][j];
    }
    for (int i = 0; i < 2; ++i) {  // (Aᵀ m) A; outputs start inside the image, so only the far edges can fall outside
      if (p.y + 1 + i >= s.H) continue;
      const W out[2] = {r[i][0] + r[i][1] + r[i][2], r[i][1] - r[i][2] - r[i][3]};
      for (int j = 0; j < 2; ++j)
        if (p.x + 1 + j < s.W) store(z + pixel(p.y + 1 + i, p.x + 1 + j) + c0, out[j]);
    }
  });
}

// ∂M[ξ, t − t0] = A ∂Y Aᵀ for ∂Y the tile's 2×2 output gradients (zero outside the image), the adjoint of `output_transform`.
template <typename T>
void output_transform_adjoint(const T* dz, const Shape& s, int64_t t0, int64_t t1, T* dM) {
  using W = typename Wide<T>::V;
  const int64_t C = s.cout, xs = point_stride<T>(C);
  for_tiles<T>(s, C, t0, t1, [=](const Tile& p, int64_t row, auto pixel, int64_t c0) {
    W dy[2][2], e[2][4];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        dy[i][j] = (p.y + 1 + i < s.H && p.x + 1 + j < s.W) ? load<W>(dz + pixel(p.y + 1 + i, p.x + 1 + j) + c0) : W{};
    for (int i = 0; i < 2; ++i) {  // ∂Y Aᵀ
      e[i][0] = dy[i][0];
      e[i][1] = dy[i][0] + dy[i][1];
      e[i][2] = dy[i][0] - dy[i][1];
      e[i][3] = -dy[i][1];
    }
    for (int j = 0; j < 4; ++j) {  // A (∂Y Aᵀ)
      T* o = dM + j * xs + row * C + c0;
      store(o, e[0][j]);
      store(o + 4 * xs, e[0][j] + e[1][j]);
      store(o + 8 * xs, e[0][j] - e[1][j]);
      store(o + 12 * xs, -e[1][j]);
    }
  });
}

// This thread's scratch buffer number `i` of at least n elements, uninitialised: kept between calls, since a fresh
// allocation of these sizes is a fresh mapping, whose page faults and zeroing cost as much as a small layer's products.
template <typename T>
T* scratch(int i, int64_t n) {
  thread_local std::vector<T> buffers[5];
  if (int64_t(buffers[i].size()) < n) buffers[i].resize(n);
  return buffers[i].data();
}

template <typename T>
void forward_kernel(const T* h, const T* w_io, const Shape& s, T* z) {
  const int64_t vs = point_stride<T>(s.cin), ms = point_stride<T>(s.cout);
  T *U = scratch<T>(0, XI * s.cin * s.cout), *V = scratch<T>(1, XI * vs), *M = scratch<T>(2, XI * ms);
  weight_transform(w_io, s.cin, s.cout, U);
  for (int64_t t0 = 0; t0 < s.tiles(); t0 += CHUNK) {
    const int64_t t1 = std::min(t0 + CHUNK, s.tiles()), tc = t1 - t0;
    input_transform(h, s, t0, t1, V);
    for (int64_t x = 0; x < XI; ++x)  // M_ξ = V_ξ U_ξ: [tiles × C_in] · [C_in × C_out]
      gemm<T, false>(tc, s.cout, s.cin, V + x * vs, s.cin, 1, U + x * s.cin * s.cout, s.cout, M + x * ms, s.cout);
    output_transform(M, s, t0, t1, z);
  }
}

// w_oi: the weight permuted to [C_out, 3, 3, C_in]; dw_io: ∂weight permuted to [C_in, 3, 3, C_out].
template <typename T>
void backward_kernel(const T* dz, const T* h, const T* w_oi, const Shape& s, T* dh, T* dw_io) {
  const int64_t vs = point_stride<T>(s.cin), ms = point_stride<T>(s.cout);
  T *Ut = scratch<T>(0, XI * s.cin * s.cout), *V = scratch<T>(1, XI * vs), *dM = scratch<T>(2, XI * ms);
  T *dV = scratch<T>(3, XI * vs), *dU = scratch<T>(4, XI * s.cin * s.cout);
  std::fill(dU, dU + XI * s.cin * s.cout, T(0));
  weight_transform(w_oi, s.cout, s.cin, Ut);
  for (int64_t t0 = 0; t0 < s.tiles(); t0 += CHUNK) {
    const int64_t t1 = std::min(t0 + CHUNK, s.tiles()), tc = t1 - t0;
    input_transform(h, s, t0, t1, V);
    output_transform_adjoint(dz, s, t0, t1, dM);
    for (int64_t x = 0; x < XI; ++x) {
      const T* v = V + x * vs;
      const T* m = dM + x * ms;
      // ∂U_ξ += V_ξᵀ ∂M_ξ: [C_in × tiles] · [tiles × C_out]
      gemm<T, true>(s.cin, s.cout, tc, v, 1, s.cin, m, s.cout, dU + x * s.cin * s.cout, s.cout);
      // ∂V_ξ = ∂M_ξ U_ξᵀ: [tiles × C_out] · [C_out × C_in]
      gemm<T, false>(tc, s.cin, s.cout, m, s.cout, 1, Ut + x * s.cout * s.cin, s.cin, dV + x * vs, s.cin);
    }
    input_transform_adjoint(dV, s, t0, t1, dh);
  }
  weight_transform_adjoint(dU, s.cin, s.cout, dw_io);
}

// The kernels' shapes: a 3×3 weight [C_out, C_in, 3, 3] of the input's dtype, both channel counts whole registers.
bool supported(const at::Tensor& h, const at::Tensor& w) {
  const int64_t lanes = fedmeta::VECTOR_BYTES / int64_t(h.element_size());
  return h.dim() == 4 && h.device().is_cpu() && w.dim() == 4 && w.size(1) == h.size(1) && w.size(2) == 3 && w.size(3) == 3 &&
         w.scalar_type() == h.scalar_type() && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble) &&
         h.size(1) % lanes == 0 && w.size(0) % lanes == 0;
}

Shape shape_of(const at::Tensor& h, const at::Tensor& w) {
  const int64_t H = h.size(2), W = h.size(3);
  return {h.size(0), H, W, h.size(1), w.size(0), (H + 1) / 2, (W + 1) / 2};
}

// conv2d(h, weight, padding=1), channels last; other shapes go to torch's convolution.
at::Tensor conv3x3_forward(const at::Tensor& h_in, const at::Tensor& weight_in) {
  if (!supported(h_in, weight_in)) return at::conv2d(h_in, weight_in, {}, 1, 1);
  const at::Tensor h = h_in.contiguous(at::MemoryFormat::ChannelsLast), w_io = weight_in.permute({1, 2, 3, 0}).contiguous();
  const Shape s = shape_of(h, weight_in);
  at::Tensor z = at::empty({s.n, s.cout, s.H, s.W}, h.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "conv3x3_forward", [&] {
    forward_kernel<scalar_t>(h.data_ptr<scalar_t>(), w_io.data_ptr<scalar_t>(), s, z.data_ptr<scalar_t>());
  });
  return z;
}

// (∂h, ∂weight) of conv2d(h, weight, padding=1) given ∂z; other shapes go to torch's convolution backward.
std::tuple<at::Tensor, at::Tensor> conv3x3_backward(const at::Tensor& dz_in, const at::Tensor& h_in, const at::Tensor& weight_in) {
  if (!supported(h_in, weight_in)) {
    auto grads = at::convolution_backward(dz_in, h_in, weight_in, at::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, {true, true, false});
    return {std::get<0>(grads), std::get<1>(grads)};
  }
  const at::Tensor h = h_in.contiguous(at::MemoryFormat::ChannelsLast), w_oi = weight_in.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor dz = dz_in.contiguous(at::MemoryFormat::ChannelsLast);
  const Shape s = shape_of(h, weight_in);
  TORCH_CHECK(dz.dim() == 4 && dz.size(0) == s.n && dz.size(1) == s.cout && dz.size(2) == s.H && dz.size(3) == s.W &&
                  dz.scalar_type() == h.scalar_type(),
              "fedmeta conv3x3_backward: expected dz [n, C_out, H, W] of the input's dtype, got ", dz.sizes());
  at::Tensor dh = at::empty({s.n, s.cin, s.H, s.W}, h.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  at::Tensor dw_io = at::empty({s.cin, 3, 3, s.cout}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "conv3x3_backward", [&] {
    backward_kernel<scalar_t>(dz.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w_oi.data_ptr<scalar_t>(), s, dh.data_ptr<scalar_t>(),
                              dw_io.data_ptr<scalar_t>());
  });
  return {dh, dw_io.permute({3, 0, 1, 2}).contiguous()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fedmeta, m) {
  m.def("conv3x3_forward(Tensor h, Tensor weight) -> Tensor");
  m.def("conv3x3_backward(Tensor dz, Tensor h, Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fedmeta, CPU, m) {
  m.impl("conv3x3_forward", conv3x3_forward);
  m.impl("conv3x3_backward", conv3x3_backward);
}
