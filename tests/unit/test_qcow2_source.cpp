// The qcow2 reader over small hand-built images: each kind of L2 entry, v2 and v3 headers, a
// raw backing file, and the refusals (each names the file and the cause).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>
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
