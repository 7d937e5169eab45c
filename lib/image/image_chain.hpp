// A qcow2 image and its backing files, opened once and resolved to the files they name. The
// chain is read-only and shared by every pass over it; passes keep their own caches.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "image/qcow2_header.hpp"
#include "util/bytes.hpp"
#include "util/fd.hpp"
#include "util/file_identity.hpp"

namespace diskferry {

// At most this many backing files below the image named (QEMU has no fixed limit; real chains
// are a few snapshots deep, and a bound stops a hostile or looping chain early).
inline constexpr size_t kMaxBackingDepth = 64;

// Reads at an offset into a buffer; short only at the end of the file.
using ReadAt = std::function<size_t(MutableBytes buf, uint64_t offset)>;

struct ChainLayer {
  std::string name;  // the path as opened, for messages
  UniqueFd fd;
  ReadAt read;  // set for a remote image (fd then unused), else reads go to fd
  uint64_t file_size = 0;
  uint64_t size = 0;                 // guest-visible bytes of this layer
  std::optional<Qcow2Header> qcow2;  // nullopt: a raw file
  std::vector<uint64_t> l1;          // qcow2: the active L1 table, host byte order
  std::optional<FileIdentity> file;  // a local layer: which file it is
};

// The local files of a chain, top first.
FileIdentities chain_files(const std::vector<ChainLayer>& chain);

using Warn = std::function<void(const std::string&)>;

// Opens the qcow2 image `fd` (named `path`) and its backing chain. Relative backing names are
// resolved against the directory of the image that names them; the backing-format extension
// decides raw or qcow2, else the magic does. Throws Error(Input|Format) naming the file and the
// cause: damage, unsupported features, a loop, a chain deeper than kMaxBackingDepth, a backing
// file that cannot be opened. `warn` hears about readable oddities (a dirty image).
std::vector<ChainLayer> open_image_chain(UniqueFd fd, const std::string& path, const Warn& warn);

// A qcow2 image that is not a local file (on an SFTP server), read through `read`. It may not
// have a backing file: those are named relative to the remote's directory and would have to
// be fetched too (refused, naming the backing file).
std::vector<ChainLayer> open_remote_image(ReadAt read, uint64_t file_size, const std::string& name,
                                          const Warn& warn);

// Reads of a layer, local or remote.
size_t read_layer(const ChainLayer& l, MutableBytes buf, uint64_t offset);

// Where a backing name points, as QEMU resolves it: absolute names as they are, relative ones
// against the directory of `image`.
std::string resolve_backing_name(const std::string& image, const std::string& backing);

}  // namespace diskferry
