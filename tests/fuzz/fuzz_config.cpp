// libFuzzer target: the configuration parser (a file an administrator edits by hand). Only
// diskferry::Error may come out of it; a yaml-cpp exception escaping would kill the daemon with
// a message naming no file or line.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "config/config.hpp"
#include "util/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace diskferry;
  Config c;
  try {
    c = parse_config(std::string(reinterpret_cast<const char*>(data), size), "fuzz.yaml",
                     "/etc/diskferry");
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Usage) __builtin_trap();
    return 0;
  }
  // What parse_config accepts, render_name must render and match_name read back.
  auto when = std::chrono::system_clock::from_time_t(1767225599);  // 2025-12-31T23:59:59Z
  for (const auto& [name, s] : c.sources) {
    if (!c.remotes.count(s.remote) || s.path.empty() || s.path[0] != '/') __builtin_trap();
    std::string rendered = render_name(s, when);
    auto back = match_name(s, rendered);
    if (!back || render_name(s, *back) != rendered || *back > when) __builtin_trap();
  }
  return 0;
}
