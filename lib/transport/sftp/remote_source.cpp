#include "transport/sftp/remote_source.hpp"

#include <fmt/format.h>

#include "codec/decode.hpp"
#include "image/checked_source.hpp"
#include "image/qcow2_header.hpp"
#include "image/qcow2_source.hpp"
#include "image/vhdx_header.hpp"
#include "image/vhdx_source.hpp"
#include "pipeline/checksum.hpp"

namespace diskferry::sftp {
namespace {

// The SHA-256 that NAME.sha256 beside the backup gives; null when there is none (backups copied
// by other means may not have one), with `warning` set to say so once the source opened.
std::shared_ptr<const ExpectedSha256> sidecar_sha256(const Url& url, const ReadOptions& read,
                                                     std::string& warning) {
  Url side = url;
  side.path += ".sha256";
  const std::string base = side.path.substr(side.path.find_last_of('/') + 1);
  auto text = read_small_file(side, read.ssh, read.stall_timeout);
  if (!text) {
    warning =
        fmt::format("{}: no {} beside it: the backup's checksum is not checked", url.str(), base);
    return nullptr;
  }
  std::string why;
  auto hex = parse_sha256_sidecar(*text, base.substr(0, base.size() - 7), why);
  if (!hex)
    throw Error(ErrorKind::Input, fmt::format("{}: {}, so the checksum of {} cannot be checked "
                                              "(--no-verify-checksum reads it anyway)",
                                              side.str(), why, url.str()));
  return std::make_shared<ExpectedSha256>(ExpectedSha256{url.str(), base, *hex});
}

}  // namespace

std::unique_ptr<Source> open_remote_source(const Url& url, const ReadOptions& read,
                                           const SourceOptions& options) {
  auto file = std::make_shared<RemoteFile>(url, read);
  std::string warning;
  auto want = options.verify_checksum ? sidecar_sha256(url, read, warning) : nullptr;
  auto opened = [&](std::unique_ptr<Source> s) {
    if (!warning.empty() && options.on_warning) options.on_warning(warning);
    return s;
  };
  const std::string name = url.str();
  std::vector<std::byte> head(8);
  head.resize(file->read_at(0, head));
  const bool raw_forced =
      options.format == SourceFormat::Raw || options.format == SourceFormat::File;
  if (!raw_forced && detect_compression(head) == SourceCompression::None) {
    ReadAt read_at = [file](MutableBytes buf, uint64_t off) { return file->read_at(off, buf); };
    std::shared_ptr<HashedReadAt> hashed;
    if (want) {
      hashed = std::make_shared<HashedReadAt>(std::move(read_at), file->size(), *want);
      read_at = [hashed](MutableBytes buf, uint64_t off) { return hashed->read(buf, off); };
    }
    std::unique_ptr<Source> image;
    if (options.format == SourceFormat::Qcow2 ||
        (options.format == SourceFormat::Auto && is_qcow2_magic(head)))
      image = open_remote_qcow2_source(std::move(read_at), file->size(), name, options);
    else if (options.format == SourceFormat::Vhdx ||
             (options.format == SourceFormat::Auto && is_vhdx_magic(head)))
      image = open_vhdx_source_at(std::move(read_at), file->size(), name, options);
    // A pass hashes from byte 0: a later pass starts the read-ahead there again, so it serves
    // that pass's reads (the first pass finds it there, filled, after the header was read).
    auto rewind = [file] {
      if (file->consumed() > (8u << 20)) file->seek(0);
    };
    if (image && hashed) return opened(make_checked_source(std::move(image), hashed, rewind));
    if (image) return opened(std::move(image));
  }
  // Each pass reads the file again from its start: the first one on the connection already
  // open, later ones on a new one.
  auto first = std::make_shared<std::shared_ptr<RemoteFile>>(file);
  file->seek(0);
  auto open = [first, url, read, want]() -> std::unique_ptr<ByteReader> {
    struct Shared final : ByteReader {
      std::shared_ptr<RemoteFile> f;
      explicit Shared(std::shared_ptr<RemoteFile> p) : f(std::move(p)) {}
      size_t read(MutableBytes b) override { return f->read(b); }
      uint64_t consumed() const override { return f->consumed(); }
    };
    std::unique_ptr<ByteReader> r;
    if (*first)
      r = std::make_unique<Shared>(std::exchange(*first, nullptr));
    else
      r = std::make_unique<RemoteFile>(url, read);
    return want ? make_checked_reader(std::move(r), want) : std::move(r);
  };
  return opened(open_stream_source(name, std::move(open), file->size(), options));
}

}  // namespace diskferry::sftp
