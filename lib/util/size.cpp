#include "util/size.hpp"

#include <fmt/format.h>
#include <charconv>
#include <cmath>

#include "util/error.hpp"

namespace diskferry {

uint64_t parse_size(std::string_view text, std::string_view what) {
  auto bad = [&] {
    return Error(ErrorKind::Usage,
                 fmt::format("{}: '{}' is not a size (examples: 65536, 64K, 32M, 1G)", what, text));
  };
  if (text.empty()) throw bad();
  size_t end = 0;
  while (end < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[end])) || text[end] == '.'))
    ++end;
  if (end == 0) throw bad();
  double value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + end, value);
  if (ec != std::errc() || ptr != text.data() + end) throw bad();
  std::string_view suffix = text.substr(end);
  double mult = 1;
  if (!suffix.empty()) {
    switch (std::toupper(static_cast<unsigned char>(suffix[0]))) {
      case 'B':
        mult = 1;
        break;
      case 'K':
        mult = 1024.0;
        break;
      case 'M':
        mult = 1024.0 * 1024;
        break;
      case 'G':
        mult = 1024.0 * 1024 * 1024;
        break;
      case 'T':
        mult = 1024.0 * 1024 * 1024 * 1024;
        break;
      default:
        throw bad();
    }
    auto rest = suffix.substr(1);
    if (!(rest.empty() || rest == "B" || rest == "iB" || rest == "ib" || rest == "b")) throw bad();
  }
  double bytes = value * mult;
  if (bytes > 1.8e19 || bytes != std::floor(bytes)) throw bad();
  return static_cast<uint64_t>(bytes);
}

std::string format_size(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  if (u == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.1f} {}", v, units[u]);
}

}  // namespace diskferry
