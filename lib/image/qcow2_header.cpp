#include "image/qcow2_header.hpp"

#include <fmt/format.h>
#include <algorithm>

#include "util/error.hpp"

namespace diskferry {
namespace {

constexpr uint64_t kIncompatDirty = 1u << 0;
constexpr uint64_t kIncompatCorrupt = 1u << 1;
constexpr uint64_t kIncompatDataFile = 1u << 2;
constexpr uint64_t kIncompatCompression = 1u << 3;
constexpr uint64_t kIncompatExtendedL2 = 1u << 4;
constexpr uint64_t kIncompatKnown = (1u << 5) - 1;

constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xE2792ACA;
constexpr uint32_t kExtFeatureTable = 0x6803F857;

constexpr size_t kV2HeaderLength = 72;
constexpr size_t kV3MinHeaderLength = 104;
constexpr size_t kFeatureEntry = 48;  // u8 type, u8 bit, char name[46]

[[noreturn]] void damaged(const std::string& name, const std::string& why) {
  throw Error(ErrorKind::Input, fmt::format("{}: qcow2 image {}", name, why));
}
[[noreturn]] void unsupported(const std::string& name, const std::string& why) {
  throw Error(ErrorKind::Format, fmt::format("{}: qcow2 image {}", name, why));
}

// A NUL-padded name field as a string (QEMU treats these as C strings).
std::string c_string(Bytes b) {
  auto* p = reinterpret_cast<const char*>(b.data());
  return std::string(p, std::find(p, p + b.size(), '\0'));
}

// The names the image's own feature table gives unknown incompatible bits, so the refusal says
// what the image needs ("bit 7" alone tells a user nothing).
std::string describe_unknown(uint64_t bits, Bytes table) {
  std::string out;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(bits >> bit & 1)) continue;
    std::string label = fmt::format("bit {}", bit);
    for (size_t i = 0; i + kFeatureEntry <= table.size(); i += kFeatureEntry) {
      if (std::to_integer<int>(table[i]) == 0 && std::to_integer<int>(table[i + 1]) == bit) {
        std::string n = c_string(table.subspan(i + 2, kFeatureEntry - 2));
        if (!n.empty()) label += fmt::format(" ({})", n);
      }
    }
    out += out.empty() ? label : ", " + label;
  }
  return out;
}

// Walks the header extensions in [start, end) of the first cluster. Bytes past the end of a
// short file read as zeros, i.e. as the end marker, as they do for QEMU.
void parse_extensions(Bytes head, size_t start, size_t end, Qcow2Header& h, Bytes& feature_table,
                      const std::string& name) {
  size_t off = start;
  while (off + 8 <= end && off + 8 <= head.size()) {
    uint32_t type = get_be32(head.data() + off);
    uint32_t len = get_be32(head.data() + off + 4);
    off += 8;
    if (type == kExtEnd) return;
    if (len > end - off) damaged(name, fmt::format("header extension {:#x} too large", type));
    if (len > head.size() - off) damaged(name, "truncated inside its header extensions");
    Bytes data = head.subspan(off, len);
    if (type == kExtBackingFormat) {
      // QEMU keeps the name in a 16-byte buffer and refuses longer ones.
      if (len >= 16) damaged(name, "backing format name too long");
      h.backing_format = c_string(data);
    } else if (type == kExtFeatureTable) {
      feature_table = data;
    }
    off += static_cast<size_t>(round_up(len, 8));
  }
}

}  // namespace

bool is_qcow2_magic(Bytes head) {
  return head.size() >= 4 && get_be32(head.data()) == kQcow2Magic;
}

Qcow2Header parse_qcow2_header(Bytes head, uint64_t file_size, const std::string& name) {
  head = head.first(static_cast<size_t>(std::min<uint64_t>(head.size(), file_size)));
  if (!is_qcow2_magic(head)) damaged(name, "magic missing: not a qcow2 image");
  if (head.size() < kV2HeaderLength) damaged(name, "truncated inside its header");
  const std::byte* p = head.data();
  Qcow2Header h;
  h.version = get_be32(p + 4);
  uint64_t backing_offset = get_be64(p + 8);
  uint32_t backing_len = get_be32(p + 16);
  h.cluster_bits = get_be32(p + 20);
  h.size = get_be64(p + 24) / 512 * 512;
  uint32_t crypt = get_be32(p + 32);
  h.l1_size = get_be32(p + 36);
  h.l1_offset = get_be64(p + 40);

  if (h.version != 2 && h.version != 3) unsupported(name, fmt::format("version {}", h.version));
  if (h.cluster_bits < kQcow2MinClusterBits || h.cluster_bits > kQcow2MaxClusterBits)
    damaged(name, fmt::format("cluster size 2^{} outside 512 B..2 MiB", h.cluster_bits));
  const uint64_t cs = h.cluster_size();

  h.header_length = kV2HeaderLength;
  if (h.version == 3) {
    if (head.size() < kV3MinHeaderLength) damaged(name, "truncated inside its header");
    h.incompatible = get_be64(p + 72);
    h.compatible = get_be64(p + 80);
    h.autoclear = get_be64(p + 88);
    h.refcount_order = get_be32(p + 96);
    h.header_length = get_be32(p + 100);
    if (h.header_length < kV3MinHeaderLength) damaged(name, "header_length below 104");
    if (h.header_length > cs) damaged(name, "header longer than a cluster");
    if (h.header_length > head.size()) damaged(name, "truncated inside its header");
  }
  if (h.refcount_order > 6) damaged(name, "refcount width above 64 bits");

  if (backing_offset > cs) damaged(name, "backing file name offset beyond the first cluster");
  const size_t ext_end = backing_offset ? static_cast<size_t>(backing_offset) : cs;
  Bytes feature_table;
  parse_extensions(head, h.header_length, ext_end, h, feature_table, name);

  if (crypt != 0)
    unsupported(name, fmt::format("is encrypted ({}); decrypt it first with qemu-img convert",
                                  crypt == 1   ? "AES"
                                  : crypt == 2 ? "LUKS"
                                               : "unknown method"));
  if (uint64_t unknown = h.incompatible & ~kIncompatKnown)
    unsupported(name, fmt::format("uses unknown incompatible features: {}",
                                  describe_unknown(unknown, feature_table)));
  if (h.incompatible & kIncompatCorrupt)
    damaged(name, "is marked corrupt by QEMU; repair it first (qemu-img check -r all)");
  if (h.incompatible & kIncompatDataFile)
    unsupported(name, "keeps its data in an external data file, which diskferry does not read");
  if (h.incompatible & kIncompatExtendedL2)
    unsupported(name, "uses extended L2 entries (subclusters), which diskferry does not read");
  h.dirty = h.incompatible & kIncompatDirty;

  // compression_type exists only in headers longer than 104 bytes; a non-default one must be
  // announced by its incompatible bit, and the bit must not be set without one (as QEMU checks).
  uint8_t ctype = h.header_length > kV3MinHeaderLength ? std::to_integer<uint8_t>(p[104]) : 0;
  if (ctype > 1) unsupported(name, fmt::format("uses unknown compression type {}", ctype));
  if ((ctype != 0) != bool(h.incompatible & kIncompatCompression))
    damaged(name, "compression type and its incompatible feature bit disagree");
  h.compression = ctype == 1 ? ClusterCodec::Zstd : ClusterCodec::Deflate;

  // The L1 table must map the whole disk, fit QEMU's limit and lie inside the file.
  const uint64_t cov = h.l1_coverage();
  const uint64_t needed = h.size / cov + (h.size % cov != 0);
  if (h.l1_size > kQcow2MaxL1Bytes / 8) damaged(name, "L1 table larger than 32 MiB");
  if (h.l1_size < needed) damaged(name, "L1 table too small for its virtual size");
  if (h.l1_size > 0) {
    if (h.l1_offset % cs) damaged(name, "L1 table offset not cluster-aligned");
    uint64_t bytes = uint64_t{h.l1_size} * 8;
    if (h.l1_offset > file_size || bytes > file_size - h.l1_offset)
      damaged(name, fmt::format("L1 table at {:#x} lies beyond the end of the file ({} bytes): "
                                "truncated or corrupt",
                                h.l1_offset, file_size));
  }

  if (backing_offset != 0) {
    if (backing_len > std::min<uint64_t>(1023, cs - backing_offset))
      damaged(name, "backing file name too long");
    if (backing_offset + backing_len > head.size())
      damaged(name, "truncated inside its backing file name");
    h.backing_file = c_string(head.subspan(static_cast<size_t>(backing_offset), backing_len));
  }
  return h;
}

}  // namespace diskferry
