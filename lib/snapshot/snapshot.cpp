#include "snapshot/snapshot.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <utility>

#include "util/error.hpp"
#include "util/fd.hpp"

namespace diskferry {
namespace {

constexpr const char* kDefaultDir = ".diskferry-snapshots";
constexpr const char* kOptions =
    "use snapshot: none, or keep images on XFS (mkfs.xfs -m reflink=1) or btrfs";

std::string parent_of(const std::string& p) {
  auto slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return p.substr(0, slash);
}

std::string name_of(const std::string& p) {
  auto slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

std::string strip_trailing_slashes(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

void check_tag(const std::string& tag) {
  auto allowed = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::string_view("._:+@-").find(c) != std::string_view::npos;
  };
  bool ok = !tag.empty() && tag.size() <= 128 && tag.front() != '.';
  for (char c : tag) ok = ok && allowed(c);
  if (!ok)
    throw Error(ErrorKind::Usage,
                fmt::format("snapshot tag '{}': use 1-128 letters, digits or ._:+@- "
                            "(not starting with '.')",
                            tag));
}

// The name an admin knows the filesystem by; ext2/3/4 share a magic number, and ext4 is what
// anyone creates today.
std::string fs_type_of(int fd) {
  struct statfs st {};
  if (::fstatfs(fd, &st) != 0) return "this filesystem";
  struct Known {
    uint32_t magic;
    const char* name;
  };
  static constexpr Known kKnown[] = {
      {0xEF53, "ext4"},         {0x58465342, "xfs"},      {0x9123683E, "btrfs"},
      {0xCA451A4E, "bcachefs"}, {0x2FC12FC1, "zfs"},      {0xF2F52010, "f2fs"},
      {0x01021994, "tmpfs"},    {0x858458F6, "ramfs"},    {0x794C7630, "overlayfs"},
      {0x65735546, "fuse"},     {0x6969, "nfs"},          {0xFF534D42, "cifs"},
      {0xFE534D42, "smb2"},     {0x01021997, "9p"},       {0x4D44, "vfat"},
      {0x5346544E, "ntfs"},     {0x73717368, "squashfs"},
  };
  auto magic = static_cast<uint32_t>(st.f_type);
  for (const Known& k : kKnown)
    if (k.magic == magic) return k.name;
  return fmt::format("this filesystem (type {:#x})", magic);
}

// ENOSPC and EDQUOT are about the directory the snapshot goes to, whichever call reports them.
[[noreturn]] void fail(int err, const std::string& image, const std::string& dir,
                       std::string_view what) {
  if (err == ENOSPC || err == EDQUOT)
    throw Error(ErrorKind::Output,
                fmt::format("{}: {} for a snapshot of {}", dir,
                            err == ENOSPC ? "no space left" : "quota exceeded", image));
  throw_errno(ErrorKind::Output, dir, what, err);
}

void fsync_dir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd || ::fsync(fd.get()) != 0) throw_errno(ErrorKind::Output, dir, "fsync failed", errno);
}

// The default directory sits in a directory others may write to (an images directory), so it is
// not followed if it is a symlink and must belong to us.
UniqueFd open_snapshot_dir(const std::string& dir, const std::string& image, bool is_default) {
  bool created = ::mkdir(dir.c_str(), 0700) == 0;
  if (!created && errno != EEXIST) fail(errno, image, dir, "cannot create the snapshot directory");
  if (created) fsync_dir(parent_of(dir));  // so a snapshot made in it survives a crash
  int flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC | (is_default ? O_NOFOLLOW : 0);
  UniqueFd fd(::open(dir.c_str(), flags));
  if (!fd) {
    if (errno == ENOTDIR || errno == ELOOP)
      throw Error(ErrorKind::Output,
                  dir + ": exists and is not a directory; remove it or set another snapshot_dir");
    throw_errno(ErrorKind::Output, dir, "cannot open the snapshot directory", errno);
  }
  if (is_default) {
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) throw_errno(ErrorKind::Output, dir, "cannot stat", errno);
    if (st.st_uid != ::geteuid())
      throw Error(ErrorKind::Output,
                  fmt::format("{}: owned by uid {}, not by this user; remove it or set "
                              "snapshot_dir",
                              dir, st.st_uid));
  }
  return fd;
}

// A temporary name that is removed again unless it was renamed into place.
class TempName {
 public:
  TempName(int dirfd, std::string name) : dirfd_(dirfd), name_(std::move(name)) {}
  ~TempName() {
    if (armed_) ::unlinkat(dirfd_, name_.c_str(), 0);
  }
  TempName(const TempName&) = delete;
  TempName& operator=(const TempName&) = delete;
  const char* c_str() const { return name_.c_str(); }
  void disarm() { armed_ = false; }

 private:
  int dirfd_;
  std::string name_;
  bool armed_ = true;
};

bool no_reflink_errno(int err) {
  return err == EOPNOTSUPP || err == EINVAL || err == ENOTTY || err == ENOSYS;
}

std::string no_reflink_message(int fd, const std::string& image) {
  std::string fs = fs_type_of(fd);
  if (fs == "xfs") fs = "this xfs (made without -m reflink=1)";
  return fmt::format("{}: cannot snapshot: {} cannot make reflink copies; {}", image, fs, kOptions);
}

std::string other_fs_message(int image_fd, int dir_fd, const std::string& image,
                             const std::string& dir) {
  return fmt::format(
      "{}: cannot snapshot into {}: it is on another filesystem ({}) than the "
      "image ({}), and reflink copies stay within one mount; set a snapshot_dir "
      "on the image's filesystem, or use snapshot: none",
      image, dir, fs_type_of(dir_fd), fs_type_of(image_fd));
}

[[noreturn]] void clone_failed(int err, int src, int dst, const std::string& image,
                               const std::string& dir) {
  if (no_reflink_errno(err)) throw Error(ErrorKind::Input, no_reflink_message(src, image));
  if (err == EXDEV) throw Error(ErrorKind::Input, other_fs_message(src, dst, image, dir));
  fail(err, image, dir, "cannot clone " + image + " into it");
}

}  // namespace

std::string snapshot_path(const std::string& image, const std::string& snapshot_dir,
                          const std::string& tag) {
  check_tag(tag);
  std::string name = name_of(image);
  if (name.empty() || name == "." || name == "..")
    throw Error(ErrorKind::Usage, image + ": not an image file name");
  std::string dir;
  if (snapshot_dir.empty()) {
    std::unique_ptr<char, decltype(&std::free)> real(::realpath(image.c_str(), nullptr),
                                                     &std::free);
    if (!real) throw_errno(ErrorKind::Input, image, "cannot open the image to snapshot", errno);
    dir = parent_of(real.get());
    dir = (dir == "/" ? "" : dir) + "/" + kDefaultDir;
  } else {
    dir = strip_trailing_slashes(snapshot_dir);
  }
  return fmt::format("{}/{}.{}.snap", dir == "/" ? "" : dir, name, tag);
}

Snapshot take_snapshot(const std::string& image, const std::string& snapshot_dir,
                       const std::string& tag) {
  UniqueFd src(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
  if (!src) throw_errno(ErrorKind::Input, image, "cannot open the image to snapshot", errno);
  struct stat st {};
  if (::fstat(src.get(), &st) != 0) throw_errno(ErrorKind::Input, image, "cannot stat", errno);
  if (!S_ISREG(st.st_mode))
    throw Error(ErrorKind::Input, image +
                                      ": not a regular file; reflink snapshots need an image "
                                      "file (use snapshot: none for block devices)");

  const std::string path = snapshot_path(image, snapshot_dir, tag);
  const std::string dir = parent_of(path);
  const std::string name = name_of(path);
  UniqueFd dirfd = open_snapshot_dir(dir, image, snapshot_dir.empty());

  // Only a complete snapshot ever has the final name, so one that exists is the one an earlier
  // attempt made, and the retry must back up those same bytes.
  struct stat existing {};
  if (::fstatat(dirfd.get(), name.c_str(), &existing, AT_SYMLINK_NOFOLLOW) == 0) {
    if (!S_ISREG(existing.st_mode))
      throw Error(ErrorKind::Output, path + ": exists and is not a regular file; remove it");
    return {path, true};
  }
  if (errno != ENOENT) throw_errno(ErrorKind::Output, path, "cannot stat", errno);

  // A fixed temporary name: what a crash left behind is replaced, not accumulated.
  TempName tmp(dirfd.get(), "." + name + ".tmp");
  if (::unlinkat(dirfd.get(), tmp.c_str(), 0) != 0 && errno != ENOENT)
    fail(errno, image, dir, "cannot remove a stale temporary snapshot");
  UniqueFd dst(::openat(dirfd.get(), tmp.c_str(),
                        O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!dst) fail(errno, image, dir, "cannot create a snapshot file");
  while (::ioctl(dst.get(), FICLONE, src.get()) != 0) {
    if (errno != EINTR) clone_failed(errno, src.get(), dst.get(), image, dir);
  }
  if (::fsync(dst.get()) != 0) fail(errno, image, dir, "fsync of the snapshot failed");
  dst.reset();

  if (::renameat2(dirfd.get(), tmp.c_str(), dirfd.get(), name.c_str(), RENAME_NOREPLACE) != 0) {
    int err = errno;
    if (err == EEXIST) return {path, true};  // a concurrent attempt won; ours is discarded
    if (err != EINVAL && err != ENOSYS) fail(err, image, dir, "cannot rename the snapshot");
    // Filesystems without RENAME_NOREPLACE: replacing a concurrent twin is harmless.
    if (::renameat(dirfd.get(), tmp.c_str(), dirfd.get(), name.c_str()) != 0)
      fail(errno, image, dir, "cannot rename the snapshot");
  }
  tmp.disarm();
  if (::fsync(dirfd.get()) != 0) fail(errno, image, dir, "fsync failed");
  return {path, false};
}

std::string reflink_obstacle(const std::string& image, const std::string& snapshot_dir) {
  UniqueFd src(::open(image.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!src) return "";
  struct stat st {};
  if (::fstat(src.get(), &st) != 0) return "";
  if (!S_ISREG(st.st_mode))
    return image +
           ": not a regular file; reflink snapshots need an image file (use snapshot: "
           "none for block devices)";
  std::unique_ptr<char, decltype(&std::free)> real(::realpath(image.c_str(), nullptr), &std::free);
  if (!real) return "";
  const std::string image_dir = parent_of(real.get());

  // The snapshot directory, or the nearest directory above it that exists (it is created on
  // the first snapshot, on the filesystem of its parent).
  const std::string wanted =
      snapshot_dir.empty() ? image_dir : strip_trailing_slashes(snapshot_dir);
  std::string dir = wanted;
  for (;;) {
    UniqueFd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    struct stat ds {};
    if (d && ::fstat(d.get(), &ds) == 0) {
      if (ds.st_dev != st.st_dev) return other_fs_message(src.get(), d.get(), image, wanted);
      break;
    }
    if (dir == "/" || dir == "." || (errno != ENOENT && errno != ENOTDIR)) break;
    dir = parent_of(dir);
  }

  // Cloning between two unnamed files in the image's directory shows what the filesystem can
  // do without touching the image (a running VM's disk) or leaving anything behind: O_TMPFILE
  // files vanish when closed. Without the right to create files there, it cannot be told.
  UniqueFd a(::open(image_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  UniqueFd b(::open(image_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  if (!a || !b) return "";
  while (::ioctl(b.get(), FICLONE, a.get()) != 0) {
    if (errno == EINTR) continue;
    return no_reflink_errno(errno) ? no_reflink_message(src.get(), image) : "";
  }
  return "";
}

void remove_snapshot(const std::string& path) {
  constexpr std::string_view suffix = ".snap";
  if (path.size() <= suffix.size() || !path.ends_with(suffix))
    throw Error(ErrorKind::Internal, path + ": refusing to remove: not a snapshot (no .snap)");
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    throw_errno(ErrorKind::Output, path, "cannot remove the snapshot", errno);
  }
  if (!S_ISREG(st.st_mode))
    throw Error(ErrorKind::Internal, path + ": refusing to remove: not a regular file");
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    throw_errno(ErrorKind::Output, path, "cannot remove the snapshot", errno);
}

}  // namespace diskferry
