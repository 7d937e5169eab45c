#include "image/vhdx_header.hpp"

#include <fmt/format.h>
#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <string_view>

#include "util/crc32c.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kHeaderSection = kMiB;
constexpr size_t kHeaderSlot[2] = {64 * 1024, 128 * 1024};
constexpr size_t kRegionSlot[2] = {192 * 1024, 256 * 1024};
constexpr size_t kHeaderSize = 4096, kRegionTableSize = 64 * 1024;
constexpr size_t kHeadBytes = 320 * 1024;    // identifier, headers and region tables
constexpr uint32_t kMaxTableEntries = 2047;  // region and metadata tables (MS-VHDX)
constexpr size_t kMetadataTableSize = 64 * 1024;
constexpr uint64_t kMaxVirtualSize = uint64_t{64} << 40;  // 64 TiB, MS-VHDX's limit
constexpr uint64_t kMinBlock = kMiB, kMaxBlock = 256 * kMiB;

// A GUID in its on-disk (Microsoft mixed-endian) byte order, made from the canonical text.
using Guid = std::array<uint8_t, 16>;
constexpr uint8_t hex_digit(char c) {
  return static_cast<uint8_t>(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
}
constexpr Guid guid(std::string_view t) {
  // Text byte positions of each binary byte: the first three groups are little-endian.
  constexpr size_t at[16] = {6, 4, 2, 0, 11, 9, 16, 14, 19, 21, 24, 26, 28, 30, 32, 34};
  Guid g{};
  for (size_t i = 0; i < 16; ++i)
    g[i] = static_cast<uint8_t>(hex_digit(t[at[i]]) << 4 | hex_digit(t[at[i] + 1]));
  return g;
}
constexpr Guid kBatRegion = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
constexpr Guid kMetadataRegion = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
constexpr Guid kFileParameters = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
constexpr Guid kVirtualDiskSize = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
constexpr Guid kVirtualDiskId = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
constexpr Guid kLogicalSectorSize = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
constexpr Guid kPhysicalSectorSize = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
constexpr Guid kParentLocator = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

Guid guid_at(const std::byte* p) {
  Guid g;
  std::memcpy(g.data(), p, 16);
  return g;
}
std::string guid_text(const Guid& g) {
  return fmt::format(
      "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-"
      "{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
      g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14],
      g[15]);
}
uint16_t get_le16(const std::byte* p) {
  return static_cast<uint16_t>(std::to_integer<unsigned>(p[0]) | std::to_integer<unsigned>(p[1])
                                                                     << 8);
}
bool is_pow2(uint64_t v) {
  return v && !(v & (v - 1));
}

// CRC-32C of a structure whose checksum field (at 4) counts as zero.
bool crc_ok(Bytes s) {
  uint32_t stored = get_le32(s.data() + 4);
  const std::byte zero[4] = {};
  uint32_t crc = crc32c(s.first(4));
  crc = crc32c(Bytes(zero, 4), crc);
  crc = crc32c(s.subspan(8), crc);
  return crc == stored;
}

struct Header {
  uint64_t sequence;
  Guid log_guid;
  uint16_t log_version, version;
  uint32_t log_length;
  uint64_t log_offset;
};

struct Parser {
  const ReadAt& read;
  uint64_t file_size;
  const std::string& name;
  bool strict;
  VhdxImage img;

  [[noreturn]] void bad(const std::string& why) const {
    throw Error(ErrorKind::Input, fmt::format("{}: VHDX {}", name, why));
  }
  [[noreturn]] void unsupported(const std::string& why) const {
    throw Error(ErrorKind::Format, fmt::format("{}: VHDX {}", name, why));
  }

  std::vector<std::byte> read_exact(uint64_t offset, uint64_t length, const char* what) {
    if (offset > file_size || length > file_size - offset)
      bad(
          fmt::format("{} at {:#x} ({} bytes) lies beyond the end of the file ({} bytes): "
                      "truncated or corrupt",
                      what, offset, length, file_size));
    std::vector<std::byte> b(static_cast<size_t>(length));
    if (read(b, offset) != b.size())
      bad(fmt::format("{} at {:#x}: the file ended early while reading it (truncated)", what,
                      offset));
    return b;
  }

  std::optional<Header> parse_header(Bytes h) {
    if (std::memcmp(h.data(), "head", 4) != 0 || !crc_ok(h)) return std::nullopt;
    Header r{};
    r.sequence = get_le64(h.data() + 8);
    r.log_guid = guid_at(h.data() + 48);
    r.log_version = get_le16(h.data() + 64);
    r.version = get_le16(h.data() + 66);
    r.log_length = get_le32(h.data() + 68);
    r.log_offset = get_le64(h.data() + 72);
    if (r.version != 1) return std::nullopt;  // MS-VHDX: a header of another version is invalid
    return r;
  }

  Header pick_header(Bytes head) {
    std::optional<Header> h[2];
    for (int i = 0; i < 2; ++i) {
      h[i] = parse_header(head.subspan(kHeaderSlot[i], kHeaderSize));
      if (!h[i] && strict)
        bad(fmt::format("header {} is damaged (bad signature, CRC-32C or version)", i + 1));
    }
    if (!h[0] && !h[1])
      bad("has no valid header (both have a bad signature, CRC-32C or version): damaged");
    int use = !h[0] ? 1 : !h[1] ? 0 : (h[1]->sequence > h[0]->sequence ? 1 : 0);
    img.header = use + 1;
    img.sequence = h[use]->sequence;
    return *h[use];
  }

  // The region table in use: the first if intact, else the second.
  Bytes pick_region_table(Bytes head) {
    auto valid = [](Bytes t) {
      return std::memcmp(t.data(), "regi", 4) == 0 && crc_ok(t) &&
             get_le32(t.data() + 8) <= kMaxTableEntries;
    };
    Bytes t[2] = {head.subspan(kRegionSlot[0], kRegionTableSize),
                  head.subspan(kRegionSlot[1], kRegionTableSize)};
    bool ok[2] = {valid(t[0]), valid(t[1])};
    if (strict) {
      for (int i = 0; i < 2; ++i)
        if (!ok[i])
          bad(fmt::format("region table {} is damaged (bad signature, CRC-32C or entry count)",
                          i + 1));
      if (std::memcmp(t[0].data(), t[1].data(), kRegionTableSize) != 0)
        bad("region tables 1 and 2 differ");
    }
    if (!ok[0] && !ok[1])
      bad("has no valid region table (bad signature, CRC-32C or entry count): damaged");
    return ok[0] ? t[0] : t[1];
  }

  void check_region(const VhdxRegion& r, const char* what) {
    if (r.offset % kMiB || r.offset < kHeaderSection || r.length % kMiB || r.length == 0)
      bad(
          fmt::format("{} region at {:#x} ({} bytes) is not 1 MiB aligned after the header "
                      "section",
                      what, r.offset, r.length));
    if (r.offset > file_size || r.length > file_size - r.offset)
      bad(
          fmt::format("{} region at {:#x} ({} bytes) lies beyond the end of the file ({} "
                      "bytes): truncated",
                      what, r.offset, r.length, file_size));
  }

  void parse_regions(Bytes table) {
    const uint32_t n = get_le32(table.data() + 8);
    bool have_bat = false, have_meta = false;
    for (uint32_t i = 0; i < n; ++i) {
      const std::byte* e = table.data() + 16 + 32 * size_t{i};
      Guid id = guid_at(e);
      VhdxRegion r{get_le64(e + 16), get_le32(e + 24)};
      bool required = get_le32(e + 28) & 1;
      if (id == kBatRegion || id == kMetadataRegion) {
        bool& seen = id == kBatRegion ? have_bat : have_meta;
        if (seen) bad(fmt::format("region table lists the {} twice", region_name(id)));
        seen = true;
        check_region(r, region_name(id));
        (id == kBatRegion ? img.bat : img.metadata) = r;
      } else if (required) {
        unsupported(
            fmt::format("has a required region diskferry does not know ({})", guid_text(id)));
      }
    }
    if (!have_bat) bad("region table has no BAT region");
    if (!have_meta) bad("region table has no metadata region");
    if (overlap(img.bat, img.metadata)) bad("BAT and metadata regions overlap");
    if (img.log.length && (overlap(img.log, img.bat) || overlap(img.log, img.metadata)))
      bad("the log overlaps the BAT or metadata region");
  }
  static const char* region_name(const Guid& id) { return id == kBatRegion ? "BAT" : "metadata"; }
  static bool overlap(const VhdxRegion& a, const VhdxRegion& b) {
    return a.offset < b.end() && b.offset < a.end();
  }

  void check_header_log(const Header& h) {
    if (h.log_version != 0) unsupported(fmt::format("log version {} (expected 0)", h.log_version));
    img.log = {h.log_offset, h.log_length};
    if (h.log_length % kMiB || h.log_offset % kMiB || h.log_offset < kHeaderSection ||
        h.log_offset > kMaxVirtualSize)
      bad(fmt::format("log at {:#x} ({} bytes) is not 1 MiB aligned after the header section",
                      h.log_offset, h.log_length));
    if (strict && h.log_length && h.log_offset + h.log_length > file_size)
      bad(
          fmt::format("log at {:#x} ({} bytes) lies beyond the end of the file ({} bytes): "
                      "truncated",
                      h.log_offset, h.log_length, file_size));
  }

  // A set LogGuid with log entries carrying it: metadata updates that were never applied. What
  // the file says without them may be stale, so it is not read (QEMU replays them on a
  // read-write open).
  void check_log(const Header& h) {
    if (h.log_guid == Guid{} || h.log_length == 0) return;
    for (uint64_t at = 0; at < h.log_length; at += kMiB) {
      auto chunk =
          read_exact(h.log_offset + at, std::min<uint64_t>(kMiB, h.log_length - at), "the log");
      for (size_t s = 0; s + 64 <= chunk.size(); s += 4096)
        if (std::memcmp(chunk.data() + s, "loge", 4) == 0 &&
            guid_at(chunk.data() + s + 32) == h.log_guid)
          unsupported(
              "image needs log replay (it was not closed cleanly and its log holds updates "
              "that were never applied): open it once in Hyper-V or run `qemu-img check -r all` "
              "on it, then try again");
    }
  }

  void parse_metadata() {
    auto t = read_exact(img.metadata.offset, kMetadataTableSize, "the metadata table");
    if (std::memcmp(t.data(), "metadata", 8) != 0) bad("metadata table has no signature");
    const uint16_t n = get_le16(t.data() + 10);
    if (n > kMaxTableEntries) bad(fmt::format("metadata table has {} entries (at most 2047)", n));
    struct Item {
      const Guid* id;
      uint32_t min_length;
      std::optional<std::vector<std::byte>> value;
    };
    Item items[] = {{&kFileParameters, 8, {}},
                    {&kVirtualDiskSize, 8, {}},
                    {&kVirtualDiskId, 16, {}},
                    {&kLogicalSectorSize, 4, {}},
                    {&kPhysicalSectorSize, 4, {}}};
    std::optional<Guid> unknown_required;
    bool parent_locator = false;
    for (uint16_t i = 0; i < n; ++i) {
      const std::byte* e = t.data() + 32 + 32 * size_t{i};
      Guid id = guid_at(e);
      uint32_t off = get_le32(e + 16), len = get_le32(e + 20), flags = get_le32(e + 24);
      bool user = flags & 1, required = flags & 4;
      if (len && (off < kMetadataTableSize || off > img.metadata.length ||
                  len > img.metadata.length - off))
        bad(fmt::format("metadata item {} at {:#x} ({} bytes) lies outside its region",
                        guid_text(id), off, len));
      if (user) continue;  // user items never change how the disk reads
      if (id == kParentLocator) parent_locator = true;
      auto it = std::find_if(std::begin(items), std::end(items),
                             [&](const Item& x) { return *x.id == id; });
      if (it == std::end(items)) {
        if (required && !unknown_required) unknown_required = id;
        continue;
      }
      if (it->value) bad(fmt::format("metadata item {} appears twice", guid_text(id)));
      if (len < it->min_length)
        bad(fmt::format("metadata item {} is {} bytes (expected {})", guid_text(id), len,
                        it->min_length));
      it->value = read_exact(img.metadata.offset + off, it->min_length, "a metadata item");
    }
    for (const Item& x : items)
      if (!x.value) bad(fmt::format("metadata item {} is missing", guid_text(*x.id)));

    const std::byte* fp = items[0].value->data();
    const uint32_t fp_flags = get_le32(fp + 4);
    if ((fp_flags & 2) || parent_locator)
      unsupported(
          "differencing disk (it has a parent disk); diskferry reads standalone VHDX images "
          "only: merge it into its parent first (Hyper-V's Edit Disk, or qemu-img convert of the "
          "chain)");
    if (unknown_required)
      unsupported(fmt::format("has a required metadata item diskferry does not know ({})",
                              guid_text(*unknown_required)));
    img.block_size = get_le32(fp);
    img.leave_allocated = fp_flags & 1;
    img.virtual_size = get_le64(items[1].value->data());
    img.logical_sector = get_le32(items[3].value->data());
    img.physical_sector = get_le32(items[4].value->data());
    if (!is_pow2(img.block_size) || img.block_size < kMinBlock || img.block_size > kMaxBlock)
      bad(fmt::format("block size {} (expected a power of two from 1 MiB to 256 MiB)",
                      img.block_size));
    for (uint32_t s : {img.logical_sector, img.physical_sector})
      if (s != 512 && s != 4096) bad(fmt::format("sector size {} (expected 512 or 4096)", s));
    if (img.virtual_size > kMaxVirtualSize)
      bad(fmt::format("virtual size {} exceeds the format's limit of 64 TiB", img.virtual_size));
    if (img.virtual_size % img.logical_sector)
      bad(fmt::format("virtual size {} is not a multiple of the logical sector size {}",
                      img.virtual_size, img.logical_sector));
  }

  void parse_bat() {
    const uint64_t bs = img.block_size;
    img.chunk_ratio = (uint64_t{1} << 23) * img.logical_sector / bs;
    const uint64_t nblocks = div_round_up(img.virtual_size, bs);
    // MS-VHDX: a sector-bitmap entry after every chunk_ratio payload entries, the last one
    // only if payload entries follow it.
    const uint64_t entries = nblocks ? nblocks + (nblocks - 1) / img.chunk_ratio : 0;
    if (entries > img.bat.length / 8)
      bad(fmt::format("BAT region of {} bytes cannot hold the {} entries a {}-byte disk needs",
                      img.bat.length, entries, img.virtual_size));
    img.blocks.resize(static_cast<size_t>(nblocks));
    // What lies in the file: [start, length, what] of each structure and allocated block.
    struct Used {
      uint64_t offset, length;
      int64_t block;  // -1 header section, -2 log, -3 BAT, -4 metadata, -5 sector bitmap
    };
    std::vector<Used> used = {{0, kHeaderSection, -1},
                              {img.bat.offset, img.bat.length, -3},
                              {img.metadata.offset, img.metadata.length, -4}};
    if (img.log.length) used.push_back({img.log.offset, img.log.length, -2});
    uint64_t b = 0;
    std::vector<std::byte> buf;
    for (uint64_t i = 0; i < entries; ++i) {
      const uint64_t in_buf = i % (kMiB / 8);
      if (in_buf == 0)
        buf = read_exact(img.bat.offset + i * 8, std::min<uint64_t>(kMiB, (entries - i) * 8),
                         "the BAT");
      const uint64_t e = get_le64(buf.data() + in_buf * 8);
      const uint64_t state = e & kVhdxStateMask, off = e & kVhdxOffsetMask;
      if ((i + 1) % (img.chunk_ratio + 1) == 0) {
        // A sector bitmap: only a differencing disk uses one; a present one still occupies
        // its MiB of the file.
        if (state == kVhdxBlockFullyPresent) {
          check_in_file(off, kMiB, fmt::format("sector bitmap entry {}", i));
          used.push_back({off, kMiB, -5});
        } else if (strict && state != kVhdxBlockNotPresent) {
          bad(fmt::format("sector bitmap entry {} has state {} (expected 0 or 6)", i, state));
        }
        continue;
      }
      img.blocks[b] = e;
      switch (state) {
        case kVhdxBlockNotPresent:
        case kVhdxBlockUndefined:
        case kVhdxBlockZero:
        case kVhdxBlockUnmapped:
          break;
        case kVhdxBlockFullyPresent:
          check_in_file(off, img.block_bytes(b), fmt::format("block {}", b));
          used.push_back({off, bs, static_cast<int64_t>(b)});
          ++img.present_blocks;
          break;
        case kVhdxBlockPartiallyPresent:
          bad(
              fmt::format("block {} is PARTIALLY_PRESENT, which only a differencing disk may "
                          "use: corrupt",
                          b));
        default:
          bad(fmt::format("block {} has the invalid BAT state {}", b, state));
      }
      ++b;
    }
    std::sort(used.begin(), used.end(),
              [](const Used& x, const Used& y) { return x.offset < y.offset; });
    for (size_t k = 1; k < used.size(); ++k)
      if (used[k].offset < used[k - 1].offset + used[k - 1].length)
        bad(fmt::format("{} at {:#x} overlaps {} at {:#x}: corrupt BAT", what(used[k].block),
                        used[k].offset, what(used[k - 1].block), used[k - 1].offset));
  }

  void check_in_file(uint64_t off, uint64_t len, const std::string& what) {
    if (off > file_size || len > file_size - off)
      bad(
          fmt::format("{} at {:#x} lies beyond the end of the file ({} bytes): truncated or "
                      "corrupt BAT",
                      what, off, file_size));
  }
  static std::string what(int64_t block) {
    switch (block) {
      case -1:
        return "the header section";
      case -2:
        return "the log";
      case -3:
        return "the BAT";
      case -4:
        return "the metadata region";
      case -5:
        return "a sector bitmap";
      default:
        return fmt::format("block {}", block);
    }
  }

  VhdxImage run() {
    img.file_size = file_size;
    if (file_size < kHeadBytes)
      bad(fmt::format("file of {} bytes is shorter than its header section: truncated", file_size));
    auto head = read_exact(0, kHeadBytes, "the header section");
    if (!is_vhdx_magic(head)) bad("file identifier 'vhdxfile' missing");
    Header h = pick_header(head);
    check_header_log(h);
    parse_regions(pick_region_table(head));
    check_log(h);
    parse_metadata();
    parse_bat();
    return std::move(img);
  }
};

}  // namespace

bool is_vhdx_magic(Bytes head) {
  return head.size() >= 8 && std::memcmp(head.data(), "vhdxfile", 8) == 0;
}

uint64_t VhdxImage::block_bytes(uint64_t b) const {
  return std::min<uint64_t>(block_size, virtual_size - b * block_size);
}

VhdxImage read_vhdx(const ReadAt& read, uint64_t file_size, const std::string& name, bool strict) {
  return Parser{read, file_size, name, strict, {}}.run();
}

}  // namespace diskferry
