// libFuzzer target: the VHDX reader (identifier, headers, region table, metadata, log scan, BAT)
// as a Source, and `diskferry verify`'s strict check of the same file. A VHDX is at least 4 MiB
// of mostly zeros, so the input describes a sparse file instead of being one:
//   u8 flags (bit 0: recompute the CRC-32C of both headers and region tables, so mutations get
//   past them), u16le file size in 256-byte units, then records of u16le offset (256-byte
//   units), u16le length and that many bytes, laid over a zero file in order.
// tests/fuzz/vhdx_seed.py turns real images into seeds. A pass reads at most kMaxChunks units.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "image/vhdx_source.hpp"
#include "pass_contract.hpp"
#include "util/crc32c.hpp"
#include "util/error.hpp"
#include "verify/vhdx_check.hpp"

namespace {

constexpr size_t kMaxChunks = 256;
constexpr uint32_t kUnit = 64 * 1024;
constexpr size_t kGrain = 256;
constexpr size_t kHeaderSection = 1 << 20;

struct Record {
  uint64_t offset;
  diskferry::Bytes data;
};

struct SparseFile {
  uint64_t size = 0;
  std::vector<std::byte> head;  // the first MiB, dense (CRCs are fixed up in it)
  std::vector<Record> rest;     // records beyond it

  size_t read(diskferry::MutableBytes buf, uint64_t off) const {
    if (off >= size) return 0;
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - off));
    std::memset(buf.data(), 0, n);
    if (off < head.size()) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(n, head.size() - off));
      std::memcpy(buf.data(), head.data() + off, k);
    }
    for (const Record& r : rest) {
      uint64_t s = std::max(off, r.offset), e = std::min(off + n, r.offset + r.data.size());
      if (s < e) std::memcpy(buf.data() + (s - off), r.data.data() + (s - r.offset), e - s);
    }
    return n;
  }
};

uint16_t le16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | p[1] << 8);
}

void fix_crc(std::vector<std::byte>& head, size_t at, size_t len) {
  std::memset(head.data() + at + 4, 0, 4);
  diskferry::put_le32(head.data() + at + 4, diskferry::crc32c({head.data() + at, len}));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  SparseFile f;
  const bool fix = data[0] & 1;
  f.size = uint64_t{le16(data + 1)} * kGrain;
  f.head.assign(static_cast<size_t>(std::min<uint64_t>(f.size, kHeaderSection)), std::byte{0});
  for (size_t i = 3; i + 4 <= size;) {
    uint64_t off = uint64_t{le16(data + i)} * kGrain;
    size_t len = std::min<size_t>(le16(data + i + 2), size - i - 4);
    diskferry::Bytes d(reinterpret_cast<const std::byte*>(data + i + 4), len);
    i += 4 + len;
    if (off < f.head.size()) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(len, f.head.size() - off));
      std::memcpy(f.head.data() + off, d.data(), k);
      if (k == len) continue;
      d = d.subspan(k);
      off += k;
    }
    f.rest.push_back({off, d});
  }
  if (fix && f.head.size() == kHeaderSection) {
    fix_crc(f.head, 64 * 1024, 4096);
    fix_crc(f.head, 128 * 1024, 4096);
    fix_crc(f.head, 192 * 1024, 64 * 1024);
    fix_crc(f.head, 256 * 1024, 64 * 1024);
  }
  diskferry::ReadAt read = [&f](diskferry::MutableBytes b, uint64_t off) { return f.read(b, off); };

  try {
    auto src = diskferry::open_vhdx_source_at(read, f.size, "fuzz.vhdx", {});
    diskferry::fuzz::read_pass(*src, kUnit, kMaxChunks);
  } catch (const diskferry::Error&) {
  }

  try {
    diskferry::check_vhdx(
        [&f](uint64_t off, size_t len) {
          std::vector<std::byte> d(len);
          d.resize(f.read(d, off));
          return d;
        },
        f.size, "fuzz.vhdx");
  } catch (const diskferry::StructureError&) {
  }
  return 0;
}
