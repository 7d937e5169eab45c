#include "image/source.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>

#include "codec/decode.hpp"
#include "image/qcow2_header.hpp"
#include "image/qcow2_source.hpp"
#include "image/stream_image.hpp"
#include "image/vhdx_header.hpp"
#include "image/vhdx_source.hpp"
#include "util/fd.hpp"

namespace diskferry {
namespace {

UniqueFd open_input(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno(ErrorKind::Input, path, "cannot open source", errno);
  return UniqueFd(fd);
}

// Zeroes the parts of a unit that a layout file does not list. `layout` is sorted and merged.
class LayoutMask {
 public:
  LayoutMask(const std::optional<std::vector<Extent>>& layout, const std::string& layout_name)
      : layout_(layout), layout_name_(layout_name) {}
  bool active() const { return layout_.has_value(); }

  // First offset >= pos that the layout lists, or nullopt past the last range.
  std::optional<uint64_t> next_listed(uint64_t pos) {
    while (idx_ < layout_->size() && (*layout_)[idx_].end() <= pos) ++idx_;
    if (idx_ == layout_->size()) return std::nullopt;
    return std::max(pos, (*layout_)[idx_].offset);
  }

  // Zero every byte of [off, off+len) outside the layout. Returns false if nothing is listed.
  bool apply(uint64_t off, MutableBytes buf) {
    uint64_t end = off + buf.size();
    uint64_t pos = off;
    bool any = false;
    size_t i = idx_;
    while (i < layout_->size() && (*layout_)[i].end() <= off) ++i;
    for (; i < layout_->size() && (*layout_)[i].offset < end; ++i) {
      const Extent& e = (*layout_)[i];
      uint64_t s = std::max(e.offset, off), t = std::min(e.end(), end);
      if (s > pos) std::memset(buf.data() + (pos - off), 0, s - pos);
      pos = t;
      any = true;
    }
    if (pos < end) std::memset(buf.data() + (pos - off), 0, end - pos);
    return any;
  }

  void check_within(uint64_t size, const std::string& name) const {
    if (!layout_ || layout_->empty()) return;
    const Extent& last = layout_->back();
    if (last.end() > size)
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: lists bytes {}..{} but source {} has only {} bytes",
                              layout_name_, last.offset, last.end(), name, size));
  }

 private:
  const std::optional<std::vector<Extent>>& layout_;
  const std::string& layout_name_;
  size_t idx_ = 0;
};

// A raw image file or block device: holes come from SEEK_DATA/SEEK_HOLE and are never read.
class RawFilePass final : public Pass {
 public:
  RawFilePass(UniqueFd fd, const std::string& name, uint64_t size, uint32_t unit,
              const SourceOptions& opts)
      : fd_(std::move(fd)),
        name_(name),
        size_(size),
        unit_(unit),
        mask_(opts.layout, opts.layout_name) {}

  std::optional<Chunk> next(MutableBytes buf) override {
    while (pos_ < size_) {
      auto data = next_data(pos_);
      if (!data || *data >= size_) break;
      uint64_t off = *data / unit_ * unit_;
      size_t len = static_cast<size_t>(std::min<uint64_t>(unit_, size_ - off));
      size_t got = pread_some(fd_.get(), buf.first(len), off, name_);
      if (got != len)
        throw Error(ErrorKind::Input,
                    fmt::format("{}: source shrank while reading (expected {} bytes, ends at {})",
                                name_, size_, off + got));
      pos_ = off + len;
      consumed_ = pos_;
      if (mask_.active() && !mask_.apply(off, buf.first(len))) continue;
      return Chunk{off, len};
    }
    consumed_ = size_;
    pos_ = size_;
    return std::nullopt;
  }
  uint64_t size() const override { return size_; }
  uint64_t consumed() const override { return consumed_; }

 private:
  // First offset >= pos that may hold data, by the file's own map and the layout.
  std::optional<uint64_t> next_data(uint64_t pos) {
    for (;;) {
      if (mask_.active()) {
        auto listed = mask_.next_listed(pos);
        if (!listed) return std::nullopt;
        pos = *listed;
      }
      auto fs = file_data(pos);
      if (!fs) return std::nullopt;
      if (!mask_.active() || *fs == pos) return fs;
      pos = *fs;  // re-check the layout from where the file has data
    }
  }

  std::optional<uint64_t> file_data(uint64_t pos) {
    if (!seek_map_) return pos;
    if (pos >= data_start_ && pos < hole_start_) return pos;
    off_t d = ::lseek(fd_.get(), static_cast<off_t>(pos), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) return std::nullopt;  // no data after pos
      seek_map_ = false;  // filesystem or device without SEEK_DATA: read everything
      return pos;
    }
    off_t h = ::lseek(fd_.get(), d, SEEK_HOLE);
    if (h < 0) h = static_cast<off_t>(size_);
    data_start_ = static_cast<uint64_t>(d);
    hole_start_ = static_cast<uint64_t>(h);
    return data_start_;
  }

  UniqueFd fd_;
  std::string name_;
  uint64_t size_;
  uint32_t unit_;
  LayoutMask mask_;
  uint64_t pos_ = 0, consumed_ = 0;
  bool seek_map_ = true;
  uint64_t data_start_ = 0, hole_start_ = 0;
};

class RawFileSource final : public Source {
 public:
  RawFileSource(std::string path, uint64_t size, SourceOptions opts)
      : path_(std::move(path)), size_(size), opts_(std::move(opts)) {
    LayoutMask(opts_.layout, opts_.layout_name).check_within(size_, path_);
  }
  const std::string& name() const override { return path_; }
  std::optional<uint64_t> known_size() const override { return size_; }
  std::optional<uint64_t> input_bytes() const override { return size_; }
  bool rereadable() const override { return true; }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    return std::make_unique<RawFilePass>(open_input(path_), path_, size_, unit, opts_);
  }

 private:
  std::string path_;
  uint64_t size_;
  SourceOptions opts_;
};

// A byte stream (stdin, or a gzip/zstd file): every unit is read; zero detection happens later.
class StreamPass final : public Pass {
 public:
  StreamPass(std::unique_ptr<ByteReader> reader, std::string name, uint32_t unit,
             const SourceOptions& opts)
      : reader_(std::move(reader)),
        name_(std::move(name)),
        unit_(unit),
        mask_(opts.layout, opts.layout_name) {}

  std::optional<Chunk> next(MutableBytes buf) override {
    while (!eof_) {
      size_t got = reader_->read(buf.first(unit_));
      uint64_t off = pos_;
      pos_ += got;
      if (got < unit_) {
        eof_ = true;
        mask_.check_within(pos_, name_);
      }
      if (got == 0) break;
      if (mask_.active() && !mask_.apply(off, buf.first(got))) continue;
      return Chunk{off, got};
    }
    return std::nullopt;
  }
  uint64_t size() const override { return pos_; }
  uint64_t consumed() const override { return reader_->consumed(); }

 private:
  std::unique_ptr<ByteReader> reader_;
  std::string name_;
  uint32_t unit_;
  LayoutMask mask_;
  uint64_t pos_ = 0;
  bool eof_ = false;
};

class StreamSource final : public Source {
 public:
  // For stdin the already-open reader is used once; for files each pass reopens the path.
  StreamSource(std::string name, SourceCompression c, std::optional<uint64_t> file_bytes,
               std::unique_ptr<ByteReader> first, bool rereadable, SourceOptions opts,
               std::function<std::unique_ptr<ByteReader>()> reopen = {})
      : name_(std::move(name)),
        comp_(c),
        file_bytes_(file_bytes),
        first_(std::move(first)),
        rereadable_(rereadable),
        opts_(std::move(opts)),
        reopen_(std::move(reopen)) {}

  const std::string& name() const override { return name_; }
  std::optional<uint64_t> known_size() const override { return std::nullopt; }
  std::optional<uint64_t> input_bytes() const override { return file_bytes_; }
  bool rereadable() const override { return rereadable_; }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    std::unique_ptr<ByteReader> r;
    if (first_) {
      r = std::move(first_);
    } else if (rereadable_) {
      r = make_decoder(comp_, reopen_ ? reopen_() : make_fd_reader(open_input(name_), name_),
                       name_);
    } else {
      throw Error(ErrorKind::Internal, fmt::format("{}: cannot be read twice", name_));
    }
    return std::make_unique<StreamPass>(std::move(r), name_, unit, opts_);
  }

 private:
  std::string name_;
  SourceCompression comp_;
  std::optional<uint64_t> file_bytes_;
  std::unique_ptr<ByteReader> first_;
  bool rereadable_;
  SourceOptions opts_;
  std::function<std::unique_ptr<ByteReader>()> reopen_;  // empty: reopen the path
};

// A reader whose first bytes were taken off to look at them: hands them out first.
class PeekedReader final : public ByteReader {
 public:
  PeekedReader(std::unique_ptr<ByteReader> inner, std::vector<std::byte> head)
      : inner_(std::move(inner)), head_(std::move(head)) {}
  size_t read(MutableBytes buf) override {
    size_t n = std::min(buf.size(), head_.size() - pos_);
    std::memcpy(buf.data(), head_.data() + pos_, n);
    pos_ += n;
    if (n < buf.size() && pos_ == head_.size()) n += inner_->read(buf.subspan(n));
    return n;
  }
  uint64_t consumed() const override { return inner_->consumed(); }

 private:
  std::unique_ptr<ByteReader> inner_;
  std::vector<std::byte> head_;
  size_t pos_ = 0;
};

// A stream (stdin, a pipe, a .gz/.zst file) is read front to back; a qcow2 image inside one
// cannot be, since its tables point anywhere. Refused here, before any output is made.
std::unique_ptr<ByteReader> refuse_qcow2_stream(std::unique_ptr<ByteReader> r,
                                                const std::string& name, SourceCompression c,
                                                const SourceOptions& opts) {
  if (opts.format == SourceFormat::Raw || opts.format == SourceFormat::File) return r;
  std::vector<std::byte> head(8);
  head.resize(r->read(head));
  const bool vhdx = opts.format == SourceFormat::Vhdx || is_vhdx_magic(head);
  if (opts.format == SourceFormat::Qcow2 || is_qcow2_magic(head) || vhdx)
    throw Error(ErrorKind::Input,
                fmt::format("{}: a {} image{} cannot be read as a stream: its tables point "
                            "anywhere in the file, so it needs random access; give the "
                            "uncompressed image file itself",
                            name, vhdx ? "VHDX" : "qcow2",
                            c == SourceCompression::None ? "" : " inside a compressed file"));
  return std::make_unique<PeekedReader>(std::move(r), std::move(head));
}

// A qcow2 inside a .gz/.zst file that can be read again from its start: read in passes over
// the decompressed stream (image/stream_image.hpp). nullptr when the decoded bytes are something
// else; `r` is then still at byte 0.
std::unique_ptr<Source> qcow2_in_stream(std::unique_ptr<ByteReader>& r, const std::string& name,
                                        SourceCompression c, StreamOpener reopen,
                                        std::optional<uint64_t> input_bytes,
                                        const SourceOptions& opts) {
  if (c == SourceCompression::None ||
      (opts.format != SourceFormat::Auto && opts.format != SourceFormat::Qcow2 &&
       opts.format != SourceFormat::Vhdx))
    return nullptr;
  std::vector<std::byte> head(8);
  size_t got = 0;
  while (got < head.size()) {
    size_t n = r->read(MutableBytes(head).subspan(got));
    if (n == 0) break;
    got += n;
  }
  head.resize(got);
  const bool auto_ = opts.format == SourceFormat::Auto;
  const bool qcow2 = opts.format == SourceFormat::Qcow2 || (auto_ && is_qcow2_magic(head));
  const bool vhdx = opts.format == SourceFormat::Vhdx || (auto_ && is_vhdx_magic(head));
  r = std::make_unique<PeekedReader>(std::move(r), std::move(head));
  if (qcow2)
    return open_qcow2_stream_source(name, std::move(reopen), std::move(r), input_bytes, opts, c);
  if (vhdx)
    return open_vhdx_stream_source(name, std::move(reopen), std::move(r), input_bytes, opts, c);
  return nullptr;
}

std::vector<Extent> normalise(std::vector<Extent> v) {
  std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.offset < b.offset; });
  std::vector<Extent> out;
  for (auto& e : v) {
    if (e.length == 0) continue;
    if (!out.empty() && e.offset <= out.back().end())
      out.back().length = std::max(out.back().end(), e.end()) - out.back().offset;
    else
      out.push_back(e);
  }
  return out;
}

// -O asis of a qcow2 with a backing file copies the top layer alone: a file that is useless
// without the backing file, which the copy does not carry.
void warn_if_backed(int fd, const std::string& path, uint64_t size, const SourceOptions& opts) {
  if (!opts.on_warning) return;
  std::vector<std::byte> head(
      static_cast<size_t>(std::min<uint64_t>(size, uint64_t{1} << kQcow2MaxClusterBits)));
  head.resize(pread_some(fd, head, 0, path));
  std::string backing;
  try {
    backing = parse_qcow2_header(head, size, path).backing_file;
  } catch (const Error&) {
    return;  // asis copies whatever the bytes are; a damaged header is not its business
  }
  if (!backing.empty())
    opts.on_warning(fmt::format(
        "{}: has a backing file ({}), which -O asis does not copy: the copy is not standalone "
        "and cannot be restored on its own; -O qcow2 writes the whole chain as one standalone "
        "image",
        path, backing));
}

// A local file or device opened by name: raw, qcow2, VHDX, or compressed (by magic).
std::unique_ptr<Source> open_local(UniqueFd fd, const std::string& path, SourceOptions opts) {
  const bool as_file = opts.format == SourceFormat::File;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_errno(ErrorKind::Input, path, "cannot stat source", errno);
  uint64_t size = 0;
  if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd.get(), BLKGETSIZE64, &size) != 0)
      throw_errno(ErrorKind::Input, path, "cannot get block device size", errno);
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
  } else if (S_ISDIR(st.st_mode)) {
    throw Error(ErrorKind::Input, fmt::format("{}: is a directory, not a disk image", path));
  } else {
    // A pipe or character device given by name: read it once, as a stream.
    std::vector<std::byte> head(4);
    head.resize(read_some(fd.get(), head, path));
    SourceCompression c = as_file ? SourceCompression::None : detect_compression(head);
    auto reader = make_decoder(c, make_fd_reader(std::move(fd), path, head), path);
    reader = refuse_qcow2_stream(std::move(reader), path, c, opts);
    return std::make_unique<StreamSource>(path, c, std::nullopt, std::move(reader), false,
                                          std::move(opts));
  }

  std::vector<std::byte> head(8);
  head.resize(pread_some(fd.get(), head, 0, path));
  SourceCompression c = as_file ? SourceCompression::None : detect_compression(head);
  bool qcow2 = opts.format == SourceFormat::Qcow2 ||
               (opts.format == SourceFormat::Auto && is_qcow2_magic(head));
  bool vhdx = opts.format == SourceFormat::Vhdx ||
              (opts.format == SourceFormat::Auto && is_vhdx_magic(head));
  if (qcow2 && c == SourceCompression::None) return open_qcow2_source(std::move(fd), path, opts);
  if (as_file && is_qcow2_magic(head)) warn_if_backed(fd.get(), path, size, opts);
  if (vhdx && c == SourceCompression::None)
    return open_vhdx_source(std::move(fd), path, size, opts);
  if (c == SourceCompression::None)
    return std::make_unique<RawFileSource>(path, size, std::move(opts));
  // Each pass decompresses the file again; look at the first decompressed bytes now.
  auto first = make_decoder(c, make_fd_reader(std::move(fd), path), path);
  auto decoded = [path, c] {
    return make_decoder(c, make_fd_reader(open_input(path), path), path);
  };
  if (auto img = qcow2_in_stream(first, path, c, decoded, size, opts)) return img;
  refuse_qcow2_stream(std::move(first), path, c, opts);
  return std::make_unique<StreamSource>(path, c, size, nullptr, true, std::move(opts));
}

}  // namespace

SourceFormat parse_source_format(const std::string& s) {
  if (s == "raw") return SourceFormat::Raw;
  if (s == "qcow2") return SourceFormat::Qcow2;
  if (s == "vhdx") return SourceFormat::Vhdx;
  throw Error(ErrorKind::Usage,
              fmt::format("--source-format '{}': expected raw, qcow2 or vhdx", s));
}

std::unique_ptr<Source> open_source(const std::string& path, const SourceOptions& options) {
  SourceOptions opts = options;
  if (opts.layout) opts.layout = normalise(std::move(*opts.layout));
  const bool as_file = opts.format == SourceFormat::File;
  if (as_file && opts.layout)
    throw Error(ErrorKind::Usage,
                "--layout does not apply to -O asis (the file's bytes as they are)");

  if (path == "-") {
    std::vector<std::byte> head(4);
    size_t n = read_some(STDIN_FILENO, head, "stdin");
    head.resize(n);
    SourceCompression c = as_file ? SourceCompression::None : detect_compression(head);
    auto reader =
        make_decoder(c, make_fd_reader(UniqueFd(::dup(STDIN_FILENO)), "stdin", head), "stdin");
    reader = refuse_qcow2_stream(std::move(reader), "stdin", c, opts);
    auto src = std::make_unique<StreamSource>("stdin", c, std::nullopt, std::move(reader), false,
                                              std::move(opts));
    // stdin redirected from a file is that file.
    if (auto id = identify_fd(STDIN_FILENO, "the source (stdin)")) src->set_files({*id});
    return src;
  }

  UniqueFd fd = open_input(path);
  auto id = identify_fd(fd.get(), "the source " + path);
  std::unique_ptr<Source> src = open_local(std::move(fd), path, std::move(opts));
  if (src->files().empty() && id) src->set_files({*id});
  return src;
}

std::unique_ptr<Source> open_stream_source(const std::string& name,
                                           std::function<std::unique_ptr<ByteReader>()> open,
                                           std::optional<uint64_t> input_bytes,
                                           const SourceOptions& options) {
  SourceOptions opts = options;
  if (opts.layout) opts.layout = normalise(std::move(*opts.layout));
  const bool as_file = opts.format == SourceFormat::File;
  auto raw = open();
  std::vector<std::byte> head(4);
  head.resize(raw->read(head));
  SourceCompression c = as_file ? SourceCompression::None : detect_compression(head);
  auto reader =
      make_decoder(c, std::make_unique<PeekedReader>(std::move(raw), std::move(head)), name);
  auto decoded = [open, c, name] { return make_decoder(c, open(), name); };
  if (auto img = qcow2_in_stream(reader, name, c, decoded, input_bytes, opts)) return img;
  reader = refuse_qcow2_stream(std::move(reader), name, c, opts);
  return std::make_unique<StreamSource>(name, c, input_bytes, std::move(reader), true,
                                        std::move(opts), std::move(open));
}

}  // namespace diskferry
