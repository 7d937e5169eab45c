#include "image/image_chain.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <algorithm>
#include <cerrno>
#include <utility>

#include "util/error.hpp"

namespace diskferry {
namespace {

// Size and identity of an open regular file or block device. Anything else (a FIFO, a
// character device) is refused: a backing file must be read at random offsets.
std::pair<uint64_t, FileIdentity> stat_image(int fd, const std::string& name) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno(ErrorKind::Input, name, "cannot stat", errno);
  auto id = identify_fd(fd, name);
  if (!id)
    throw Error(
        ErrorKind::Input,
        fmt::format("{}: not a regular file or block device, cannot be read as an image", name));
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (id->block && ::ioctl(fd, BLKGETSIZE64, &size) != 0)
    throw_errno(ErrorKind::Input, name, "cannot get block device size", errno);
  return {size, *id};
}

std::vector<uint64_t> read_l1(const ChainLayer& l) {
  const Qcow2Header& h = *l.qcow2;
  std::vector<std::byte> raw(size_t{h.l1_size} * 8);  // ≤ 32 MiB and inside the file (checked)
  if (read_layer(l, raw, h.l1_offset) != raw.size())
    throw Error(ErrorKind::Input,
                fmt::format("{}: qcow2 image truncated inside its L1 table", l.name));
  std::vector<uint64_t> l1(h.l1_size);
  for (size_t i = 0; i < l1.size(); ++i) l1[i] = get_be64(raw.data() + 8 * i);
  return l1;
}

// QEMU's path_has_protocol: a colon before the first slash ("nbd:…", "json:{…}").
bool names_protocol(const std::string& s) {
  size_t colon = s.find(':');
  return colon != std::string::npos && colon < s.find('/');
}

void open_qcow2_layer(ChainLayer& l, const Warn& warn) {
  // The first cluster holds the header, its extensions and the backing name; 2 MiB is the
  // largest cluster, so one read covers every cluster size.
  std::vector<std::byte> head(
      static_cast<size_t>(std::min<uint64_t>(l.file_size, uint64_t{1} << kQcow2MaxClusterBits)));
  head.resize(read_layer(l, head, 0));
  l.qcow2 = parse_qcow2_header(head, l.file_size, l.name);
  l.size = l.qcow2->size;
  l.l1 = read_l1(l);
  if (l.qcow2->dirty && warn)
    warn(
        fmt::format("{}: qcow2 image is marked dirty (its VM did not shut down cleanly, or is "
                    "running); reading it anyway: only its refcounts can be stale, not its data",
                    l.name));
}

}  // namespace

FileIdentities chain_files(const std::vector<ChainLayer>& chain) {
  FileIdentities files;
  for (const auto& l : chain) {
    if (!l.file) continue;
    files.push_back(*l.file);
    files.back().name = files.size() == 1 ? "the source " + l.name
                                          : fmt::format("{}, a backing file of the source", l.name);
  }
  return files;
}

size_t read_layer(const ChainLayer& l, MutableBytes buf, uint64_t offset) {
  if (l.read) return l.read(buf, offset);
  return pread_some(l.fd.get(), buf, offset, l.name);
}

std::vector<ChainLayer> open_remote_image(ReadAt read, uint64_t file_size, const std::string& name,
                                          const Warn& warn) {
  ChainLayer top;
  top.name = name;
  top.read = std::move(read);
  top.file_size = file_size;
  open_qcow2_layer(top, warn);
  if (!top.qcow2->backing_file.empty())
    throw Error(ErrorKind::Input,
                fmt::format("{}: has a backing file ({}); a remote image is read on its own "
                            "(diskferry's backups have none)",
                            name, top.qcow2->backing_file));
  std::vector<ChainLayer> chain;
  chain.push_back(std::move(top));
  return chain;
}

std::string resolve_backing_name(const std::string& image, const std::string& backing) {
  if (backing.empty() || backing.front() == '/') return backing;
  size_t slash = image.rfind('/');
  if (slash == std::string::npos) return backing;
  return image.substr(0, slash + 1) + backing;
}

std::vector<ChainLayer> open_image_chain(UniqueFd fd, const std::string& path, const Warn& warn) {
  std::vector<ChainLayer> chain;
  FileIdentities seen;  // a chain is at most kMaxBackingDepth files: a list will do
  ChainLayer top;
  top.name = path;
  top.fd = std::move(fd);
  auto [size, id] = stat_image(top.fd.get(), top.name);
  top.file_size = size;
  top.file = id;
  seen.push_back(id);
  open_qcow2_layer(top, warn);
  chain.push_back(std::move(top));

  while (chain.back().qcow2 && !chain.back().qcow2->backing_file.empty()) {
    const ChainLayer& upper = chain.back();
    const std::string& named = upper.qcow2->backing_file;
    if (chain.size() > kMaxBackingDepth)
      throw Error(ErrorKind::Input, fmt::format("{}: backing chain deeper than {} files (at {})",
                                                path, kMaxBackingDepth, upper.name));
    if (names_protocol(named))
      throw Error(ErrorKind::Format,
                  fmt::format("{}: backing file '{}' names a protocol, not a local file; "
                              "diskferry reads local backing files only",
                              upper.name, named));
    ChainLayer l;
    l.name = resolve_backing_name(upper.name, named);
    // O_NONBLOCK: a backing name pointing at a FIFO must fail in stat_image, not hang here.
    int raw_fd = ::open(l.name.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (raw_fd < 0)
      throw_errno(ErrorKind::Input, upper.name,
                  fmt::format("cannot open its backing file {}", l.name), errno);
    l.fd = UniqueFd(raw_fd);
    std::tie(l.file_size, l.file) = stat_image(l.fd.get(), l.name);
    if (std::any_of(seen.begin(), seen.end(),
                    [&](const FileIdentity& f) { return f.same_file(*l.file); }))
      throw Error(ErrorKind::Input,
                  fmt::format("{}: backing chain loops: {} is already part of it", path, l.name));
    seen.push_back(*l.file);

    std::vector<std::byte> magic(4);
    magic.resize(pread_some(l.fd.get(), magic, 0, l.name));
    const std::optional<std::string>& fmt_name = upper.qcow2->backing_format;
    bool qcow2 = false;
    if (!fmt_name) {
      qcow2 = is_qcow2_magic(magic);
      if (warn)
        warn(fmt::format("{}: no backing format recorded for {}; probed as {}", upper.name, l.name,
                         qcow2 ? "qcow2" : "raw"));
    } else if (*fmt_name == "qcow2") {
      qcow2 = true;
    } else if (*fmt_name != "raw") {
      throw Error(ErrorKind::Format,
                  fmt::format("{}: backing file {} has format '{}'; diskferry reads raw and "
                              "qcow2 backing files only",
                              upper.name, l.name, *fmt_name));
    }
    if (qcow2) {
      open_qcow2_layer(l, warn);
    } else {
      l.size = l.file_size;
    }
    chain.push_back(std::move(l));
  }
  return chain;
}

}  // namespace diskferry
