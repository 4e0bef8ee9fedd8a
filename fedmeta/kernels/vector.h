// What the kernels share: a 64-byte vector of T (one AVX-512 register, or two or four narrower ones, through GCC's
// vector extensions), and unaligned loads and stores of it, or of a plain T, which lets a kernel take either.
#pragma once

#include <cstdint>
#include <cstring>

namespace fedmeta {

template <typename T>
struct Wide {
  typedef T V __attribute__((vector_size(64)));
  static constexpr int64_t L = 64 / sizeof(T);  // lanes
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
