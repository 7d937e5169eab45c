// The VHDX reader over images made in memory by diskferry's own writer: units of every size
// against the disk's bytes (short last block, a unit larger than a block), header fallback and
// strict mode, and refusals naming the file.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "format/writer.hpp"
#include "image/vhdx_header.hpp"
#include "image/vhdx_source.hpp"
#include "util/crc32c.hpp"
#include "util/error.hpp"

using namespace diskferry;

namespace {

constexpr uint64_t kMiB = 1 << 20;

struct VecSink final : Sink {
  std::vector<std::byte>& out;
  explicit VecSink(std::vector<std::byte>& o) : out(o) {}
  void write(Bytes d) override { out.insert(out.end(), d.begin(), d.end()); }
  void commit() override {}
  void abort() noexcept override {}
  uint64_t position() const override { return out.size(); }
};

// A 5 MiB + 512 B disk with data in blocks 0, 2 and the short last one (5).
std::vector<std::byte> disk() {
  std::vector<std::byte> d(5 * kMiB + 512);
  std::mt19937 rng(7);
  for (uint64_t at : {uint64_t{100}, 2 * kMiB + 4096, 5 * kMiB + 10})
    for (size_t i = 0; i < 300; ++i) d[at + i] = std::byte(rng() | 1);
  return d;
}

std::vector<std::byte> vhdx_of(const std::vector<std::byte>& d) {
  WriterOptions o;
  o.format = ImageFormat::Vhdx;
  o.block_size = kMiB;
  auto w = make_writer(o);
  const uint32_t u = w->unit();
  for (size_t off = 0; off < d.size(); off += u)
    w->plan(off, Bytes(d).subspan(off, std::min<size_t>(u, d.size() - off)));
  w->end_plan(d.size());
  std::vector<std::byte> file;
  VecSink sink(file);
  w->begin(sink, true);
  for (size_t off = 0; off < d.size(); off += u)
    w->write(off, Bytes(d).subspan(off, std::min<size_t>(u, d.size() - off)));
  w->finish(d.size());
  return file;
}

ReadAt reader(const std::vector<std::byte>& f) {
  return [&f](MutableBytes b, uint64_t off) {
    size_t n = off >= f.size() ? 0 : std::min<size_t>(b.size(), f.size() - off);
    std::memcpy(b.data(), f.data() + off, n);
    return n;
  };
}

std::string error_of(const std::vector<std::byte>& f, bool strict = false) {
  try {
    read_vhdx(reader(f), f.size(), "t.vhdx", strict);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("vhdx source: every unit size gives the disk back, zero blocks never handed out") {
  const auto d = disk();
  const auto f = vhdx_of(d);
  auto src = open_vhdx_source_at(reader(f), f.size(), "t.vhdx", {});
  CHECK(*src->known_size() == d.size());
  for (uint32_t unit : {64u * 1024, 1u << 20, 2u << 20, 8u << 20}) {
    CAPTURE(unit);
    std::vector<std::byte> got(d.size()), buf(unit);
    auto pass = src->open_pass(unit);
    uint64_t last_end = 0;
    size_t chunks = 0;
    while (auto c = pass->next(buf)) {
      CHECK(c->offset % unit == 0);
      CHECK(c->offset >= last_end);
      std::memcpy(got.data() + c->offset, buf.data(), c->length);
      last_end = c->offset + c->length;
      ++chunks;
    }
    CHECK(got == d);
    // Blocks 0, 2 and 5 hold data: at most those units are read.
    if (unit == kMiB) CHECK(chunks == 3);
    if (unit == 64 * 1024) CHECK(chunks == 16 + 16 + 1);
  }
}

TEST_CASE("vhdx source: the header with the higher sequence number, the other when damaged") {
  auto f = vhdx_of(disk());
  CHECK(read_vhdx(reader(f), f.size(), "t.vhdx").header == 2);
  f[128 * 1024 + 200] ^= std::byte{1};
  VhdxImage img = read_vhdx(reader(f), f.size(), "t.vhdx");
  CHECK(img.header == 1);
  CHECK(img.present_blocks == 3);
  CHECK(error_of(f, true).find("t.vhdx: VHDX header 2 is damaged") == 0);
}

TEST_CASE("vhdx source: refusals name the file and the cause") {
  const auto good = vhdx_of(disk());
  VhdxImage img = read_vhdx(reader(good), good.size(), "t.vhdx");
  auto bat_entry = [&](std::vector<std::byte>& f, uint64_t i, uint64_t v) {
    put_le64(f.data() + img.bat.offset + 8 * i, v);
  };
  auto f = good;
  bat_entry(f, 2, (f.size() + kMiB) / kMiB * kMiB | kVhdxBlockFullyPresent);
  CHECK(error_of(f).find("t.vhdx: VHDX block 2 at") == 0);
  CHECK(error_of(f).find("beyond the end of the file") != std::string::npos);
  f = good;
  bat_entry(f, 2, img.block_offset(0) | kVhdxBlockFullyPresent);
  CHECK(error_of(f).find("overlaps block 0") != std::string::npos);
  f = good;
  bat_entry(f, 1, 4);
  CHECK(error_of(f) == "t.vhdx: VHDX block 1 has the invalid BAT state 4");
  f = good;
  f.resize(100 * 1024);
  CHECK(error_of(f).find("shorter than its header section") != std::string::npos);
  f = good;
  std::memcpy(f.data(), "vhdxfilX", 8);
  CHECK(error_of(f) == "t.vhdx: VHDX file identifier 'vhdxfile' missing");
  CHECK(parse_source_format("vhdx") == SourceFormat::Vhdx);
}
