#include "pipeline/rate_limit.hpp"

#include <fmt/format.h>
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <ctime>
#include <map>
#include <mutex>
#include <string_view>
#include <thread>

#include "util/error.hpp"

namespace diskferry {

namespace {

constexpr int kMinutesPerDay = 24 * 60;
constexpr const char* kDayNames[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};

// Re-parseable and exact: the largest binary unit that divides the rate.
std::string format_rate(uint64_t rate) {
  if (rate == 0) return "off";
  static const struct {
    int shift;
    char unit;
  } units[] = {{40, 'T'}, {30, 'G'}, {20, 'M'}, {10, 'K'}};
  for (const auto& u : units) {
    if (rate % (uint64_t{1} << u.shift) == 0) return fmt::format("{}{}", rate >> u.shift, u.unit);
  }
  return fmt::format("{}B", rate);
}

class Parser {
 public:
  explicit Parser(const std::string& text) : text_(text) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(ErrorKind::Usage, fmt::format("--bwlimit '{}': {}", text_, what));
  }

  // Same grammar as parse_size (lib/util/size.hpp), but a rate may be fractional ("1.3M" is a
  // fine rate though not a whole number of bytes) and a bare number is refused: rclone reads
  // "1000" as KiB/s, a size parser as bytes, and guessing wrong is off by 1024x.
  uint64_t rate(std::string_view s, std::string_view entry) const {
    auto bad = [&](std::string_view why) {
      if (entry.empty()) fail(fmt::format("bad rate '{}'{}", s, why));
      fail(fmt::format("bad rate '{}' in '{}'{}", s, entry, why));
    };
    const std::string_view examples = " (examples: 512K, 20M, 1.5G, off)";
    std::string lower(s);
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower == "off") return 0;
    if (s.find(':') != std::string_view::npos)
      bad(": upload:download pairs are not supported (diskferry only uploads); give one rate");
    size_t end = 0;
    while (end < s.size() && (std::isdigit(static_cast<unsigned char>(s[end])) || s[end] == '.'))
      ++end;
    double value = 0;
    auto [ptr, ec] = std::from_chars(s.data(), s.data() + end, value);
    if (end == 0 || ec != std::errc() || ptr != s.data() + end) bad(examples);
    std::string_view suffix = s.substr(end);
    if (suffix.empty()) {
      if (value == 0) return 0;
      bad(": needs a unit (B, K, M, G or T per second; rclone would read it as K)");
    }
    double mult = 0;
    switch (std::toupper(static_cast<unsigned char>(suffix[0]))) {
      case 'B':
        mult = 1;
        break;
      case 'K':
        mult = 0x1p10;
        break;
      case 'M':
        mult = 0x1p20;
        break;
      case 'G':
        mult = 0x1p30;
        break;
      case 'T':
        mult = 0x1p40;
        break;
      default:
        bad(examples);
    }
    auto rest = suffix.substr(1);
    if (!(rest.empty() || rest == "B" || rest == "iB" || rest == "ib" || rest == "b"))
      bad(examples);
    double bytes = value * mult;
    if (bytes == 0) return 0;
    if (bytes < 1) bad(": below 1 byte per second");
    if (bytes > 1e18) bad(": too large");
    return static_cast<uint64_t>(bytes);
  }

  // "HH:MM" (or "H:MM") → minute of the day.
  int time(std::string_view s, std::string_view entry) const {
    auto bad = [&] {
      fail(fmt::format("bad time '{}' in '{}' (HH:MM, 00:00 to 23:59)", s, entry));
    };
    size_t colon = s.find(':');
    if (colon == std::string_view::npos || colon < 1 || colon > 2 || s.size() != colon + 3) bad();
    int h = 0, m = 0;
    for (size_t i = 0; i < colon; ++i) {
      if (!std::isdigit(static_cast<unsigned char>(s[i]))) bad();
      h = h * 10 + (s[i] - '0');
    }
    for (size_t i = colon + 1; i < s.size(); ++i) {
      if (!std::isdigit(static_cast<unsigned char>(s[i]))) bad();
      m = m * 10 + (s[i] - '0');
    }
    if (h > 23 || m > 59) bad();
    return h * 60 + m;
  }

  // rclone accepts three-letter and full English names, any case. Returns tm_wday.
  int weekday(std::string_view s, std::string_view entry) const {
    static const char* full[] = {"sunday",   "monday", "tuesday", "wednesday",
                                 "thursday", "friday", "saturday"};
    std::string lower(s);
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    for (int d = 0; d < 7; ++d) {
      if (lower == full[d] || lower == std::string_view(full[d]).substr(0, 3)) return d;
    }
    fail(fmt::format("unknown weekday '{}' in '{}' (Mon, Tue, Wed, Thu, Fri, Sat, Sun)", s, entry));
  }

 private:
  const std::string& text_;
};

}  // namespace

RateSchedule RateSchedule::constant(uint64_t bytes_per_second) {
  RateSchedule s;
  s.slots_.push_back({0, bytes_per_second});
  s.text_ = format_rate(bytes_per_second);
  return s;
}

uint64_t RateSchedule::rate_at(std::chrono::system_clock::time_point when) const {
  if (slots_.empty()) return 0;
  if (slots_.size() == 1) return slots_[0].rate;
  std::time_t t = std::chrono::system_clock::to_time_t(when);
  std::tm tm{};
  localtime_r(&t, &tm);
  int minute = tm.tm_wday * kMinutesPerDay + tm.tm_hour * 60 + tm.tm_min;
  auto it = std::upper_bound(slots_.begin(), slots_.end(), minute,
                             [](int m, const Slot& s) { return m < s.minute_of_week; });
  // Before the first entry of the week, the last one is still in force.
  return it == slots_.begin() ? slots_.back().rate : std::prev(it)->rate;
}

std::string RateSchedule::to_string() const {
  return text_.empty() ? "off" : text_;
}

RateSchedule parse_bwlimit(const std::string& text) {
  Parser p(text);
  std::vector<std::string_view> tokens;
  std::string_view rest(text);
  while (!rest.empty()) {
    size_t start = rest.find_first_not_of(" \t;");
    if (start == std::string_view::npos) break;
    rest.remove_prefix(start);
    size_t len = std::min(rest.find_first_of(" \t;"), rest.size());
    tokens.push_back(rest.substr(0, len));
    rest.remove_prefix(len);
  }
  if (tokens.empty()) p.fail("empty (examples: 20M, off, \"08:00,5M 23:00,off\")");

  if (tokens.size() == 1 && tokens[0].find(',') == std::string_view::npos) {
    std::string_view t = tokens[0];
    // "08:00" or "Mon-08:00" alone is a timetable entry that lost its rate, not a bad rate.
    std::string_view clock = t.substr(t.find('-') == std::string_view::npos ? 0 : t.find('-') + 1);
    if (!clock.empty() && std::isdigit(static_cast<unsigned char>(clock[0])) &&
        clock.find(':') != std::string_view::npos &&
        clock.find_first_not_of("0123456789:") == std::string_view::npos)
      p.fail(fmt::format("'{}' has no rate (a timetable entry is TIME,RATE, e.g. 08:00,5M)", t));
    return RateSchedule::constant(p.rate(t, ""));
  }

  // Entries without a weekday apply to every day; an entry naming the day wins over an every-day
  // entry at the same minute (rclone would let the later one in the text win).
  struct Parsed {
    uint64_t rate;
    bool specific;
  };
  std::map<int, Parsed> slots;                           // minute of week → rate
  std::map<std::pair<int, int>, std::string_view> seen;  // (weekday or -1, minute) → entry
  std::string normalised;
  for (std::string_view entry : tokens) {
    size_t comma = entry.find(',');
    if (comma == std::string_view::npos || entry.find(',', comma + 1) != std::string_view::npos)
      p.fail(fmt::format("'{}' is not TIME,RATE (e.g. 08:00,5M or Mon-08:00,5M)", entry));
    std::string_view when = entry.substr(0, comma);
    int day = -1;
    size_t dash = when.find('-');
    if (dash != std::string_view::npos) {
      std::string_view name = when.substr(0, dash);
      bool alpha = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalpha(static_cast<unsigned char>(c));
      });
      if (!alpha) p.time(when, entry);  // "08-00": report it as a bad time, the likely intent
      day = p.weekday(name, entry);
      when = when.substr(dash + 1);
    }
    int minute = p.time(when, entry);
    uint64_t rate = p.rate(entry.substr(comma + 1), entry);

    auto [prev, inserted] = seen.emplace(std::pair{day, minute}, entry);
    if (!inserted) p.fail(fmt::format("duplicate time in '{}' and '{}'", prev->second, entry));

    for (int d = 0; d < 7; ++d) {
      if (day >= 0 && d != day) continue;
      int key = d * kMinutesPerDay + minute;
      auto it = slots.find(key);
      if (it == slots.end() || !it->second.specific) slots[key] = {rate, day >= 0};
    }
    if (!normalised.empty()) normalised += ' ';
    normalised += day >= 0
                      ? fmt::format("{}-{:02}:{:02},{}", kDayNames[day], minute / 60, minute % 60,
                                    format_rate(rate))
                      : fmt::format("{:02}:{:02},{}", minute / 60, minute % 60, format_rate(rate));
  }

  RateSchedule s;
  for (const auto& [minute, slot] : slots) {
    // A slot repeating the rate in force before it changes nothing.
    if (!s.slots_.empty() && s.slots_.back().rate == slot.rate) continue;
    s.slots_.push_back({minute, slot.rate});
  }
  while (s.slots_.size() > 1 && s.slots_.front().rate == s.slots_.back().rate)
    s.slots_.erase(s.slots_.begin());
  if (s.slots_.size() == 1) s.slots_[0].minute_of_week = 0;
  s.text_ = std::move(normalised);
  return s;
}

// ---------------------------------------------------------------------------------------------

// Tokens are kept as two running totals so each waiter can hold a fixed target: `issued` counts
// every byte handed out (including reservations still waiting), `refilled` every token ever
// added. The bucket level is refilled - issued, never above `burst`.
struct RateLimiter::State {
  std::mutex mu;
  RateSchedule schedule;
  size_t burst;
  Clock clock;
  uint64_t rate = 0;
  uint64_t issued = 0;
  double refilled = 0;
  std::chrono::steady_clock::time_point last, next_check;

  void set_rate(uint64_t r) {
    if (r == rate) return;
    // Unlimited settles all debt; the bucket starts full when a limit comes back.
    if (r == 0) refilled = static_cast<double>(issued) + static_cast<double>(burst);
    rate = r;
  }

  void advance(std::chrono::steady_clock::time_point now) {
    if (now > last) {
      if (rate > 0) {
        double dt = std::chrono::duration<double>(now - last).count();
        refilled = std::min(refilled + static_cast<double>(rate) * dt,
                            static_cast<double>(issued) + static_cast<double>(burst));
      }
      last = now;
    }
    if (!schedule.is_constant() && now >= next_check) {
      set_rate(schedule.rate_at(clock.wall()));
      next_check = now + std::chrono::seconds(1);
    }
  }
};

RateLimiter::RateLimiter(RateSchedule schedule, size_t burst, Clock clock)
    : s_(std::make_unique<State>()) {
  if (!clock.now) clock.now = [] { return std::chrono::steady_clock::now(); };
  if (!clock.sleep)
    clock.sleep = [](std::chrono::nanoseconds d) { std::this_thread::sleep_for(d); };
  if (!clock.wall) clock.wall = [] { return std::chrono::system_clock::now(); };
  s_->burst = std::max<size_t>(burst, 1);
  s_->clock = std::move(clock);
  s_->refilled = static_cast<double>(s_->burst);
  s_->last = s_->clock.now();
  s_->schedule = std::move(schedule);
  s_->rate = s_->schedule.rate_at(s_->clock.wall());
  s_->next_check = s_->last + std::chrono::seconds(1);
}

RateLimiter::~RateLimiter() = default;

void RateLimiter::acquire(size_t bytes) {
  if (bytes == 0) return;
  std::unique_lock lock(s_->mu);
  State& s = *s_;
  s.advance(s.clock.now());
  if (s.rate == 0) {
    s.issued += bytes;
    s.refilled = static_cast<double>(s.issued) + static_cast<double>(s.burst);
    return;
  }
  // Wait for min(bytes, burst) tokens, then take all of them: an oversized request cannot wait
  // for more than the bucket holds, so it leaves the bucket negative instead.
  double target = static_cast<double>(s.issued) + static_cast<double>(std::min(bytes, s.burst));
  s.issued += bytes;
  for (;;) {
    double need = target - s.refilled;
    // The epsilon absorbs rounding in rate * dt; a millionth of a byte is not worth a wake-up.
    if (need <= 1e-6 || s.rate == 0) return;
    double ns = std::ceil(need * 1e9 / static_cast<double>(s.rate));
    // Wake at least every second to notice a timetable change or set_schedule().
    auto wait = std::chrono::nanoseconds(static_cast<int64_t>(std::min(ns, 1e9)));
    lock.unlock();
    s.clock.sleep(wait);
    lock.lock();
    s.advance(s.clock.now());
  }
}

void RateLimiter::set_schedule(RateSchedule schedule) {
  std::lock_guard lock(s_->mu);
  s_->advance(s_->clock.now());
  s_->schedule = std::move(schedule);
  s_->set_rate(s_->schedule.rate_at(s_->clock.wall()));
  s_->next_check = s_->last + std::chrono::seconds(1);
}

uint64_t RateLimiter::rate() const {
  std::lock_guard lock(s_->mu);
  s_->advance(s_->clock.now());
  return s_->rate;
}

size_t RateLimiter::burst() const {
  return s_->burst;
}

// ---------------------------------------------------------------------------------------------

namespace {

class RateLimitedSink final : public FilterSink {
 public:
  RateLimitedSink(std::unique_ptr<Sink> inner, std::vector<std::shared_ptr<RateLimiter>> limiters)
      : FilterSink(std::move(inner)), limiters_(std::move(limiters)) {
    for (const auto& l : limiters_) chunk_ = std::min(chunk_, l->burst());
  }

  void write(Bytes data) override {
    while (!data.empty()) {
      Bytes piece = data.first(std::min(data.size(), chunk_));
      pay(piece.size());
      inner().write(piece);
      data = data.subspan(piece.size());
    }
  }

  void rewrite(uint64_t offset, Bytes data) override {
    while (!data.empty()) {
      Bytes piece = data.first(std::min(data.size(), chunk_));
      pay(piece.size());
      inner().rewrite(offset, piece);
      offset += piece.size();
      data = data.subspan(piece.size());
    }
  }

 private:
  void pay(size_t n) {
    for (const auto& l : limiters_) l->acquire(n);
  }

  std::vector<std::shared_ptr<RateLimiter>> limiters_;
  size_t chunk_ = SIZE_MAX;
};

}  // namespace

std::unique_ptr<Sink> make_rate_limited_sink(std::unique_ptr<Sink> inner,
                                             std::vector<std::shared_ptr<RateLimiter>> limiters) {
  std::erase(limiters, nullptr);
  if (limiters.empty()) return inner;
  return std::make_unique<RateLimitedSink>(std::move(inner), std::move(limiters));
}

}  // namespace diskferry
