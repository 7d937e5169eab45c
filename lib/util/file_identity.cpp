#include "util/file_identity.hpp"

#include <fmt/format.h>
#include <sys/stat.h>

#include "util/error.hpp"

namespace diskferry {
namespace {

std::optional<FileIdentity> from_stat(const struct stat& st, const std::string& name) {
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) return std::nullopt;
  return FileIdentity{name, st.st_dev, st.st_ino, st.st_rdev, S_ISBLK(st.st_mode)};
}

}  // namespace

std::optional<FileIdentity> identify_fd(int fd, const std::string& name) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return std::nullopt;
  return from_stat(st, name);
}

std::optional<FileIdentity> identify_path(const std::string& path, const std::string& name) {
  struct stat st {};
  if (path.empty() || ::stat(path.c_str(), &st) != 0) return std::nullopt;
  return from_stat(st, name.empty() ? path : name);
}

void refuse_input_as_destination(const std::optional<FileIdentity>& dest,
                                 const std::string& dest_name, const FileIdentities& inputs) {
  if (!dest) return;
  for (const auto& in : inputs) {
    if (dest->same_file(in))
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: is the same {} as {}; writing it would destroy it: name "
                              "another destination",
                              dest_name, in.block ? "device" : "file", in.name));
    if (dest->holds(in))
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: is the block device holding {}, which this run reads; "
                              "writing it would destroy the input: name another destination",
                              dest_name, in.name));
  }
}

}  // namespace diskferry
