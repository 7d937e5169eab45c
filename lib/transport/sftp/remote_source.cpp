#include "transport/sftp/remote_source.hpp"

#include <fmt/format.h>

#include "codec/decode.hpp"
#include "image/qcow2_header.hpp"
#include "image/qcow2_source.hpp"
#include "image/vhdx_header.hpp"
#include "image/vhdx_source.hpp"

namespace diskferry::sftp {

std::unique_ptr<Source> open_remote_source(const Url& url, const ReadOptions& read,
                                           const SourceOptions& options) {
  auto file = std::make_shared<RemoteFile>(url, read);
  const std::string name = url.str();
  std::vector<std::byte> head(8);
  head.resize(file->read_at(0, head));
  const bool raw_forced =
      options.format == SourceFormat::Raw || options.format == SourceFormat::File;
  if (!raw_forced && detect_compression(head) == SourceCompression::None) {
    ReadAt read_at = [file](MutableBytes buf, uint64_t off) { return file->read_at(off, buf); };
    if (options.format == SourceFormat::Qcow2 ||
        (options.format == SourceFormat::Auto && is_qcow2_magic(head)))
      return open_remote_qcow2_source(std::move(read_at), file->size(), name, options);
    if (options.format == SourceFormat::Vhdx ||
        (options.format == SourceFormat::Auto && is_vhdx_magic(head)))
      return open_vhdx_source_at(std::move(read_at), file->size(), name, options);
  }
  // Each pass reads the file again from its start: the first one on the connection already
  // open, later ones on a new one.
  auto first = std::make_shared<std::shared_ptr<RemoteFile>>(file);
  file->seek(0);
  auto open = [first, url, read]() -> std::unique_ptr<ByteReader> {
    struct Shared final : ByteReader {
      std::shared_ptr<RemoteFile> f;
      explicit Shared(std::shared_ptr<RemoteFile> p) : f(std::move(p)) {}
      size_t read(MutableBytes b) override { return f->read(b); }
      uint64_t consumed() const override { return f->consumed(); }
    };
    if (*first) return std::make_unique<Shared>(std::exchange(*first, nullptr));
    return std::make_unique<RemoteFile>(url, read);
  };
  return open_stream_source(name, std::move(open), file->size(), options);
}

}  // namespace diskferry::sftp
