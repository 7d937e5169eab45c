// qcow2 v3, written front to back: header cluster, data clusters in guest order, then L2 tables,
// L1 table, refcount table and refcount blocks. The spec allows metadata anywhere; putting it
// after the data means the planned and single-pass ways produce the same file.
#include <fmt/format.h>
#include <algorithm>
#include <deque>
#include <future>
#include <optional>
#include <vector>

#include "format/alloc_runs.hpp"
#include "format/writer.hpp"
#include "image/source.hpp"
#include "pipeline/worker_pool.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCompressed = 1ull << 62;
constexpr uint32_t kRefcountOrder = 4;  // 16-bit refcounts, QEMU's default
constexpr uint32_t kHeaderLength = 112;

// Where everything goes, derived from the allocation plan alone.
struct Layout {
  uint64_t data_end = 0;  // cluster aligned
  uint64_t l2_tables = 0, l2_offset = 0;
  uint64_t l1_size = 0, l1_offset = 0, l1_clusters = 0;
  uint64_t rt_offset = 0, rt_clusters = 0;
  uint64_t rb_offset = 0, rb_count = 0;
  uint64_t file_end = 0;
};

// One allocated cluster: where it lives in the host file and how many bytes it takes there.
struct HostCluster {
  uint64_t guest = 0;
  uint64_t offset = 0;
  uint32_t stored = 0;  // == cluster size: stored plain; less: compressed
};

class Qcow2Writer final : public FormatWriter {
 public:
  explicit Qcow2Writer(const WriterOptions& o)
      : opts_(o),
        cs_(o.cluster_size),
        l2e_(cs_ / 8),
        rbe_(cs_ * 8 / (1u << kRefcountOrder)),
        compress_(o.cluster_codec != ClusterCodec::None),
        // A compressed cluster stores at least cs/32768 bytes so that no host cluster is shared
        // by more than 32769 entries: its refcount then fits 16 bits.
        min_stored_(std::max<uint32_t>(1, cs_ >> 15)) {
    while ((1u << cluster_bits_) < cs_) ++cluster_bits_;
    if (compress_) pool_.emplace(opts_.threads);
  }

  uint32_t unit() const override { return std::max<uint32_t>(cs_, 1u << 20); }
  bool needs_header_fixup() const override { return true; }

  void plan(uint64_t offset, Bytes data) override {
    mode_ = Mode::Plan;
    process(offset, data);
  }
  void end_plan(uint64_t source_size) override {
    drain(0);
    planned_vsize_ = virtual_disk_size(source_size);
    layout_ = compute_layout(planned_vsize_);
    have_plan_ = true;
  }
  uint64_t planned_size() const override { return layout_.file_end; }
  uint64_t max_size(uint64_t source_size) const override {
    uint64_t vclusters = div_round_up(virtual_disk_size(source_size), cs_);
    return layout_after_data(virtual_disk_size(source_size), cs_ * (1 + vclusters),
                             div_round_up(vclusters, l2e_))
        .file_end;
  }

  void begin(Sink& sink, bool planned) override {
    sink_ = &sink;
    planned_ = planned;
    mode_ = planned ? Mode::Verify : Mode::Write;
    if (planned) {
      if (!have_plan_) throw Error(ErrorKind::Internal, "qcow2: planned write without a plan");
      verify_.emplace(allocs_);
      verify_sizes_ = 0;
      sink.write(header_cluster(planned_vsize_, layout_));
    } else {
      if (!sink.supports_rewrite())
        throw Error(ErrorKind::Internal, "qcow2: single pass needs a rewritable destination");
      allocs_.clear();
      stored_.clear();
      sink.write_zeros(cs_);  // placeholder header, rewritten in finish()
    }
    host_pos_ = cs_;
  }

  void write(uint64_t offset, Bytes data) override { process(offset, data); }

  void finish(uint64_t source_size) override {
    drain(0);
    uint64_t vsize = virtual_disk_size(source_size);
    if (planned_) {
      if (vsize != planned_vsize_ || verify_->peek())
        throw Error(ErrorKind::Input, "source changed between the planning and the writing pass");
    } else {
      layout_ = compute_layout(vsize);
    }
    pad_to_cluster();
    if (host_pos_ != layout_.data_end)
      throw Error(ErrorKind::Internal, "qcow2: data area does not match its layout");
    write_l2_tables();
    write_l1_table();
    write_refcounts();
    if (host_pos_ != layout_.file_end)
      throw Error(ErrorKind::Internal, "qcow2: file size does not match its layout");
    if (!planned_) sink_->rewrite(0, header_cluster(vsize, layout_));
  }

 private:
  enum class Mode { Plan, Verify, Write };

  // One unit handed to a compression worker, and the non-zero clusters it yields. Jobs are
  // recycled, so their buffers are allocated once: fresh 1 MiB buffers per unit cost more in page
  // faults than the copy into them.
  struct Job {
    uint64_t offset = 0;
    std::vector<std::byte> in;
    std::vector<uint32_t> cluster_index;  // relative to offset / cluster size
    std::vector<uint32_t> stored;         // bytes stored per listed cluster
    std::vector<std::byte> bytes;         // their stored bytes, back to back
  };

  void process(uint64_t offset, Bytes data) {
    if (!compress_) {
      // Plain clusters: zero detection is cheaper than handing work to threads.
      for (size_t pos = 0; pos < data.size(); pos += cs_) {
        Bytes c = data.subspan(pos, std::min<size_t>(cs_, data.size() - pos));
        if (is_zero(c)) continue;
        uint64_t idx = (offset + pos) / cs_;
        accept(idx, cs_, c);
      }
      return;
    }
    std::unique_ptr<Job> job;
    if (!free_jobs_.empty()) {
      job = std::move(free_jobs_.back());
      free_jobs_.pop_back();
    } else {
      job = std::make_unique<Job>();
    }
    job->offset = offset;
    job->in.assign(data.begin(), data.end());
    Job* j = job.get();
    uint32_t cs = cs_, min_stored = min_stored_;
    ClusterCodec codec = opts_.cluster_codec;
    auto done =
        pool_->submit([j, cs, codec, min_stored] { compress_job(*j, cs, codec, min_stored); });
    inflight_.push_back({std::move(job), std::move(done)});
    drain(static_cast<size_t>(2 * pool_->size() + 2));
  }

  static void compress_job(Job& job, uint32_t cs, ClusterCodec codec, uint32_t min_stored) {
    thread_local std::optional<ClusterCompressor> tl[3];
    auto& comp = tl[static_cast<int>(codec)];
    if (!comp) comp.emplace(codec);
    job.cluster_index.clear();
    job.stored.clear();
    job.bytes.resize(job.in.size() + cs);  // never reallocated below: at most one cluster each
    size_t at = 0;
    thread_local std::vector<std::byte> padded;
    for (size_t pos = 0; pos < job.in.size(); pos += cs) {
      Bytes c(job.in.data() + pos, std::min<size_t>(cs, job.in.size() - pos));
      if (is_zero(c)) continue;
      if (c.size() < cs) {  // short final cluster: compress it zero-padded, as QEMU does
        padded.assign(cs, std::byte{0});
        std::copy(c.begin(), c.end(), padded.begin());
        c = Bytes(padded);
      }
      size_t n = comp->compress(c, MutableBytes(job.bytes.data() + at, cs));
      if (n == 0) {
        std::copy(c.begin(), c.end(), job.bytes.begin() + static_cast<long>(at));
        n = cs;
      } else if (n < min_stored) {
        std::fill(job.bytes.begin() + static_cast<long>(at + n),
                  job.bytes.begin() + static_cast<long>(at + min_stored), std::byte{0});
        n = min_stored;
      }
      at += n;
      job.cluster_index.push_back(static_cast<uint32_t>(pos / cs));
      job.stored.push_back(static_cast<uint32_t>(n));
    }
  }

  void drain(size_t keep) {
    while (inflight_.size() > keep) {
      auto [job, done] = std::move(inflight_.front());
      inflight_.pop_front();
      done.get();
      size_t at = 0;
      uint64_t first = job->offset / cs_;
      for (size_t i = 0; i < job->stored.size(); ++i) {
        accept(first + job->cluster_index[i], job->stored[i],
               Bytes(job->bytes.data() + at, job->stored[i]));
        at += job->stored[i];
      }
      free_jobs_.push_back(std::move(job));
    }
  }

  // One non-zero cluster, in guest order: record it (plan), check it against the plan (verify)
  // or record it; then write it unless planning.
  void accept(uint64_t idx, uint32_t stored, Bytes bytes) {
    if (mode_ == Mode::Verify) {
      auto want = verify_->peek();
      if (!want || *want != idx || (compress_ && stored_[verify_sizes_] != stored))
        throw Error(ErrorKind::Input, "source changed between the planning and the writing pass");
      verify_->advance();
      ++verify_sizes_;
    } else {
      allocs_.add(idx);
      if (compress_) stored_.push_back(stored);
    }
    if (mode_ == Mode::Plan) return;
    if (stored == cs_) pad_to_cluster();
    sink_->write(bytes);
    if (bytes.size() < stored) sink_->write_zeros(stored - bytes.size());  // short last cluster
    host_pos_ += stored;
  }

  void pad_to_cluster() {
    uint64_t to = round_up(host_pos_, cs_);
    if (to > host_pos_) sink_->write_zeros(to - host_pos_);
    host_pos_ = to;
  }

  // Replays data placement from the plan: the host offset of every allocated cluster.
  class Placement {
   public:
    explicit Placement(const Qcow2Writer& w) : w_(w), cur_(w.allocs_), pos_(w.cs_) {}
    std::optional<HostCluster> next() {
      auto g = cur_.peek();
      if (!g) return std::nullopt;
      cur_.advance();
      uint32_t stored = w_.compress_ ? w_.stored_[i_++] : w_.cs_;
      if (stored == w_.cs_) pos_ = round_up(pos_, w_.cs_);
      HostCluster h{*g, pos_, stored};
      pos_ += stored;
      return h;
    }
    uint64_t end() const { return round_up(pos_, w_.cs_); }

   private:
    const Qcow2Writer& w_;
    AllocRuns::Cursor cur_;
    size_t i_ = 0;
    uint64_t pos_;  // data starts after the header cluster
  };
  Placement placement() const { return Placement(*this); }

  Layout compute_layout(uint64_t vsize) const {
    auto p = placement();
    while (p.next()) {
    }
    uint64_t l2_tables = 0, last_l1 = UINT64_MAX;
    for (auto& r : allocs_.runs()) {
      uint64_t a = r.first / l2e_, b = (r.first + r.count - 1) / l2e_;
      l2_tables += b - a + 1 - (a == last_l1 ? 1 : 0);
      last_l1 = b;
    }
    return layout_after_data(vsize, p.end(), l2_tables);
  }

  // The tables after a data area ending at `data_end` that needs `l2_tables` L2 tables.
  Layout layout_after_data(uint64_t vsize, uint64_t data_end, uint64_t l2_tables) const {
    Layout l;
    l.data_end = data_end;
    l.l2_tables = l2_tables;
    uint64_t vclusters = div_round_up(vsize, cs_);
    l.l1_size = div_round_up(vclusters, l2e_);
    if (l.l1_size > (1u << 28))
      throw Error(ErrorKind::Format, "qcow2: virtual size too large for this cluster size");
    // An empty disk has no L1 table; QEMU would count a cluster reserved for one as a leak.
    l.l1_clusters = div_round_up(l.l1_size * 8, cs_);
    l.l2_offset = l.data_end;
    l.l1_offset = l.l2_offset + l.l2_tables * cs_;
    uint64_t before = l.l1_offset / cs_ + l.l1_clusters;  // clusters before refcount structures
    // Refcount structures must count themselves: iterate to the fixed point.
    uint64_t rt = 1, rb = 1;
    for (;;) {
      uint64_t total = before + rt + rb;
      uint64_t rb2 = div_round_up(total, rbe_);
      uint64_t rt2 = div_round_up(rb2 * 8, cs_);
      if (rb2 == rb && rt2 == rt) break;
      rb = rb2;
      rt = rt2;
    }
    l.rt_offset = l.l1_offset + l.l1_clusters * cs_;
    l.rt_clusters = rt;
    l.rb_offset = l.rt_offset + rt * cs_;
    l.rb_count = rb;
    l.file_end = l.rb_offset + rb * cs_;
    return l;
  }

  std::vector<std::byte> header_cluster(uint64_t vsize, const Layout& l) const {
    std::vector<std::byte> h(cs_);
    std::byte* p = h.data();
    put_be32(p + 0, 0x514649fb);  // "QFI\xfb"
    put_be32(p + 4, 3);
    put_be32(p + 20, cluster_bits_);
    put_be64(p + 24, vsize);
    put_be32(p + 36, static_cast<uint32_t>(l.l1_size));
    put_be64(p + 40, l.l1_offset);
    put_be64(p + 48, l.rt_offset);
    put_be32(p + 56, static_cast<uint32_t>(l.rt_clusters));
    uint64_t incompatible = opts_.cluster_codec == ClusterCodec::Zstd ? (1ull << 3) : 0;
    put_be64(p + 72, incompatible);
    put_be32(p + 96, kRefcountOrder);
    put_be32(p + 100, kHeaderLength);
    p[104] = std::byte(opts_.cluster_codec == ClusterCodec::Zstd ? 1 : 0);
    // Header extensions start at 112: all zero, i.e. the end-of-extensions marker.
    return h;
  }

  void write_l2_tables() {
    std::vector<std::byte> l2(cs_);
    auto p = placement();
    auto h = p.next();
    while (h) {
      uint64_t l1 = h->guest / l2e_;
      std::fill(l2.begin(), l2.end(), std::byte{0});
      for (; h && h->guest / l2e_ == l1; h = p.next()) {
        uint64_t entry;
        if (h->stored == cs_) {
          entry = h->offset | kCopied;
        } else {
          uint64_t sectors = (h->offset + h->stored - 1) / 512 - h->offset / 512;
          entry = kCompressed | (sectors << (62 - (cluster_bits_ - 8))) | h->offset;
        }
        put_be64(l2.data() + (h->guest % l2e_) * 8, entry);
      }
      put(l2);
    }
  }

  void write_l1_table() {
    std::vector<std::byte> l1(layout_.l1_clusters * cs_);
    uint64_t next_l2 = layout_.l2_offset, last = UINT64_MAX;
    for (auto& r : allocs_.runs()) {
      for (uint64_t i = r.first / l2e_; i <= (r.first + r.count - 1) / l2e_; ++i) {
        if (i == last) continue;
        put_be64(l1.data() + i * 8, next_l2 | kCopied);
        next_l2 += cs_;
        last = i;
      }
    }
    put(l1);
  }

  void write_refcounts() {
    uint64_t total = layout_.file_end / cs_;
    std::vector<std::byte> table(layout_.rt_clusters * cs_);
    for (uint64_t i = 0; i < layout_.rb_count; ++i)
      put_be64(table.data() + i * 8, layout_.rb_offset + i * cs_);
    put(table);

    // Data clusters hold 1 each, except where compressed clusters share host clusters: there
    // each compressed cluster touching a host cluster counts once.
    DataRefcounts data(*this);
    uint64_t data_first = 1, data_end = layout_.data_end / cs_;
    std::vector<std::byte> block(cs_);
    for (uint64_t b = 0; b < layout_.rb_count; ++b) {
      std::fill(block.begin(), block.end(), std::byte{0});
      for (uint64_t i = 0; i < rbe_; ++i) {
        uint64_t c = b * rbe_ + i;
        if (c >= total) break;
        uint32_t count = (c >= data_first && c < data_end) ? data.next() : 1;
        put_be16(block.data() + i * 2, static_cast<uint16_t>(count));
      }
      put(block);
    }
  }

  // Refcounts of the data area's host clusters, in order, without materialising them.
  class DataRefcounts {
   public:
    explicit DataRefcounts(const Qcow2Writer& w) : w_(w), p_(w.placement()) {
      window_base_ = 1;
      pending_ = p_.next();
    }
    uint32_t next() {
      uint64_t c = window_base_;
      // Take every placed cluster that starts at or before host cluster c.
      while (pending_ && pending_->offset / w_.cs_ <= c) {
        uint64_t first = pending_->offset / w_.cs_;
        uint64_t last = (pending_->offset + pending_->stored - 1) / w_.cs_;
        for (uint64_t k = first; k <= last; ++k) {
          size_t slot = static_cast<size_t>(k - window_base_);
          if (window_.size() <= slot) window_.resize(slot + 1, 0);
          ++window_[slot];
        }
        pending_ = p_.next();
      }
      uint32_t v = window_.empty() ? 0 : window_.front();
      if (!window_.empty()) window_.pop_front();
      ++window_base_;
      return v;
    }

   private:
    const Qcow2Writer& w_;
    Placement p_;
    std::optional<HostCluster> pending_;
    std::deque<uint32_t> window_;
    uint64_t window_base_;
  };

  void put(const std::vector<std::byte>& v) {
    sink_->write(v);
    host_pos_ += v.size();
  }

  WriterOptions opts_;
  uint32_t cs_, l2e_, rbe_;
  uint32_t cluster_bits_ = 9;
  bool compress_;
  uint32_t min_stored_;
  std::deque<std::pair<std::unique_ptr<Job>, std::future<void>>> inflight_;
  std::vector<std::unique_ptr<Job>> free_jobs_;
  // Declared after the jobs: destroyed (joined) first, so no worker outlives its job.
  std::optional<WorkerPool> pool_;

  Mode mode_ = Mode::Plan;
  AllocRuns allocs_;
  std::vector<uint32_t> stored_;  // per allocated cluster, only when compressing
  bool have_plan_ = false, planned_ = false;
  uint64_t planned_vsize_ = 0;
  Layout layout_;
  std::optional<AllocRuns::Cursor> verify_;
  size_t verify_sizes_ = 0;

  Sink* sink_ = nullptr;
  uint64_t host_pos_ = 0;
};

}  // namespace

std::unique_ptr<FormatWriter> make_qcow2_writer(const WriterOptions& o) {
  return std::make_unique<Qcow2Writer>(o);
}

}  // namespace diskferry
