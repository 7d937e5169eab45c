// The qcow2 reader over small hand-built images: each kind of L2 entry, v2 and v3 headers, a
// raw backing file, and the refusals (each names the file and the cause).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "image/qcow2_header.hpp"
#include "image/source.hpp"
#include "util/error.hpp"

using namespace diskferry;

namespace {

constexpr uint64_t kCopied = 1ULL << 63;
constexpr uint64_t kCompressedFlag = 1ULL << 62;
constexpr size_t kCs = 512;  // cluster_bits 9: the smallest cluster keeps the images tiny

struct Dir {
  std::filesystem::path path;
  Dir() {
    char tmpl[] = "/tmp/df-q2unit-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~Dir() { std::filesystem::remove_all(path); }
  std::string write(const std::string& name, const std::vector<std::byte>& data) const {
    std::string p = (path / name).string();
    std::ofstream(p, std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()),
               static_cast<std::streamsize>(data.size()));
    return p;
  }
};

// Raw deflate with QEMU's window, as `qemu-img convert -c` writes it.
std::vector<std::byte> deflate_raw(const std::vector<std::byte>& in) {
  z_stream zs{};
  REQUIRE(deflateInit2(&zs, 9, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) == Z_OK);
  std::vector<std::byte> out(in.size() + 64);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  REQUIRE(deflate(&zs, Z_FINISH) == Z_STREAM_END);
  out.resize(out.size() - zs.avail_out);
  deflateEnd(&zs);
  return out;
}

// A 4 KiB disk of 512-byte clusters: [0] data 0xab, [1] zero flag, [2] unallocated,
// [3] compressed 'x'. File: header, L1, L2, data cluster, compressed bytes.
struct Image {
  std::vector<std::byte> b = std::vector<std::byte>(4 * kCs);
  void be32(size_t off, uint32_t v) { put_be32(b.data() + off, v); }
  void be64(size_t off, uint64_t v) { put_be64(b.data() + off, v); }

  explicit Image(uint32_t version = 3) {
    be32(0, kQcow2Magic);
    be32(4, version);
    be32(20, 9);
    be64(24, 8 * kCs);
    be32(36, 1);
    be64(40, 1 * kCs);
    be64(48, 0);
    be32(56, 1);
    if (version == 3) {
      be32(96, 4);
      be32(100, 104);
    }
    be64(1 * kCs, 2 * kCs | kCopied);
    be64(2 * kCs + 0, 3 * kCs | kCopied);
    be64(2 * kCs + 8, 1);  // zero flag
    std::fill_n(b.begin() + 3 * kCs, kCs, std::byte{0xab});
    auto z = deflate_raw(std::vector<std::byte>(kCs, std::byte{'x'}));
    uint64_t at = b.size();
    b.insert(b.end(), z.begin(), z.end());
    uint64_t sectors = ((at + z.size() - 1) >> 9) - (at >> 9);  // additional sectors
    be64(2 * kCs + 24, kCompressedFlag | (sectors << 61) | at);
  }
};

std::vector<std::byte> read_all(Source& s, uint32_t unit, size_t* chunks = nullptr) {
  auto pass = s.open_pass(unit);
  std::vector<std::byte> disk(static_cast<size_t>(*s.known_size()));
  std::vector<std::byte> buf(unit);
  size_t n = 0;
  while (auto c = pass->next(buf)) {
    std::copy_n(buf.begin(), c->length, disk.begin() + static_cast<ptrdiff_t>(c->offset));
    ++n;
  }
  if (chunks) *chunks = n;
  return disk;
}

std::vector<std::byte> expected_disk() {
  std::vector<std::byte> d(8 * kCs);
  std::fill_n(d.begin(), kCs, std::byte{0xab});
  std::fill_n(d.begin() + 3 * kCs, kCs, std::byte{'x'});
  return d;
}

}  // namespace

TEST_CASE("qcow2 source: data, zero, unallocated and compressed clusters, v2 and v3") {
  Dir dir;
  for (uint32_t version : {2u, 3u}) {
    CAPTURE(version);
    auto path = dir.write("v.qcow2", Image(version).b);
    auto src = open_source(path);
    REQUIRE(src->known_size() == 8 * kCs);
    size_t chunks = 0;
    CHECK(read_all(*src, 512, &chunks) == expected_disk());
    CHECK(chunks == 2);  // the zero and unallocated clusters are never handed out
    CHECK(read_all(*src, 1 << 20) == expected_disk());  // a unit larger than the disk
  }
}

TEST_CASE("qcow2 source: a raw backing file named relative to the image") {
  Dir dir;
  std::vector<std::byte> base(3 * kCs, std::byte{0x5a});
  dir.write("base.raw", base);
  Image img;
  const std::string name = "base.raw";
  img.be64(8, 400);  // the backing name, inside the first cluster
  img.be32(16, static_cast<uint32_t>(name.size()));
  std::memcpy(img.b.data() + 400, name.data(), name.size());
  // Backing format extension ("raw") right after the header.
  img.be32(104, 0xE2792ACA);
  img.be32(108, 3);
  std::memcpy(img.b.data() + 112, "raw", 3);
  // Opened by a path with a directory part: the name resolves against it, not the cwd.
  auto path = dir.write("top.qcow2", img.b);
  auto src = open_source(path);
  auto disk = read_all(*src, 512);
  auto want = expected_disk();
  std::fill_n(want.begin() + 2 * kCs, kCs, std::byte{0x5a});  // unallocated → backing
  CHECK(disk == want);
}

TEST_CASE("qcow2 source: a dirty image is read with a warning") {
  Dir dir;
  Image img;
  img.be64(72, 1);
  SourceOptions o;
  std::string warned;
  o.on_warning = [&](const std::string& m) { warned = m; };
  auto src = open_source(dir.write("d.qcow2", img.b), o);
  CHECK(warned.find("dirty") != std::string::npos);
  CHECK(read_all(*src, 512) == expected_disk());
}

TEST_CASE("qcow2 source: refusals name the file and the cause") {
  Dir dir;
  auto refuses = [&](Image img, const std::string& why, ErrorKind kind = ErrorKind::Input) {
    CAPTURE(why);
    auto path = dir.write("bad.qcow2", img.b);
    try {
      auto src = open_source(path);
      read_all(*src, 512);
      FAIL("no error");
    } catch (const Error& e) {
      std::string m = e.what();
      CHECK(m.find(path) != std::string::npos);
      CHECK(m.find(why) != std::string::npos);
      CHECK(e.kind() == kind);
    }
  };
  Image i;
  i.be32(32, 2);
  refuses(i, "encrypted (LUKS)", ErrorKind::Format);
  i = Image();
  i.be64(72, 1u << 9);
  refuses(i, "unknown incompatible features: bit 9", ErrorKind::Format);
  i = Image();
  i.be64(72, 1u << 4);
  refuses(i, "extended L2", ErrorKind::Format);
  i = Image();
  i.be64(72, 1u << 2);
  refuses(i, "external data file", ErrorKind::Format);
  i = Image();
  i.be32(4, 4);
  refuses(i, "version 4", ErrorKind::Format);
  i = Image();
  i.be32(20, 22);
  refuses(i, "cluster size");
  i = Image();
  i.be64(40, 1ULL << 40);
  refuses(i, "L1 table at 0x10000000000 lies beyond the end of the file");
  i = Image();
  i.be32(36, 0);
  refuses(i, "L1 table too small");
  i = Image();
  i.be64(24, UINT64_MAX);  // L1 size needed overflows nothing: it is simply too large
  refuses(i, "L1 table too small");
  i = Image();
  i.be64(1 * kCs, 1ULL << 30);
  refuses(i, "L2 table at 0x40000000 lies beyond the end of the file");
  i = Image();
  i.be64(2 * kCs, 3 * kCs + 8);  // reserved bits are ignored, as QEMU ignores them
  CHECK(read_all(*open_source(dir.write("r.qcow2", i.b)), 512) == expected_disk());
  i = Image();
  i.be64(2 * kCs, 1ULL << 20);
  refuses(i, "data for guest offset 0x0");
  i = Image();
  i.b.resize(4 * kCs + 2);  // the compressed stream loses its end
  refuses(i, "compressed cluster for guest offset 0x600: deflate data inflates to less");
  i = Image();
  i.b[4 * kCs] = std::byte{0x07};  // final block of the reserved type 3
  refuses(i, "compressed cluster for guest offset 0x600: deflate data is corrupt");
  i = Image();
  i.b.resize(4 * kCs);
  refuses(i, "compressed data for guest offset 0x600 (at 0x800) lies beyond the end");
  i = Image();
  i.be32(100, 112);
  i.b[104] = std::byte{1};  // zstd without its incompatible bit
  refuses(i, "disagree");
  i = Image();
  i.b.resize(60);
  refuses(i, "truncated");
  i = Image();
  i.be64(8, 500);  // backing name running off the first cluster
  i.be32(16, 100);
  refuses(i, "backing file name too long");
}

TEST_CASE("qcow2 source: a backing chain that loops is refused") {
  Dir dir;
  Image img;
  const std::string name = "self.qcow2";
  img.be64(8, 400);
  img.be32(16, static_cast<uint32_t>(name.size()));
  std::memcpy(img.b.data() + 400, name.data(), name.size());
  auto path = dir.write(name, img.b);
  CHECK_THROWS_WITH_AS(open_source(path), doctest::Contains("loops"), Error);
}

TEST_CASE("qcow2 header: the source format can be forced") {
  CHECK(parse_source_format("raw") == SourceFormat::Raw);
  CHECK(parse_source_format("qcow2") == SourceFormat::Qcow2);
  CHECK_THROWS_AS(parse_source_format("vmdk"), Error);
  Dir dir;
  auto path = dir.write("plain.img", std::vector<std::byte>(1024, std::byte{1}));
  SourceOptions o;
  o.format = SourceFormat::Qcow2;
  CHECK_THROWS_WITH_AS(open_source(path, o), doctest::Contains("not a qcow2 image"), Error);
  o.format = SourceFormat::Raw;
  Image img;
  auto q = dir.write("q.qcow2", img.b);
  CHECK(open_source(q, o)->known_size() == img.b.size());
}

namespace {

// A larger image for the parallel inflation: n clusters of 2^bits bytes, each (from a seed) a
// data, zero, unallocated or compressed cluster (deflate or zstd), optionally over a backing
// file; `disk` is what it reads as (given the backing file's disk).
struct MixedImage {
  std::vector<std::byte> b, disk;
  std::vector<size_t> compressed_at;  // file offsets of the compressed clusters, in guest order

  MixedImage(uint32_t bits, size_t n, bool zstd, uint32_t seed,
             const std::vector<std::byte>* backing = nullptr,
             const std::string& backing_name = "") {
    const size_t cs = size_t{1} << bits, per_l2 = cs / 8, tables = (n + per_l2 - 1) / per_l2;
    b.resize((2 + tables) * cs);
    disk.assign(n * cs, std::byte{0});
    put_be32(b.data() + 0, kQcow2Magic);
    put_be32(b.data() + 4, 3);
    put_be32(b.data() + 20, bits);
    put_be64(b.data() + 24, n * cs);
    put_be32(b.data() + 36, static_cast<uint32_t>(tables));
    put_be64(b.data() + 40, cs);
    put_be32(b.data() + 56, 1);
    if (zstd) put_be64(b.data() + 72, 1u << 3);  // compression type
    put_be32(b.data() + 96, 4);
    put_be32(b.data() + 100, 112);
    b[104] = std::byte{zstd ? uint8_t{1} : uint8_t{0}};
    if (!backing_name.empty()) {
      put_be64(b.data() + 8, 400);
      put_be32(b.data() + 16, static_cast<uint32_t>(backing_name.size()));
      std::memcpy(b.data() + 400, backing_name.data(), backing_name.size());
    }
    for (size_t t = 0; t < tables; ++t) put_be64(b.data() + cs + 8 * t, (2 + t) * cs | kCopied);
    uint32_t r = seed;
    auto rnd = [&] { return r = r * 1103515245u + 12345u, r >> 16; };
    for (size_t k = 0; k < n; ++k) {
      const size_t l2 = (2 + k / per_l2) * cs + 8 * (k % per_l2);  // b grows: an offset
      std::vector<std::byte> content(cs);
      // Compressible but distinct: the cluster number, then a pattern.
      for (size_t j = 0; j < cs; ++j)
        content[j] = std::byte(static_cast<uint8_t>(j < 8 ? k >> (8 * j) : (k * 7 + j / 64)));
      switch (rnd() % 5) {
        case 0: {  // data
          b.resize(round_up(b.size(), cs));
          put_be64(b.data() + l2, b.size() | kCopied);
          b.insert(b.end(), content.begin(), content.end());
          break;
        }
        case 1:  // zero flag
          put_be64(b.data() + l2, 1);
          continue;
        case 2:  // unallocated: the backing file's bytes
          if (backing) std::copy_n(backing->begin() + k * cs, cs, disk.begin() + k * cs);
          continue;
        default: {  // compressed
          std::vector<std::byte> z;
          if (zstd) {
            z.resize(ZSTD_compressBound(cs));
            z.resize(ZSTD_compress(z.data(), z.size(), content.data(), cs, 3));
          } else {
            z = deflate_raw(content);
          }
          if (rnd() % 2) b.resize(b.size() + 1 + rnd() % 700);  // not sector-aligned
          const uint64_t at = b.size();
          b.insert(b.end(), z.begin(), z.end());
          const uint64_t sectors = ((at + z.size() - 1) >> 9) - (at >> 9);
          put_be64(b.data() + l2, kCompressedFlag | (sectors << (62 - (bits - 8))) | at);
          compressed_at.push_back(at);
          break;
        }
      }
      std::copy(content.begin(), content.end(), disk.begin() + k * cs);
    }
    b.resize(round_up(b.size(), 512));
  }
};

struct Read {
  std::vector<std::pair<uint64_t, std::vector<std::byte>>> chunks;
  std::string error;
};

// Every chunk a pass hands out, and the error it ends with (if any).
Read read_chunks(const std::string& path, int threads, uint32_t unit) {
  SourceOptions o;
  o.threads = threads;
  Read r;
  try {
    auto src = open_source(path, o);
    auto pass = src->open_pass(unit);
    std::vector<std::byte> buf(unit);
    while (auto c = pass->next(buf))
      r.chunks.emplace_back(c->offset,
                            std::vector<std::byte>(buf.begin(), buf.begin() + c->length));
  } catch (const Error& e) {
    r.error = e.what();
  }
  return r;
}

std::vector<std::byte> assemble(const Read& r, size_t size) {
  std::vector<std::byte> disk(size);
  for (auto& [off, bytes] : r.chunks) std::copy(bytes.begin(), bytes.end(), disk.begin() + off);
  return disk;
}

}  // namespace

TEST_CASE("qcow2 source: compressed clusters inflate the same with 1, 2 and 4 threads") {
  Dir dir;
  // base: zstd, 8 KiB clusters (larger than the 4 KiB unit below, so one inflated cluster
  // serves two units); top: deflate, 4 KiB clusters, over it.
  MixedImage base(13, 384, true, 1);
  dir.write("base.qcow2", base.b);
  MixedImage top(12, 768, false, 2, &base.disk, "base.qcow2");
  const auto path = dir.write("top.qcow2", top.b);
  REQUIRE(top.compressed_at.size() > 100);
  for (uint32_t unit : {4096u, 65536u, 1u << 20}) {
    CAPTURE(unit);
    const Read one = read_chunks(path, 1, unit);
    REQUIRE(one.error == "");
    CHECK(assemble(one, top.disk.size()) == top.disk);
    for (int threads : {2, 4}) {
      CAPTURE(threads);
      const Read r = read_chunks(path, threads, unit);
      CHECK(r.error == "");
      CHECK(r.chunks == one.chunks);  // the same units, in the same order, with the same bytes
    }
  }
}

TEST_CASE("qcow2 source: a corrupt compressed cluster gives the same error with any thread count") {
  Dir dir;
  for (bool zstd : {false, true}) {
    CAPTURE(zstd);
    MixedImage img(12, 1024, zstd, 3);
    REQUIRE(img.compressed_at.size() > 100);
    // One in the middle: a reserved deflate block type, or a broken zstd magic.
    const size_t at = img.compressed_at[img.compressed_at.size() / 2];
    img.b[at] = zstd ? std::byte{0} : std::byte{0x07};
    const auto path = dir.write(zstd ? "bad-zstd.qcow2" : "bad-deflate.qcow2", img.b);
    const Read one = read_chunks(path, 1, 65536);
    CHECK(one.error.find(path) != std::string::npos);
    CHECK(one.error.find(zstd ? "zstd data is corrupt" : "deflate data is corrupt") !=
          std::string::npos);
    CHECK(one.error.find("compressed cluster for guest offset 0x") != std::string::npos);
    for (int threads : {2, 4, 16}) {
      CAPTURE(threads);
      const Read r = read_chunks(path, threads, 65536);
      CHECK(r.error == one.error);
      CHECK(r.chunks == one.chunks);  // everything before the bad unit, nothing after
    }
  }
}

TEST_CASE("qcow2 source: a pass given up halfway with clusters in flight ends cleanly") {
  Dir dir;
  MixedImage img(12, 1024, false, 4);
  const auto path = dir.write("m.qcow2", img.b);
  SourceOptions o;
  o.threads = 4;
  auto src = open_source(path, o);
  for (int stop_after : {0, 1, 5}) {
    auto pass = src->open_pass(4096);
    std::vector<std::byte> buf(4096);
    for (int k = 0; k < stop_after; ++k) REQUIRE(pass->next(buf));
  }  // each pass destroyed with its window of units still being inflated
  CHECK(assemble(read_chunks(path, 4, 4096), img.disk.size()) == img.disk);
}
