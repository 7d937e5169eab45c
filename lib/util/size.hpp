// Human sizes: "64K", "32M", "1.5G" in and out (binary units, as qemu-img uses).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace diskferry {

// Throws Error(Usage) naming `what` when text is not a size.
uint64_t parse_size(std::string_view text, std::string_view what);
std::string format_size(uint64_t bytes);  // "1.5 GiB"

}  // namespace diskferry
