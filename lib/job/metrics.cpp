#include "job/metrics.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <span>
#include <vector>

#include "util/error.hpp"
#include "util/fd.hpp"

namespace diskferry {
namespace {

double unix_seconds(Time t) {
  return static_cast<double>(t.time_since_epoch().count()) / 1000.0;
}

// One metric: its name, what it means, and the field it shows.
template <class T>
struct Def {
  std::string_view name, type, help;
  std::function<double&(T&)> ref;  // doubles are the common ground for the text format
};

// Fields that are integers are kept in doubles while parsing and rendering only; they are
// exact up to 2^53.
struct SourceRow {
  double last_success, last_end, last_duration, last_bytes_sent, bytes_on_remote, last_attempts,
      last_ok, failures_total, successes_total;
};

SourceRow to_row(const SourceMetrics& s) {
  return {s.last_success,
          s.last_end,
          s.last_duration,
          static_cast<double>(s.last_bytes_sent),
          static_cast<double>(s.bytes_on_remote),
          static_cast<double>(s.last_attempts),
          static_cast<double>(s.last_ok),
          static_cast<double>(s.failures_total),
          static_cast<double>(s.successes_total)};
}

SourceMetrics from_row(const SourceRow& r) {
  auto u = [](double v) { return v > 0 ? static_cast<uint64_t>(std::llround(v)) : uint64_t{0}; };
  SourceMetrics s;
  s.last_success = r.last_success;
  s.last_end = r.last_end;
  s.last_duration = r.last_duration;
  s.last_bytes_sent = u(r.last_bytes_sent);
  s.bytes_on_remote = u(r.bytes_on_remote);
  s.last_attempts = static_cast<int>(u(r.last_attempts));
  s.last_ok = r.last_ok > 0 ? 1 : 0;
  s.failures_total = u(r.failures_total);
  s.successes_total = u(r.successes_total);
  return s;
}

const std::vector<Def<SourceRow>>& source_defs() {
  static const std::vector<Def<SourceRow>> defs = {
      {"diskferry_source_last_success_timestamp_seconds", "gauge",
       "When the source's newest successful backup finished (unix time; 0: never).",
       [](SourceRow& r) -> double& { return r.last_success; }},
      {"diskferry_source_last_end_timestamp_seconds", "gauge",
       "When the source's last attempt ended (done, failed or waiting to retry).",
       [](SourceRow& r) -> double& { return r.last_end; }},
      {"diskferry_source_last_duration_seconds", "gauge", "How long the source's last attempt ran.",
       [](SourceRow& r) -> double& { return r.last_duration; }},
      {"diskferry_source_last_sent_bytes", "gauge",
       "Bytes the source's last attempt sent to the remote.",
       [](SourceRow& r) -> double& { return r.last_bytes_sent; }},
      {"diskferry_source_remote_bytes", "gauge",
       "Size of the source's newest published backup on the remote.",
       [](SourceRow& r) -> double& { return r.bytes_on_remote; }},
      {"diskferry_source_last_attempts", "gauge",
       "Attempts the source's last job has taken so far.",
       [](SourceRow& r) -> double& { return r.last_attempts; }},
      {"diskferry_source_last_ok", "gauge",
       "1 if the source's last job that ended is done, 0 if it failed (or none ended yet).",
       [](SourceRow& r) -> double& { return r.last_ok; }},
      {"diskferry_source_failures_total", "counter",
       "Jobs of the source that failed for good (after their last attempt).",
       [](SourceRow& r) -> double& { return r.failures_total; }},
      {"diskferry_source_successes_total", "counter", "Jobs of the source that ended done.",
       [](SourceRow& r) -> double& { return r.successes_total; }},
  };
  return defs;
}

struct RemoteRow {
  double up, last_check;
};

const std::vector<Def<RemoteRow>>& remote_defs() {
  static const std::vector<Def<RemoteRow>> defs = {
      {"diskferry_remote_up", "gauge",
       "1 if the last attempt that tried reached the remote (connected, logged in), else 0.",
       [](RemoteRow& r) -> double& { return r.up; }},
      {"diskferry_remote_last_check_timestamp_seconds", "gauge",
       "When an attempt last tried the remote (unix time; 0: never).",
       [](RemoteRow& r) -> double& { return r.last_check; }},
  };
  return defs;
}

std::string escape_label(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"')
      out += {'\\', c};
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

// Shortest text that reads back as the same double; integers without a fraction.
std::string number(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15)
    return fmt::format("{}", static_cast<long long>(v));
  return fmt::format("{}", v);
}

template <class Row, class Map, class ToRow>
void render_family(std::string& out, const std::vector<Def<Row>>& defs, std::string_view label,
                   const Map& items, ToRow to) {
  for (const auto& d : defs) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", d.name, d.help, d.name, d.type);
    for (const auto& [name, item] : items) {
      Row row = to(item);
      out += fmt::format("{}{{{}=\"{}\"}} {}\n", d.name, label, escape_label(name),
                         number(d.ref(row)));
    }
  }
}

// `name{label="value"} number`, or nothing.
struct Sample {
  std::string name, label, value;
  double number = 0;
};

std::optional<Sample> parse_sample(std::string_view line) {
  Sample s;
  size_t brace = line.find('{');
  if (brace == std::string_view::npos) return std::nullopt;
  s.name = line.substr(0, brace);
  size_t eq = line.find('=', brace);
  if (eq == std::string_view::npos || eq + 1 >= line.size() || line[eq + 1] != '"')
    return std::nullopt;
  s.label = line.substr(brace + 1, eq - brace - 1);
  size_t i = eq + 2;
  for (; i < line.size() && line[i] != '"'; ++i) {
    if (line[i] == '\\' && i + 1 < line.size()) {
      ++i;
      s.value += line[i] == 'n' ? '\n' : line[i];
    } else {
      s.value += line[i];
    }
  }
  if (i + 2 >= line.size() || line[i + 1] != '}' || line[i + 2] != ' ') return std::nullopt;
  std::string num(line.substr(i + 3));
  char* end = nullptr;
  errno = 0;
  s.number = std::strtod(num.c_str(), &end);
  if (end == num.c_str() || *end != '\0' || errno != 0) return std::nullopt;
  return s;
}

}  // namespace

std::string render_metrics(const Metrics& m) {
  std::string out;
  render_family(out, source_defs(), "source", m.sources, to_row);
  render_family(out, remote_defs(), "remote", m.remotes, [](const RemoteMetrics& r) {
    return RemoteRow{static_cast<double>(r.up), r.last_check};
  });
  return out;
}

Metrics parse_metrics(std::string_view text) {
  std::map<std::string, SourceRow> sources;
  std::map<std::string, RemoteRow> remotes;
  while (!text.empty()) {
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
    if (line.empty() || line[0] == '#') continue;
    auto s = parse_sample(line);
    if (!s) continue;
    if (s->label == "source") {
      for (const auto& d : source_defs())
        if (d.name == s->name)
          d.ref(sources.try_emplace(s->value, SourceRow{}).first->second) = s->number;
    } else if (s->label == "remote") {
      for (const auto& d : remote_defs())
        if (d.name == s->name)
          d.ref(remotes.try_emplace(s->value, RemoteRow{}).first->second) = s->number;
    }
  }
  Metrics m;
  for (const auto& [name, row] : sources) m.sources[name] = from_row(row);
  for (const auto& [name, row] : remotes)
    m.remotes[name] = RemoteMetrics{row.up > 0 ? 1 : 0, row.last_check};
  return m;
}

void apply_report(Metrics& m, const JobReport& r) {
  if (r.state == JobState::Running) return;
  SourceMetrics& s = m.sources[r.source];
  s.last_end = unix_seconds(r.ended);
  s.last_duration = static_cast<double>(r.duration.count()) / 1000.0;
  s.last_bytes_sent = r.bytes_sent;
  s.last_attempts = r.attempt;
  if (r.state == JobState::Done) {
    s.last_ok = 1;
    ++s.successes_total;
    s.last_success = unix_seconds(r.ended);
    if (r.bytes_on_remote) s.bytes_on_remote = r.bytes_on_remote;
  } else if (r.state == JobState::Failed) {
    s.last_ok = 0;
    ++s.failures_total;
  }
  if (r.remote_reached && !r.remote.empty()) {
    RemoteMetrics& rem = m.remotes[r.remote];
    rem.up = *r.remote_reached ? 1 : 0;
    rem.last_check = unix_seconds(r.ended);
  }
}

void write_file_atomically(const std::string& dir, std::string_view name,
                           std::string_view content) {
  std::string final_path = fmt::format("{}/{}", dir, name);
  // Hidden and without the .prom ending: node_exporter reads only *.prom.
  std::string tmp = fmt::format("{}/.{}.XXXXXX", dir, name);
  UniqueFd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (!fd) throw_errno(ErrorKind::Output, final_path, "cannot create a temporary file", errno);
  try {
    write_all(fd.get(), std::as_bytes(std::span(content.data(), content.size())), tmp);
    if (::fchmod(fd.get(), 0644) != 0) throw_errno(ErrorKind::Output, tmp, "chmod", errno);
    if (::fsync(fd.get()) != 0) throw_errno(ErrorKind::Output, tmp, "fsync", errno);
    if (::rename(tmp.c_str(), final_path.c_str()) != 0)
      throw_errno(ErrorKind::Output, final_path, "cannot replace", errno);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  UniqueFd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d) ::fsync(d.get());  // the rename itself; the file is whole either way
}

void update_metrics(const Config& config, const Queue& queue, const JobReport* report) {
  if (config.metrics_dir.empty()) return;
  const std::string& dir = config.metrics_dir;
  UniqueFd lock(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!lock) throw_errno(ErrorKind::Output, dir, "metrics_dir", errno);
  while (::flock(lock.get(), LOCK_EX) != 0)
    if (errno != EINTR) throw_errno(ErrorKind::Output, dir, "lock", errno);

  Metrics old;
  std::string path = fmt::format("{}/{}", dir, kMetricsFile);
  if (UniqueFd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC)); f) {
    std::string text;
    std::byte buf[65536];
    while (size_t n = read_some(f.get(), buf, path))
      text.append(reinterpret_cast<const char*>(buf), n);
    old = parse_metrics(text);
  }
  if (report) apply_report(old, *report);

  Metrics now;
  for (const auto& [name, src] : config.sources) {
    SourceMetrics s = old.sources.count(name) ? old.sources.at(name) : SourceMetrics{};
    if (auto last = queue.last_success(name)) s.last_success = unix_seconds(last->at);
    now.sources[name] = s;
  }
  for (const auto& [name, rem] : config.remotes)
    now.remotes[name] = old.remotes.count(name) ? old.remotes.at(name) : RemoteMetrics{};
  write_file_atomically(dir, kMetricsFile, render_metrics(now));
}

}  // namespace diskferry
