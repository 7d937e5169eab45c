// libFuzzer target: the qcow2 reader (header, extensions, backing chain, L1/L2 walk, compressed
// clusters) over an image file written from the input. The input lives in a private directory
// beside a small raw file, base.raw, so seeds can name it (or themselves) as a backing file.
// Work per input is bounded: a small unit and at most kMaxChunks units of one pass.
#include <fcntl.h>
#include <unistd.h>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "image/source.hpp"
#include "pass_contract.hpp"
#include "util/error.hpp"
#include "util/fd.hpp"

namespace {

constexpr size_t kMaxChunks = 256;
constexpr uint32_t kUnit = 4096;

void write_file(const std::string& path, const uint8_t* data, size_t size) {
  diskferry::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) abort();
  diskferry::write_all(fd.get(), {reinterpret_cast<const std::byte*>(data), size}, path);
}

const std::string& image_path() {
  static const std::string path = [] {
    char tmpl[] = "/tmp/df-fuzz-qcow2-XXXXXX";
    if (!mkdtemp(tmpl)) abort();
    std::string dir = tmpl;
    std::vector<uint8_t> base(64 * 1024);
    for (size_t i = 0; i < base.size(); ++i) base[i] = static_cast<uint8_t>(i * 7 + 1);
    write_file(dir + "/base.raw", base.data(), base.size());
    return dir + "/fuzz.qcow2";
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = image_path();
  write_file(path, data, size);
  diskferry::SourceOptions opts;
  opts.format = diskferry::SourceFormat::Qcow2;
  opts.on_warning = [](const std::string&) {};
  try {
    auto src = diskferry::open_source(path, opts);
    diskferry::fuzz::read_pass(*src, kUnit, kMaxChunks);
  } catch (const diskferry::Error&) {
  }
  return 0;
}
