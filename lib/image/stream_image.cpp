#include "image/stream_image.hpp"

#include <fmt/format.h>
#include <algorithm>
#include <cstring>
#include <set>
#include <thread>

#include "image/qcow2_header.hpp"
#include "image/qcow2_source.hpp"
#include "image/vhdx_header.hpp"
#include "image/vhdx_source.hpp"
#include "pipeline/progress.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

constexpr size_t kChunk = 1u << 20;             // one read of the decoder
constexpr uint64_t kL2Speculate = 64ull << 20;  // kept before the L1 table in pass 1
constexpr uint64_t kMaxTables = 4ull << 30;     // L2 tables held at most (a 4 PiB disk at 64K)
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;  // bits 9-55 of L1 and L2 entries
constexpr uint64_t kCompressed = 1ULL << 62;
constexpr uint64_t kZero = 1ULL << 0;

}  // namespace

RestartableStream::RestartableStream(std::string name, StreamOpener open,
                                     std::unique_ptr<ByteReader> first)
    : name_(std::move(name)), open_(std::move(open)), reader_(std::move(first)) {
  set_lookback(4u << 20);
}

void RestartableStream::set_lookback(size_t bytes) {
  std::lock_guard lock(mu_);
  lookback_ = std::max(bytes, kChunk);
  // Compacting moves at most lookback_ bytes per lookback_ bytes read.
  if (win_.size() < 2 * lookback_ + kChunk) win_.resize(2 * lookback_ + kChunk);
}

void RestartableStream::restart() {
  if (!started_ && reader_) {
    started_ = true;  // the reader given at construction, still at byte 0
  } else {
    reader_.reset();  // one download at a time
    reader_ = open_();
    started_ = true;
  }
  pos_ = 0;
  win_len_ = 0;
  eof_ = false;
  ++sweeps_;
}

void RestartableStream::advance(uint64_t target, uint64_t keep_from) {
  while (pos_ < target && !eof_) {
    if (win_.size() - win_len_ < kChunk) {
      // Keep what a read may still want: from keep_from, and kLookback behind the target.
      uint64_t keep = std::min(keep_from, target > lookback_ ? target - lookback_ : 0);
      keep = std::clamp(keep, window_start(), pos_);
      size_t drop = static_cast<size_t>(keep - window_start());
      std::memmove(win_.data(), win_.data() + drop, win_len_ - drop);
      win_len_ -= drop;
      if (win_.size() - win_len_ < kChunk)
        throw Error(ErrorKind::Internal, fmt::format("{}: stream window overflow", name_));
    }
    size_t got = reader_->read(MutableBytes(win_.data() + win_len_, kChunk));
    win_len_ += got;
    pos_ += got;
    if (got < kChunk) {
      eof_ = true;
      size_ = pos_;
    }
    if (progress_) progress_(reader_->consumed());
  }
}

size_t RestartableStream::read_at(uint64_t offset, MutableBytes buf) {
  std::lock_guard lock(mu_);
  return read_locked(offset, buf);
}

size_t RestartableStream::read_locked(uint64_t offset, MutableBytes buf) {
  auto it = captures_.upper_bound(offset);
  if (it != captures_.begin()) {
    --it;
    const uint64_t start = it->first, end = start + it->second.size();
    const bool at_eof = size_ && end == *size_;
    if (offset >= start && (offset + buf.size() <= end || (at_eof && offset <= end))) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), end - offset));
      std::memcpy(buf.data(), it->second.data() + (offset - start), n);
      return n;
    }
  }
  if (size_ && offset >= *size_) return 0;
  size_t done = 0;
  while (done < buf.size()) {
    const uint64_t p = offset + done;
    if (!started_ || p < window_start()) restart();
    const size_t need = std::min(kChunk, buf.size() - done);
    if (p + need > pos_) advance(p + need, p);
    if (p >= pos_) break;  // the stream ends before p
    size_t n = static_cast<size_t>(std::min<uint64_t>(need, pos_ - p));
    std::memcpy(buf.data() + done, win_.data() + (p - window_start()), n);
    done += n;
    if (n < need) break;
  }
  return done;
}

void RestartableStream::capture(std::vector<Extent> ranges) {
  std::lock_guard lock(mu_);
  std::sort(ranges.begin(), ranges.end(),
            [](const Extent& a, const Extent& b) { return a.offset < b.offset; });
  // Those still ahead in this sweep first; the ones behind then cost one restart.
  std::stable_partition(ranges.begin(), ranges.end(),
                        [&](const Extent& e) { return !started_ || e.offset >= window_start(); });
  for (const Extent& e : ranges) {
    if (e.length > kMaxTables)
      throw Error(ErrorKind::Input,
                  fmt::format("{}: image tables of {} bytes: too large to hold", name_, e.length));
    std::vector<std::byte> b(static_cast<size_t>(e.length));
    b.resize(read_locked(e.offset, b));
    captured_bytes_ += b.size();
    auto [it, fresh] = captures_.try_emplace(e.offset);
    if (!fresh) captured_bytes_ -= it->second.size();
    it->second = std::move(b);
  }
}

const std::vector<std::byte>* RestartableStream::captured(uint64_t offset) const {
  auto it = captures_.find(offset);
  return it == captures_.end() ? nullptr : &it->second;
}

std::vector<std::byte> RestartableStream::take_capture(uint64_t offset) {
  std::lock_guard lock(mu_);
  auto it = captures_.find(offset);
  if (it == captures_.end()) return {};
  std::vector<std::byte> b = std::move(it->second);
  captured_bytes_ -= b.size();
  captures_.erase(it);
  return b;
}

void RestartableStream::keep_captured(uint64_t offset, std::vector<std::byte> bytes) {
  std::lock_guard lock(mu_);
  captured_bytes_ += bytes.size();
  auto [it, fresh] = captures_.try_emplace(offset);
  if (!fresh) captured_bytes_ -= it->second.size();
  it->second = std::move(bytes);
}

void RestartableStream::drain() {
  std::lock_guard lock(mu_);
  if (!started_) restart();
  while (!eof_) advance(pos_ + kChunk, UINT64_MAX);
}

namespace {

const char* compression_name(SourceCompression c) {
  return c == SourceCompression::Gzip ? "gzip" : "zstd";
}

// Runs of guest clusters read through the stream, in guest order: where each starts in the
// stream and how far the read goes. Sweeps the data pass needs: one, plus one per read that
// lies behind what the stream still holds.
int data_sweeps(const Qcow2Header& h, const std::vector<uint64_t>& l1, const RestartableStream& s) {
  const uint64_t cs = h.cluster_size();
  const unsigned x = 62 - (h.cluster_bits - 8);
  int sweeps = 1;
  uint64_t pos = 0;  // where the stream is after the reads so far (one sweep)
  for (uint64_t e1 : l1) {
    const uint64_t l2_off = e1 & kOffsetMask;
    if (!l2_off) continue;
    const std::vector<std::byte>* t = s.captured(l2_off);
    if (!t || t->size() < cs) continue;  // truncated: the data pass reports it
    for (uint64_t k = 0; k < cs / 8; ++k) {
      const uint64_t e = get_be64(t->data() + 8 * k);
      uint64_t host = 0, len = 0;
      if (e & kCompressed) {
        host = e & ((uint64_t{1} << x) - 1);
        uint64_t sectors = ((e >> x) & ((uint64_t{1} << (h.cluster_bits - 8)) - 1)) + 1;
        len = sectors * 512 - (host & 511);
      } else if (!(e & kZero) && (e & kOffsetMask)) {
        host = e & kOffsetMask;
        len = cs;
      } else {
        continue;
      }
      if (pos > s.lookback() && host < pos - s.lookback()) {
        ++sweeps;
        pos = host + len;
      } else {
        pos = std::max(pos, host + len);
      }
    }
  }
  return sweeps;
}

// Hands the image reader's units on (qcow2 or VHDX); at the end reads the stream to its end, so an
// outer stream cut after the last data cluster (or one whose checksum fails) still fails the pass.
class StreamDataPass final : public Pass {
 public:
  StreamDataPass(std::unique_ptr<Pass> inner, std::shared_ptr<RestartableStream> s, int planned)
      : inner_(std::move(inner)), stream_(std::move(s)), limit_(stream_->sweeps() + planned + 1) {}
  std::optional<Chunk> next(MutableBytes buf) override {
    auto c = inner_->next(buf);
    // planned + 1: the pass's first read may start the stream over. More than that would mean
    // the reader reads further out of order than the stream keeps: stop rather than download
    // the file again and again.
    if (stream_->sweeps() > limit_)
      throw Error(ErrorKind::Input,
                  fmt::format("{}: the image is read further out of order than the stream can "
                              "follow ({} reads of it so far); decompress it to a file first",
                              stream_->name(), stream_->sweeps()));
    if (!c && !drained_) {
      stream_->drain();
      drained_ = true;
    }
    return c;
  }
  uint64_t size() const override { return inner_->size(); }
  uint64_t consumed() const override { return inner_->consumed(); }

 private:
  std::unique_ptr<Pass> inner_;
  std::shared_ptr<RestartableStream> stream_;
  int limit_;
  bool drained_ = false;
};

// A qcow2 or VHDX inside a stream: the image reader over the RestartableStream, one data pass each.
class StreamImageSource final : public Source {
 public:
  StreamImageSource(std::string name, std::shared_ptr<RestartableStream> s,
                    std::unique_ptr<Source> inner, int sweeps, bool progress)
      : name_(std::move(name)),
        stream_(std::move(s)),
        inner_(std::move(inner)),
        sweeps_(sweeps),
        progress_(progress) {}
  const std::string& name() const override { return name_; }
  std::optional<uint64_t> known_size() const override { return inner_->known_size(); }
  // Progress counts guest bytes: the one measure that grows evenly over sweeps of the stream.
  std::optional<uint64_t> input_bytes() const override { return inner_->known_size(); }
  bool rereadable() const override { return true; }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    ++passes_;
    if (progress_)
      fmt::print(stderr, "{}: data pass {}: reading the stream from its start{}\n", name_, passes_,
                 sweeps_ > 1 ? fmt::format(", {} times: clusters out of order", sweeps_) : "");
    return std::make_unique<StreamDataPass>(inner_->open_pass(unit), stream_, sweeps_);
  }

 private:
  std::string name_;
  std::shared_ptr<RestartableStream> stream_;
  std::unique_ptr<Source> inner_;
  int sweeps_;
  bool progress_;
  int passes_ = 0;
};

}  // namespace

std::unique_ptr<Source> open_qcow2_stream_source(const std::string& name, StreamOpener open,
                                                 std::unique_ptr<ByteReader> first,
                                                 std::optional<uint64_t> input_bytes,
                                                 const SourceOptions& options,
                                                 SourceCompression c) {
  if (options.layout)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: --layout applies to raw sources; a qcow2 image has its own "
                            "allocation map",
                            name));
  auto s = std::make_shared<RestartableStream>(name, std::move(open), std::move(first));
  std::unique_ptr<Progress> progress;
  uint64_t read_so_far = 0;
  auto pass = [&](std::string label) {
    progress.reset();
    progress = std::make_unique<Progress>(options.progress, std::move(label), input_bytes);
    s->on_progress([&read_so_far, p = progress.get()](uint64_t done) {
      read_so_far = done;
      p->update(done);
    });
  };
  auto pass_done = [&] {
    s->on_progress({});
    if (progress) progress->done(read_so_far);
    progress.reset();
  };

  // Pass 1: the header, then forward to the L1 table. diskferry writes the L2 tables just before
  // it, so the bytes before it (up to one cluster per L1 entry) are kept on the way and most
  // often spare pass 2.
  const uint64_t max_cluster = uint64_t{1} << kQcow2MaxClusterBits;
  pass(fmt::format("qcow2 in {}: pass 1, header and L1 table", compression_name(c)));
  s->capture({{0, max_cluster}});
  const std::vector<std::byte>& head = *s->captured(0);
  Qcow2Header h = parse_qcow2_header(head, s->size().value_or(kUnknownStreamSize), name);
  if (!h.backing_file.empty())
    throw Error(ErrorKind::Input,
                fmt::format("{}: has a backing file ({}); an image inside a compressed stream is "
                            "read on its own (diskferry's backups have none)",
                            name, h.backing_file));
  const uint64_t cs = h.cluster_size();
  // The qcow2 reader plans up to 2 x threads + 2 units ahead (one thread per core by default):
  // the stream keeps that much behind its position, so the reads it makes out of order (data of
  // a unit after the compressed clusters of later ones) never restart it.
  const uint64_t unit = std::max<uint64_t>(cs, 1u << 20);
  const uint64_t cores = std::max(1u, std::thread::hardware_concurrency());
  s->set_lookback(static_cast<size_t>(std::min<uint64_t>((2 * cores + 4) * unit, 256u << 20)));
  const uint64_t l1_bytes = uint64_t{h.l1_size} * 8;
  const uint64_t speculate = std::min(
      {kL2Speculate, uint64_t{h.l1_size} * cs, h.l1_offset > cs ? h.l1_offset - cs : uint64_t{0}});
  const uint64_t spec_start = h.l1_offset - speculate;
  if (l1_bytes) s->capture({{spec_start, speculate + l1_bytes}});

  std::vector<uint64_t> l1(h.l1_size);
  {
    const std::vector<std::byte>* blob = l1_bytes ? s->captured(spec_start) : nullptr;
    if (l1_bytes && (!blob || blob->size() < speculate + l1_bytes))
      throw Error(ErrorKind::Input,
                  fmt::format("{}: qcow2 image truncated inside its L1 table (the decoded stream "
                              "ends at {} bytes)",
                              name, s->position()));
    for (size_t i = 0; i < l1.size(); ++i) l1[i] = get_be64(blob->data() + speculate + 8 * i);
  }
  // The qcow2 reader checks the header and L1 again through the stream (served from memory).
  auto inner =
      open_remote_qcow2_source([s](MutableBytes b, uint64_t off) { return s->read_at(off, b); },
                               s->size().value_or(kUnknownStreamSize), name, options);

  // Keep only the L2 tables of the speculative window; the rest is data.
  std::set<uint64_t> wanted;
  for (uint64_t e : l1)
    if (e & kOffsetMask) wanted.insert(e & kOffsetMask);
  if (wanted.size() * cs > kMaxTables)
    throw Error(ErrorKind::Input,
                fmt::format("{}: {} L2 tables: too many to hold in memory", name, wanted.size()));
  std::vector<Extent> missing;
  if (l1_bytes) {
    std::vector<std::byte> blob = s->take_capture(spec_start);
    s->take_capture(0);
    for (uint64_t off : wanted) {
      if (off >= spec_start && off + cs <= spec_start + speculate) {
        const std::byte* p = blob.data() + (off - spec_start);
        s->keep_captured(off, std::vector<std::byte>(p, p + cs));
      } else {
        missing.push_back({off, cs});
      }
    }
  }
  pass_done();

  // Pass 2 (only for tables pass 1 did not see): every remaining L2 table in one sweep, those
  // still ahead of the stream without starting it over.
  if (!missing.empty()) {
    pass(fmt::format("qcow2 in {}: pass 2, {} L2 tables", compression_name(c), missing.size()));
    s->capture(missing);
    pass_done();
  }
  for (uint64_t off : wanted) {
    const std::vector<std::byte>* t = s->captured(off);
    if (!t || t->size() < cs)
      throw Error(ErrorKind::Input,
                  fmt::format("{}: qcow2 image truncated inside an L2 table (at {:#x}; the "
                              "decoded stream ends at {} bytes)",
                              name, off, s->size().value_or(s->position())));
  }

  // The data passes read clusters in the order of the guest, so the stream must hold them in
  // that order (diskferry's own images always do); each step back costs another sweep.
  const int sweeps = data_sweeps(h, l1, *s);
  if (sweeps > kMaxDataSweeps)
    throw Error(ErrorKind::Input,
                fmt::format("{}: its data clusters are far out of guest order (a qcow2 not "
                            "written by diskferry), which would take {} reads of the {} stream "
                            "per pass; a compressed stream cannot seek: decompress it to a file "
                            "first (diskferry convert SOURCE --source-format raw -O raw -o "
                            "FILE.qcow2), then convert that file",
                            name, sweeps, compression_name(c)));
  return std::make_unique<StreamImageSource>(name, std::move(s), std::move(inner), sweeps,
                                             options.progress);
}

// A VHDX inside a stream. Its structure is all in the first MiB (headers, region tables) and in
// the regions they name (BAT, metadata: diskferry puts them after the payload), so pass 1 keeps
// the first MiB, then each region as the stream passes it, and reads on to the end to learn the
// file's size; the VHDX reader then finds its tables in memory, and every Source pass streams the
// payload blocks in file order.
std::unique_ptr<Source> open_vhdx_stream_source(const std::string& name, StreamOpener open,
                                                std::unique_ptr<ByteReader> first,
                                                std::optional<uint64_t> input_bytes,
                                                const SourceOptions& options, SourceCompression c) {
  if (options.layout)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: --layout applies to raw sources; a VHDX image has its own "
                            "allocation map",
                            name));
  constexpr uint64_t kHeaderSection = 1u << 20;
  constexpr uint64_t kRegionTable = 192u << 10;  // the first region table (MS-VHDX 2.2.3)
  constexpr uint64_t kMaxRegion = 256u << 20;    // larger regions are read by the reader itself
  auto s = std::make_shared<RestartableStream>(name, std::move(open), std::move(first));
  Progress progress(
      options.progress,
      fmt::format("VHDX in {}: pass 1, headers, BAT and metadata", compression_name(c)),
      input_bytes);
  uint64_t read_so_far = 0;
  s->on_progress([&](uint64_t done) {
    read_so_far = done;
    progress.update(done);
  });
  s->capture({{0, kHeaderSection}});
  const std::vector<std::byte>& head = *s->captured(0);
  // Only where the regions are: the reader checks signatures and CRCs when it parses them.
  std::vector<Extent> regions;
  if (head.size() >= kRegionTable + 16 && std::memcmp(&head[kRegionTable], "regi", 4) == 0) {
    uint32_t n = get_le32(&head[kRegionTable + 8]);
    uint64_t total = 0;
    for (uint32_t i = 0; i < std::min<uint32_t>(n, 2047); ++i) {
      const size_t e = kRegionTable + 16 + size_t{i} * 32;
      if (e + 32 > head.size()) break;
      uint64_t off = get_le64(&head[e + 16]);
      uint64_t len = get_le32(&head[e + 24]);
      if (off < kHeaderSection || len == 0 || len > kMaxRegion || total + len > 2 * kMaxRegion)
        continue;
      bool overlaps = false;
      for (const auto& r : regions) overlaps |= off < r.end() && r.offset < off + len;
      if (overlaps) continue;
      regions.push_back({off, len});
      total += len;
    }
  }
  if (!regions.empty()) s->capture(regions);
  s->drain();  // the size, and a complete stream
  s->on_progress({});
  progress.done(read_so_far);
  const uint64_t size = *s->size();
  ReadAt read = [s](MutableBytes b, uint64_t off) { return s->read_at(off, b); };
  VhdxImage img = read_vhdx(read, size, name);
  // Payload blocks are read in guest order; each step back in the file is another sweep.
  int sweeps = 1;
  uint64_t last = 0;
  for (uint64_t b = 0; b < img.blocks.size(); ++b) {
    if (img.block_state(b) != kVhdxBlockFullyPresent) continue;
    if (img.block_offset(b) < last) ++sweeps;
    last = img.block_offset(b);
  }
  if (sweeps > kMaxDataSweeps)
    throw Error(ErrorKind::Input,
                fmt::format("{}: its payload blocks are far out of guest order (a VHDX not "
                            "written by diskferry), which would take {} reads of the {} stream "
                            "per pass; a compressed stream cannot seek: decompress it to a file "
                            "first (diskferry convert SOURCE --source-format raw -O raw -o "
                            "FILE.vhdx), then convert that file",
                            name, sweeps, compression_name(c)));
  s->set_lookback(static_cast<size_t>(std::min<uint64_t>(4 * uint64_t{img.block_size}, 64u << 20)));
  auto inner = open_vhdx_source_at(read, size, name, options);
  return std::make_unique<StreamImageSource>(name, std::move(s), std::move(inner), sweeps,
                                             options.progress);
}

}  // namespace diskferry
