// Durations as people write them in configs and options: "90", "90s", "5m", "2h", "1d".
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace diskferry {

// nullopt when `text` is not a whole number with an optional unit s, m, h or d.
std::optional<std::chrono::seconds> parse_duration(std::string_view text);
// The largest unit that divides it exactly: "2h", "90s".
std::string format_duration(std::chrono::seconds d);

}  // namespace diskferry
