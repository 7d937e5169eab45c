// RestartableStream: random reads over a stream that can only be read front to back, served
// from captured ranges or the stream, restarting it only when a read lies behind what it keeps.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "image/stream_image.hpp"
#include "util/error.hpp"

using namespace diskferry;

namespace {

class MemReader final : public ByteReader {
 public:
  explicit MemReader(const std::vector<std::byte>& d) : d_(d) {}
  size_t read(MutableBytes buf) override {
    size_t n = std::min(buf.size(), d_.size() - pos_);
    std::memcpy(buf.data(), d_.data() + pos_, n);
    pos_ += n;
    return n;
  }
  uint64_t consumed() const override { return pos_; }

 private:
  const std::vector<std::byte>& d_;
  size_t pos_ = 0;
};

std::vector<std::byte> pattern(size_t n) {
  std::vector<std::byte> d(n);
  for (size_t i = 0; i < n; ++i) d[i] = std::byte(static_cast<unsigned char>(i * 7 + i / 4096));
  return d;
}

bool reads_right(RestartableStream& s, const std::vector<std::byte>& d, uint64_t off, size_t n) {
  std::vector<std::byte> b(n);
  size_t got = s.read_at(off, b);
  size_t want = off >= d.size() ? 0 : std::min<size_t>(n, d.size() - off);
  return got == want && std::memcmp(b.data(), d.data() + off, got) == 0;
}

}  // namespace

TEST_CASE("restartable stream: forward reads, look-back, restarts and captures") {
  const auto data = pattern(40u << 20);
  int opens = 0;
  RestartableStream s("mem", [&] {
    ++opens;
    return std::make_unique<MemReader>(data);
  });
  s.set_lookback(2u << 20);
  CHECK(reads_right(s, data, 5u << 20, 100000));
  CHECK(reads_right(s, data, 5u << 20, 1000));  // in the look-back window: no restart
  CHECK(reads_right(s, data, 30u << 20, 3u << 20));
  CHECK(s.sweeps() == 1);
  CHECK(reads_right(s, data, 1000, 5000));  // far behind: starts over
  CHECK(s.sweeps() == 2);
  // Captures: those ahead first, then one restart for those behind; then served from memory.
  CHECK(reads_right(s, data, 28u << 20, 4096));
  CHECK(s.sweeps() == 2);
  s.capture({{20u << 20, 4096}, {100, 512}, {34u << 20, 65536}});
  CHECK(s.sweeps() == 3);
  CHECK(s.captured(100) != nullptr);
  CHECK(reads_right(s, data, 20u << 20, 4096));
  CHECK(reads_right(s, data, (34u << 20) + 10, 600));
  CHECK(s.sweeps() == 3);
  // Past the end: short, and the size is known once seen.
  CHECK(reads_right(s, data, data.size() - 10, 100));
  CHECK(s.size() == data.size());
  CHECK(reads_right(s, data, data.size() + 5, 100));
  s.drain();
  CHECK(opens == s.sweeps());
}

TEST_CASE("restartable stream: a stream that fails to decode fails the read") {
  struct Broken final : ByteReader {
    size_t read(MutableBytes) override { throw Error(ErrorKind::Input, "mem: corrupt"); }
    uint64_t consumed() const override { return 0; }
  };
  RestartableStream s("mem", [] { return std::make_unique<Broken>(); });
  std::vector<std::byte> b(10);
  CHECK_THROWS_WITH(s.read_at(0, b), "mem: corrupt");
}
