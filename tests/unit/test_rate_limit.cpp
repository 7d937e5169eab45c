#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pipeline/rate_limit.hpp"
#include "util/error.hpp"

using namespace diskferry;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;

// Local wall-clock time, as the timetable reads it. January 2024 has no DST change anywhere in
// the first half of the month; the 15th is a Monday.
std::chrono::system_clock::time_point local(int day, int hour, int minute, int second = 0) {
  std::tm tm{};
  tm.tm_year = 2024 - 1900;
  tm.tm_mon = 0;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  tm.tm_isdst = -1;
  return std::chrono::system_clock::from_time_t(std::mktime(&tm));
}
constexpr int kSun = 14, kMon = 15, kTue = 16, kWed = 17, kThu = 18, kFri = 19, kSat = 20;

// The virtual time each thread last saw, for the multi-threaded fake clock.
thread_local std::chrono::steady_clock::time_point tl_seen{};

std::string bwlimit_error(const std::string& text) {
  try {
    parse_bwlimit(text);
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::Usage);
    return e.what();
  }
  return "accepted";
}

// Time stands still until someone sleeps; the wall clock moves with it.
struct FakeClock {
  std::chrono::steady_clock::time_point t{};
  std::chrono::system_clock::time_point wall0 = local(kMon, 12, 0);
  int sleeps = 0;

  RateLimiter::Clock clock() {
    return {[this] { return t; },
            [this](std::chrono::nanoseconds d) {
              t += d;
              ++sleeps;
            },
            [this] {
              return wall0 + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                 t.time_since_epoch());
            }};
  }
  double seconds() const { return std::chrono::duration<double>(t.time_since_epoch()).count(); }
};

// Records each call with the (fake) time it arrived.
class RecordingSink final : public Sink {
 public:
  struct Call {
    char kind;  // 'w'rite, 'z'eros, 'r'ewrite
    uint64_t offset, size;
    double at;
  };
  explicit RecordingSink(const FakeClock& clock, std::vector<Call>& calls)
      : clock_(clock), calls_(calls) {}
  void write(Bytes data) override {
    calls_.push_back({'w', pos_, data.size(), clock_.seconds()});
    pos_ += data.size();
  }
  void write_zeros(uint64_t n) override {
    calls_.push_back({'z', pos_, n, clock_.seconds()});
    pos_ += n;
  }
  bool supports_rewrite() const override { return true; }
  void rewrite(uint64_t offset, Bytes data) override {
    calls_.push_back({'r', offset, data.size(), clock_.seconds()});
  }
  void commit() override {}
  void abort() noexcept override {}
  uint64_t position() const override { return pos_; }

 private:
  const FakeClock& clock_;
  std::vector<Call>& calls_;
  uint64_t pos_ = 0;
};

}  // namespace

// --- parsing ----------------------------------------------------------------------------------

TEST_CASE("parse_bwlimit: a plain rate, K = 1024, fractions allowed") {
  auto now = std::chrono::system_clock::now();
  CHECK(parse_bwlimit("20M").rate_at(now) == 20 * MiB);
  CHECK(parse_bwlimit("512K").rate_at(now) == 512 * KiB);
  CHECK(parse_bwlimit("1G").rate_at(now) == GiB);
  CHECK(parse_bwlimit("1.5M").rate_at(now) == 1536 * KiB);
  CHECK(parse_bwlimit("1.3M").rate_at(now) == 1363148);  // truncated to whole bytes
  CHECK(parse_bwlimit("100KiB").rate_at(now) == 100 * KiB);
  CHECK(parse_bwlimit("20m").rate_at(now) == 20 * MiB);
  CHECK(parse_bwlimit("1000B").rate_at(now) == 1000);
  CHECK(parse_bwlimit("  20M ").rate_at(now) == 20 * MiB);
  CHECK(parse_bwlimit("20M").is_constant());
  CHECK(parse_bwlimit("20M").to_string() == "20M");
  CHECK(parse_bwlimit("1.5M").to_string() == "1536K");
  CHECK(parse_bwlimit("1000B").to_string() == "1000B");
  CHECK(RateSchedule::constant(3 * GiB).to_string() == "3G");
}

TEST_CASE("parse_bwlimit: off and 0 mean unlimited") {
  auto now = std::chrono::system_clock::now();
  for (const char* text : {"off", "OFF", "0", "0M", "0.0K"}) {
    CAPTURE(text);
    RateSchedule s = parse_bwlimit(text);
    CHECK(s.rate_at(now) == 0);
    CHECK(s.is_constant());
    CHECK(s.to_string() == "off");
  }
  CHECK(RateSchedule().rate_at(now) == 0);
  CHECK(RateSchedule().to_string() == "off");
}

TEST_CASE("parse_bwlimit: daily timetable, the last entry carries over past midnight") {
  RateSchedule s = parse_bwlimit("08:00,512K 12:00,10M 13:00,512K 18:00,30M 23:00,off");
  CHECK_FALSE(s.is_constant());
  CHECK(s.rate_at(local(kTue, 0, 0)) == 0);
  CHECK(s.rate_at(local(kTue, 7, 59, 59)) == 0);
  CHECK(s.rate_at(local(kTue, 8, 0)) == 512 * KiB);
  CHECK(s.rate_at(local(kTue, 11, 59)) == 512 * KiB);
  CHECK(s.rate_at(local(kTue, 12, 30)) == 10 * MiB);
  CHECK(s.rate_at(local(kTue, 13, 0)) == 512 * KiB);
  CHECK(s.rate_at(local(kTue, 18, 0)) == 30 * MiB);
  CHECK(s.rate_at(local(kTue, 22, 59)) == 30 * MiB);
  CHECK(s.rate_at(local(kTue, 23, 30)) == 0);
  CHECK(s.to_string() == "08:00,512K 12:00,10M 13:00,512K 18:00,30M 23:00,off");

  // Wrap-around before the first entry, on every day of the week (Sunday included).
  RateSchedule w = parse_bwlimit("08:00,5M 23:00,1M");
  for (int day = kSun; day <= kSat; ++day) {
    CAPTURE(day);
    CHECK(w.rate_at(local(day, 3, 0)) == MiB);
    CHECK(w.rate_at(local(day, 9, 0)) == 5 * MiB);
    CHECK(w.rate_at(local(day, 23, 0)) == MiB);
  }
}

TEST_CASE("parse_bwlimit: entry order, separators and a single entry") {
  RateSchedule a = parse_bwlimit("23:00,off 08:00,5M");
  RateSchedule b = parse_bwlimit("08:00,5M;23:00,off");
  RateSchedule c = parse_bwlimit(" 8:00,5M \t 23:00,0 ");
  for (int hour : {0, 7, 8, 12, 22, 23}) {
    CAPTURE(hour);
    uint64_t want = hour >= 8 && hour < 23 ? 5 * MiB : 0;
    CHECK(a.rate_at(local(kWed, hour, 0)) == want);
    CHECK(b.rate_at(local(kWed, hour, 0)) == want);
    CHECK(c.rate_at(local(kWed, hour, 0)) == want);
  }
  CHECK(c.to_string() == "08:00,5M 23:00,off");
  // One entry holds all day, every day.
  RateSchedule one = parse_bwlimit("08:00,5M");
  CHECK(one.is_constant());
  CHECK(one.rate_at(local(kSun, 1, 0)) == 5 * MiB);
  CHECK(one.to_string() == "08:00,5M");
}

TEST_CASE("parse_bwlimit: weekday timetable wraps around the week") {
  // rclone's documented example.
  RateSchedule s = parse_bwlimit("Mon-00:00,512K Fri-23:59,10M Sat-10:00,1M Sun-20:00,off");
  CHECK(s.rate_at(local(kMon, 0, 0)) == 512 * KiB);
  CHECK(s.rate_at(local(kWed, 12, 0)) == 512 * KiB);
  CHECK(s.rate_at(local(kFri, 23, 58)) == 512 * KiB);
  CHECK(s.rate_at(local(kFri, 23, 59)) == 10 * MiB);
  CHECK(s.rate_at(local(kSat, 9, 59)) == 10 * MiB);
  CHECK(s.rate_at(local(kSat, 10, 0)) == MiB);
  CHECK(s.rate_at(local(kSun, 19, 59)) == MiB);  // Sunday is day 0: wraps back to Saturday's
  CHECK(s.rate_at(local(kSun, 20, 0)) == 0);
  CHECK(s.rate_at(local(kSun, 23, 59)) == 0);
  CHECK(s.to_string() == "Mon-00:00,512K Fri-23:59,10M Sat-10:00,1M Sun-20:00,off");

  // A table starting mid-week: Monday still runs under Friday's entry.
  RateSchedule mid = parse_bwlimit("Wed-09:00,1M Fri-17:00,off");
  CHECK(mid.rate_at(local(kMon, 12, 0)) == 0);
  CHECK(mid.rate_at(local(kWed, 8, 59)) == 0);
  CHECK(mid.rate_at(local(kWed, 9, 0)) == MiB);
  CHECK(mid.rate_at(local(kThu, 23, 0)) == MiB);

  // Full names, any case.
  RateSchedule names = parse_bwlimit("monday-08:00,1M SATURDAY-08:00,2M");
  CHECK(names.rate_at(local(kFri, 12, 0)) == MiB);
  CHECK(names.rate_at(local(kSun, 12, 0)) == 2 * MiB);
  CHECK(names.to_string() == "Mon-08:00,1M Sat-08:00,2M");
}

TEST_CASE("parse_bwlimit: every-day and weekday entries mix; the weekday one wins a tie") {
  for (const char* text :
       {"08:00,5M Sat-08:00,off 23:00,off", "Sat-08:00,off 08:00,5M 23:00,off"}) {
    CAPTURE(text);
    RateSchedule s = parse_bwlimit(text);
    CHECK(s.rate_at(local(kFri, 9, 0)) == 5 * MiB);
    CHECK(s.rate_at(local(kSat, 7, 0)) == 0);
    CHECK(s.rate_at(local(kSat, 9, 0)) == 0);
    CHECK(s.rate_at(local(kSun, 9, 0)) == 5 * MiB);
  }
  RateSchedule s = parse_bwlimit("08:00,5M 18:00,off Sat-12:00,1M");
  CHECK(s.rate_at(local(kSat, 11, 0)) == 5 * MiB);
  CHECK(s.rate_at(local(kSat, 12, 0)) == MiB);
  CHECK(s.rate_at(local(kSat, 18, 0)) == 0);
}

TEST_CASE("parse_bwlimit: bad input names the bad piece") {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"", "--bwlimit '': empty (examples: 20M, off, \"08:00,5M 23:00,off\")"},
      {" ; ", "--bwlimit ' ; ': empty (examples: 20M, off, \"08:00,5M 23:00,off\")"},
      {"fast", "--bwlimit 'fast': bad rate 'fast' (examples: 512K, 20M, 1.5G, off)"},
      {"20X", "--bwlimit '20X': bad rate '20X' (examples: 512K, 20M, 1.5G, off)"},
      {"20MX", "--bwlimit '20MX': bad rate '20MX' (examples: 512K, 20M, 1.5G, off)"},
      {"-5M", "--bwlimit '-5M': bad rate '-5M' (examples: 512K, 20M, 1.5G, off)"},
      {"1.2.3M", "--bwlimit '1.2.3M': bad rate '1.2.3M' (examples: 512K, 20M, 1.5G, off)"},
      {"1000",
       "--bwlimit '1000': bad rate '1000': needs a unit (B, K, M, G or T per second; rclone would "
       "read it as K)"},
      {"0.5B", "--bwlimit '0.5B': bad rate '0.5B': below 1 byte per second"},
      {"99999999T", "--bwlimit '99999999T': bad rate '99999999T': too large"},
      {"10M:1M",
       "--bwlimit '10M:1M': bad rate '10M:1M': upload:download pairs are not supported "
       "(diskferry only uploads); give one rate"},
      {"08:00",
       "--bwlimit '08:00': '08:00' has no rate (a timetable entry is TIME,RATE, e.g. 08:00,5M)"},
      {"Mon-08:00",
       "--bwlimit 'Mon-08:00': 'Mon-08:00' has no rate (a timetable entry is TIME,RATE, e.g. "
       "08:00,5M)"},
      {"08:00,5M 23:00",
       "--bwlimit '08:00,5M 23:00': '23:00' is not TIME,RATE (e.g. 08:00,5M or Mon-08:00,5M)"},
      {"08:00,5M,1M",
       "--bwlimit '08:00,5M,1M': '08:00,5M,1M' is not TIME,RATE (e.g. 08:00,5M or "
       "Mon-08:00,5M)"},
      {"24:00,1M", "--bwlimit '24:00,1M': bad time '24:00' in '24:00,1M' (HH:MM, 00:00 to 23:59)"},
      {"08:60,1M", "--bwlimit '08:60,1M': bad time '08:60' in '08:60,1M' (HH:MM, 00:00 to 23:59)"},
      {"8:0,1M", "--bwlimit '8:0,1M': bad time '8:0' in '8:0,1M' (HH:MM, 00:00 to 23:59)"},
      {"0800,1M", "--bwlimit '0800,1M': bad time '0800' in '0800,1M' (HH:MM, 00:00 to 23:59)"},
      {"08-00,1M", "--bwlimit '08-00,1M': bad time '08-00' in '08-00,1M' (HH:MM, 00:00 to 23:59)"},
      {",1M", "--bwlimit ',1M': bad time '' in ',1M' (HH:MM, 00:00 to 23:59)"},
      {"Mun-08:00,1M",
       "--bwlimit 'Mun-08:00,1M': unknown weekday 'Mun' in 'Mun-08:00,1M' (Mon, Tue, Wed, Thu, "
       "Fri, Sat, Sun)"},
      {"Mon-Tue-08:00,1M",
       "--bwlimit 'Mon-Tue-08:00,1M': bad time 'Tue-08:00' in 'Mon-Tue-08:00,1M' (HH:MM, 00:00 to "
       "23:59)"},
      {"08:00,fast",
       "--bwlimit '08:00,fast': bad rate 'fast' in '08:00,fast' (examples: 512K, 20M, 1.5G, off)"},
      {"08:00,", "--bwlimit '08:00,': bad rate '' in '08:00,' (examples: 512K, 20M, 1.5G, off)"},
      {"08:00,1000",
       "--bwlimit '08:00,1000': bad rate '1000' in '08:00,1000': needs a unit (B, K, M, G or T "
       "per second; rclone would read it as K)"},
      {"08:00,10M:1M",
       "--bwlimit '08:00,10M:1M': bad rate '10M:1M' in '08:00,10M:1M': upload:download pairs are "
       "not supported (diskferry only uploads); give one rate"},
      {"08:00,1M 8:00,2M",
       "--bwlimit '08:00,1M 8:00,2M': duplicate time in '08:00,1M' and '8:00,2M'"},
      {"Mon-08:00,1M monday-08:00,2M",
       "--bwlimit 'Mon-08:00,1M monday-08:00,2M': duplicate time in 'Mon-08:00,1M' and "
       "'monday-08:00,2M'"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.text);
    std::string got = bwlimit_error(c.text);
    CHECK(got == c.message);
    CHECK(got.find('\n') == std::string::npos);
  }
  // Not duplicates: different days, or an every-day entry overridden on one day.
  CHECK_NOTHROW(parse_bwlimit("Mon-08:00,1M Tue-08:00,2M"));
  CHECK_NOTHROW(parse_bwlimit("08:00,1M Mon-08:00,2M"));
}

// --- token bucket arithmetic (injected clock, no real sleeping) -------------------------------

TEST_CASE("RateLimiter: long-run rate is exact, the first burst is free") {
  FakeClock fc;
  RateLimiter limiter(RateSchedule::constant(MiB), 256 * KiB, fc.clock());
  CHECK(limiter.rate() == MiB);
  CHECK(limiter.burst() == 256 * KiB);
  for (int i = 0; i < 400; ++i) limiter.acquire(256 * KiB);  // 100 MiB
  CHECK(fc.seconds() == doctest::Approx(99.75).epsilon(1e-12));

  // Sizes that do not divide anything evenly.
  FakeClock fc2;
  RateLimiter odd(parse_bwlimit("1000000B"), 65536, fc2.clock());
  for (int i = 0; i < 10000; ++i) odd.acquire(10007);
  double want = (10000.0 * 10007 - 65536) / 1e6;
  CHECK(fc2.seconds() >= want);
  CHECK(fc2.seconds() < want + 1e-6);
}

TEST_CASE("RateLimiter: an idle bucket holds at most one burst") {
  FakeClock fc;
  RateLimiter limiter(RateSchedule::constant(MiB), 256 * KiB, fc.clock());
  fc.t += 1000s;  // idle: would be 1000 MiB of credit without the cap
  limiter.acquire(256 * KiB);
  CHECK(fc.sleeps == 0);
  limiter.acquire(256 * KiB);
  CHECK(fc.seconds() == doctest::Approx(1000.25).epsilon(1e-12));
  fc.t += 10s;
  limiter.acquire(128 * KiB);
  limiter.acquire(128 * KiB);
  CHECK(fc.seconds() == doctest::Approx(1010.25).epsilon(1e-12));  // still free: the burst
  limiter.acquire(1);
  CHECK(fc.seconds() > 1010.25);
}

TEST_CASE("RateLimiter: a request larger than the burst goes, and the next caller pays") {
  FakeClock fc;
  RateLimiter limiter(RateSchedule::constant(MiB), 256 * KiB, fc.clock());
  limiter.acquire(MiB);  // bucket full: goes now, leaves 768 KiB of debt
  CHECK(fc.sleeps == 0);
  limiter.acquire(64 * KiB);
  CHECK(fc.seconds() == doctest::Approx(0.8125).epsilon(1e-12));  // (768 + 64) KiB / 1 MiB/s

  // An oversized request waits for a full bucket, no more.
  FakeClock fc2;
  RateLimiter l2(RateSchedule::constant(MiB), 256 * KiB, fc2.clock());
  l2.acquire(256 * KiB);  // empties the bucket
  l2.acquire(4 * MiB);
  CHECK(fc2.seconds() == doctest::Approx(0.25).epsilon(1e-12));
  l2.acquire(256 * KiB);  // 3.75 MiB of debt + its own 256 KiB
  CHECK(fc2.seconds() == doctest::Approx(4.25).epsilon(1e-12));
}

TEST_CASE("RateLimiter: the timetable is re-read while transferring") {
  FakeClock fc;
  fc.wall0 = local(kMon, 10, 0);
  RateLimiter limiter(parse_bwlimit("10:00,1M 10:01,4M"), 256 * KiB, fc.clock());
  CHECK(limiter.rate() == MiB);
  // 1 MiB/s for the first minute, then 4 MiB/s: burst + 60 MiB + 40 MiB take 60 s + 10 s.
  uint64_t sent = 0;
  while (sent < 256 * KiB + 100 * MiB) {
    limiter.acquire(256 * KiB);
    sent += 256 * KiB;
    if (fc.seconds() < 59.9) CHECK(limiter.rate() == MiB);
  }
  CHECK(limiter.rate() == 4 * MiB);
  CHECK(fc.seconds() == doctest::Approx(70.0).epsilon(1e-9));
}

TEST_CASE("RateLimiter: off lets everything through, also when it starts mid-wait") {
  FakeClock fc;
  RateLimiter off(parse_bwlimit("off"), 256 * KiB, fc.clock());
  for (int i = 0; i < 10; ++i) off.acquire(GiB);
  CHECK(fc.sleeps == 0);
  CHECK(off.rate() == 0);

  FakeClock fc2;
  fc2.wall0 = local(kMon, 10, 0, 50);
  RateLimiter limiter(parse_bwlimit("10:00,1K 10:01,off"), 256 * KiB, fc2.clock());
  limiter.acquire(256 * KiB);  // the burst
  limiter.acquire(256 * KiB);  // would take 256 s at 1 KiB/s; released at 10:01:00
  CHECK(fc2.seconds() == doctest::Approx(10.0).epsilon(1e-9));
  int sleeps = fc2.sleeps;
  limiter.acquire(GiB);
  CHECK(fc2.sleeps == sleeps);
}

TEST_CASE("RateLimiter: set_schedule takes effect, the bucket starts full") {
  FakeClock fc;
  RateLimiter limiter(RateSchedule(), 256 * KiB, fc.clock());
  limiter.acquire(GiB);
  CHECK(fc.sleeps == 0);
  limiter.set_schedule(parse_bwlimit("1M"));
  CHECK(limiter.rate() == MiB);
  limiter.acquire(256 * KiB);
  CHECK(fc.sleeps == 0);
  limiter.acquire(256 * KiB);
  CHECK(fc.seconds() == doctest::Approx(0.25).epsilon(1e-12));
  limiter.set_schedule(parse_bwlimit("2M"));  // the empty bucket now refills twice as fast
  limiter.acquire(512 * KiB);                 // oversized: waits for a full bucket
  CHECK(fc.seconds() == doctest::Approx(0.375).epsilon(1e-12));
  limiter.acquire(256 * KiB);  // 256 KiB of debt + its own 256 KiB at 2 MiB/s
  CHECK(fc.seconds() == doctest::Approx(0.625).epsilon(1e-12));
}

TEST_CASE("RateLimiter: shared by threads, the total rate holds") {
  // Threads sleep at the same time: virtual time advances to the latest wake-up asked for,
  // counted from when that thread last read the clock.
  std::mutex mu;
  std::chrono::steady_clock::time_point t{};
  RateLimiter::Clock clock{[&] {
                             std::lock_guard l(mu);
                             return tl_seen = t;
                           },
                           [&](std::chrono::nanoseconds d) {
                             {
                               std::lock_guard l(mu);
                               t = std::max(t, tl_seen + d);
                             }
                             std::this_thread::yield();
                           },
                           [] { return local(kMon, 12, 0); }};
  RateLimiter limiter(RateSchedule::constant(10 * MiB), 256 * KiB, clock);
  std::atomic<uint64_t> total{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 100; ++k) {
        limiter.acquire(64 * KiB);
        total += 64 * KiB;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(total == 25 * MiB);
  double secs = std::chrono::duration<double>(t.time_since_epoch()).count();
  double exact = (25.0 * MiB - 256 * KiB) / (10.0 * MiB);
  CHECK(secs >= exact - 1e-9);
  CHECK(secs <= exact + 0.05);
}

// --- the sink ---------------------------------------------------------------------------------

TEST_CASE("rate-limited sink: writes go out in burst-sized pieces, on time") {
  FakeClock fc;
  std::vector<RecordingSink::Call> calls;
  auto limiter = std::make_shared<RateLimiter>(RateSchedule::constant(MiB), 256 * KiB, fc.clock());
  auto sink = make_rate_limited_sink(std::make_unique<RecordingSink>(fc, calls), {limiter});
  std::vector<std::byte> data(MiB);
  sink->write(data);
  REQUIRE(calls.size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(calls[i].kind == 'w');
    CHECK(calls[i].size == 256 * KiB);
    CHECK(calls[i].offset == i * 256 * KiB);
    CHECK(calls[i].at == doctest::Approx(0.25 * static_cast<double>(i)).epsilon(1e-12));
  }
  CHECK(sink->position() == MiB);
}

TEST_CASE("rate-limited sink: zeros are free, rewrites are paid for") {
  FakeClock fc;
  std::vector<RecordingSink::Call> calls;
  auto limiter = std::make_shared<RateLimiter>(RateSchedule::constant(MiB), 256 * KiB, fc.clock());
  auto sink = make_rate_limited_sink(std::make_unique<RecordingSink>(fc, calls), {limiter});
  sink->write_zeros(100 * GiB);
  CHECK(fc.sleeps == 0);
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].kind == 'z');
  CHECK(sink->position() == 100 * GiB);

  CHECK(sink->supports_rewrite());
  std::vector<std::byte> header(600 * KiB);
  sink->rewrite(100, header);
  REQUIRE(calls.size() == 4);
  CHECK(calls[1].kind == 'r');
  CHECK(calls[1].offset == 100);
  CHECK(calls[1].size == 256 * KiB);
  CHECK(calls[2].offset == 100 + 256 * KiB);
  CHECK(calls[3].offset == 100 + 512 * KiB);
  CHECK(calls[3].size == 88 * KiB);
  CHECK(fc.seconds() == doctest::Approx((600.0 - 256) / 1024).epsilon(1e-12));
}

TEST_CASE("rate-limited sink: every limiter is paid, pieces fit the smallest burst") {
  FakeClock fc;
  std::vector<RecordingSink::Call> calls;
  auto job = std::make_shared<RateLimiter>(RateSchedule::constant(MiB), 256 * KiB, fc.clock());
  auto global =
      std::make_shared<RateLimiter>(RateSchedule::constant(2 * MiB), 64 * KiB, fc.clock());
  auto sink =
      make_rate_limited_sink(std::make_unique<RecordingSink>(fc, calls), {job, nullptr, global});
  std::vector<std::byte> data(MiB);
  sink->write(data);
  CHECK(calls.size() == 16);
  for (const auto& c : calls) CHECK(c.size == 64 * KiB);
  CHECK(fc.seconds() == doctest::Approx(0.75).epsilon(1e-9));  // the job's 1 MiB/s decides

  // A faster job is held to the global rate.
  fc.t += 10s;
  calls.clear();
  double start = fc.seconds();
  auto job2 = std::make_shared<RateLimiter>(RateSchedule::constant(8 * MiB), 64 * KiB, fc.clock());
  auto sink2 = make_rate_limited_sink(std::make_unique<RecordingSink>(fc, calls), {job2, global});
  std::vector<std::byte> more(4 * MiB);
  sink2->write(more);
  CHECK(fc.seconds() - start == doctest::Approx((4.0 * 1024 - 64) / 2048).epsilon(1e-9));
}

TEST_CASE("rate-limited sink: no limiters, no wrapper") {
  std::vector<RecordingSink::Call> calls;
  FakeClock fc;
  auto inner = std::make_unique<RecordingSink>(fc, calls);
  Sink* raw = inner.get();
  auto sink = make_rate_limited_sink(std::move(inner), {nullptr});
  CHECK(sink.get() == raw);
}

TEST_CASE("rate-limited sink: 3 MiB at 6 MiB/s in real time") {
  auto limiter = std::make_shared<RateLimiter>(parse_bwlimit("6M"));
  auto sink = make_rate_limited_sink(make_counting_sink(), {limiter});
  std::vector<std::byte> data(MiB);
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) sink->write(data);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(sink->position() == 3 * MiB);
  // (3 MiB - the 256 KiB burst) / 6 MiB/s = 0.458 s
  CHECK(secs >= 0.4);
  CHECK(secs <= 0.7);
}
