// Endian packing and zero detection for on-disk structures.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace diskferry {

using Bytes = std::span<const std::byte>;
using MutableBytes = std::span<std::byte>;

inline void put_be16(std::byte* p, uint16_t v) {
  for (int i = 1; i >= 0; --i, v = static_cast<uint16_t>(v >> 8)) p[i] = std::byte(v & 0xff);
}
inline void put_be32(std::byte* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = std::byte(v & 0xff);
}
inline void put_be64(std::byte* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = std::byte(v & 0xff);
}
inline void put_le16(std::byte* p, uint16_t v) {
  for (int i = 0; i < 2; ++i, v = static_cast<uint16_t>(v >> 8)) p[i] = std::byte(v & 0xff);
}
inline void put_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i, v >>= 8) p[i] = std::byte(v & 0xff);
}
inline void put_le64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i, v >>= 8) p[i] = std::byte(v & 0xff);
}
inline uint32_t get_be32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | std::to_integer<uint32_t>(p[i]);
  return v;
}
inline uint64_t get_be64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}
inline uint32_t get_le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | std::to_integer<uint32_t>(p[i]);
  return v;
}
inline uint64_t get_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}

// True when every byte is zero. Word-at-a-time; the hot loop of allocation detection.
bool is_zero(Bytes data) noexcept;

inline uint64_t round_up(uint64_t v, uint64_t align) {
  return (v + align - 1) / align * align;
}
inline uint64_t div_round_up(uint64_t v, uint64_t d) {
  return (v + d - 1) / d;
}

}  // namespace diskferry
