#include "util/duration.hpp"

#include <fmt/format.h>

#include <cctype>
#include <charconv>

namespace diskferry {

std::optional<std::chrono::seconds> parse_duration(std::string_view s) {
  size_t end = 0;
  while (end < s.size() && std::isdigit(static_cast<unsigned char>(s[end]))) ++end;
  if (end == 0 || end > 9) return std::nullopt;  // 9 digits of days still fit in 64 bits
  long long n = 0;
  std::from_chars(s.data(), s.data() + end, n);
  std::string_view unit = s.substr(end);
  long long mult = 0;
  if (unit.empty() || unit == "s")
    mult = 1;
  else if (unit == "m")
    mult = 60;
  else if (unit == "h")
    mult = 3600;
  else if (unit == "d")
    mult = 86400;
  else
    return std::nullopt;
  return std::chrono::seconds(n * mult);
}

std::string format_duration(std::chrono::seconds d) {
  long long s = d.count();
  if (s && s % 86400 == 0) return fmt::format("{}d", s / 86400);
  if (s && s % 3600 == 0) return fmt::format("{}h", s / 3600);
  if (s && s % 60 == 0) return fmt::format("{}m", s / 60);
  return fmt::format("{}s", s);
}

}  // namespace diskferry
