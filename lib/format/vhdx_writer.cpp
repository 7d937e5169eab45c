// VHDX (dynamic), written front to back: the 1 MiB header section, a zero 1 MiB log, the payload
// blocks that hold data in guest order, then the BAT region and the metadata region. The spec
// lets regions and payload blocks sit anywhere after the header section, so putting the tables
// after the data means the planned and single-pass ways produce the same file; only the header
// section (which holds the regions' offsets) waits for the plan or for the final rewrite.
#include <fmt/format.h>
#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <optional>
#include <vector>

#include "format/alloc_runs.hpp"
#include "format/writer.hpp"
#include "image/source.hpp"
#include "util/crc32c.hpp"
#include "util/error.hpp"
#include "util/size.hpp"

namespace diskferry {
namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kHeaderSection = 1 * kMiB;
constexpr uint64_t kLogOffset = kHeaderSection;
constexpr uint32_t kLogLength = 1 * kMiB;
constexpr uint64_t kDataStart = kLogOffset + kLogLength;
constexpr uint64_t kMetadataLength = 1 * kMiB;
constexpr uint64_t kMaxVirtualSize = 64ull << 40;  // MS-VHDX (and QEMU) limit: 64 TiB

// Offsets inside the header section.
constexpr size_t kHeader1 = 64 * 1024, kHeader2 = 128 * 1024;
constexpr size_t kRegionTable1 = 192 * 1024, kRegionTable2 = 256 * 1024;
constexpr size_t kHeaderSize = 4 * 1024, kRegionTableSize = 64 * 1024;
constexpr size_t kHeaderBytes = kRegionTable2 + kRegionTableSize;  // 320 KiB; the rest is zero

constexpr uint32_t kLogicalSector = 512;  // 4096 is legal, but QEMU handles 512 only
constexpr uint32_t kPhysicalSector = 4096;
constexpr uint64_t kMaxSectorsPerBlock = 1ull << 23;

// BAT entry states (bits 0-2); the file offset in MiB lives in bits 20-63.
constexpr uint64_t kPayloadBlockZero = 2;
constexpr uint64_t kPayloadBlockFullyPresent = 6;

// Metadata item flags.
constexpr uint32_t kIsVirtualDisk = 1u << 1;
constexpr uint32_t kIsRequired = 1u << 2;
constexpr size_t kMetadataItems = 64 * 1024;  // items start here inside the metadata region

constexpr uint32_t kGranule = 64 * 1024;  // zero detection inside allocated blocks

// A GUID in its canonical text order; serialised in Microsoft's mixed-endian binary form.
struct Guid {
  uint32_t d1;
  uint16_t d2, d3;
  std::array<uint8_t, 8> d4;
};
constexpr Guid kBatRegion{
    0x2DC27766, 0xF623, 0x4200, {0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08}};
constexpr Guid kMetadataRegion{
    0x8B7CA206, 0x4790, 0x4B9A, {0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E}};
constexpr Guid kFileParameters{
    0xCAA16737, 0xFA36, 0x4D43, {0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B}};
constexpr Guid kVirtualDiskSize{
    0x2FA54224, 0xCD1B, 0x4876, {0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8}};
constexpr Guid kVirtualDiskId{
    0xBECA12AB, 0xB2E6, 0x4523, {0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46}};
constexpr Guid kLogicalSectorSize{
    0x8141BF1D, 0xA96F, 0x4709, {0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F}};
constexpr Guid kPhysicalSectorSize{
    0xCDA348C7, 0x445D, 0x4471, {0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56}};

void put_guid(std::byte* p, const Guid& g) {
  put_le32(p, g.d1);
  put_le16(p + 4, g.d2);
  put_le16(p + 6, g.d3);
  for (size_t i = 0; i < 8; ++i) p[8 + i] = std::byte(g.d4[i]);
}

void put_ascii(std::byte* p, const char* s) {
  std::memcpy(p, s, std::strlen(s));
}

// murmur3's 64-bit finaliser: spreads every input bit over the output.
uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

// Two FNV-1a lanes with different offset bases: a 128-bit digest of a few integers.
class Digest {
 public:
  void add(uint64_t v) {
    for (int i = 0; i < 8; ++i, v >>= 8) {
      a_ = (a_ ^ (v & 0xff)) * kPrime;
      b_ = (b_ ^ (~v & 0xff)) * kPrime;
    }
  }
  // A version-4, RFC 4122 variant GUID for `purpose`: looks random, is a function of the input.
  Guid guid(uint64_t purpose) const {
    uint64_t hi = fmix64(a_ ^ fmix64(purpose));
    uint64_t lo = fmix64(b_ ^ hi ^ (purpose * 0x9E3779B97F4A7C15ull));
    Guid g{};
    g.d1 = static_cast<uint32_t>(hi >> 32);
    g.d2 = static_cast<uint16_t>(hi >> 16);
    g.d3 = static_cast<uint16_t>((hi & 0x0fff) | 0x4000);  // version 4
    for (size_t i = 0; i < 8; ++i) g.d4[i] = static_cast<uint8_t>(lo >> (56 - 8 * i));
    g.d4[0] = static_cast<uint8_t>((g.d4[0] & 0x3f) | 0x80);  // variant 10
    return g;
  }

 private:
  static constexpr uint64_t kPrime = 0x100000001b3ull;
  uint64_t a_ = 0xcbf29ce484222325ull;
  uint64_t b_ = 0x84222325cbf29ce4ull;
};

// Where everything goes, derived from the virtual size and the allocated blocks alone.
struct Layout {
  uint64_t vsize = 0;
  uint32_t block_size = 0;  // the option's, except for an empty disk
  uint64_t nblocks = 0;
  uint64_t bat_entries = 0;
  uint64_t data_end = 0;
  uint64_t bat_offset = 0, bat_length = 0;
  uint64_t metadata_offset = 0;
  uint64_t file_end = 0;
  Guid file_write{}, data_write{}, disk_id{};
};

class VhdxWriter final : public FormatWriter {
 public:
  explicit VhdxWriter(const WriterOptions& o)
      : bs_(o.block_size), chunk_ratio_(kMaxSectorsPerBlock * kLogicalSector / bs_) {}

  // Every block size is a multiple of 1 MiB, so a unit never straddles two blocks.
  uint32_t unit() const override { return static_cast<uint32_t>(kMiB); }
  bool needs_header_fixup() const override { return true; }

  void plan(uint64_t offset, Bytes data) override {
    mode_ = Mode::Plan;
    process(offset, data);
  }
  void end_plan(uint64_t source_size) override {
    cur_block_.reset();
    planned_vsize_ = virtual_disk_size(source_size);
    layout_ = compute_layout(planned_vsize_);
    have_plan_ = true;
  }
  uint64_t planned_size() const override { return layout_.file_end; }
  uint64_t max_size(uint64_t source_size) const override {
    uint64_t vsize = virtual_disk_size(source_size);
    return compute_layout(vsize, div_round_up(vsize, bs_)).file_end;
  }

  void begin(Sink& sink, bool planned) override {
    sink_ = &sink;
    planned_ = planned;
    mode_ = planned ? Mode::Verify : Mode::Write;
    cur_block_.reset();
    if (planned) {
      if (!have_plan_) throw Error(ErrorKind::Internal, "vhdx: planned write without a plan");
      verify_.emplace(allocs_);
      auto h = header_section(layout_);
      sink.write(h);
      sink.write_zeros(kHeaderSection - h.size());
    } else {
      if (!sink.supports_rewrite())
        throw Error(ErrorKind::Internal, "vhdx: single pass needs a rewritable destination");
      allocs_.clear();
      sink.write_zeros(kHeaderSection);  // placeholder header section, rewritten in finish()
    }
    sink.write_zeros(kLogLength);  // empty log: LogGuid is zero, so nothing is ever replayed
    host_pos_ = kDataStart;
  }

  void write(uint64_t offset, Bytes data) override { process(offset, data); }

  void finish(uint64_t source_size) override {
    close_block();
    uint64_t vsize = virtual_disk_size(source_size);
    check_size(vsize);
    if (planned_) {
      if (vsize != planned_vsize_ || verify_->peek())
        throw Error(ErrorKind::Input, "source changed between the planning and the writing pass");
    } else {
      layout_ = compute_layout(vsize);
    }
    if (host_pos_ != layout_.data_end)
      throw Error(ErrorKind::Internal, "vhdx: data area does not match its layout");
    write_bat();
    write_metadata();
    if (host_pos_ != layout_.file_end)
      throw Error(ErrorKind::Internal, "vhdx: file size does not match its layout");
    if (!planned_) sink_->rewrite(0, header_section(layout_));
  }

 private:
  enum class Mode { Plan, Verify, Write };

  static void check_size(uint64_t vsize) {
    if (vsize > kMaxVirtualSize)
      throw Error(ErrorKind::Format,
                  fmt::format("vhdx: virtual size {} exceeds the format's limit of 64 TiB",
                              format_size(vsize)));
  }

  // Blocks are decided lazily: a block is allocated at its first non-zero byte; the zeros before
  // that in the block are written then, later bytes as they come, and the block is padded to its
  // full size when the next block starts or at the end. Nothing is buffered.
  void process(uint64_t offset, Bytes data) {
    check_size(offset + data.size());
    while (!data.empty()) {
      uint64_t block = offset / bs_;
      uint64_t in_block = offset % bs_;
      size_t n = static_cast<size_t>(std::min<uint64_t>(data.size(), bs_ - in_block));
      piece(block, in_block, data.first(n));
      offset += n;
      data = data.subspan(n);
    }
  }

  void piece(uint64_t block, uint64_t in_block, Bytes data) {
    if (cur_block_ && *cur_block_ == block) {
      if (mode_ == Mode::Plan) return;  // already known to be allocated
      if (in_block < block_pos_)
        throw Error(ErrorKind::Internal, "vhdx: source units out of order");
      put_data(in_block, data);
      return;
    }
    if (is_zero(data)) return;
    if (cur_block_ && block < *cur_block_)
      throw Error(ErrorKind::Internal, "vhdx: source units out of order");
    close_block();
    open_block(block);
    if (mode_ != Mode::Plan) put_data(in_block, data);
  }

  // The first non-zero byte of `block`: record it (plan, single pass) or check it (verify).
  void open_block(uint64_t block) {
    if (mode_ == Mode::Verify) {
      auto want = verify_->peek();
      if (!want || *want != block)
        throw Error(ErrorKind::Input, "source changed between the planning and the writing pass");
      verify_->advance();
    } else {
      allocs_.add(block);
    }
    cur_block_ = block;
    block_pos_ = 0;
  }

  // Bytes of the open block at `in_block`; gaps since the last bytes are zeros.
  void put_data(uint64_t in_block, Bytes data) {
    zeros(in_block - block_pos_);
    for (size_t at = 0; at < data.size(); at += kGranule) {
      Bytes g = data.subspan(at, std::min<size_t>(kGranule, data.size() - at));
      if (is_zero(g)) {
        zeros(g.size());
      } else {
        sink_->write(g);
        host_pos_ += g.size();
      }
    }
    block_pos_ = in_block + data.size();
  }

  void close_block() {
    if (!cur_block_) return;
    if (mode_ != Mode::Plan) zeros(bs_ - block_pos_);  // full blocks on disk, the last one too
    cur_block_.reset();
  }

  void zeros(uint64_t n) {
    if (n == 0) return;
    sink_->write_zeros(n);
    host_pos_ += n;
  }

  // `allocated`: payload blocks stored (default: those planned or written).
  Layout compute_layout(uint64_t vsize, std::optional<uint64_t> allocated = std::nullopt) const {
    check_size(vsize);
    Layout l;
    l.vsize = vsize;
    l.block_size = bs_;
    l.nblocks = div_round_up(vsize, bs_);
    if (!allocs_.runs().empty()) {
      const auto& last = allocs_.runs().back();
      if (last.first + last.count > l.nblocks)
        throw Error(ErrorKind::Internal, "vhdx: data past the end of the disk");
    }
    // Dynamic disk: a sector-bitmap entry after every chunk_ratio payload entries, none at the end.
    l.bat_entries = l.nblocks == 0 ? 0 : l.nblocks + (l.nblocks - 1) / chunk_ratio_;
    l.data_end = kDataStart + allocated.value_or(allocs_.total()) * bs_;
    l.bat_offset = l.data_end;
    l.bat_length = std::max(kMiB, round_up(l.bat_entries * 8, kMiB));
    if (l.nblocks == 0) {
      // An empty disk has no BAT entries, which MS-VHDX allows, but QEMU (7.2 and later alike)
      // computes the entry count in uint32_t as nblocks + ((nblocks - 1) >> log2(chunk_ratio)),
      // which wraps for 0 blocks, and refuses the image unless the BAT region is that large:
      // 8 MiB per MiB of block size (its own empty images carry such a BAT, written out). The
      // spec only sets a minimum region size, and an empty disk's block size holds no data, so
      // it gets the smallest, 1 MiB: an 8 MiB BAT of zeros (holes in a file) instead of 256 MiB
      // with 32 MiB blocks, or 2 GiB with 256 MiB blocks, which QEMU cannot read in one request.
      // libvhdi rejects every empty VHDX, QEMU's included.
      l.block_size = static_cast<uint32_t>(kMiB);
      const uint64_t chunk_ratio = kMaxSectorsPerBlock * kLogicalSector / l.block_size;
      l.bat_length = round_up((UINT32_MAX >> std::countr_zero(chunk_ratio)) * 8, kMiB);
    }
    if (l.bat_length > UINT32_MAX)
      throw Error(ErrorKind::Format, "vhdx: block allocation table too large");
    l.metadata_offset = l.bat_offset + l.bat_length;
    l.file_end = l.metadata_offset + kMetadataLength;

    // The GUIDs are derived from the layout instead of being random, so that the output is a pure
    // function of the source bytes and the options: converting the same disk twice gives the same
    // file, which resumable uploads rely on (a restarted transfer can trust what is already on
    // the other side) and which makes checksums of the image reproducible. Disks with different
    // sizes or allocation still get different IDs.
    Digest d;
    d.add(vsize);
    d.add(l.block_size);
    d.add(allocs_.runs().size());
    for (const auto& r : allocs_.runs()) {
      d.add(r.first);
      d.add(r.count);
    }
    l.file_write = d.guid(1);
    l.data_write = d.guid(2);
    l.disk_id = d.guid(3);
    return l;
  }

  // [0, 320 KiB) of the header section; the rest of the first MiB is zero.
  static std::vector<std::byte> header_section(const Layout& l) {
    std::vector<std::byte> s(kHeaderBytes);
    std::byte* p = s.data();

    // File identifier: signature, then the creator as UTF-16LE.
    put_ascii(p, "vhdxfile");
    const char* creator = "diskferry";
    for (size_t i = 0; creator[i]; ++i) put_le16(p + 8 + 2 * i, static_cast<uint16_t>(creator[i]));

    // Two headers; the one with the higher sequence number (header 2) is current.
    for (int i = 0; i < 2; ++i) {
      std::byte* h = p + (i == 0 ? kHeader1 : kHeader2);
      put_ascii(h, "head");
      put_le64(h + 8, static_cast<uint64_t>(i + 1));  // SequenceNumber
      put_guid(h + 16, l.file_write);
      put_guid(h + 32, l.data_write);
      // LogGuid (48) stays zero: there is no log to replay.
      put_le16(h + 64, 0);  // LogVersion
      put_le16(h + 66, 1);  // Version
      put_le32(h + 68, kLogLength);
      put_le64(h + 72, kLogOffset);
      put_le32(h + 4, crc32c(Bytes(h, kHeaderSize)));
    }

    // Two identical region tables.
    std::byte* r = p + kRegionTable1;
    put_ascii(r, "regi");
    put_le32(r + 8, 2);  // EntryCount
    put_guid(r + 16, kBatRegion);
    put_le64(r + 32, l.bat_offset);
    put_le32(r + 40, static_cast<uint32_t>(l.bat_length));
    put_le32(r + 44, 1);  // Required
    put_guid(r + 48, kMetadataRegion);
    put_le64(r + 64, l.metadata_offset);
    put_le32(r + 72, static_cast<uint32_t>(kMetadataLength));
    put_le32(r + 76, 1);  // Required
    put_le32(r + 4, crc32c(Bytes(r, kRegionTableSize)));
    std::memcpy(p + kRegionTable2, r, kRegionTableSize);
    return s;
  }

  // The BAT, generated entry by entry and written in 1 MiB pieces.
  void write_bat() {
    std::vector<std::byte> buf(kMiB);
    size_t fill = 0;
    auto emit = [&](uint64_t entry) {
      put_le64(buf.data() + fill, entry);
      fill += 8;
      if (fill == buf.size()) {
        put(Bytes(buf.data(), fill));
        fill = 0;
      }
    };
    AllocRuns::Cursor cur(allocs_);
    uint64_t host = kDataStart;
    for (uint64_t b = 0; b < layout_.nblocks; ++b) {
      if (b > 0 && b % chunk_ratio_ == 0) emit(0);  // sector bitmap block: not present
      if (cur.peek() == b) {
        emit(host | kPayloadBlockFullyPresent);
        host += bs_;
        cur.advance();
      } else {
        emit(kPayloadBlockZero);  // offset 0: Hyper-V rejects ZERO blocks with an offset
      }
    }
    put(Bytes(buf.data(), fill));
    zeros(layout_.bat_length - layout_.bat_entries * 8);
  }

  void write_metadata() {
    struct Item {
      Guid id;
      uint32_t length;
      uint32_t flags;
    };
    const Item items[] = {
        {kFileParameters, 8, kIsRequired},
        {kVirtualDiskSize, 8, kIsVirtualDisk | kIsRequired},
        {kVirtualDiskId, 16, kIsVirtualDisk | kIsRequired},
        {kLogicalSectorSize, 4, kIsVirtualDisk | kIsRequired},
        {kPhysicalSectorSize, 4, kIsVirtualDisk | kIsRequired},
    };
    constexpr size_t kCount = std::size(items);
    uint32_t offsets[kCount];
    size_t at = kMetadataItems;
    for (size_t i = 0; i < kCount; ++i) {
      offsets[i] = static_cast<uint32_t>(at);
      at = round_up(at + items[i].length, 8);
    }
    std::vector<std::byte> m(at);
    std::byte* p = m.data();
    put_ascii(p, "metadata");
    put_le16(p + 10, static_cast<uint16_t>(kCount));
    for (size_t i = 0; i < kCount; ++i) {
      std::byte* e = p + 32 + 32 * i;
      put_guid(e, items[i].id);
      put_le32(e + 16, offsets[i]);
      put_le32(e + 20, items[i].length);
      put_le32(e + 24, items[i].flags);
    }
    put_le32(p + offsets[0], layout_.block_size);  // BlockSize; flags 0: dynamic, no parent
    put_le64(p + offsets[1], layout_.vsize);
    put_guid(p + offsets[2], layout_.disk_id);
    put_le32(p + offsets[3], kLogicalSector);
    put_le32(p + offsets[4], kPhysicalSector);
    put(m);
    zeros(kMetadataLength - m.size());
  }

  void put(Bytes b) {
    if (b.empty()) return;
    sink_->write(b);
    host_pos_ += b.size();
  }

  uint32_t bs_;
  uint64_t chunk_ratio_;

  Mode mode_ = Mode::Plan;
  AllocRuns allocs_;
  std::optional<uint64_t> cur_block_;  // the allocated block being written
  uint64_t block_pos_ = 0;             // bytes of it handed to the sink so far
  bool have_plan_ = false, planned_ = false;
  uint64_t planned_vsize_ = 0;
  Layout layout_;
  std::optional<AllocRuns::Cursor> verify_;

  Sink* sink_ = nullptr;
  uint64_t host_pos_ = 0;
};

}  // namespace

std::unique_ptr<FormatWriter> make_vhdx_writer(const WriterOptions& o) {
  return std::make_unique<VhdxWriter>(o);
}

}  // namespace diskferry
