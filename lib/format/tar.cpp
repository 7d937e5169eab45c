#include "format/tar.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "util/error.hpp"
#include "util/fd.hpp"

namespace diskferry {
namespace {

constexpr size_t kBlock = 512;
// GNU tar and bsdtar write archives in records of 20 blocks; some readers of OVA files expect
// the archive to end on one.
constexpr uint64_t kRecord = 20 * kBlock;
constexpr uint64_t kMaxOctal11 = 077777777777ull;  // what an 11-digit ustar field holds

uint64_t padded(uint64_t n) {
  return (n + kBlock - 1) / kBlock * kBlock;
}

void put_octal(char* field, size_t width, uint64_t v) {
  // width - 1 digits and a NUL, as GNU tar writes them.
  auto s = fmt::format("{:0{}o}", v, width - 1);
  std::memcpy(field, s.data(), width - 1);
  field[width - 1] = '\0';
}

// One pax record: "LEN key=value\n", where LEN counts the whole record including its own digits.
std::string pax_record(const std::string& key, const std::string& value) {
  size_t body = key.size() + value.size() + 3;  // ' ', '=', '\n'
  size_t len = body + 1;
  while (std::to_string(len).size() + body != len) len = std::to_string(len).size() + body;
  return fmt::format("{} {}={}\n", len, key, value);
}

std::array<char, kBlock> ustar_block(const std::string& name, uint64_t size, int64_t mtime,
                                     char type) {
  std::array<char, kBlock> b{};
  std::memcpy(b.data(), name.data(), std::min<size_t>(name.size(), 100));
  put_octal(&b[100], 8, 0644);
  put_octal(&b[108], 8, 0);
  put_octal(&b[116], 8, 0);
  if (size <= kMaxOctal11) {
    put_octal(&b[124], 12, size);
  } else {
    // Base-256 (GNU, star): readers that ignore the pax size record still get the right one.
    b[124] = static_cast<char>(0x80);
    for (int i = 0; i < 8; ++i) b[135 - i] = static_cast<char>((size >> (8 * i)) & 0xff);
  }
  put_octal(&b[136], 12, static_cast<uint64_t>(std::clamp<int64_t>(mtime, 0, kMaxOctal11)));
  b[156] = type;
  std::memcpy(&b[257], "ustar", 6);  // with its NUL
  std::memcpy(&b[263], "00", 2);
  std::memcpy(&b[265], "root", 4);
  std::memcpy(&b[297], "root", 4);
  std::memset(&b[148], ' ', 8);
  unsigned sum = 0;
  for (char c : b) sum += static_cast<unsigned char>(c);
  auto s = fmt::format("{:06o}", sum);
  std::memcpy(&b[148], s.data(), 6);
  b[154] = '\0';
  b[155] = ' ';
  return b;
}

void check_name(const std::string& name) {
  if (name.empty() || name.find('\0') != std::string::npos || name.front() == '/' || name == "." ||
      name == ".." || name.rfind("../", 0) == 0 || name.find("/../") != std::string::npos)
    throw Error(ErrorKind::Usage,
                fmt::format("tar member name '{}': must be a relative name without '..'", name));
}

class TarSink final : public FilterSink {
 public:
  TarSink(const ContainerOptions& c, uint64_t image_bytes, std::unique_ptr<Sink> inner)
      : FilterSink(std::move(inner)), c_(c), image_bytes_(image_bytes) {}

  void write(Bytes d) override {
    start();
    n_ += d.size();
    FilterSink::write(d);
  }
  void write_zeros(uint64_t n) override {
    start();
    n_ += n;
    FilterSink::write_zeros(n);
  }
  // Offsets inside the image would be shifted by the headers before it.
  bool supports_rewrite() const override { return false; }
  void rewrite(uint64_t, Bytes) override {
    throw Error(ErrorKind::Internal, "tar container: rewrite requested");
  }
  void expect_size(uint64_t n) override { FilterSink::expect_size(tar_size(c_, n)); }
  void commit() override {
    start();
    if (n_ != image_bytes_)
      throw Error(ErrorKind::Internal,
                  fmt::format("tar container: the image took {} bytes, its header says {}", n_,
                              image_bytes_));
    uint64_t total = tar_size(c_, image_bytes_);
    inner().write_zeros(total - inner().position());
    FilterSink::commit();
  }
  // The image's own bytes: writers place their tables by this position.
  uint64_t position() const override { return n_; }

 private:
  void start() {
    if (started_) return;
    started_ = true;
    for (const auto& f : c_.files) {
      inner().write(as_bytes(tar_member_header(f.name, f.data.size(), f.mtime)));
      inner().write(as_bytes(f.data));
      inner().write_zeros(padded(f.data.size()) - f.data.size());
    }
    inner().write(as_bytes(tar_member_header(c_.image_name, image_bytes_, c_.image_mtime)));
  }
  static Bytes as_bytes(const std::string& s) {
    return Bytes(reinterpret_cast<const std::byte*>(s.data()), s.size());
  }

  const ContainerOptions& c_;
  uint64_t image_bytes_;
  uint64_t n_ = 0;
  bool started_ = false;
};

}  // namespace

std::string tar_member_header(const std::string& name, uint64_t size, int64_t mtime) {
  check_name(name);
  std::string out;
  std::string pax;
  if (name.size() > 100) pax += pax_record("path", name);
  if (size > kMaxOctal11) pax += pax_record("size", std::to_string(size));
  if (!pax.empty()) {
    // The extended header's own name, as GNU tar's --format=posix makes it.
    auto slash = name.rfind('/');
    std::string base = slash == std::string::npos ? name : name.substr(slash + 1);
    auto b = ustar_block("PaxHeaders.0/" + base.substr(0, 80), pax.size(), mtime, 'x');
    out.append(b.data(), b.size());
    out += pax;
    out.append(padded(pax.size()) - pax.size(), '\0');
  }
  auto b = ustar_block(name, size, mtime, '0');
  out.append(b.data(), b.size());
  return out;
}

uint64_t tar_size(const ContainerOptions& c, uint64_t image_bytes) {
  uint64_t n = 0;
  for (const auto& f : c.files)
    n += tar_member_header(f.name, f.data.size(), f.mtime).size() + padded(f.data.size());
  n += tar_member_header(c.image_name, image_bytes, c.image_mtime).size() + padded(image_bytes);
  n += 2 * kBlock;  // the end-of-archive marker
  return (n + kRecord - 1) / kRecord * kRecord;
}

std::unique_ptr<Sink> make_tar_sink(const ContainerOptions& c, uint64_t image_bytes,
                                    std::unique_ptr<Sink> inner) {
  check_name(c.image_name);
  return std::make_unique<TarSink>(c, image_bytes, std::move(inner));
}

ContainerMember read_container_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno(ErrorKind::Input, path, "cannot open --container-file", errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_errno(ErrorKind::Input, path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode))
    throw Error(ErrorKind::Input, fmt::format("{}: --container-file must be a regular file", path));
  if (static_cast<uint64_t>(st.st_size) > kMaxContainerFile)
    throw Error(ErrorKind::Input,
                fmt::format("{}: --container-file is {} bytes, more than the {} MiB a descriptor "
                            "may take",
                            path, st.st_size, kMaxContainerFile >> 20));
  ContainerMember m;
  auto slash = path.rfind('/');
  m.name = slash == std::string::npos ? path : path.substr(slash + 1);
  m.mtime = st.st_mtime;
  m.file = identify_fd(fd.get(), "the --container-file " + path);
  m.data.resize(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < m.data.size()) {
    ssize_t r = ::read(fd.get(), m.data.data() + got, m.data.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw_errno(ErrorKind::Input, path, "read failed", errno);
    if (r == 0) throw Error(ErrorKind::Input, fmt::format("{}: shrank while being read", path));
    got += static_cast<size_t>(r);
  }
  return m;
}

}  // namespace diskferry
