#include "image/qcow2_source.hpp"

#include <fmt/format.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <thread>

#include "image/image_chain.hpp"
#include "image/qcow2_decompress.hpp"
#include "util/error.hpp"
#include "util/worker_pool.hpp"

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

// A compressed cluster read ahead: its bytes, read by the pass, and the cluster a worker
// inflates them to. Slots are reused, so a pass allocates none per cluster once warmed up.
struct Inflated {
  size_t layer = 0;
  uint64_t cl = 0;  // guest cluster of that layer, for the message
  std::vector<std::byte> compressed, cluster;
  const char* why = nullptr;  // set by the worker: why it is not one compressed cluster
  uint64_t last_unit = 0;     // the last planned unit that copies from it
};

// One step of making a unit, decided ahead of reading it: writes [dst, dst+len) of the unit.
struct Op {
  enum Type : uint8_t { Zero, Data, Raw, Copy } type;
  uint32_t layer;
  size_t dst, len;
  uint64_t at;               // Data, Raw: file offset; Copy: offset in the inflated cluster
  Inflated* from = nullptr;  // Copy
};

// A unit planned ahead: its ops in guest order, the compressed clusters it is the first to
// need (inflated by one pool task), and where planning failed, if it did: the error is thrown
// after the ops before it ran, so it comes out exactly where a serial read would meet it.
struct PlannedUnit {
  uint64_t seq = 0, off = 0;
  size_t len = 0;
  std::vector<Op> ops;
  std::vector<Inflated*> inflate;
  std::future<void> inflated;
  std::exception_ptr error;
};

// A pass's view of one layer: the L2 table and compressed cluster last used (reads go forward,
// so one of each suffices), and where the next allocation may start.
struct LayerCursor {
  int64_t l2_index = -1;
  std::vector<uint64_t> l2;
  std::vector<std::byte> l2_raw;
  Inflated* inflated = nullptr;  // the last compressed cluster planned, while it is live
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

// Units are planned ahead of the caller (a window of 2 x threads + 2): planning walks the
// tables, reads the compressed bytes and hands each unit's compressed clusters to a worker pool;
// next() then runs the front unit's ops into the caller's buffer (data is read straight into
// it) and copies from the inflated clusters. So inflating runs on all cores while output stays
// in order and identical for any thread count; memory: the window's units' clusters.
class Qcow2Pass final : public Pass {
 public:
  Qcow2Pass(const std::vector<ChainLayer>& chain, uint32_t unit, int threads)
      : chain_(chain),
        unit_(unit),
        threads_(threads),
        window_max_(threads > 1 ? 2 * static_cast<size_t>(threads) + 2 : 1),
        cursors_(chain.size()) {
    // Layer i shows through only below the size of every layer above it.
    uint64_t limit = UINT64_MAX;
    for (const ChainLayer& l : chain) {
      limit = std::min(limit, l.size);
      limits_.push_back(limit);
    }
  }

  std::optional<Chunk> next(MutableBytes buf) override {
    top_up();
    if (window_.empty()) {
      pos_ = size();
      return std::nullopt;
    }
    PlannedUnit u = std::move(window_.front());
    window_.pop_front();
    run(u, buf);
    pos_ = u.off + u.len;
    Chunk chunk{u.off, u.len};
    release(std::move(u));
    top_up();  // the workers inflate ahead while the caller uses this unit
    return chunk;
  }
  uint64_t size() const override { return chain_.front().size; }
  // Guest bytes passed so far: the only measure that grows evenly over a chain of files.
  uint64_t consumed() const override { return pos_; }

 private:
  // Plans units until the window is full, the disk ends or planning fails.
  void top_up() {
    while (!planned_all_ && window_.size() < window_max_) {
      PlannedUnit u;
      if (!spare_.empty()) {
        u = std::move(spare_.back());
        spare_.pop_back();
      }
      if (!plan(u)) break;
      dispatch(u);
      window_.push_back(std::move(u));
    }
  }

  // The next unit that may hold data into u; false at the end of the disk.
  bool plan(PlannedUnit& u) {
    const uint64_t size = chain_.front().size;
    u.ops.clear();
    u.inflate.clear();
    u.error = nullptr;
    try {
      while (plan_pos_ < size) {
        auto cand = next_candidate(plan_pos_);
        if (!cand) break;
        u.seq = seq_++;
        u.off = *cand / unit_ * unit_;
        u.len = static_cast<size_t>(std::min<uint64_t>(unit_, size - u.off));
        u.ops.clear();
        bool any = fill(0, u.off, 0, u.len, u);
        plan_pos_ = u.off + u.len;
        if (any) return true;
      }
    } catch (...) {
      u.error = std::current_exception();
      planned_all_ = true;
      return true;
    }
    plan_pos_ = size;
    planned_all_ = true;
    return false;
  }

  // Inflates the unit's new compressed clusters: on the pool, or here with one thread.
  void dispatch(PlannedUnit& u) {
    if (u.inflate.empty()) return;
    if (threads_ <= 1) {
      inflate(u.inflate);
      return;
    }
    if (!pool_) pool_.emplace(threads_);
    u.inflated = pool_->submit([this, list = u.inflate] { inflate(list); });
  }

  // On a worker: each cluster with a decompressor of its layer's compression type, borrowed
  // from the pass (so codec state is made once per worker, not per cluster).
  void inflate(const std::vector<Inflated*>& list) {
    std::unique_ptr<ClusterDecompressor> dec[3];
    auto take = [&](ClusterCodec codec) -> ClusterDecompressor& {
      auto& d = dec[static_cast<int>(codec)];
      if (!d) {
        std::lock_guard lk(dec_mu_);
        auto& free = dec_free_[static_cast<int>(codec)];
        if (!free.empty()) {
          d = std::move(free.back());
          free.pop_back();
        }
      }
      if (!d) d = std::make_unique<ClusterDecompressor>(codec);
      return *d;
    };
    for (Inflated* s : list)
      s->why = take(chain_[s->layer].qcow2->compression).decompress(s->compressed, s->cluster);
    std::lock_guard lk(dec_mu_);
    for (int k = 0; k < 3; ++k)
      if (dec[k]) dec_free_[k].push_back(std::move(dec[k]));
  }

  // Makes the planned unit's bytes in buf, in guest order; errors come out in the same order.
  void run(PlannedUnit& u, MutableBytes buf) {
    if (u.inflated.valid()) u.inflated.get();
    for (const Op& op : u.ops) {
      const ChainLayer& l = chain_[op.layer];
      MutableBytes dst = buf.subspan(op.dst, op.len);
      switch (op.type) {
        case Op::Zero:
          std::memset(dst.data(), 0, dst.size());
          break;
        case Op::Data:
          if (read_layer(l, dst, op.at) != dst.size())
            corrupt(l, "qcow2 image truncated inside a data cluster");
          break;
        case Op::Raw: {
          // Past the end of a raw file (its size need not be a multiple of 512) reads as zeros.
          size_t got = read_layer(l, dst, op.at);
          std::memset(dst.data() + got, 0, dst.size() - got);
          break;
        }
        case Op::Copy:
          if (op.from->why)
            corrupt(l, fmt::format("qcow2 compressed cluster for guest offset {:#x}: {}",
                                   op.from->cl << l.qcow2->cluster_bits, op.from->why));
          std::memcpy(dst.data(), op.from->cluster.data() + op.at, dst.size());
          break;
      }
    }
    if (u.error) std::rethrow_exception(u.error);
  }

  // After a unit ran: its clusters no later unit copies from go back to the free slots.
  void release(PlannedUnit u) {
    for (const Op& op : u.ops) {
      Inflated* s = op.from;
      if (op.type != Op::Copy || s->last_unit != u.seq) continue;
      s->last_unit = UINT64_MAX;  // freed (a cluster may appear in several ops)
      if (cursors_[s->layer].inflated == s) cursors_[s->layer].inflated = nullptr;
      free_slots_.push_back(s);
    }
    u.inflated = {};
    spare_.push_back(std::move(u));
  }

  void add(PlannedUnit& u, Op op) {
    if (!u.ops.empty()) {
      Op& last = u.ops.back();
      if (last.type == op.type && last.dst + last.len == op.dst &&
          (op.type == Op::Zero ||
           (op.type == Op::Data && last.layer == op.layer && last.at + last.len == op.at))) {
        last.len += op.len;
        return;
      }
    }
    u.ops.push_back(op);
  }
  void zero(PlannedUnit& u, size_t dst, size_t len) {
    if (len) add(u, Op{Op::Zero, 0, dst, len, 0});
  }

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

  // Plans the guest bytes [off, off+len) of layer i (and below) as bytes [dst, dst+len) of
  // the unit. Returns whether any come from a file; false means they are all zeros.
  bool fill(size_t i, uint64_t off, size_t dst, size_t len, PlannedUnit& u) {
    if (i == chain_.size() || off >= chain_[i].size) {
      zero(u, dst, len);
      return false;
    }
    const ChainLayer& l = chain_[i];
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, l.size - off));
    if (!l.qcow2) {
      bool any = fill_raw(i, off, dst, n, u);
      zero(u, dst + n, len - n);
      return any;
    }
    bool any = false;
    for (uint64_t p = off, end = off + n; p < end;) {
      Mapping m = map(i, p, end);
      const size_t d = dst + static_cast<size_t>(p - off), ml = static_cast<size_t>(m.length);
      switch (m.kind) {
        case Kind::Zero:
          zero(u, d, ml);
          break;
        case Kind::Unallocated:
          any |= fill(i + 1, p, d, ml, u);
          break;
        case Kind::Data:
          check_data(l, p, m.host, ml);
          add(u, Op{Op::Data, static_cast<uint32_t>(i), d, ml, m.host});
          any = true;
          break;
        case Kind::Compressed:
          plan_compressed(i, p, d, ml, u);
          any = true;
          break;
      }
      p += m.length;
    }
    zero(u, dst + n, len - n);
    return any;
  }

  bool fill_raw(size_t i, uint64_t off, size_t dst, size_t len, PlannedUnit& u) {
    auto d = raw_data_at_or_after(i, off);
    if (!d || *d >= off + len) {
      zero(u, dst, len);
      return false;
    }
    add(u, Op{Op::Raw, static_cast<uint32_t>(i), dst, len, off});
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

  void check_data(const ChainLayer& l, uint64_t guest, uint64_t host, size_t len) {
    if (host > l.file_size || len > l.file_size - host)
      corrupt(l,
              fmt::format("qcow2 data for guest offset {:#x} (at {:#x}) lies beyond the end of the "
                          "file ({} bytes): truncated or corrupt",
                          guest, host, l.file_size));
  }

  // Reads the compressed bytes of the cluster under guest offset p of layer i (once, however
  // many ops copy from it) and plans the copy of [p, p+len) out of its inflated form.
  void plan_compressed(size_t i, uint64_t p, size_t dst, size_t len, PlannedUnit& u) {
    const ChainLayer& l = chain_[i];
    const Qcow2Header& h = *l.qcow2;
    const uint64_t cs = h.cluster_size();
    const uint64_t cl = p >> h.cluster_bits;
    LayerCursor& c = cursors_[i];
    Inflated* s = c.inflated;
    if (!s || s->cl != cl) {
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
      if (free_slots_.empty()) {
        slots_.push_back(std::make_unique<Inflated>());
        free_slots_.push_back(slots_.back().get());
      }
      s = free_slots_.back();
      free_slots_.pop_back();
      s->layer = i;
      s->cl = cl;
      s->why = nullptr;
      s->last_unit = u.seq;  // owned by this unit from here, even if the read below fails
      s->compressed.resize(static_cast<size_t>(std::min(csize, l.file_size - offset)));
      s->compressed.resize(read_layer(l, s->compressed, offset));
      s->cluster.resize(static_cast<size_t>(cs));
      c.inflated = s;
      u.inflate.push_back(s);
    }
    s->last_unit = u.seq;
    add(u, Op{Op::Copy, static_cast<uint32_t>(i), dst, len, p & (cs - 1), s});
  }

  const std::vector<ChainLayer>& chain_;
  uint32_t unit_;
  int threads_;
  size_t window_max_;
  std::vector<LayerCursor> cursors_;
  std::vector<uint64_t> limits_;
  uint64_t pos_ = 0;       // the end of the last unit handed out
  uint64_t plan_pos_ = 0;  // the end of the last unit planned
  uint64_t seq_ = 0;
  bool planned_all_ = false;
  std::vector<std::unique_ptr<Inflated>> slots_;
  std::vector<Inflated*> free_slots_;
  std::deque<PlannedUnit> window_;
  std::vector<PlannedUnit> spare_;
  std::mutex dec_mu_;
  std::vector<std::unique_ptr<ClusterDecompressor>> dec_free_[3];
  // Last: destroyed first, so its threads finish their tasks (which write into slots_ and
  // dec_free_) before those go.
  std::optional<WorkerPool> pool_;
};

class Qcow2Source final : public Source {
 public:
  Qcow2Source(std::string name, std::vector<ChainLayer> chain, int threads)
      : name_(std::move(name)),
        chain_(std::move(chain)),
        threads_(std::clamp(
            threads ? threads : static_cast<int>(std::thread::hardware_concurrency()), 1, 1024)) {
    set_files(chain_files(chain_));
  }
  const std::string& name() const override { return name_; }
  std::optional<uint64_t> known_size() const override { return chain_.front().size; }
  std::optional<uint64_t> input_bytes() const override { return chain_.front().size; }
  bool rereadable() const override { return true; }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    return std::make_unique<Qcow2Pass>(chain_, unit, threads_);
  }

 private:
  std::string name_;
  std::vector<ChainLayer> chain_;
  int threads_;
};

}  // namespace

std::unique_ptr<Source> open_qcow2_source(UniqueFd fd, const std::string& path,
                                          const SourceOptions& options) {
  if (options.layout)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: --layout applies to raw sources; a qcow2 image has its own "
                            "allocation map",
                            path));
  return std::make_unique<Qcow2Source>(
      path, open_image_chain(std::move(fd), path, options.on_warning), options.threads);
}

std::unique_ptr<Source> open_remote_qcow2_source(ReadAt read, uint64_t file_size,
                                                 const std::string& name,
                                                 const SourceOptions& options) {
  return std::make_unique<Qcow2Source>(
      name, open_remote_image(std::move(read), file_size, name, options.on_warning),
      options.threads);
}

}  // namespace diskferry
