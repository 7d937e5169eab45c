// RestartableStream: random reads over a stream that can only be read front to back, served
// from captured ranges or the stream, restarting it only when a read lies behind what it keeps.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "image/checked_source.hpp"
#include "image/stream_image.hpp"
#include "pipeline/checksum.hpp"
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

TEST_CASE("HashedReadAt: every byte is hashed once and in order, whatever the reads") {
  std::vector<std::byte> file(40u << 20);
  std::mt19937_64 rng(7);
  for (auto& b : file) b = static_cast<std::byte>(rng());
  uint64_t fetched = 0;
  ReadAt inner = [&](MutableBytes buf, uint64_t off) {
    size_t n = off >= file.size() ? 0 : std::min<size_t>(buf.size(), file.size() - off);
    std::memcpy(buf.data(), file.data() + off, n);
    fetched += n;
    return n;
  };
  const ExpectedSha256 good{"f", "f.sha256", sha256_hex(file)};
  constexpr uint64_t MiB = 1u << 20;
  // Reads of [offset, +length) in the order an image reader might make them.
  std::vector<std::pair<std::string, std::vector<std::pair<uint64_t, uint64_t>>>> orders;
  orders.push_back({"none", {}});
  std::vector<std::pair<uint64_t, uint64_t>> forward, planned, shuffled;
  forward.push_back({39 * MiB, 65536});  // a table at the end first
  for (uint64_t o = 65536; o + MiB <= 39 * MiB; o += MiB) forward.push_back({o, MiB});
  orders.push_back({"forward after a header and a far table", forward});
  for (uint64_t o = 0; o < 38 * MiB; o += 4 * MiB)  // later units' bytes before earlier ones'
    for (uint64_t k : {3, 1, 2, 0}) planned.push_back({o + k * MiB, MiB});
  orders.push_back({"planned ahead", planned});
  for (uint64_t o = 0; o < 40 * MiB; o += MiB) shuffled.push_back({o, MiB});
  std::shuffle(shuffled.begin(), shuffled.end(), rng);
  orders.push_back({"shuffled", shuffled});
  for (const auto& [label, reads] : orders) {
    CAPTURE(label);
    HashedReadAt h(inner, file.size(), good);
    fetched = 0;
    h.begin();
    uint64_t asked = 0;
    for (auto [off, len] : reads) {
      std::vector<std::byte> b(len);
      REQUIRE(h.read(b, off) == len);
      CHECK(std::memcmp(b.data(), file.data() + off, len) == 0);
      asked += len;
    }
    CHECK_NOTHROW(h.finish());
    CHECK(fetched <= asked + file.size());
    if (label == "none")
      CHECK(fetched == file.size());
    else if (label != "shuffled")
      CHECK(fetched <= asked + 2 * MiB);  // at most a header and tables more
  }
  HashedReadAt bad(inner, file.size(), {"f", "f.sha256", std::string(64, '0')});
  bad.begin();
  std::vector<std::byte> b(MiB);
  bad.read(b, 5 * MiB);
  CHECK_THROWS_AS(bad.finish(), ChecksumMismatch);
}
