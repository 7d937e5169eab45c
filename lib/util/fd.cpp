#include "util/fd.hpp"

#include <unistd.h>
#include <cerrno>

namespace diskferry {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

size_t read_some(int fd, std::span<std::byte> buf, const std::string& name) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::read(fd, buf.data() + done, buf.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(ErrorKind::Input, name, "read failed", errno);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

size_t pread_some(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& name) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n =
        ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(ErrorKind::Input, name, "read failed", errno);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

void write_all(int fd, std::span<const std::byte> buf, const std::string& name) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::write(fd, buf.data() + done, buf.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(ErrorKind::Output, name, "write failed", errno);
    }
    done += static_cast<size_t>(n);
  }
}

void pwrite_all(int fd, std::span<const std::byte> buf, uint64_t offset, const std::string& name) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n =
        ::pwrite(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(ErrorKind::Output, name, "write failed", errno);
    }
    done += static_cast<size_t>(n);
  }
}

}  // namespace diskferry
