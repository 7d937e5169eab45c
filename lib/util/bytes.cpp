#include "util/bytes.hpp"

namespace diskferry {

bool is_zero(Bytes data) noexcept {
  const std::byte* p = data.data();
  size_t n = data.size();
  // Check the first 16 bytes cheaply: most data clusters fail here.
  size_t head = n < 16 ? n : 16;
  for (size_t i = 0; i < head; ++i)
    if (p[i] != std::byte{0}) return false;
  if (n <= 16) return true;
  // memcmp against a shifted view of itself: the buffer is zero iff it equals itself shifted by
  // 16 bytes and the first 16 are zero. glibc's memcmp is vectorised.
  return std::memcmp(p, p + 16, n - 16) == 0;
}

}  // namespace diskferry
