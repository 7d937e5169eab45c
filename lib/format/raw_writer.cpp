// Raw output: the disk's bytes in order. Zero clusters travel as write_zeros, so a regular-file
// destination gets holes (sparse) while a pipe gets zeros. -O asis is the same over the source
// file's own bytes, without rounding the size up to whole sectors (they are a file, not a disk).
#include <algorithm>

#include "format/writer.hpp"
#include "image/source.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

constexpr uint32_t kGranule = 64 * 1024;  // zero-detection granularity

class RawWriter final : public FormatWriter {
 public:
  explicit RawWriter(bool whole_sectors) : whole_sectors_(whole_sectors) {}
  uint32_t unit() const override { return 1u << 20; }
  bool needs_header_fixup() const override { return false; }
  void plan(uint64_t, Bytes) override {}
  void end_plan(uint64_t source_size) override { size_ = output_size(source_size); }
  uint64_t planned_size() const override { return size_; }
  uint64_t max_size(uint64_t source_size) const override { return output_size(source_size); }

  void begin(Sink& sink, bool) override {
    sink_ = &sink;
    pos_ = 0;
  }
  void write(uint64_t offset, Bytes data) override {
    if (offset > pos_) sink_->write_zeros(offset - pos_);
    for (size_t at = 0; at < data.size(); at += kGranule) {
      Bytes g = data.subspan(at, std::min<size_t>(kGranule, data.size() - at));
      if (is_zero(g))
        sink_->write_zeros(g.size());
      else
        sink_->write(g);
    }
    pos_ = offset + data.size();
  }
  void finish(uint64_t source_size) override {
    uint64_t end = output_size(source_size);
    if (end > pos_) sink_->write_zeros(end - pos_);
    pos_ = end;
  }

 private:
  uint64_t output_size(uint64_t source_size) const {
    return whole_sectors_ ? virtual_disk_size(source_size) : source_size;
  }

  bool whole_sectors_;
  Sink* sink_ = nullptr;
  uint64_t pos_ = 0, size_ = 0;
};

}  // namespace

std::unique_ptr<FormatWriter> make_raw_writer(const WriterOptions& o) {
  return std::make_unique<RawWriter>(o.format != ImageFormat::Asis);
}

}  // namespace diskferry
