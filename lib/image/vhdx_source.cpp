#include "image/vhdx_source.hpp"

#include <fmt/format.h>
#include <algorithm>
#include <cstring>

#include "image/vhdx_header.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

class VhdxPass final : public Pass {
 public:
  VhdxPass(const VhdxImage& img, const ReadAt& read, const std::string& name, uint32_t unit)
      : img_(img), read_(read), name_(name), unit_(unit) {}

  std::optional<Chunk> next(MutableBytes buf) override {
    const uint64_t size = img_.virtual_size;
    while (pos_ < size) {
      auto b = next_present(pos_ / img_.block_size);
      if (!b) break;
      const uint64_t start = std::max(pos_, *b * img_.block_size);
      const uint64_t off = start / unit_ * unit_;
      const size_t len = static_cast<size_t>(std::min<uint64_t>(unit_, size - off));
      fill(off, buf.first(len));
      pos_ = off + len;
      return Chunk{off, len};
    }
    pos_ = size;
    return std::nullopt;
  }
  uint64_t size() const override { return img_.virtual_size; }
  // Guest bytes passed so far, as for qcow2: it grows evenly whatever the allocation.
  uint64_t consumed() const override { return pos_; }

 private:
  // The first FULLY_PRESENT block at or after b. Only forward: the BAT is scanned once a pass.
  std::optional<uint64_t> next_present(uint64_t b) {
    scan_ = std::max(scan_, b);
    while (scan_ < img_.blocks.size() && img_.block_state(scan_) != kVhdxBlockFullyPresent) ++scan_;
    if (scan_ == img_.blocks.size()) return std::nullopt;
    return scan_;
  }

  // Guest bytes [off, off + out.size()): present blocks read from the file, the rest zeros.
  // A unit lies inside one block unless the unit is larger than the block.
  void fill(uint64_t off, MutableBytes out) {
    const uint64_t bs = img_.block_size;
    for (uint64_t p = off, end = off + out.size(); p < end;) {
      const uint64_t b = p / bs;
      const uint64_t n = std::min(end, (b + 1) * bs) - p;
      MutableBytes dst = out.subspan(static_cast<size_t>(p - off), static_cast<size_t>(n));
      if (img_.block_state(b) == kVhdxBlockFullyPresent) {
        // In range: read_vhdx checked every present block against the file size.
        const uint64_t host = img_.block_offset(b) + (p - b * bs);
        if (read_(dst, host) != dst.size())
          throw Error(ErrorKind::Input,
                      fmt::format("{}: VHDX file ended inside block {} (at {:#x}): it shrank "
                                  "while being read, or is truncated",
                                  name_, b, host));
      } else {
        std::memset(dst.data(), 0, dst.size());
      }
      p += n;
    }
  }

  const VhdxImage& img_;
  const ReadAt& read_;
  const std::string& name_;
  uint32_t unit_;
  uint64_t pos_ = 0;
  uint64_t scan_ = 0;
};

class VhdxSource final : public Source {
 public:
  VhdxSource(std::string name, UniqueFd fd, ReadAt read, uint64_t file_size)
      : name_(std::move(name)), fd_(std::move(fd)), read_(std::move(read)) {
    if (!read_) {
      int raw = fd_.get();
      read_ = [raw, this](MutableBytes b, uint64_t off) { return pread_some(raw, b, off, name_); };
    }
    img_ = read_vhdx(read_, file_size, name_);
  }
  const std::string& name() const override { return name_; }
  std::optional<uint64_t> known_size() const override { return img_.virtual_size; }
  std::optional<uint64_t> input_bytes() const override { return img_.virtual_size; }
  bool rereadable() const override { return true; }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    return std::make_unique<VhdxPass>(img_, read_, name_, unit);
  }

 private:
  std::string name_;
  UniqueFd fd_;
  ReadAt read_;
  VhdxImage img_;
};

void refuse_layout(const std::string& name, const SourceOptions& options) {
  if (options.layout)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: --layout applies to raw sources; a VHDX image has its own "
                            "allocation map",
                            name));
}

}  // namespace

std::unique_ptr<Source> open_vhdx_source(UniqueFd fd, const std::string& path, uint64_t file_size,
                                         const SourceOptions& options) {
  refuse_layout(path, options);
  return std::make_unique<VhdxSource>(path, std::move(fd), ReadAt{}, file_size);
}

std::unique_ptr<Source> open_vhdx_source_at(ReadAt read, uint64_t file_size,
                                            const std::string& name, const SourceOptions& options) {
  refuse_layout(name, options);
  return std::make_unique<VhdxSource>(name, UniqueFd{}, std::move(read), file_size);
}

}  // namespace diskferry
