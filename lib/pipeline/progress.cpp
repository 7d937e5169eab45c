#include "pipeline/progress.hpp"

#include <fmt/format.h>
#include <unistd.h>
#include <cstdio>

#include "util/size.hpp"

namespace diskferry {

Progress::Progress(bool enabled, std::string label, std::optional<uint64_t> total)
    : enabled_(enabled),
      tty_(::isatty(STDERR_FILENO)),
      label_(std::move(label)),
      total_(total),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

Progress::~Progress() {
  if (enabled_ && printed_ && tty_) std::fputs("\n", stderr);
}

void Progress::update(uint64_t done) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  // A terminal gets a live line; a log file a line every 10 s.
  auto every = tty_ ? std::chrono::milliseconds(500) : std::chrono::milliseconds(10000);
  if (now - last_ < every) return;
  last_ = now;
  print(done, false);
}

void Progress::done(uint64_t done) {
  if (!enabled_) return;
  print(done, true);
  if (tty_) std::fputs("\n", stderr);
  printed_ = false;
}

void Progress::print(uint64_t done, bool final) {
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  std::string line = fmt::format("{}: {}", label_, format_size(done));
  if (total_ && *total_ > 0) {
    line += fmt::format(" / {} ({:.0f}%)", format_size(*total_),
                        100.0 * static_cast<double>(done) / static_cast<double>(*total_));
  }
  line += fmt::format("  {}/s", format_size(static_cast<uint64_t>(rate)));
  if (final) {
    line += fmt::format("  in {:.1f}s", secs);
  } else if (total_ && rate > 0 && *total_ > done) {
    auto eta = static_cast<uint64_t>(static_cast<double>(*total_ - done) / rate);
    line += fmt::format("  ETA {}:{:02}:{:02}", eta / 3600, eta / 60 % 60, eta % 60);
  }
  if (tty_)
    fmt::print(stderr, "\r\033[K{}", line);
  else
    fmt::print(stderr, "{}\n", line);
  std::fflush(stderr);
  printed_ = true;
}

}  // namespace diskferry
