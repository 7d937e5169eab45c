#include "util/crc32c.hpp"

#include <array>

namespace diskferry {
namespace {

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr auto kTable = make_table();

}  // namespace

// Only headers and region tables (a few KiB per image) are checksummed, so a table is enough.
uint32_t crc32c(Bytes data, uint32_t crc) noexcept {
  crc = ~crc;
  for (std::byte b : data) crc = kTable[(crc ^ std::to_integer<uint32_t>(b)) & 0xff] ^ (crc >> 8);
  return ~crc;
}

}  // namespace diskferry
