#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "codec/cluster.hpp"
#include "codec/decode.hpp"
#include "codec/encode.hpp"
#include "transport/sink.hpp"
#include "util/error.hpp"

using namespace diskferry;

namespace {

// Collects everything written, for checking what a stage produced.
class MemorySink final : public Sink {
 public:
  std::vector<std::byte> data;
  bool committed = false;
  void write(Bytes d) override { data.insert(data.end(), d.begin(), d.end()); }
  void commit() override { committed = true; }
  void abort() noexcept override {}
  uint64_t position() const override { return data.size(); }
};

std::vector<std::byte> sample(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(rng() % 7 == 0 ? rng() & 0xff : 'a' + i % 5);
  return v;
}

// Reads everything from a decoder over `blob` (given through a pipe-free temporary file).
std::vector<std::byte> decode_all(SourceCompression c, const std::vector<std::byte>& blob) {
  char path[] = "/tmp/df-unit-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, blob.data(), blob.size()) == static_cast<ssize_t>(blob.size()));
  lseek(fd, 0, SEEK_SET);
  unlink(path);
  auto r = make_decoder(c, make_fd_reader(UniqueFd(fd), "blob"), "blob");
  std::vector<std::byte> out, buf(100000);
  for (;;) {
    size_t n = r->read(buf);
    out.insert(out.end(), buf.begin(), buf.begin() + static_cast<long>(n));
    if (n < buf.size()) break;
  }
  return out;
}

std::vector<std::byte> compress_stream(const std::string& spec, const std::vector<std::byte>& in,
                                       int workers = 1) {
  auto mem = std::make_unique<MemorySink>();
  MemorySink* m = mem.get();
  auto s = make_compressing_sink(StreamCompression::parse(spec), std::move(mem), workers);
  s->write(in);
  s->commit();
  CHECK(m->committed);
  return m->data;
}

}  // namespace

TEST_CASE("compression is detected by magic bytes") {
  std::byte gz[] = {std::byte{0x1f}, std::byte{0x8b}, std::byte{8}, std::byte{0}};
  std::byte zs[] = {std::byte{0x28}, std::byte{0xb5}, std::byte{0x2f}, std::byte{0xfd}};
  std::byte raw[] = {std::byte{'Q'}, std::byte{'F'}, std::byte{'I'}, std::byte{0xfb}};
  CHECK(detect_compression(gz) == SourceCompression::Gzip);
  CHECK(detect_compression(zs) == SourceCompression::Zstd);
  CHECK(detect_compression(raw) == SourceCompression::None);
  CHECK(detect_compression(Bytes(gz, 1)) == SourceCompression::None);
}

TEST_CASE("stream codecs round-trip, including concatenated gzip members and zstd frames") {
  auto in = sample(3 << 20, 1);
  for (std::string spec : {"gzip", "gzip:1", "zstd", "zstd:19"}) {
    CAPTURE(spec);
    auto packed = compress_stream(spec, in);
    auto c = spec.rfind("gzip", 0) == 0 ? SourceCompression::Gzip : SourceCompression::Zstd;
    auto twice = packed;
    twice.insert(twice.end(), packed.begin(), packed.end());
    CHECK(decode_all(c, packed) == in);
    auto both = in;
    both.insert(both.end(), in.begin(), in.end());
    CHECK(decode_all(c, twice) == both);
  }
}

TEST_CASE("zstd output does not depend on the number of workers") {
  auto in = sample(9 << 20, 2);
  CHECK(compress_stream("zstd", in, 1) == compress_stream("zstd", in, 2));
  CHECK(compress_stream("zstd", in, 1) == compress_stream("zstd", in, 4));
}

TEST_CASE("truncated streams are errors, not short images") {
  auto in = sample(1 << 20, 3);
  for (std::string spec : {"gzip", "zstd"}) {
    CAPTURE(spec);
    auto packed = compress_stream(spec, in);
    packed.resize(packed.size() / 2);
    auto c = spec == "gzip" ? SourceCompression::Gzip : SourceCompression::Zstd;
    CHECK_THROWS_WITH_AS(decode_all(c, packed), doctest::Contains("truncated"), Error);
  }
}

TEST_CASE("StreamCompression::parse") {
  CHECK(StreamCompression::parse("none").codec == StreamCodec::None);
  CHECK(StreamCompression::parse("zstd").codec == StreamCodec::Zstd);
  CHECK(StreamCompression::parse("zstd:19").level == 19);
  CHECK(StreamCompression::parse("gzip:9").codec == StreamCodec::Gzip);
  for (const char* bad : {"zstd:0", "zstd:23", "gzip:10", "lz4", "none:3", "zstd:x"})
    CHECK_THROWS_AS(StreamCompression::parse(bad), Error);
}

TEST_CASE("cluster compression inflates back to exactly one cluster") {
  auto in = sample(65536, 4);
  std::vector<std::byte> out(65536), back(65536);
  {
    ClusterCompressor c(ClusterCodec::Deflate);
    size_t n = c.compress(in, out);
    REQUIRE(n > 0);
    REQUIRE(n < out.size());
    z_stream zs{};
    REQUIRE(inflateInit2(&zs, -12) == Z_OK);  // how QEMU reads it
    zs.next_in = reinterpret_cast<Bytef*>(out.data());
    zs.avail_in = static_cast<uInt>(n);
    zs.next_out = reinterpret_cast<Bytef*>(back.data());
    zs.avail_out = static_cast<uInt>(back.size());
    CHECK(inflate(&zs, Z_FINISH) == Z_STREAM_END);
    inflateEnd(&zs);
    CHECK(back == in);
  }
  {
    ClusterCompressor c(ClusterCodec::Zstd);
    size_t n = c.compress(in, out);
    REQUIRE(n > 0);
    CHECK(ZSTD_decompress(back.data(), back.size(), out.data(), n) == back.size());
    CHECK(back == in);
  }
  // Incompressible data is reported as such (stored plain).
  std::vector<std::byte> noise(65536);
  std::mt19937 rng(5);
  for (auto& b : noise) b = std::byte(rng() & 0xff);
  ClusterCompressor z(ClusterCodec::Zstd);
  CHECK(z.compress(noise, out) == 0);
}

TEST_CASE("queued sink passes bytes in order and reports the destination's errors") {
  auto mem = std::make_unique<MemorySink>();
  MemorySink* m = mem.get();
  auto q = make_queued_sink(std::move(mem), 2, 1000);
  auto in = sample(123457, 6);
  for (size_t at = 0; at < in.size(); at += 777)
    q->write(Bytes(in.data() + at, std::min<size_t>(777, in.size() - at)));
  q->write_zeros(10);
  q->commit();
  in.resize(in.size() + 10);
  CHECK(m->data == in);

  class Failing final : public Sink {
   public:
    void write(Bytes) override { throw Error(ErrorKind::Output, "dest: write failed: boom"); }
    void commit() override {}
    void abort() noexcept override {}
    uint64_t position() const override { return 0; }
  };
  auto f = make_queued_sink(std::make_unique<Failing>(), 2, 100);
  CHECK_THROWS_WITH_AS(
      {
        for (int i = 0; i < 100; ++i) f->write(Bytes(in.data(), 100));
        f->commit();
      },
      doctest::Contains("boom"), Error);
}
