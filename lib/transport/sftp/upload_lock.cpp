#include "transport/sftp/upload_lock.hpp"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

namespace diskferry::sftp {
namespace {

// How long a run that looked at a lock at the same moment as this one has to write its own:
// one round trip, with a wide margin.
constexpr std::chrono::seconds kSettle{2};

struct Holder {
  std::string host, machine, token;
  long long pid = 0, since = 0;
  unsigned long long start = 0;  // clock ticks after boot (/proc/PID/stat field 22)
};

std::optional<unsigned long long> start_time_of(long long pid) {
  std::ifstream f(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!std::getline(f, line)) return std::nullopt;
  // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
  auto paren = line.rfind(')');
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream rest(line.substr(paren + 1));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::stoull(field);
  return std::nullopt;
}

std::string machine_id() {
  std::ifstream f("/etc/machine-id");
  std::string id;
  f >> id;
  return id;
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

Holder self(const std::string& token) {
  Holder h;
  h.host = host_name();
  h.machine = machine_id();
  h.token = token;
  h.pid = ::getpid();
  h.start = start_time_of(h.pid).value_or(0);
  h.since = std::chrono::duration_cast<std::chrono::seconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
  return h;
}

std::string render(const Holder& h) {
  return fmt::format(
      "diskferry upload lock\nhost {}\nmachine {}\npid {}\nstart {}\nsince {}\n"
      "token {}\n",
      h.host, h.machine.empty() ? "-" : h.machine, h.pid, h.start, h.since, h.token);
}

std::optional<Holder> parse(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != "diskferry upload lock") return std::nullopt;
  Holder h;
  while (std::getline(in, line)) {
    auto sp = line.find(' ');
    if (sp == std::string::npos) continue;
    std::string key = line.substr(0, sp), value = line.substr(sp + 1);
    auto num = [&](auto& out) { std::from_chars(value.data(), value.data() + value.size(), out); };
    if (key == "host") h.host = value;
    if (key == "machine") h.machine = value == "-" ? "" : value;
    if (key == "pid") num(h.pid);
    if (key == "start") num(h.start);
    if (key == "since") num(h.since);
    if (key == "token") h.token = value;
  }
  if (h.token.empty() || h.pid <= 0) return std::nullopt;
  return h;
}

bool same_machine(const Holder& a, const Holder& b) {
  if (!a.machine.empty() && !b.machine.empty()) return a.machine == b.machine;
  return a.host == b.host;
}

// Whether the holder (on this machine) is still running: its pid exists and started when the
// lock says. A process this one may not signal or inspect counts as running.
bool alive(const Holder& h) {
  if (::kill(static_cast<pid_t>(h.pid), 0) != 0 && errno == ESRCH) return false;
  auto start = start_time_of(h.pid);
  return !start || !h.start || *start == h.start;
}

bool is_self(const Holder& h, const Holder& me) {
  return same_machine(h, me) && h.pid == me.pid && h.start == me.start;
}

std::string age(long long since) {
  long long now = std::chrono::duration_cast<std::chrono::seconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
  long long s = std::max(0LL, now - since);
  if (s < 120) return fmt::format("{} s", s);
  if (s < 2 * 3600) return fmt::format("{} min", s / 60);
  if (s < 2 * 86400) return fmt::format("{} h {} min", s / 3600, s / 60 % 60);
  return fmt::format("{} days", s / 86400);
}

Bytes as_bytes(const std::string& s) {
  return Bytes(reinterpret_cast<const std::byte*>(s.data()), s.size());
}

// The lock's text; nullopt when there is no lock.
std::optional<std::string> read_lock(Channel& ch, const std::string& lock) {
  std::string h;
  try {
    h = ch.open(lock, kOpenRead);
  } catch (const StatusError& e) {
    if (e.code() == kNoSuchFile) return std::nullopt;
    throw;
  }
  auto bytes = ch.read(h, 0, 4096);
  ch.close(h);
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

void write_new(Channel& ch, const std::string& path, const std::string& text, uint32_t flags) {
  std::string h = ch.open(path, kOpenWrite | kOpenCreate | flags);
  ch.write(h, 0, as_bytes(text));
  ch.close(h);
}

[[noreturn]] void refuse(Channel& ch, const std::string& final_path, const std::string& lock,
                         const std::optional<Holder>& h, const Holder& me) {
  if (!h)
    throw LockedError(fmt::format(
        "{}: {}: another diskferry run is starting to write it ({} is being created or is not "
        "a diskferry lock); if no run is writing it, remove {} on the server",
        ch.where(), final_path, lock, lock));
  if (same_machine(*h, me) && h->pid == me.pid && h->start == me.start)
    throw LockedError(
        fmt::format("{}: {}: another upload of this process writes it too; give "
                    "each output a NAME of its own",
                    ch.where(), final_path));
  if (same_machine(*h, me))
    throw LockedError(fmt::format(
        "{}: {}: another diskferry run is writing it (pid {} on this host, for {}; lock {}); "
        "wait for it to end, or stop it",
        ch.where(), final_path, h->pid, age(h->since), lock));
  throw LockedError(fmt::format(
      "{}: {}: another diskferry run is writing it (pid {} on host {}, for {}; lock {}); if that "
      "run is gone, remove {} on the server to clear it",
      ch.where(), final_path, h->pid, h->host, age(h->since), lock, lock));
}

}  // namespace

std::string random_lock_token() {
  std::random_device rd;
  return fmt::format("{:08x}{:08x}{:08x}{:08x}", rd(), rd(), rd(), rd());
}

std::string lock_path(const std::string& final_path) {
  return final_path + ".lock";
}

namespace {

LockTaken take(Channel& ch, const std::string& final_path, const std::string& token,
               bool exclusive_create) {
  const std::string lock = lock_path(final_path);
  const Holder me = self(token);
  const std::string text_of_mine = render(me);
  for (int round = 0; round < 3; ++round) {
    // A server that ignores EXCL lets a second run overwrite a live lock: look first.
    if (!ch.stat(lock)) {
      try {
        write_new(ch, lock, text_of_mine, kOpenExcl);
        // Without EXCL, a run that looked at the same moment writes its lock over ours: wait
        // until its write has landed, then only the last writer reads back its own lock
        // unchanged (interleaved writes leave a lock neither recognises: both refuse).
        if (!exclusive_create) std::this_thread::sleep_for(kSettle);
        auto back = read_lock(ch, lock);
        if (back == text_of_mine) return LockTaken::Fresh;
        refuse(ch, final_path, lock, back ? parse(*back) : std::nullopt, me);
      } catch (const StatusError&) {
        if (ch.stat(lock)) continue;  // another run created it first: judge that one
        throw;
      }
    }
    auto text = read_lock(ch, lock);
    if (!text) continue;  // removed meanwhile: try to create it again
    auto h = parse(*text);
    if (!h) refuse(ch, final_path, lock, h, me);
    if (h->token == token && is_self(*h, me)) return LockTaken::Own;
    if (!same_machine(*h, me) || alive(*h)) refuse(ch, final_path, lock, h, me);
    // Stale: its process is gone from this machine. The replacement is renamed over it, so
    // NAME.lock never disappears (a run on another host could create it in the gap). Two runs
    // here taking over the same stale lock both rename; each reads back after the other's rename
    // had time to land, so at most one finds its own token.
    bool own_job = h->token == token;
    std::string mine = fmt::format("{}.{}", lock, ::getpid());
    write_new(ch, mine, text_of_mine, kOpenTrunc);
    auto again = read_lock(ch, lock);
    if (!again || *again != *text) {
      ch.remove(mine);
      continue;  // changed while we looked: judge it again
    }
    ch.rename(mine, lock);
    if (!own_job) std::this_thread::sleep_for(kSettle);
    auto back = read_lock(ch, lock);
    if (back != text_of_mine) refuse(ch, final_path, lock, back ? parse(*back) : std::nullopt, me);
    return own_job ? LockTaken::Own : LockTaken::TakenOver;
  }
  throw LockedError(fmt::format("{}: {}: {} keeps changing: another run is taking it", ch.where(),
                                final_path, lock));
}

}  // namespace

LockTaken take_lock(Channel& ch, const std::string& final_path, const std::string& token,
                    bool exclusive_create) {
  try {
    return take(ch, final_path, token, exclusive_create);
  } catch (const StatusError& e) {
    // The first thing an upload writes is its lock, so this is where a directory the user may
    // not write in shows (rclone: a lazy open that fails on the first read).
    throw StatusError(e.code(), fmt::format("{} (taking the lock before writing {}.partial)",
                                            e.what(), final_path));
  }
}

void check_lock(Channel& ch, const std::string& final_path, const std::string& token) {
  const std::string lock = lock_path(final_path);
  auto text = read_lock(ch, lock);
  auto h = text ? parse(*text) : std::nullopt;
  if (h && h->token == token && is_self(*h, self(token))) return;
  throw LockedError(fmt::format(
      "{}: {}: not published: {} {} while this run was writing", ch.where(), final_path, lock,
      h ? fmt::format("was taken by pid {} on host {}", h->pid, h->host) : "was removed"));
}

bool held_by_other(Channel& ch, const std::string& final_path, const std::string& token) {
  auto text = read_lock(ch, lock_path(final_path));
  if (!text) return false;
  auto h = parse(*text);
  return !h || h->token != token;
}

bool release_lock(Channel& ch, const std::string& final_path, const std::string& token) {
  if (held_by_other(ch, final_path, token)) return false;
  if (ch.stat(lock_path(final_path))) ch.remove(lock_path(final_path));
  return true;
}

}  // namespace diskferry::sftp
