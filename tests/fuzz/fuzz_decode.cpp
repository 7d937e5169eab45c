// libFuzzer target: compression detection and the gzip/zstd source decoders (outside bytes from
// a .gz/.zst image or stdin). Input goes through a memfd so the real fd reader is exercised.
#include <sys/mman.h>
#include <unistd.h>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "codec/decode.hpp"
#include "util/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = memfd_create("fuzz", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (write(fd, data, size) != static_cast<ssize_t>(size)) {
    close(fd);
    return 0;
  }
  lseek(fd, 0, SEEK_SET);
  auto head = diskferry::Bytes(reinterpret_cast<const std::byte*>(data), size < 4 ? size : 4);
  auto c = diskferry::detect_compression(head);
  try {
    auto r =
        diskferry::make_decoder(c, diskferry::make_fd_reader(diskferry::UniqueFd(fd), "f"), "fuzz");
    std::vector<std::byte> buf(64 * 1024);
    size_t total = 0;
    // Bound the output: a tiny input may legitimately expand to gigabytes of zeros.
    while (total < (64u << 20)) {
      size_t n = r->read(buf);
      total += n;
      if (n < buf.size()) break;
    }
  } catch (const diskferry::Error&) {
  }
  return 0;
}
