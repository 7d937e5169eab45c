// The tar container stage (`--container tar`, OVA): the image becomes the last member of a POSIX
// tar stream, after the small files given with it (an .ovf descriptor first makes an OVA).
// A tar header holds the member's size before its bytes, so the image's exact size must be known
// before its first byte: containers always use the planned layout (or a raw image of known size).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "transport/sink.hpp"
#include "util/file_identity.hpp"

namespace diskferry {

struct ContainerMember {
  std::string name;  // the member's name in the archive
  std::string data;  // its bytes (descriptors, manifests: small files read once)
  int64_t mtime = 0;
  std::optional<FileIdentity> file{};  // the file it was read from, which no output may replace
};

struct ContainerOptions {
  bool tar = false;
  std::vector<ContainerMember> files;  // before the image, in this order
  std::string image_name;              // the image's member name
  // The image member's time. It must not change between the attempts of one backup (a resumed
  // upload regenerates the same bytes), so it comes from the source, never from the clock.
  int64_t image_mtime = 0;
};

// Largest member read into memory by read_container_file (descriptors are a few KiB).
inline constexpr uint64_t kMaxContainerFile = 16 << 20;

// Reads FILE for --container-file: its name in the archive is its base name; its time, its mtime.
// Throws Error(Input) naming the file and the cause (missing, not a regular file, too large).
ContainerMember read_container_file(const std::string& path);

// Bytes the whole archive takes when the image holds `image_bytes`.
uint64_t tar_size(const ContainerOptions& c, uint64_t image_bytes);

// Writes the headers and the members before the image on its first write, then passes the image
// through and ends the archive on commit. Throws Error(Internal) on commit when the image was
// not exactly `image_bytes` long (the headers would lie).
std::unique_ptr<Sink> make_tar_sink(const ContainerOptions& c, uint64_t image_bytes,
                                    std::unique_ptr<Sink> inner);

// The archive's header blocks for one member, exposed for tests: a pax extended header first
// when the size or the name does not fit ustar's fields.
std::string tar_member_header(const std::string& name, uint64_t size, int64_t mtime);

}  // namespace diskferry
