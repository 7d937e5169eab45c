// Bandwidth limits (--bwlimit): a rate or an rclone-style timetable, enforced by token buckets
// that can be shared (one per job, one per remote, one global in the daemon).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "transport/sink.hpp"

namespace diskferry {

// Bytes per second as a function of local wall-clock time; 0 means unlimited.
class RateSchedule {
 public:
  RateSchedule() = default;  // unlimited
  static RateSchedule constant(uint64_t bytes_per_second);

  uint64_t rate_at(std::chrono::system_clock::time_point when) const;
  // A constant schedule never needs the clock, so limiters skip re-reading it.
  bool is_constant() const { return slots_.size() <= 1; }
  // Normalised, re-parseable text ("20M", "off", "08:00,5M 23:00,off") for logs.
  std::string to_string() const;

 private:
  friend RateSchedule parse_bwlimit(const std::string& text);
  struct Slot {
    int minute_of_week;  // tm_wday * 1440 + hour * 60 + minute (Sunday 00:00 is 0)
    uint64_t rate;
  };
  std::vector<Slot> slots_;  // sorted; each holds until the next one, the last wraps around
  std::string text_;
};

// Accepts "off", "0", a rate with a unit ("512K", "20M", "1.5G", K = 1024), or rclone's
// timetable: "08:00,5M 23:00,off", "Mon-08:00,5M Fri-18:00,off" (';' also separates entries).
// Each entry holds until the next, wrapping around the day (or the week with weekday prefixes).
// Throws Error(Usage) "--bwlimit 'TEXT': ..." naming the bad piece.
RateSchedule parse_bwlimit(const std::string& text);

// A token bucket holding at most `burst` bytes, so the output is smooth rather than bursty.
// Thread-safe; waiters are served in arrival order.
class RateLimiter {
 public:
  static constexpr size_t kDefaultBurst = 256 * 1024;

  // Injectable so tests can check the arithmetic without sleeping; empty members mean the real
  // steady clock, std::this_thread::sleep_for and the system clock (for the timetable).
  struct Clock {
    std::function<std::chrono::steady_clock::time_point()> now;
    std::function<void(std::chrono::nanoseconds)> sleep;
    std::function<std::chrono::system_clock::time_point()> wall;
  };

  explicit RateLimiter(RateSchedule schedule, size_t burst = kDefaultBurst, Clock clock = {});
  ~RateLimiter();
  RateLimiter(const RateLimiter&) = delete;
  RateLimiter& operator=(const RateLimiter&) = delete;

  // Blocks until `bytes` may be sent. A request larger than the burst goes once the bucket is
  // full and leaves it in debt, so the next caller pays for it and the long-run rate stays exact.
  void acquire(size_t bytes);
  // For a daemon reloading its configuration; waiters notice within a second.
  void set_schedule(RateSchedule schedule);
  uint64_t rate() const;  // bytes/s in force now, 0 = unlimited
  size_t burst() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Throttles write() and rewrite() through every limiter in turn, in pieces of at most the
// smallest burst. Pass the most specific limiter first (job, remote, global) so a shared limiter
// is only drawn on when the bytes are about to go. write_zeros() is not throttled: destinations
// leave holes rather than send zeros. Null limiters are ignored.
std::unique_ptr<Sink> make_rate_limited_sink(std::unique_ptr<Sink> inner,
                                             std::vector<std::shared_ptr<RateLimiter>> limiters);

}  // namespace diskferry
