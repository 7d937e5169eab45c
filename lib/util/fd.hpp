// RAII file descriptor and full-length I/O that retries short transfers and EINTR.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "util/error.hpp"

namespace diskferry {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

// Each throws Error(kind, "name: reading|writing: strerror") on failure.
// read_some returns fewer bytes than asked only at end of file.
size_t read_some(int fd, std::span<std::byte> buf, const std::string& name);
size_t pread_some(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& name);
void write_all(int fd, std::span<const std::byte> buf, const std::string& name);
void pwrite_all(int fd, std::span<const std::byte> buf, uint64_t offset, const std::string& name);

}  // namespace diskferry
