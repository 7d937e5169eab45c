#include "util/fd.hpp"

#include <unistd.h>
#include <cerrno>

namespace diskferry {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

namespace {

// Repeats `op(done)` (one read/write syscall for the rest of the buffer) until `size` bytes are
// moved, EINTR is retried, and a zero return means end of file (reads).
template <class Op>
size_t transfer(size_t size, Op op, ErrorKind kind, const std::string& name, const char* what) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = op(done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(kind, name, what, errno);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

}  // namespace

size_t read_some(int fd, std::span<std::byte> buf, const std::string& name) {
  return transfer(
      buf.size(), [&](size_t d) { return ::read(fd, buf.data() + d, buf.size() - d); },
      ErrorKind::Input, name, "read failed");
}

size_t pread_some(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& name) {
  return transfer(
      buf.size(),
      [&](size_t d) {
        return ::pread(fd, buf.data() + d, buf.size() - d, static_cast<off_t>(offset + d));
      },
      ErrorKind::Input, name, "read failed");
}

void write_all(int fd, std::span<const std::byte> buf, const std::string& name) {
  size_t n = transfer(
      buf.size(), [&](size_t d) { return ::write(fd, buf.data() + d, buf.size() - d); },
      ErrorKind::Output, name, "write failed");
  if (n != buf.size()) throw Error(ErrorKind::Output, name + ": write failed: no progress");
}

void pwrite_all(int fd, std::span<const std::byte> buf, uint64_t offset, const std::string& name) {
  size_t n = transfer(
      buf.size(),
      [&](size_t d) {
        return ::pwrite(fd, buf.data() + d, buf.size() - d, static_cast<off_t>(offset + d));
      },
      ErrorKind::Output, name, "write failed");
  if (n != buf.size()) throw Error(ErrorKind::Output, name + ": write failed: no progress");
}

}  // namespace diskferry
