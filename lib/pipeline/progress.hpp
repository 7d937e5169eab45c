// Progress on stderr for long conversions: bytes, rate, ETA. Throttled; silent when disabled.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace diskferry {

class Progress {
 public:
  Progress(bool enabled, std::string label, std::optional<uint64_t> total);
  ~Progress();
  void update(uint64_t done);
  void done(uint64_t done);

 private:
  void print(uint64_t done, bool final);

  bool enabled_, tty_;
  std::string label_;
  std::optional<uint64_t> total_;
  std::chrono::steady_clock::time_point start_, last_;
  bool printed_ = false;
};

}  // namespace diskferry
