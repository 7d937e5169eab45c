// The commands that manage the daemon's queue: enqueue, list, show, cancel, retry, prune,
// check-config, status. Each reads the configuration (for the state directory and the sources)
// and talks to the same SQLite file the daemon uses; none needs the daemon to be running.
#include <fmt/chrono.h>
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "config/config.hpp"
#include "job/job.hpp"
#include "queue/queue.hpp"
#include "util/duration.hpp"
#include "util/size.hpp"

namespace diskferry::cli {
namespace {

using Json = nlohmann::json;

struct ConfigArg {
  std::string file;
  void add(CLI::App& c) {
    c.add_option("--config", file,
                 "Configuration file (default: $DISKFERRY_CONFIG, else "
                 "/etc/diskferry/diskferry.yaml)");
  }
  std::string path() const {
    if (!file.empty()) return file;
    if (const char* e = std::getenv("DISKFERRY_CONFIG"); e && *e) return e;
    return "/etc/diskferry/diskferry.yaml";
  }
  Config load() const { return load_config(path()); }
};

std::string when(Time t) {
  return fmt::format("{:%Y-%m-%d %H:%M:%S}Z",
                     std::chrono::time_point_cast<std::chrono::seconds>(t));
}

std::string age(std::chrono::milliseconds d) {
  auto s = std::chrono::duration_cast<std::chrono::seconds>(d).count();
  if (s < 120) return fmt::format("{}s", s);
  if (s < 7200) return fmt::format("{}m", s / 60);
  if (s < 172800) return fmt::format("{}h", s / 3600);
  return fmt::format("{}d", s / 86400);
}

Time now_ms() {
  return std::chrono::time_point_cast<std::chrono::milliseconds>(std::chrono::system_clock::now());
}

Json job_json(const Job& j) {
  Json o{{"id", j.id},
         {"source", j.source},
         {"state", std::string(to_string(j.state))},
         {"attempt", j.attempt},
         {"created", when(j.created)},
         {"updated", when(j.updated)},
         {"bytes_done", j.bytes_done},
         {"rate", j.rate},
         {"remote_path", j.remote_path},
         {"sha256", j.sha256},
         {"error", j.error},
         {"error_class", j.error_class}};
  o["bytes_total"] = j.bytes_total ? Json(*j.bytes_total) : Json();
  o["next_run_at"] = j.next_run_at ? Json(when(*j.next_run_at)) : Json();
  o["finished"] = j.finished ? Json(when(*j.finished)) : Json();
  return o;
}

std::string progress_text(const Job& j) {
  if (j.state != JobState::Running) return "";
  if (j.bytes_total && *j.bytes_total)
    return fmt::format(
        "{:.0f}% {}/s",
        100.0 * static_cast<double>(j.bytes_done) / static_cast<double>(*j.bytes_total),
        format_size(j.rate));
  return format_size(j.bytes_done);
}

int64_t parse_id(const std::string& s) {
  try {
    size_t n = 0;
    long long v = std::stoll(s, &n);
    if (n == s.size() && v > 0) return v;
  } catch (...) {
  }
  throw Error(ErrorKind::Usage, fmt::format("'{}' is not a job id (see diskferry list)", s));
}

}  // namespace

Run add_enqueue(CLI::App& app) {
  auto* c = app.add_subcommand("enqueue", "Queue backup jobs for sources of the configuration");
  auto cfg = std::make_shared<ConfigArg>();
  auto sources = std::make_shared<std::vector<std::string>>();
  auto all = std::make_shared<bool>(false);
  cfg->add(*c);
  c->add_option("SOURCE", *sources, "Source names from the configuration");
  c->add_flag("--all", *all, "Every source of the configuration (what the nightly timer runs)");
  c->footer(
      "Idempotent: a source that already has a queued, running or retrying job is not queued "
      "again,\nso a timer may fire twice safely. diskferryd then works the queue.");
  return [cfg, sources, all]() {
    Config conf = cfg->load();
    if (*all == !sources->empty())
      throw Error(ErrorKind::Usage, "enqueue: name sources or give --all, not both or neither");
    std::vector<std::string> names = *sources;
    if (*all)
      for (auto& [n, _] : conf.sources) names.push_back(n);
    for (auto& n : names)
      if (!conf.sources.count(n))
        throw Error(ErrorKind::Usage, fmt::format("{}: no source named '{}'", conf.path, n));
    Queue q(default_db_path(conf.state_dir));
    for (auto& n : names) {
      EnqueueResult r = q.enqueue(n);
      fmt::print("{} job {} for {}{}\n", r.created ? "queued" : "already", r.job.id, n,
                 r.created ? "" : fmt::format(" ({})", to_string(r.job.state)));
    }
    return 0;
  };
}

Run add_list(CLI::App& app) {
  auto* c = app.add_subcommand("list", "Show the queue's jobs, newest first");
  auto cfg = std::make_shared<ConfigArg>();
  auto json = std::make_shared<bool>(false);
  auto limit = std::make_shared<size_t>(50);
  auto source = std::make_shared<std::string>();
  cfg->add(*c);
  c->add_flag("--json", *json, "One JSON array of jobs");
  c->add_option("--limit", *limit, "At most this many jobs (default 50, 0: all)");
  c->add_option("--source", *source, "Only this source's jobs");
  return [cfg, json, limit, source]() {
    Config conf = cfg->load();
    Queue q(default_db_path(conf.state_dir));
    JobFilter f;
    f.limit = *limit;
    if (!source->empty()) f.source = *source;
    auto jobs = q.list(f);
    if (*json) {
      Json a = Json::array();
      for (auto& j : jobs) a.push_back(job_json(j));
      fmt::print("{}\n", a.dump(2));
      return 0;
    }
    fmt::print("{:>5}  {:<14} {:<10} {:>7}  {:<14} {:<44} {}\n", "ID", "SOURCE", "STATE", "ATTEMPT",
               "PROGRESS", "REMOTE PATH", "SHA256 / ERROR");
    for (auto& j : jobs)
      fmt::print("{:>5}  {:<14} {:<10} {:>7}  {:<14} {:<44} {}\n", j.id, j.source,
                 to_string(j.state), j.attempt, progress_text(j), j.remote_path,
                 j.error.empty() ? j.sha256.substr(0, 16) : j.error);
    return 0;
  };
}

Run add_show(CLI::App& app) {
  auto* c = app.add_subcommand("show", "Show one job and its event log");
  auto cfg = std::make_shared<ConfigArg>();
  auto id = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  cfg->add(*c);
  c->add_option("ID", *id, "Job id")->required();
  c->add_flag("--json", *json, "As JSON");
  return [cfg, id, json]() {
    Config conf = cfg->load();
    Queue q(default_db_path(conf.state_dir));
    int64_t n = parse_id(*id);
    auto j = q.get(n);
    if (!j) throw Error(ErrorKind::Usage, fmt::format("no job {}", n));
    auto ev = q.events(n);
    if (*json) {
      Json o = job_json(*j);
      o["events"] = Json::array();
      for (auto& e : ev)
        o["events"].push_back({{"at", when(e.at)}, {"kind", e.kind}, {"message", e.message}});
      fmt::print("{}\n", o.dump(2));
      return 0;
    }
    fmt::print("job {}: {} {} (attempt {})\n", j->id, j->source, to_string(j->state), j->attempt);
    if (!j->remote_path.empty()) fmt::print("remote: {}\n", j->remote_path);
    if (!j->sha256.empty()) fmt::print("sha256: {}\n", j->sha256);
    if (!j->error.empty()) fmt::print("error ({}): {}\n", j->error_class, j->error);
    for (auto& e : ev) fmt::print("{}  {:<10} {}\n", when(e.at), e.kind, e.message);
    return 0;
  };
}

Run add_cancel(CLI::App& app) {
  auto* c = app.add_subcommand("cancel", "Cancel a queued, waiting or running job");
  auto cfg = std::make_shared<ConfigArg>();
  auto id = std::make_shared<std::string>();
  cfg->add(*c);
  c->add_option("ID", *id, "Job id")->required();
  return [cfg, id]() {
    Config conf = cfg->load();
    Queue q(default_db_path(conf.state_dir));
    int64_t n = parse_id(*id);
    switch (q.cancel(n)) {
      case CancelResult::Cancelled:
        fmt::print("job {} cancelled\n", n);
        break;
      case CancelResult::Requested:
        fmt::print("job {} is running: its worker stops within seconds\n", n);
        break;
      case CancelResult::AlreadyCancelled:
        fmt::print("job {} was already cancelled\n", n);
        break;
    }
    return 0;
  };
}

Run add_retry(CLI::App& app) {
  auto* c = app.add_subcommand("retry", "Queue a failed or cancelled job again");
  auto cfg = std::make_shared<ConfigArg>();
  auto id = std::make_shared<std::string>();
  cfg->add(*c);
  c->add_option("ID", *id, "Job id")->required();
  return [cfg, id]() {
    Config conf = cfg->load();
    Queue q(default_db_path(conf.state_dir));
    int64_t n = parse_id(*id);
    q.retry(n);
    fmt::print("job {} queued again\n", n);
    return 0;
  };
}

Run add_prune(CLI::App& app) {
  auto* c = app.add_subcommand("prune", "Apply the retention policy to a source's remote backups");
  auto cfg = std::make_shared<ConfigArg>();
  auto source = std::make_shared<std::string>();
  auto dry = std::make_shared<bool>(false);
  cfg->add(*c);
  c->add_option("SOURCE", *source, "One source (default: every source)");
  c->add_flag("--dry-run,-n", *dry, "Only show what would be kept and removed");
  c->footer(
      "Only files whose names the source's template produces are considered; nothing else in the "
      "\nremote directory is touched. The newest backup is always kept.");
  return [cfg, source, dry]() {
    Config conf = cfg->load();
    std::vector<const SourceConf*> srcs;
    for (auto& [n, s] : conf.sources)
      if (source->empty() || n == *source) srcs.push_back(&s);
    if (srcs.empty())
      throw Error(ErrorKind::Usage, fmt::format("{}: no source named '{}'", conf.path, *source));
    for (auto* s : srcs) {
      for (size_t i = 0; i < s->output_count(); ++i) {  // each output has its own backups
        PruneResult r = prune_source(conf, s->output(i), *dry);
        for (auto& d : r.plan.keep)
          fmt::print("{}: keep   {}  ({})\n", s->name, d.backup.name, d.reason);
        for (auto& d : r.plan.remove)
          fmt::print("{}: {} {}  ({})\n", s->name, *dry ? "would remove" : "removed", d.backup.name,
                     d.reason);
      }
    }
    return 0;
  };
}

Run add_check_config(CLI::App& app) {
  auto* c = app.add_subcommand("check-config", "Validate the configuration file and say so");
  c->footer(
      "Besides the file itself it checks each source on this machine: two sources that are one "
      "file (same path, or a link to it) and snapshot: reflink where no reflink copy can be made "
      "are errors (exit 2, as for a mistake in the file); a path that does not exist now is a "
      "warning (it may appear later, e.g. an unmounted volume), exit 0.");
  auto cfg = std::make_shared<ConfigArg>();
  cfg->add(*c);
  return [cfg]() {
    Config conf = cfg->load();
    DiskCheck disk = check_sources_on_disk(conf);
    for (auto& w : conf.warnings) fmt::print(stderr, "diskferry: warning: {}\n", w);
    for (auto& w : disk.warnings) fmt::print(stderr, "diskferry: warning: {}\n", w);
    for (auto& e : disk.errors) fmt::print(stderr, "diskferry: {}\n", e);
    if (!disk.errors.empty()) return 2;
    fmt::print("{}: ok ({} remote{}, {} source{}, state in {})\n", conf.path, conf.remotes.size(),
               conf.remotes.size() == 1 ? "" : "s", conf.sources.size(),
               conf.sources.size() == 1 ? "" : "s", conf.state_dir);
    return 0;
  };
}

// The status check itself; errors are left to the caller (exit 3).
static int status(const ConfigArg& cfg, const std::string& max_age_text, bool as_json) {
  Config conf = cfg.load();
  auto limit = parse_duration(max_age_text);
  if (!limit)
    throw Error(ErrorKind::Usage,
                fmt::format("--max-age '{}': expected a duration such as 90s, 30m, 26h or 2d",
                            max_age_text));
  Queue q(default_db_path(conf.state_dir));
  int stale = 0;
  Json a = Json::array();
  Time now = now_ms();
  for (auto& [name, s] : conf.sources) {
    auto last = q.last_success(name);
    bool ok = last && now - last->at <= *limit;
    stale += !ok;
    if (as_json) {
      a.push_back({{"source", name},
                   {"ok", ok},
                   {"last_success", last ? Json(when(last->at)) : Json()},
                   {"remote_path", last ? Json(last->remote_path) : Json()}});
      continue;
    }
    if (last)
      fmt::print("{:<16} {:<5} last success {} ({} ago) {}\n", name, ok ? "OK" : "STALE",
                 when(last->at), age(now - last->at), last->remote_path);
    else
      fmt::print("{:<16} {:<5} no successful backup yet\n", name, "STALE");
    // What a monitoring check's reader needs next: why the newest job did not succeed.
    if (ok) continue;
    JobFilter f;
    f.source = name;
    f.limit = 1;
    for (const Job& j : q.list(f))
      if (j.state != JobState::Done)
        fmt::print("{:<16} {:<5} job {} {}{}{}\n", "", "", j.id, to_string(j.state),
                   j.error.empty() ? "" : ": ", j.error);
  }
  if (as_json) fmt::print("{}\n", a.dump(2));
  return stale ? 2 : 0;
}

Run add_status(CLI::App& app) {
  auto* c = app.add_subcommand("status", "Per source: the last successful backup and its age");
  auto cfg = std::make_shared<ConfigArg>();
  auto max_age = std::make_shared<std::string>("26h");
  auto json = std::make_shared<bool>(false);
  cfg->add(*c);
  c->add_option("--max-age", *max_age,
                "A source whose last success is older than this is stale (default 26h: a nightly "
                "run plus slack); s, m, h, d");
  c->add_flag("--json", *json, "As JSON");
  c->footer(
      "Exit status (Nagios/Icinga style): 0 every source has a recent backup, 2 at least one is "
      "stale\nor never succeeded, 3 the configuration or the state could not be read (the first "
      "line of\nstandard output then says UNKNOWN and why).");
  return [cfg, max_age, json]() {
    try {
      return status(*cfg, *max_age, *json);
    } catch (const Error& e) {
      // A check that cannot look must not pass for OK (0) or CRITICAL (2).
      fmt::print("UNKNOWN: {}\n", e.what());
      fmt::print(stderr, "diskferry: {}\n", e.what());
      return 3;
    }
  };
}

}  // namespace diskferry::cli
