// libFuzzer target: `diskferry verify`'s qcow2 checker (header, L1/L2 and refcount tables, the
// streaming inflation of compressed clusters) over the input as a whole file. It must report
// StructureError, never crash or allocate without bound (its own limits: QEMU's L1 and refcount
// table maxima, 256 Mi clusters).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "verify/qcow2_check.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  diskferry::Bytes file(reinterpret_cast<const std::byte*>(data), size);
  try {
    diskferry::Qcow2Check q(file.first(std::min<size_t>(size, 1 << 20)), size, "fuzz.qcow2");
    q.check_tables([&](uint64_t off, size_t len) {
      if (off >= size) return std::vector<std::byte>{};
      auto n = static_cast<size_t>(std::min<uint64_t>(len, size - off));
      return std::vector<std::byte>(file.begin() + static_cast<std::ptrdiff_t>(off),
                                    file.begin() + static_cast<std::ptrdiff_t>(off + n));
    });
    // Fed in uneven pieces, as the network delivers it.
    for (size_t off = 0; off < size;) {
      size_t n = std::min<size_t>(size - off, 1 + (off * 7919) % 5000);
      q.feed(off, file.subspan(off, n));
      off += n;
    }
    q.finish();
  } catch (const diskferry::Error&) {
  }
  return 0;
}
