// libFuzzer target: the rbd diff layout JSON parser (outside bytes from --layout).
#include <cstddef>
#include <cstdint>
#include <string>

#include "image/layout.hpp"
#include "util/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto v = diskferry::parse_rbd_layout(std::string(reinterpret_cast<const char*>(data), size),
                                         "fuzz.json");
    for (auto& e : v)
      if (e.length == 0 || e.offset + e.length < e.offset) __builtin_trap();
  } catch (const diskferry::Error&) {
  }
  return 0;
}
