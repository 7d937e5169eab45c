// Which file a name or a descriptor is, so that two names of one file compare equal: a symlink,
// a hard link, a second device node of one disk.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

namespace diskferry {

struct FileIdentity {
  std::string name;  // for messages: what it is to the run ("the source vm.img")
  dev_t dev = 0;     // the filesystem holding it
  ino_t ino = 0;
  dev_t rdev = 0;  // a block device: the device itself
  bool block = false;

  // Regular files by inode; block devices by device number (the node is only a name).
  bool same_file(const FileIdentity& o) const {
    return block ? o.block && rdev == o.rdev : !o.block && dev == o.dev && ino == o.ino;
  }
  // Whether `o` (a file) lives on the filesystem of this block device.
  bool holds(const FileIdentity& o) const { return block && !o.block && o.dev == rdev; }
};

// A regular file or block device; nullopt for anything else (a pipe, a terminal, a socket).
std::optional<FileIdentity> identify_fd(int fd, const std::string& name);
// Follows symbolic links; nullopt when the path does not exist or is neither. `name`: the
// path when empty.
std::optional<FileIdentity> identify_path(const std::string& path, const std::string& name = "");

// The files one run reads. A destination is checked against all of them before anything is
// written to it.
using FileIdentities = std::vector<FileIdentity>;

// Throws Error(Usage) naming both when the file `dest_name` is (`dest`) is one of `inputs`, or
// a block device holding one of them.
void refuse_input_as_destination(const std::optional<FileIdentity>& dest,
                                 const std::string& dest_name, const FileIdentities& inputs);

}  // namespace diskferry
