#include "verify/qcow2_check.hpp"

#include <fmt/format.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <memory>

namespace diskferry {
namespace {

constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;  // bits 9-55
constexpr uint64_t kCopied = 1ULL << 63;
constexpr uint64_t kCompressedBit = 1ULL << 62;
constexpr uint64_t kL1Reserved = 0x7f000000000001feULL;  // bits 1-8, 56-62
constexpr uint64_t kL2Reserved = 0x3f000000000001feULL;  // bits 1-8, 56-61
// Incompatible feature bits: dirty, corrupt, external data file, compression type, extended L2.
constexpr uint64_t kDirty = 1, kCorrupt = 2, kExternalData = 4, kCompressionType = 8,
                   kExtendedL2 = 16;

uint16_t be16(const std::byte* p) {
  return static_cast<uint16_t>((std::to_integer<unsigned>(p[0]) << 8) |
                               std::to_integer<unsigned>(p[1]));
}

}  // namespace

bool is_qcow2(Bytes head) {
  static const unsigned char magic[4] = {'Q', 'F', 'I', 0xfb};
  return head.size() >= 4 && std::memcmp(head.data(), magic, 4) == 0;
}

void Qcow2Check::bad(const std::string& what) const {
  throw StructureError(fmt::format("{}: qcow2: {}", name_, what));
}

Qcow2Check::Qcow2Check(Bytes h, uint64_t file_size, std::string name)
    : name_(std::move(name)), file_size_(file_size) {
  if (h.size() < 72 || !is_qcow2(h)) bad("no qcow2 header");
  version_ = get_be32(&h[4]);
  if (version_ != 2 && version_ != 3) bad(fmt::format("version {} (expected 2 or 3)", version_));
  cluster_bits_ = get_be32(&h[20]);
  if (cluster_bits_ < 9 || cluster_bits_ > 21)
    bad(fmt::format("cluster_bits {} (expected 9 to 21)", cluster_bits_));
  size_ = get_be64(&h[24]);
  if (size_ > (1ULL << 61)) bad(fmt::format("virtual size {} is too large", size_));
  if (get_be32(&h[32]) != 0) bad("encrypted (crypt_method is not 0); cannot be validated");
  l1_size_ = get_be32(&h[36]);
  l1_offset_ = get_be64(&h[40]);
  rt_offset_ = get_be64(&h[48]);
  rt_clusters_ = get_be32(&h[56]);
  const uint64_t cs = cluster_size();
  if (version_ == 3) {
    if (h.size() < 104) bad("header shorter than 104 bytes");
    uint64_t incompatible = get_be64(&h[72]);
    if (incompatible & kCorrupt) bad("the corrupt bit is set");
    if (incompatible & kExternalData) bad("external data file: the data is not in this file");
    if (incompatible & kExtendedL2) bad("extended L2 entries are not supported by verify");
    if (incompatible & ~(kDirty | kCompressionType))
      bad(fmt::format(
          "unknown incompatible features {:#x}",
          incompatible & ~(kDirty | kCorrupt | kExternalData | kCompressionType | kExtendedL2)));
    refcount_order_ = get_be32(&h[96]);
    if (refcount_order_ > 6) bad(fmt::format("refcount_order {}", refcount_order_));
    uint32_t header_length = get_be32(&h[100]);
    if (header_length > 104 && h.size() > 104) compression_type_ = std::to_integer<uint8_t>(h[104]);
    if (compression_type_ > 1) bad(fmt::format("compression type {}", compression_type_));
    if (compression_type_ == 1 && !(incompatible & kCompressionType))
      bad("compression type zstd without the compression-type feature bit");
  }
  // Every guest cluster needs an L1 entry's worth of L2 coverage.
  const uint64_t l2_entries = cs / 8;
  const uint64_t needed_l1 = (size_ + cs * l2_entries - 1) / (cs * l2_entries);
  if (l1_size_ < needed_l1)
    bad(fmt::format("L1 table of {} entries cannot map {} bytes (needs {})", l1_size_, size_,
                    needed_l1));
  // QEMU's own limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE), which also bound our memory.
  if (l1_size_ > (32u << 20) / 8)
    bad(fmt::format("L1 table of {} entries (QEMU's limit is {})", l1_size_, (32u << 20) / 8));
  if (uint64_t(rt_clusters_) * cs > (8u << 20))
    bad(fmt::format("refcount table of {} clusters (QEMU's limit is 8 MiB)", rt_clusters_));
  if (l1_size_ && (l1_offset_ % cs || l1_offset_ + uint64_t(l1_size_) * 8 > file_size_))
    bad(fmt::format("L1 table at {} ({} entries) is not inside the {}-byte file", l1_offset_,
                    l1_size_, file_size_));
  if (rt_offset_ % cs || rt_clusters_ == 0 || rt_offset_ + uint64_t(rt_clusters_) * cs > file_size_)
    bad(fmt::format("refcount table at {} ({} clusters) is not inside the {}-byte file", rt_offset_,
                    rt_clusters_, file_size_));
}

void Qcow2Check::check_tables(const ReadAt& at) {
  const uint64_t cs = cluster_size();
  const uint64_t file_clusters = (file_size_ + cs - 1) / cs;
  if (file_clusters > (256u << 20))
    bad(fmt::format("{} clusters are too many to recount in memory", file_clusters));
  std::vector<uint32_t> refs(file_clusters, 0);
  auto ref = [&](uint64_t offset, uint64_t length, const std::string& what) {
    if (offset + length > round_up(file_size_, cs) || offset + length < offset)
      bad(fmt::format("{} at {} ({} bytes) is beyond the end of the {}-byte file", what, offset,
                      length, file_size_));
    for (uint64_t c = offset / cs; c <= (offset + length - 1) / cs; ++c) ++refs[c];
  };
  auto read = [&](uint64_t offset, size_t length, const std::string& what) {
    auto d = at(offset, length);
    if (d.size() != length)
      bad(fmt::format("{} at {} is cut off by the end of the file", what, offset));
    return d;
  };

  ref(0, cs, "header");
  if (l1_size_) ref(l1_offset_, uint64_t(l1_size_) * 8, "L1 table");
  ref(rt_offset_, uint64_t(rt_clusters_) * cs, "refcount table");

  const uint64_t l2_entries = cs / 8;
  std::vector<std::byte> l1 =
      l1_size_ ? read(l1_offset_, size_t(l1_size_) * 8, "L1 table") : std::vector<std::byte>{};
  for (uint32_t i = 0; i < l1_size_; ++i) {
    uint64_t e = get_be64(&l1[size_t(i) * 8]);
    if (e & kL1Reserved) bad(fmt::format("L1 entry {} has reserved bits set ({:#x})", i, e));
    uint64_t l2 = e & kOffsetMask;
    if (!l2) continue;
    if (l2 % cs) bad(fmt::format("L1 entry {}: L2 table at {} is not cluster aligned", i, l2));
    ref(l2, cs, fmt::format("L1 entry {}'s L2 table", i));
    std::vector<std::byte> t = read(l2, cs, fmt::format("L2 table {}", i));
    for (uint64_t j = 0; j < l2_entries; ++j) {
      uint64_t guest = (uint64_t(i) * l2_entries + j) * cs;
      uint64_t x = get_be64(&t[j * 8]);
      if (!x) continue;
      if (guest >= size_)
        bad(fmt::format("L2 table {} maps guest offset {}, beyond the virtual size {}", i, guest,
                        size_));
      if (x & kCompressedBit) {
        const uint32_t shift = 62 - (cluster_bits_ - 8);
        uint64_t off = x & ((1ULL << shift) - 1);
        uint64_t sectors = ((x & ~kCopied & ~kCompressedBit) >> shift) + 1;
        uint64_t start = off & ~uint64_t(511);
        ref(start, sectors * 512, fmt::format("compressed cluster for guest offset {}", guest));
        compressed_.push_back(Compressed{off, sectors * 512 - (off & 511), guest});
        continue;
      }
      if (x & kL2Reserved)
        bad(fmt::format("L2 entry for guest offset {} has reserved bits set ({:#x})", guest, x));
      uint64_t host = x & kOffsetMask;
      if (!host) continue;  // a zero cluster (bit 0) without preallocation
      if (host % cs)
        bad(fmt::format("L2 entry for guest offset {}: data at {} is not cluster aligned", guest,
                        host));
      ref(host, cs, fmt::format("data for guest offset {}", guest));
      ++data_clusters_;
    }
  }

  // Refcount blocks, and the stored refcount of every cluster of the file.
  const uint32_t bits = 1u << refcount_order_;
  const uint64_t per_block = cs * 8 / bits;
  std::vector<std::byte> rt = read(rt_offset_, size_t(rt_clusters_) * cs, "refcount table");
  std::vector<std::pair<uint64_t, uint64_t>> blocks;  // (block index, offset)
  for (uint64_t b = 0; b < uint64_t(rt_clusters_) * cs / 8; ++b) {
    uint64_t e = get_be64(&rt[b * 8]);
    if (!e) continue;
    if (e % cs || (e & 0x1ff))
      bad(fmt::format("refcount table entry {}: block at {} is not cluster aligned", b, e));
    ref(e, cs, fmt::format("refcount block {}", b));
    blocks.emplace_back(b, e);
  }
  std::vector<uint32_t> stored(file_clusters, 0);
  for (auto [b, off] : blocks) {
    std::vector<std::byte> blk = read(off, cs, fmt::format("refcount block {}", b));
    for (uint64_t k = 0; k < per_block; ++k) {
      uint64_t c = b * per_block + k;
      uint64_t v = 0;
      if (bits == 64)
        v = get_be64(&blk[k * 8]);
      else if (bits == 32)
        v = get_be32(&blk[k * 4]);
      else if (bits == 16)
        v = be16(&blk[k * 2]);
      else {
        uint64_t bit = k * bits;
        v = (std::to_integer<uint64_t>(blk[bit / 8]) >> (8 - bits - bit % 8)) & ((1u << bits) - 1);
      }
      if (c < file_clusters)
        stored[c] = static_cast<uint32_t>(std::min<uint64_t>(v, UINT32_MAX));
      else if (v)
        bad(fmt::format("refcount block {} counts cluster {}, beyond the end of the file", b, c));
    }
  }
  uint64_t low = 0, leaked = 0;
  std::string first;
  for (uint64_t c = 0; c < file_clusters; ++c) {
    if (stored[c] == refs[c]) continue;
    (stored[c] < refs[c] ? low : leaked)++;
    if (first.empty())
      first = fmt::format("cluster {} (offset {}) has refcount {} but {} reference{}", c, c * cs,
                          stored[c], refs[c], refs[c] == 1 ? "" : "s");
  }
  if (low || leaked)
    bad(fmt::format("refcounts do not match the references: {} too low, {} leaked; first: {}", low,
                    leaked, first));
  std::sort(compressed_.begin(), compressed_.end(),
            [](const Compressed& a, const Compressed& b) { return a.offset < b.offset; });
}

void Qcow2Check::feed(uint64_t offset, Bytes data) {
  uint64_t end = offset + data.size();
  while (next_compressed_ < compressed_.size()) {
    const Compressed& c = compressed_[next_compressed_];
    uint64_t c_end = std::min(c.offset + c.length, file_size_);
    if (c.offset >= end) return;
    uint64_t from = std::max(c.offset + pending_.size(), offset);
    uint64_t to = std::min(c_end, end);
    if (to > from) {
      auto piece = data.subspan(from - offset, to - from);
      pending_.insert(pending_.end(), piece.begin(), piece.end());
    }
    if (c.offset + pending_.size() < c_end) return;  // the rest comes with the next bytes
    inflate(c, pending_);
    pending_.clear();
    ++next_compressed_;
  }
}

void Qcow2Check::inflate(const Compressed& c, Bytes in) {
  const size_t cs = cluster_size();
  std::vector<std::byte> out(cs);
  size_t produced = 0;
  if (compression_type_ == 0) {
    z_stream z{};
    if (inflateInit2(&z, -12) != Z_OK) throw Error(ErrorKind::Internal, "zlib: inflateInit2");
    z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
    z.avail_in = static_cast<uInt>(in.size());
    z.next_out = reinterpret_cast<Bytef*>(out.data());
    z.avail_out = static_cast<uInt>(cs);
    int rc = ::inflate(&z, Z_FINISH);
    produced = cs - z.avail_out;
    inflateEnd(&z);
    // QEMU accepts a stream that fills the cluster, ended or not.
    if (!(rc == Z_STREAM_END || (rc == Z_BUF_ERROR && z.avail_out == 0)) || produced != cs)
      bad(fmt::format("the deflate cluster at {} (guest offset {}) inflates to {} bytes, not {}",
                      c.offset, c.guest, produced, cs));
    return;
  }
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> d(ZSTD_createDCtx(), ZSTD_freeDCtx);
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), cs, 0};
  while (ob.pos < cs && ib.pos < ib.size) {
    size_t rc = ZSTD_decompressStream(d.get(), &ob, &ib);
    if (ZSTD_isError(rc))
      bad(fmt::format("the zstd cluster at {} (guest offset {}): {}", c.offset, c.guest,
                      ZSTD_getErrorName(rc)));
    if (rc == 0) break;
  }
  if (ob.pos != cs)
    bad(fmt::format("the zstd cluster at {} (guest offset {}) inflates to {} bytes, not {}",
                    c.offset, c.guest, ob.pos, cs));
}

void Qcow2Check::finish() {
  if (next_compressed_ < compressed_.size())
    bad(fmt::format("the compressed cluster at {} was not in the stream",
                    compressed_[next_compressed_].offset));
}

}  // namespace diskferry
