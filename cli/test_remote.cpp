// `diskferry test-remote sftp://USER@HOST[:PORT]/DIR`: checks, one step per line, everything an
// upload relies on (connection, host key, login, SFTP extensions and limits, channels, the target
// directory, a pipelined probe write with fsync, rename and remove) and says exactly what is
// wrong when something is. The probe file is removed on every path that still can.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>
#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "remote_args.hpp"
#include "transport/sftp/channel.hpp"
#include "transport/sftp/ssh_session.hpp"
#include "transport/sftp/url.hpp"
#include "transport/sftp/wire.hpp"
#include "util/error.hpp"
#include "util/size.hpp"

namespace diskferry::cli {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::ordered_json;
using sftp::Channel;

// ---------------------------------------------------------------------------------------------
// Ctrl-C / SIGTERM: finish the current request, remove the probe, exit 130. A second signal
// kills at once (the handler restores the default).

volatile std::sig_atomic_t g_signal = 0;

void on_signal(int sig) {
  g_signal = sig;
  std::signal(sig, SIG_DFL);
}

class Interrupted : public Error {
 public:
  Interrupted()
      : Error(ErrorKind::Output, fmt::format("interrupted by signal {}", int(g_signal))) {}
};

void check_interrupt() {
  if (g_signal) throw Interrupted();
}

// Server-provided text (banner, status messages, extension names) must not reach the terminal
// with control characters in it.
std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    out += (u < 0x20 || u == 0x7f) ? '?' : c;
  }
  return out;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string local_hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || !buf[0]) return "host";
  std::string h;
  for (char* p = buf; *p && h.size() < 48; ++p) {
    auto u = static_cast<unsigned char>(*p);
    bool ok = std::isalnum(u) || *p == '-' || *p == '_' || *p == '.';
    h += ok ? *p : '_';
  }
  return h;
}

// The URL of an upload (…/vm.qcow2) given instead of its directory: creating a directory of
// that name would make the real upload fail later.
bool looks_like_image_name(const std::string& path) {
  static const char* const exts[] = {".qcow2", ".vhdx", ".raw", ".img", ".zst", ".gz", ".sha256"};
  for (const char* e : exts) {
    std::string_view x(e);
    if (path.size() > x.size() && path.compare(path.size() - x.size(), x.size(), x) == 0)
      return true;
  }
  return false;
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir == ".") return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

// xorshift64*: incompressible enough that neither SSH compression nor a deduplicating server
// makes the throughput figure look better than real data would get.
class Noise {
 public:
  explicit Noise(uint64_t seed) : s_(seed | 1) {}
  void fill(std::vector<std::byte>& buf) {
    for (size_t i = 0; i < buf.size(); i += 8) {
      s_ ^= s_ >> 12;
      s_ ^= s_ << 25;
      s_ ^= s_ >> 27;
      uint64_t v = s_ * 0x2545F4914F6CDD1DULL;
      for (size_t k = 0; k < 8 && i + k < buf.size(); ++k, v >>= 8)
        buf[i + k] = std::byte(v & 0xff);
    }
  }

 private:
  uint64_t s_;
};

// ---------------------------------------------------------------------------------------------
// Output: "STEP ... ok (facts)" lines as the steps run, or with --json one object at the end.

class Report {
 public:
  explicit Report(bool json) : json_(json) {}

  void begin(const std::string& step, const std::string& label) {
    step_ = step;
    open_ = true;
    if (!json_) {
      fmt::print("{} ... ", label);
      std::fflush(stdout);
    }
  }
  // status: "ok", "created", "not offered", ...
  void end(const std::string& status, const std::string& detail = "") {
    steps_.push_back(Json{{"step", step_}, {"status", status}, {"detail", detail}});
    open_ = false;
    if (!json_) {
      fmt::print("{}{}\n", status, detail.empty() ? "" : " (" + detail + ")");
      std::fflush(stdout);
    }
  }
  // Ends the open step as failed (or, between steps, a "stopped" one); returns its name.
  std::string fail(const std::string& message) {
    if (!open_) begin("stopped", "stopped");
    steps_.push_back(Json{{"step", step_}, {"status", "failed"}, {"detail", message}});
    open_ = false;
    if (!json_) {
      fmt::print("FAILED: {}\n", message);
      std::fflush(stdout);
    }
    return step_;
  }
  void warn(const std::string& w) { warnings_.push_back(w); }

  const std::string& step() const { return step_; }
  bool json() const { return json_; }
  const std::vector<std::string>& warnings() const { return warnings_; }
  Json& facts() { return facts_; }

  void finish(bool ok, const std::string& verdict) {
    if (!json_) {
      fmt::print("verdict: {}\n", verdict);
      std::fflush(stdout);
      return;
    }
    Json j;
    j["ok"] = ok;
    j["verdict"] = verdict;
    for (auto it = facts_.begin(); it != facts_.end(); ++it) j[it.key()] = it.value();
    j["steps"] = steps_;
    j["warnings"] = warnings_;
    fmt::print("{}\n", j.dump(2));
    std::fflush(stdout);
  }

 private:
  bool json_;
  bool open_ = false;
  std::string step_;
  Json steps_ = Json::array();
  Json facts_ = Json::object();
  std::vector<std::string> warnings_;
};

// ---------------------------------------------------------------------------------------------

struct Limits {
  uint64_t max_packet = 0, max_read = 0, max_write = 0, max_handles = 0;
};

class Tester {
 public:
  Tester(sftp::Url url, sftp::SinkOptions opts, uint64_t probe_bytes, Report& report)
      : url_(std::move(url)), opts_(std::move(opts)), probe_bytes_(probe_bytes), r_(report) {}

  // 0: every step passed; 1: one failed (reported); 2: usage; 130: interrupted.
  int run() {
    try {
      connect();
      start_sftp();
      limits();
      channels();
      directory();
      probe();
      finish_ok();
      return 0;
    } catch (const std::exception& e) {
      const auto* err = dynamic_cast<const Error*>(&e);
      std::string msg = printable(g_signal ? Interrupted().what() : e.what());
      std::string failed_step = r_.fail(msg);
      cleanup();
      std::string hint = g_signal ? "interrupted" : hint_for(e, failed_step);
      r_.facts()["failed_step"] = failed_step;
      r_.facts()["error"] = msg;
      r_.finish(false, fmt::format("FAILED at {}{}", failed_step, hint.empty() ? "" : ": " + hint));
      if (r_.json()) fmt::print(stderr, "diskferry: test-remote: {}\n", msg);
      if (g_signal) return 130;
      return err && err->kind() == ErrorKind::Usage ? 2 : 1;
    }
  }

 private:
  // connect, host key, auth: SshSession does all three; its on_step hook reports them as they
  // happen, so a failure is attributed to the right step.
  void connect() {
    std::string target = url_.host + (url_.port ? fmt::format(":{}", *url_.port) : "");
    r_.begin("connect", "connect " + target);
    sftp::SshOptions so = opts_.ssh;
    so.on_step = [this](const sftp::SshSession& s, sftp::ConnectStep step) {
      if (step == sftp::ConnectStep::Connected) {
        std::string banner = printable(s.banner());
        if (banner.rfind("SSH-2.0-", 0) == 0) banner = banner.substr(8);
        r_.facts()["server"] = Json{
            {"where", s.where()}, {"banner", banner}, {"kex", s.kex()}, {"cipher", s.cipher()}};
        r_.end("ok", fmt::format("{}, {}, kex {}, cipher {}", s.where(),
                                 banner.empty() ? "no banner" : banner, s.kex(), s.cipher()));
        r_.begin("host key", "host key");
      } else {
        r_.facts()["host_key"] = Json{{"type", s.host_key_type()},
                                      {"fingerprint", s.fingerprint()},
                                      {"known_hosts", s.known_hosts()},
                                      {"added", s.host_key_added()}};
        r_.end("ok", fmt::format("{} {}, {} known_hosts: {}", s.host_key_type(), s.fingerprint(),
                                 s.host_key_added() ? "now added to" : "in", s.known_hosts()));
        r_.begin("auth", "auth publickey");
      }
    };
    session_ = std::make_unique<sftp::SshSession>(url_, so);
    std::string key = opts_.ssh.identity ? "key " + *opts_.ssh.identity
                                         : "ssh-agent, IdentityFile or ~/.ssh/id_* keys";
    r_.facts()["auth"] =
        Json{{"method", "publickey"},
             {"identity", opts_.ssh.identity ? Json(*opts_.ssh.identity) : Json()}};
    r_.end("ok", key);
    check_interrupt();
  }

  void start_sftp() {
    r_.begin("sftp", "sftp subsystem");
    ch_ = std::make_unique<Channel>(*session_, opts_.stall_timeout);
    std::string names;
    Json ext = Json::object();
    for (auto& [name, data] : ch_->extensions()) {
      names += (names.empty() ? "" : " ") + printable(name);
      ext[printable(name)] = printable(data);
    }
    r_.facts()["sftp"] = Json{{"version", 3}, {"extensions", ext}};
    r_.end("ok", fmt::format("version 3, extensions: {}", names.empty() ? "none" : names));
    // The ones an upload uses; missing ones are warnings, not failures.
    if (!ch_->has("posix-rename@openssh.com"))
      r_.warn("no posix-rename@openssh.com: uploading over an existing file fails");
    if (!ch_->has("fsync@openssh.com"))
      r_.warn("no fsync@openssh.com: the server alone decides when uploads reach its disk");
    if (!ch_->has("statvfs@openssh.com"))
      r_.warn("no statvfs@openssh.com: free space cannot be checked before an upload");
    check_interrupt();
  }

  void limits() {
    r_.begin("limits", "limits");
    std::string use =
        fmt::format("writes of {} ({} bytes)", format_size(ch_->max_write()), ch_->max_write());
    Json j{{"max_write_used", ch_->max_write()}};
    if (!ch_->has("limits@openssh.com")) {
      j["limits@openssh.com"] = nullptr;
      r_.facts()["limits"] = j;
      r_.end("not offered", "no limits@openssh.com; " + use + ", the size every server takes");
      return;
    }
    uint32_t id = ch_->next_id();
    sftp::PacketWriter w(sftp::kExtended, id);
    w.str("limits@openssh.com");
    ch_->send(w.finish());
    sftp::Reply rep = ch_->wait(id);
    if (rep.type != sftp::kExtendedReply) {
      Channel::expect_ok(rep, fmt::format("{}: limits@openssh.com", ch_->where()));
      throw sftp::ProtocolError(
          fmt::format("{}: limits@openssh.com: no limits in the reply", ch_->where()));
    }
    sftp::PacketReader rd(rep.data);
    Limits l;
    l.max_packet = rd.u64("max packet length");
    l.max_read = rd.u64("max read length");
    l.max_write = rd.u64("max write length");
    l.max_handles = rd.u64("max open handles");
    j["limits@openssh.com"] = Json{{"max_packet_length", l.max_packet},
                                   {"max_read_length", l.max_read},
                                   {"max_write_length", l.max_write},
                                   {"max_open_handles", l.max_handles}};
    r_.facts()["limits"] = j;
    auto n = [](uint64_t v) { return v ? std::to_string(v) : std::string("unlimited"); };
    r_.end("ok",
           fmt::format("max write {}, max read {}, max packet {}, max open handles {}; {}",
                       n(l.max_write), n(l.max_read), n(l.max_packet), n(l.max_handles), use));
    check_interrupt();
  }

  // An upload spreads its writes over --streams channels of one connection; a server that
  // limits sessions per connection (OpenSSH MaxSessions) refuses the extra ones.
  void channels() {
    int want = opts_.streams;
    r_.begin("channels", "channels");
    std::vector<std::unique_ptr<Channel>> extra;
    if (want > 1) extra = Channel::open_many(*session_, want - 1, opts_.stall_timeout);
    int got = static_cast<int>(extra.size()) + 1;
    if (got < want) {
      // Uploads use what the server grants (sftp_sink.cpp); slower on long links, not broken.
      r_.warn(
          fmt::format("the server allows only {} SFTP channel{} per connection (OpenSSH: "
                      "MaxSessions); uploads use {} instead of --streams {}",
                      got, got == 1 ? "" : "s", got, want));
      want = got;
    }
    r_.facts()["channels"] = want;
    // The upload itself uses one channel with rclone (sftp_sink.cpp): its server fails writes
    // that arrive out of file order.
    bool rclone = session_->banner().find("rclone") != std::string::npos;
    r_.end("ok", fmt::format("{} SFTP channel{} on one connection, for --streams {}{}", want,
                             want == 1 ? "" : "s", want,
                             rclone && want > 1 ? "; uploads to rclone use 1, it needs writes in "
                                                  "file order"
                                                : ""));
    check_interrupt();
  }

  void directory() {
    dir_ = url_.remote_path();
    while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
    if (dir_.empty()) dir_ = ".";
    r_.begin("directory", "directory " + dir_);
    std::vector<std::string> created;
    if (auto a = ch_->stat(dir_)) {
      if (a->permissions && (*a->permissions & 0170000) != 0040000)
        throw sftp::StatusError(sftp::kFailure, fmt::format("{}: {}: exists and is not a directory",
                                                            ch_->where(), dir_));
    } else {
      if (looks_like_image_name(dir_))
        throw Error(ErrorKind::Usage,
                    fmt::format("{}: {} does not exist and looks like an image file name: "
                                "test-remote takes the directory uploads go to (e.g. "
                                "sftp://.../backups, not sftp://.../backups/vm.qcow2)",
                                ch_->where(), dir_));
      // Like the upload does: every missing component, reported.
      std::vector<std::string> missing{dir_};
      for (std::string p = dir_;;) {
        auto slash = p.find_last_of('/');
        if (slash == std::string::npos || slash == 0) break;
        p = p.substr(0, slash);
        if (ch_->stat(p)) break;
        missing.push_back(p);
      }
      for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
        ch_->mkdir(*it);
        created.push_back(*it);
      }
    }
    std::string real;
    try {
      real = printable(ch_->realpath(dir_));
    } catch (const sftp::StatusError&) {
      // Some servers cannot resolve it; the path as given is all we know then.
    }
    std::string space;
    Json free = nullptr;
    try {
      if (auto fs = ch_->statvfs(dir_)) {
        if (fs->block_size) {
          free_ = fs->bytes_avail();
          free = *free_;
          space = fmt::format("free space {} (statvfs)", format_size(*free_));
        } else {
          space = "free space unknown (statvfs reports no block size)";
        }
      } else {
        space = "free space unknown (no statvfs@openssh.com)";
      }
    } catch (const sftp::StatusError& e) {
      space = fmt::format("free space unknown (statvfs@openssh.com offered but failing: {})",
                          sftp::status_name(e.code()));
      r_.warn("statvfs@openssh.com fails: free space cannot be checked before an upload");
    }
    r_.facts()["directory"] = Json{{"path", dir_},
                                   {"realpath", real.empty() ? Json() : Json(real)},
                                   {"created", created},
                                   {"free_bytes", free}};
    std::string where = real.empty() || real == dir_ ? "" : "is " + real + ", ";
    if (created.empty()) {
      r_.end("exists", where + space);
    } else {
      std::string list;
      for (auto& c : created) list += (list.empty() ? "" : ", ") + c;
      r_.end("created", fmt::format("{}created {}; {}", where, list, space));
    }
    check_interrupt();
  }

  void probe() {
    final_ = join_path(dir_, fmt::format(".diskferry-probe-{}-{}", local_hostname(), ::getpid()));
    partial_ = final_ + ".partial";
    Json pj{{"name", final_}, {"bytes", probe_bytes_}};
    r_.facts()["probe"] = pj;
    std::string base = partial_.substr(partial_.find_last_of('/') + 1);

    // write
    r_.begin("write", probe_bytes_ ? fmt::format("write probe {} ({}, pipelined)", base,
                                                 format_size(probe_bytes_))
                                   : fmt::format("write probe {} (empty: --probe-size 0)", base));
    if (free_ && *free_ < probe_bytes_)
      throw Error(ErrorKind::Output,
                  fmt::format("{}: {}: only {} free, the {} probe does not fit (a full disk or "
                              "quota; --probe-size 0 skips the throughput test)",
                              ch_->where(), dir_, format_size(*free_), format_size(probe_bytes_)));
    partial_may_exist_ = true;
    try {
      handle_ = ch_->open(partial_, sftp::kOpenWrite | sftp::kOpenCreate | sftp::kOpenTrunc);
    } catch (const sftp::StatusError&) {
      partial_may_exist_ = false;  // refused: nothing was created
      throw;
    }
    handle_open_ = true;
    auto t0 = Clock::now();
    try {
      write_pipelined();
    } catch (const sftp::StatusError& e) {
      explain_failure(e);
    }
    double secs = seconds_since(t0);
    if (probe_bytes_) {
      double mbs = secs > 0 ? static_cast<double>(probe_bytes_) / secs / 1e6 : 0;
      r_.facts()["probe"]["seconds"] = secs;
      r_.facts()["probe"]["mb_per_s"] = mbs;
      mb_per_s_ = mbs;
      r_.end("ok", fmt::format("{:.1f} MB/s: {:.2f} s, writes of {}, up to {} in flight on "
                               "1 channel",
                               mbs, secs, format_size(ch_->max_write()),
                               format_size(opts_.lane_inflight_bytes)));
    } else {
      r_.end("ok", "created; throughput not measured");
    }
    check_interrupt();

    // fsync
    r_.begin("fsync", "fsync");
    if (ch_->has("fsync@openssh.com")) {
      auto t = Clock::now();
      ch_->fsync(handle_);
      r_.facts()["probe"]["fsync"] = true;
      r_.end("ok", fmt::format("fsync@openssh.com, {:.0f} ms", seconds_since(t) * 1000));
    } else {
      r_.facts()["probe"]["fsync"] = false;
      r_.end("not offered", "no fsync@openssh.com: the server alone decides when data is durable");
    }
    check_interrupt();

    // close: some servers (rclone) report write errors such as a full disk only here
    r_.begin("close", "close");
    handle_open_ = false;
    try {
      ch_->close(handle_);
    } catch (const sftp::StatusError& e) {
      explain_failure(e);
    }
    r_.end("ok");
    check_interrupt();

    // rename, then check what arrived
    std::string fbase = final_.substr(final_.find_last_of('/') + 1);
    r_.begin("rename", "rename to " + fbase);
    bool posix = ch_->has("posix-rename@openssh.com");
    final_may_exist_ = true;
    ch_->rename(partial_, final_);
    partial_may_exist_ = false;
    auto a = ch_->stat(final_);
    if (!a)
      throw Error(ErrorKind::Output,
                  fmt::format("{}: {}: renamed, but the server says it does not exist",
                              ch_->where(), final_));
    if (a->size && *a->size != probe_bytes_)
      throw Error(ErrorKind::Output,
                  fmt::format("{}: {}: the server holds {} bytes of the {} written", ch_->where(),
                              final_, *a->size, probe_bytes_));
    r_.facts()["probe"]["rename"] = posix ? "posix-rename@openssh.com" : "rename";
    r_.end("ok", fmt::format("{}; size {} bytes as written",
                             posix ? "posix-rename@openssh.com, replaces atomically"
                                   : "plain RENAME, cannot replace an existing file",
                             probe_bytes_));
    check_interrupt();

    // remove
    r_.begin("remove", "remove " + fbase);
    ch_->remove(final_);
    final_may_exist_ = false;
    r_.facts()["probe"]["removed"] = true;
    r_.end("ok");
  }

  // Many WRITEs in flight on one channel, up to the sink's per-channel budget; replies are taken
  // as they come. (The upload's own writer lives in sftp_sink.cpp; this is the same idea.)
  void write_pipelined() {
    const size_t chunk = ch_->max_write();
    const size_t budget = std::max(opts_.lane_inflight_bytes, chunk);
    std::map<uint32_t, std::pair<uint64_t, size_t>> inflight;
    size_t in_bytes = 0;
    auto reap = [&] {
      sftp::Reply rep = ch_->receive();
      auto it = rep.id ? inflight.find(*rep.id) : inflight.end();
      if (it == inflight.end())
        throw sftp::ProtocolError(fmt::format("{}: reply for unknown request id {}", ch_->where(),
                                              rep.id ? static_cast<int64_t>(*rep.id) : -1));
      auto [off, len] = it->second;
      inflight.erase(it);
      in_bytes -= len;
      Channel::expect_ok(rep, fmt::format("{}: {}: write of {} bytes at offset {} failed",
                                          ch_->where(), partial_, len, off));
    };
    Noise noise(static_cast<uint64_t>(::getpid()) * 0x9E3779B97F4A7C15ULL ^
                static_cast<uint64_t>(Clock::now().time_since_epoch().count()));
    std::vector<std::byte> buf(chunk);
    for (uint64_t off = 0; off < probe_bytes_;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, probe_bytes_ - off));
      while (in_bytes + n > budget && !inflight.empty()) reap();
      check_interrupt();
      buf.resize(n);
      noise.fill(buf);
      uint32_t id = ch_->next_id();
      sftp::PacketWriter w(sftp::kWrite, id);
      w.str(handle_).u64(off).bytes(Bytes(buf.data(), n));
      ch_->send(w.finish());
      inflight.emplace(id, std::make_pair(off, n));
      in_bytes += n;
      off += n;
    }
    while (!inflight.empty()) reap();
  }

  // A write or close refused with a bare "failure" (rclone opens lazily, so a read-only
  // directory shows up only there, as "io: read/write on closed pipe"): a test mkdir in the
  // directory tells a permission problem from anything else. Always throws.
  [[noreturn]] void explain_failure(const sftp::StatusError& e) {
    if (e.code() != sftp::kFailure || ch_->broken()) throw e;
    std::string probe_dir = final_ + ".dir";
    try {
      ch_->mkdir(probe_dir);
    } catch (const sftp::StatusError& m) {
      if (m.code() == sftp::kPermissionDenied)
        throw sftp::StatusError(
            sftp::kPermissionDenied,
            fmt::format("{}; creating {} was refused too: permission denied", e.what(), probe_dir));
      throw e;
    }
    try {
      uint32_t id = ch_->next_id();
      sftp::PacketWriter w(sftp::kRmdir, id);
      w.str(probe_dir);
      ch_->send(w.finish());
      Channel::expect_ok(ch_->wait(id),
                         fmt::format("{}: {}: cannot remove directory", ch_->where(), probe_dir));
    } catch (const Error& rm) {
      r_.warn(printable(rm.what()));
    }
    throw e;
  }

  // After a failure: close the handle and remove whatever probe file may exist, on the same
  // channel when it still works, else on a fresh connection.
  void cleanup() {
    std::vector<std::string> names;
    if (partial_may_exist_) names.push_back(partial_);
    if (final_may_exist_) names.push_back(final_);
    if (names.empty()) return;
    r_.begin("cleanup", "cleanup");
    std::unique_ptr<sftp::SshSession> s2;
    std::unique_ptr<Channel> c2;
    std::vector<std::string> removed, left;
    try {
      Channel* ch = ch_.get();
      if (!ch || ch->broken()) {
        // A connection that just dropped often comes back after a moment (a restarted server).
        sftp::SshOptions so = opts_.ssh;
        so.on_step = nullptr;
        for (int attempt = 0;; ++attempt) {
          try {
            c2.reset();
            s2 = std::make_unique<sftp::SshSession>(url_, so);
            c2 = std::make_unique<Channel>(*s2, opts_.stall_timeout);
            break;
          } catch (const Error& e) {
            if (!e.transient() || attempt == 3) throw;
            ::sleep(1u << attempt);  // 1, 2, 4 s
          }
        }
        ch = c2.get();
      } else if (handle_open_) {
        try {
          ch->close(handle_);
        } catch (const Error&) {
          // The remove below is what matters.
        }
      }
      for (auto& n : names) {
        try {
          ch->remove(n);
          removed.push_back(n);
        } catch (const sftp::StatusError& e) {
          if (e.code() != sftp::kNoSuchFile) left.push_back(printable(e.what()));
        }
      }
    } catch (const std::exception& e) {
      left.push_back(printable(e.what()));
    }
    r_.facts()["cleanup"] = Json{{"removed", removed}, {"left", left}};
    if (left.empty()) {
      r_.end("ok", removed.empty() ? "no probe file was left" : "removed " + removed.back());
    } else {
      std::string why;
      for (auto& l : left) why += (why.empty() ? "" : "; ") + l;
      r_.fail(fmt::format("{}; delete {} by hand", why, names.back()));
    }
  }

  // One line saying what to do about a failure.
  std::string hint_for(const std::exception& e, const std::string& step) const {
    if (const auto* ce = dynamic_cast<const sftp::ConnectError*>(&e)) {
      switch (ce->failure()) {
        case sftp::ConnectFailure::Unreachable:
          if (step == "connect")
            return "no SSH server answered: check the host name and port (sftp://USER@HOST:PORT/; "
                   "a Hetzner Storage Box uses port 23), DNS and firewalls";
          return "the server closed the connection during " + step;
        case sftp::ConnectFailure::HostUnknown:
          return "check the host name (or the HostName of its alias in ~/.ssh/config) and DNS";
        case sftp::ConnectFailure::HostKeyUnknown:
          return "compare the fingerprint with the one your provider publishes (or `ssh-keygen "
                 "-lf` on the server's key), then run again with --accept-new-host-key";
        case sftp::ConnectFailure::HostKeyChanged:
          return "the server's key differs from known_hosts: find out why before connecting again";
        case sftp::ConnectFailure::AuthRefused:
          return "the server refused the key: add its public key to the account's authorized "
                 "keys (Storage Box: ssh-copy-id -p 23 -s USER@HOST), or name the right one with "
                 "--identity";
        case sftp::ConnectFailure::Protocol:
          if (step == "sftp")
            return "the server offers no sftp subsystem to this account (OpenSSH: `Subsystem sftp "
                   "internal-sftp`, or `ForceCommand internal-sftp` for chrooted users)";
          return "";
      }
    }
    if (dynamic_cast<const sftp::DisconnectedError*>(&e))
      return "the connection dropped or stalled; try again, and raise --stall-timeout on a slow "
             "link";
    if (const auto* se = dynamic_cast<const sftp::StatusError*>(&e)) {
      if (se->code() == sftp::kPermissionDenied) {
        std::string user = session_ ? user_of(session_->where()) : "the user";
        if (dir_ == "/")
          return fmt::format(
              "{} may not write in /: in an OpenSSH chroot (ChrootDirectory) the "
              "top directory must be root-owned and not writable, so uploads go "
              "into a subdirectory the user owns, e.g. sftp://.../backups",
              user);
        return fmt::format("{} may not write in {}: check its owner and mode on the server", user,
                           dir_);
      }
      if (se->code() == sftp::kFailure && (step == "write" || step == "close"))
        return free_ ? fmt::format(
                           "the server refused the data, often a full disk or quota "
                           "({} was free)",
                           format_size(*free_))
                     : "the server refused the data, often a full disk or quota";
      if (se->code() == sftp::kNoSuchFile && step == "directory")
        return "a parent directory is missing and could not be created";
    }
    if (step == "write" && free_ && *free_ < probe_bytes_) return "the target is (nearly) full";
    return "";
  }

  static std::string user_of(const std::string& where) {
    auto at = where.find('@');
    return at == std::string::npos ? "the user" : where.substr(0, at);
  }

  void finish_ok() {
    std::string w;
    for (auto& x : r_.warnings()) w += (w.empty() ? "" : "; ") + x;
    std::string speed =
        probe_bytes_ ? fmt::format(", wrote {:.1f} MB/s on 1 channel", mb_per_s_) : "";
    std::string verdict =
        r_.warnings().empty()
            ? fmt::format("OK: diskferry can upload to {}{}", url_.str(), speed)
            : fmt::format("OK with {} warning{}: diskferry can upload to {}{}; {}",
                          r_.warnings().size(), r_.warnings().size() == 1 ? "" : "s", url_.str(),
                          speed, w);
    r_.finish(true, verdict);
  }

  sftp::Url url_;
  sftp::SinkOptions opts_;
  uint64_t probe_bytes_;
  Report& r_;
  std::unique_ptr<sftp::SshSession> session_;
  std::unique_ptr<Channel> ch_;  // destroyed before the session
  std::string dir_, partial_, final_, handle_;
  std::optional<uint64_t> free_;
  double mb_per_s_ = 0;
  bool handle_open_ = false, partial_may_exist_ = false, final_may_exist_ = false;
};

}  // namespace

Run add_test_remote(CLI::App& app) {
  auto remote = std::make_shared<RemoteArgs>();
  auto url = std::make_shared<std::string>();
  auto probe_size = std::make_shared<std::string>("32M");
  auto json = std::make_shared<bool>(false);
  auto* c = app.add_subcommand(
      "test-remote",
      "Check an sftp:// destination step by step: connection, host key, login, SFTP features, "
      "the directory, and a probe upload with its throughput");
  c->footer(
      "Steps, one line each as it runs (\"ok\" with what was learned, or FAILED with why):\n"
      "  connect    TCP and SSH key exchange: the server's software, key exchange and cipher\n"
      "  host key   the server's key is in known_hosts (--known-hosts). Unknown: its SHA256\n"
      "             fingerprint is printed; compare it with your provider's, then run again with\n"
      "             --accept-new-host-key to record it. A changed key always fails\n"
      "  auth       public key login (--identity, else ssh-agent, IdentityFile, ~/.ssh/id_*)\n"
      "  sftp       the sftp subsystem starts; lists its extensions. diskferry uses\n"
      "             posix-rename (atomic replace), fsync (durability), statvfs (free space) and\n"
      "             limits@openssh.com (write size); a missing one is a warning\n"
      "  limits     the largest write the server accepts (32 KiB when it does not say)\n"
      "  channels   --streams SFTP channels open on one connection, as an upload uses them\n"
      "  directory  DIR exists or is created with its missing parents (named when created);\n"
      "             its real path on the server and the free space there\n"
      "  write      DIR/.diskferry-probe-HOST-PID.partial: --probe-size random bytes with many\n"
      "             writes in flight, as an upload sends them; the MB/s figure\n"
      "  fsync      fsync@openssh.com flushes the probe to the server's disk\n"
      "  close      the server accepts the file (rclone reports a full disk only here)\n"
      "  rename     .partial to the final name, then its size on the server is checked\n"
      "  remove     the probe is deleted\n"
      "Then a one-line verdict. A failed step ends the test; the probe file is removed on every\n"
      "failure that leaves a way to (also after Ctrl-C; a second one kills at once). Only DIR\n"
      "(when created) and, with --accept-new-host-key, known_hosts are left changed.\n\n"
      "Examples:\n"
      "  Hetzner Storage Box (port 23; /~/ is relative to the login directory):\n"
      "    diskferry test-remote sftp://u123456@u123456.your-storagebox.de:23/~/backups\n"
      "  OpenSSH server with a chroot (ChrootDirectory /srv/sftp/%u, /backups owned by the user):\n"
      "    diskferry test-remote --identity ~/.ssh/backup_ed25519 sftp://backup@nas:22/backups\n"
      "  First contact: check the printed fingerprint, then\n"
      "    diskferry test-remote --accept-new-host-key sftp://backup@nas/backups\n"
      "  For scripts (facts as one JSON object, no throughput test):\n"
      "    diskferry test-remote --json --probe-size 0 sftp://backup@nas/backups | jq .verdict\n\n"
      "Exit status: 0 every step passed (warnings possible), 1 a step failed (its line says which\n"
      "and why), 2 bad usage, 130 interrupted.");
  c->add_option("URL", *url,
                "sftp://USER@HOST[:PORT]/DIR: the directory uploads will go to (/~/DIR: relative "
                "to the login directory)")
      ->required();
  c->add_option("--probe-size", *probe_size,
                "Bytes of random data the probe file gets, for the throughput figure (default "
                "32M; 0: create the probe empty, measure nothing)");
  c->add_flag("--json", *json,
              "Print the facts as one JSON object on stdout (ok, verdict, server, host_key, "
              "sftp, limits, directory, probe, steps, warnings; failed_step and error on failure)");
  remote->add(*c);
  // A test reports the first failure; it does not retry.
  for (const char* name : {"--retries", "--retry-delay", "--bwlimit"})
    if (CLI::Option* o = c->get_option_no_throw(name)) c->remove_option(o);

  return [remote, url, probe_size, json]() {
    // Usage errors first, before anything is printed or connected (exit 2).
    if (!sftp::is_sftp_url(*url))
      throw Error(ErrorKind::Usage,
                  fmt::format("'{}': test-remote checks an sftp://USER@HOST[:PORT]/DIR URL", *url));
    sftp::Url u = sftp::parse_url(*url);
    sftp::SinkOptions o = remote->sink_options();
    if (o.ssh.identity) sftp::check_private_key_permissions(*o.ssh.identity);
    uint64_t probe = parse_size(*probe_size, "--probe-size");
    if (probe > (uint64_t{1} << 40)) throw Error(ErrorKind::Usage, "--probe-size: at most 1T");

    Report report(*json);
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    struct sigaction old_int {
    }, old_term{};
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    int rc = Tester(std::move(u), std::move(o), probe, report).run();
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    return rc;
  };
}

}  // namespace diskferry::cli
