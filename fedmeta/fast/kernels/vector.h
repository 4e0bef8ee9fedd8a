// What the kernels share: a vector of T as wide as one register of the ISA the build targets (64 bytes with
// AVX-512, else 32: AVX2) through GCC's vector extensions, the number of such registers, and unaligned loads and
// stores of a vector, or of a plain T, which lets a kernel take either. A vector wider than the registers would be
// split into several and spill the register-blocked kernels' accumulators.
#pragma once

#include <cstdint>
#include <cstring>

namespace fedmeta {

#if defined(__AVX512F__)
constexpr int64_t VECTOR_BYTES = 64;
constexpr int64_t REGISTERS = 32;
#else
constexpr int64_t VECTOR_BYTES = 32;
constexpr int64_t REGISTERS = 16;
#endif

template <typename T>
struct Wide {
  typedef T V __attribute__((vector_size(VECTOR_BYTES)));
  static constexpr int64_t L = VECTOR_BYTES / sizeof(T);  // lanes
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace fedmeta
