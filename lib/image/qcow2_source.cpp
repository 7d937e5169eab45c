#include "image/qcow2_source.hpp"

#include <fmt/format.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cstring>

#include "image/image_chain.hpp"
#include "image/qcow2_decompress.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;  // bits 9-55 of L1 and L2 entries
constexpr uint64_t kCompressed = 1ULL << 62;
constexpr uint64_t kZero = 1ULL << 0;

// How a run of guest bytes of one layer reads.
enum class Kind { Unallocated, Zero, Data, Compressed };

struct Mapping {
  Kind kind;
  uint64_t length;  // guest bytes from the position asked about
  uint64_t host;    // Data: file offset of the first byte
};

// A pass's view of one layer: the L2 table and compressed cluster last used (reads go forward,
// so one of each suffices), and where the next allocation may start.
struct LayerCursor {
  int64_t l2_index = -1;
  std::vector<uint64_t> l2;
  std::vector<std::byte> l2_raw;
  int64_t cached_cluster = -1;
  std::vector<std::byte> cluster;     // the inflated cluster `cached_cluster`
  std::vector<std::byte> compressed;  // its compressed bytes
  std::unique_ptr<ClusterDecompressor> decompressor;
  // The last data search: from scan_from, the first standard or compressed cluster.
  bool scanned = false;
  uint64_t scan_from = 0;
  std::optional<uint64_t> next_data;
  // Raw layers: the data extent SEEK_DATA/SEEK_HOLE last reported.
  bool seek_map = true;
  uint64_t data_start = 0, hole_start = 0;
};

[[noreturn]] void corrupt(const ChainLayer& l, const std::string& why) {
  throw Error(ErrorKind::Input, fmt::format("{}: {}", l.name, why));
}

class Qcow2Pass final : public Pass {
 public:
  Qcow2Pass(const std::vector<ChainLayer>& chain, uint32_t unit)
      : chain_(chain), unit_(unit), cursors_(chain.size()) {
    // Layer i shows through only below the size of every layer above it.
    uint64_t limit = UINT64_MAX;
    for (const ChainLayer& l : chain) {
      limit = std::min(limit, l.size);
      limits_.push_back(limit);
    }
  }

  std::optional<Chunk> next(MutableBytes buf) override {
    const uint64_t size = chain_.front().size;
    while (pos_ < size) {
      auto cand = next_candidate(pos_);
      if (!cand) break;
      uint64_t off = *cand / unit_ * unit_;
      size_t len = static_cast<size_t>(std::min<uint64_t>(unit_, size - off));
      bool any = fill(0, off, buf.first(len));
      pos_ = off + len;
      if (any) return Chunk{off, len};
    }
    pos_ = size;
    return std::nullopt;
  }
  uint64_t size() const override { return chain_.front().size; }
  // Guest bytes passed so far: the only measure that grows evenly over a chain of files.
  uint64_t consumed() const override { return pos_; }

 private:
  // The lowest offset >= pos that any layer may hold data at, or nullopt. A lower bound only:
  // a layer with an allocated L2 table may still read as zeros there.
  std::optional<uint64_t> next_candidate(uint64_t pos) {
    std::optional<uint64_t> best;
    for (size_t i = 0; i < chain_.size(); ++i) {
      if (pos >= limits_[i]) continue;
      auto c = chain_[i].qcow2 ? qcow2_candidate(i, pos) : raw_data_at_or_after(i, pos);
      if (c && *c < limits_[i] && (!best || *c < *best)) best = c;
    }
    return best;
  }

  // The first offset >= pos where layer i itself stores data (a standard or compressed
  // cluster). Zero and unallocated clusters are skipped here: what shows through them is the
  // lower layers' business, and their own candidates cover it. Scanning whole L2 tables keeps
  // the work per pass linear in the tables, however many units read as zeros.
  std::optional<uint64_t> qcow2_candidate(size_t i, uint64_t pos) {
    const ChainLayer& l = chain_[i];
    const Qcow2Header& h = *l.qcow2;
    const uint64_t cov = h.l1_coverage();
    const uint64_t per_table = uint64_t{1} << h.l2_bits();
    LayerCursor& c = cursors_[i];
    // The answer holds for every pos from where it was asked up to the data found.
    if (c.scanned && pos >= c.scan_from && (!c.next_data || pos <= *c.next_data))
      return c.next_data ? std::optional(std::max(pos, *c.next_data)) : std::nullopt;
    c.scanned = true;
    c.scan_from = pos;
    c.next_data.reset();
    const uint64_t limit = limits_[i];  // nothing of layer i shows at or beyond this
    for (uint64_t j = pos / cov; j < l.l1.size() && j * cov < limit; ++j) {
      if (!(l.l1[j] & kOffsetMask)) continue;
      uint64_t first = std::max(pos, j * cov) >> h.cluster_bits;
      uint64_t last = std::min((j + 1) * per_table, div_round_up(limit, h.cluster_size()));
      for (uint64_t cl = first; cl < last; ++cl) {
        Kind k = classify(l2_entry(i, cl));
        if (k == Kind::Data || k == Kind::Compressed) {
          c.next_data = std::max(pos, cl << h.cluster_bits);
          return c.next_data;
        }
      }
    }
    return std::nullopt;
  }

  std::optional<uint64_t> raw_data_at_or_after(size_t i, uint64_t pos) {
    LayerCursor& c = cursors_[i];
    if (!c.seek_map || (pos >= c.data_start && pos < c.hole_start)) return pos;
    int fd = chain_[i].fd.get();
    off_t d = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) return std::nullopt;
      c.seek_map = false;  // no SEEK_DATA here (a block device, an old filesystem): read all
      return pos;
    }
    off_t h = ::lseek(fd, d, SEEK_HOLE);
    c.data_start = static_cast<uint64_t>(d);
    c.hole_start = h < 0 ? chain_[i].file_size : static_cast<uint64_t>(h);
    return c.data_start;
  }

  // Writes the guest bytes [off, off+out.size()) of layer i (and below) into out. Returns
  // whether any came from a file; false means out is all zeros.
  bool fill(size_t i, uint64_t off, MutableBytes out) {
    if (i == chain_.size() || off >= chain_[i].size) {
      std::memset(out.data(), 0, out.size());
      return false;
    }
    const ChainLayer& l = chain_[i];
    size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), l.size - off));
    std::memset(out.data() + n, 0, out.size() - n);
    if (!l.qcow2) return fill_raw(i, off, out.first(n));
    bool any = false;
    for (uint64_t p = off, end = off + n; p < end;) {
      Mapping m = map(i, p, end);
      MutableBytes dst = out.subspan(static_cast<size_t>(p - off), static_cast<size_t>(m.length));
      switch (m.kind) {
        case Kind::Zero:
          std::memset(dst.data(), 0, dst.size());
          break;
        case Kind::Unallocated:
          any |= fill(i + 1, p, dst);
          break;
        case Kind::Data:
          read_data(l, p, m.host, dst);
          any = true;
          break;
        case Kind::Compressed:
          read_compressed(i, p, dst);
          any = true;
          break;
      }
      p += m.length;
    }
    return any;
  }

  bool fill_raw(size_t i, uint64_t off, MutableBytes out) {
    auto d = raw_data_at_or_after(i, off);
    if (!d || *d >= off + out.size()) {
      std::memset(out.data(), 0, out.size());
      return false;
    }
    // Past the end of a raw file (its size need not be a multiple of 512) reads as zeros.
    size_t got = read_layer(chain_[i], out, off);
    std::memset(out.data() + got, 0, out.size() - got);
    return true;
  }

  // The L2 entry of guest cluster `cl` of layer i (0 when its L2 table is unallocated).
  uint64_t l2_entry(size_t i, uint64_t cl) {
    const ChainLayer& l = chain_[i];
    const Qcow2Header& h = *l.qcow2;
    const uint64_t l1_index = cl >> h.l2_bits();
    if (l1_index >= l.l1.size()) corrupt(l, "qcow2 L1 table does not cover its virtual size");
    const uint64_t l2_offset = l.l1[l1_index] & kOffsetMask;
    if (!l2_offset) return 0;
    LayerCursor& c = cursors_[i];
    if (c.l2_index != static_cast<int64_t>(l1_index)) {
      const uint64_t cs = h.cluster_size();
      if (l2_offset % cs)
        corrupt(l, fmt::format("qcow2 L2 table offset {:#x} not aligned", l2_offset));
      if (l2_offset > l.file_size || cs > l.file_size - l2_offset)
        corrupt(l,
                fmt::format("qcow2 L2 table at {:#x} lies beyond the end of the file ({} bytes): "
                            "truncated or corrupt",
                            l2_offset, l.file_size));
      c.l2_raw.resize(static_cast<size_t>(cs));
      if (read_layer(l, c.l2_raw, l2_offset) != c.l2_raw.size())
        corrupt(l, "qcow2 image truncated inside an L2 table");
      c.l2.resize(static_cast<size_t>(cs / 8));
      for (size_t k = 0; k < c.l2.size(); ++k) c.l2[k] = get_be64(c.l2_raw.data() + 8 * k);
      c.l2_index = static_cast<int64_t>(l1_index);
    }
    return c.l2[cl & ((uint64_t{1} << h.l2_bits()) - 1)];
  }

  static Kind classify(uint64_t e) {
    if (e & kCompressed) return Kind::Compressed;
    if (e & kZero) return Kind::Zero;  // with or without a preallocated host cluster
    if (!(e & kOffsetMask)) return Kind::Unallocated;
    return Kind::Data;
  }

  // How guest bytes from p (up to end) read in layer i: one run of clusters of the same kind
  // (and, for data, contiguous in the file), so a run costs one read or one recursion.
  Mapping map(size_t i, uint64_t p, uint64_t end) {
    const Qcow2Header& h = *chain_[i].qcow2;
    const uint64_t cs = h.cluster_size();
    uint64_t cl = p >> h.cluster_bits;
    uint64_t e = l2_entry(i, cl);
    Mapping m{classify(e), std::min(cs - (p & (cs - 1)), end - p), 0};
    if (m.kind == Kind::Data) {
      m.host = e & kOffsetMask;
      if (m.host % cs)
        corrupt(chain_[i],
                fmt::format("qcow2 data cluster offset {:#x} not aligned (guest offset {:#x})",
                            m.host, cl * cs));
      m.host += p & (cs - 1);
    }
    if (m.kind == Kind::Compressed) return m;
    while (p + m.length < end) {
      uint64_t e2 = l2_entry(i, ++cl);
      if (classify(e2) != m.kind) break;
      if (m.kind == Kind::Data && (e2 & kOffsetMask) != m.host + m.length) break;
      m.length += std::min(cs, end - (p + m.length));
    }
    return m;
  }

  void read_data(const ChainLayer& l, uint64_t guest, uint64_t host, MutableBytes dst) {
    if (host > l.file_size || dst.size() > l.file_size - host)
      corrupt(l,
              fmt::format("qcow2 data for guest offset {:#x} (at {:#x}) lies beyond the end of the "
                          "file ({} bytes): truncated or corrupt",
                          guest, host, l.file_size));
    if (read_layer(l, dst, host) != dst.size())
      corrupt(l, "qcow2 image truncated inside a data cluster");
  }

  void read_compressed(size_t i, uint64_t p, MutableBytes dst) {
    const ChainLayer& l = chain_[i];
    const Qcow2Header& h = *l.qcow2;
    const uint64_t cs = h.cluster_size();
    const uint64_t cl = p >> h.cluster_bits;
    LayerCursor& c = cursors_[i];
    if (c.cached_cluster != static_cast<int64_t>(cl)) {
      // Bits 0..x-1: byte offset in the file; x..61: additional 512-byte sectors, where
      // x = 62 - (cluster_bits - 8). The size is sector-granular, measured from the offset's
      // sector, so it can reach past the stream (and past the end of the file).
      const uint64_t e = l2_entry(i, cl);
      const unsigned x = 62 - (h.cluster_bits - 8);
      const uint64_t offset = e & ((uint64_t{1} << x) - 1);
      const uint64_t sectors = ((e >> x) & ((uint64_t{1} << (h.cluster_bits - 8)) - 1)) + 1;
      const uint64_t csize = sectors * 512 - (offset & 511);
      if (offset >= l.file_size)
        corrupt(l, fmt::format(
                       "qcow2 compressed data for guest offset {:#x} (at {:#x}) lies beyond the "
                       "end of the file ({} bytes): truncated or corrupt",
                       cl * cs, offset, l.file_size));
      c.compressed.resize(static_cast<size_t>(std::min(csize, l.file_size - offset)));
      c.compressed.resize(read_layer(l, c.compressed, offset));
      c.cluster.resize(static_cast<size_t>(cs));
      if (!c.decompressor) c.decompressor = std::make_unique<ClusterDecompressor>(h.compression);
      c.cached_cluster = -1;
      if (const char* why = c.decompressor->decompress(c.compressed, c.cluster))
        corrupt(l,
                fmt::format("qcow2 compressed cluster for guest offset {:#x}: {}", cl * cs, why));
      c.cached_cluster = static_cast<int64_t>(cl);
    }
    std::memcpy(dst.data(), c.cluster.data() + (p & (cs - 1)), dst.size());
  }

  const std::vector<ChainLayer>& chain_;
  uint32_t unit_;
  std::vector<LayerCursor> cursors_;
  std::vector<uint64_t> limits_;
  uint64_t pos_ = 0;
};

class Qcow2Source final : public Source {
 public:
  Qcow2Source(std::string name, std::vector<ChainLayer> chain)
      : name_(std::move(name)), chain_(std::move(chain)) {}
  const std::string& name() const override { return name_; }
  std::optional<uint64_t> known_size() const override { return chain_.front().size; }
  std::optional<uint64_t> input_bytes() const override { return chain_.front().size; }
  bool rereadable() const override { return true; }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    return std::make_unique<Qcow2Pass>(chain_, unit);
  }

 private:
  std::string name_;
  std::vector<ChainLayer> chain_;
};

}  // namespace

std::unique_ptr<Source> open_qcow2_source(UniqueFd fd, const std::string& path,
                                          const SourceOptions& options) {
  if (options.layout)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: --layout applies to raw sources; a qcow2 image has its own "
                            "allocation map",
                            path));
  return std::make_unique<Qcow2Source>(path,
                                       open_image_chain(std::move(fd), path, options.on_warning));
}

std::unique_ptr<Source> open_remote_qcow2_source(ReadAt read, uint64_t file_size,
                                                 const std::string& name,
                                                 const SourceOptions& options) {
  return std::make_unique<Qcow2Source>(
      name, open_remote_image(std::move(read), file_size, name, options.on_warning));
}

}  // namespace diskferry
