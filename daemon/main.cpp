// diskferryd: works the job queue. Each of `workers` threads claims a job, runs it to its next
// state (lib/job) and claims the next. SIGTERM/SIGINT: stop claiming, bring running uploads to a
// resumable point, exit. SIGHUP: reload the configuration (running jobs keep the one they
// started with). --once: work what is due (see kOnceGrace), then exit; later retries stay queued.
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "config/config.hpp"
#include "job/job.hpp"
#include "job/metrics.hpp"
#include "journal_log.hpp"
#include "queue/queue.hpp"
#include "version.hpp"

namespace {

using namespace diskferry;

std::atomic<bool> g_stop{false};

// --once runs from a timer or by hand: it must not sit through a retry schedule that can reach
// half an hour. A retry due this soon is still worked (a dropped connection retried after a few
// seconds is part of finishing the run); a later one is left queued for the next run.
constexpr std::chrono::seconds kOnceGrace{10};
std::atomic<bool> g_reload{false};

extern "C" void on_signal(int sig) {
  if (sig == SIGHUP)
    g_reload = true;
  else
    g_stop = true;
}

std::string config_path(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* e = std::getenv("DISKFERRY_CONFIG"); e && *e) return e;
  return "/etc/diskferry/diskferry.yaml";
}

Time now_ms() {
  return std::chrono::time_point_cast<std::chrono::milliseconds>(std::chrono::system_clock::now());
}

std::shared_ptr<RateLimiter> limiter(const RateSchedule& s) {
  RateSchedule unlimited;
  if (s.to_string() == unlimited.to_string()) return nullptr;
  return std::make_shared<RateLimiter>(s);
}

class Daemon {
 public:
  Daemon(std::string config_file, bool once) : file_(std::move(config_file)), once_(once) {
    load();
    queue_ = std::make_unique<Queue>(default_db_path(cfg_->state_dir));
    release_dead_workers();
    write_metrics();
  }

  int run() {
    std::vector<std::thread> workers;
    idle_workers_ = cfg_->workers;
    for (int i = 0; i < cfg_->workers; ++i) workers.emplace_back([this, i] { work(i); });
    sd_notify(0, fmt::format("READY=1\nSTATUS=working the queue with {} worker{}", cfg_->workers,
                             cfg_->workers == 1 ? "" : "s")
                     .c_str());
    spdlog::info("diskferryd {} started: {} worker(s), database {}", DISKFERRY_VERSION,
                 cfg_->workers, queue_->path());
    uint64_t usec = 0;
    bool watchdog = sd_watchdog_enabled(0, &usec) > 0;
    auto beat = std::chrono::microseconds(usec / 2);
    auto next_beat = std::chrono::steady_clock::now();
    while (!g_stop && !(once_ && idle_workers_ == cfg_->workers && nothing_due())) {
      if (g_reload.exchange(false)) reload();
      if (watchdog && std::chrono::steady_clock::now() >= next_beat) {
        sd_notify(0, "WATCHDOG=1");
        next_beat = std::chrono::steady_clock::now() + beat;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    sd_notify(0, "STOPPING=1");
    done_ = true;
    for (auto& t : workers) t.join();
    spdlog::info("diskferryd stopped");
    return 0;
  }

 private:
  void load() {
    auto c = std::make_shared<const Config>(load_config(file_));
    for (auto& w : c->warnings) spdlog::warn("{}", w);
    std::lock_guard lk(m_);
    if (cfg_ && c->state_dir != cfg_->state_dir)
      spdlog::warn("{}: state_dir changed; it takes effect on restart", file_);
    env_.config = c;
    env_.global_limit = limiter(c->bwlimit);
    env_.remote_limits.clear();
    for (auto& [name, r] : c->remotes) env_.remote_limits[name] = limiter(r.bwlimit);
    env_.stopping = &g_stop;
    env_.log = [](const std::string& m) { spdlog::info("{}", m); };
    if (!cfg_) cfg_ = c;
  }

  void reload() {
    try {
      load();
      spdlog::info("{}: configuration reloaded", file_);
      write_metrics();
    } catch (const Error& e) {
      spdlog::error("reload refused, keeping the running configuration: {}", e.what());
    }
  }

  // Every configured source and remote in the metrics file from the start (and after a reload),
  // before any job has run; each job updates it when it ends (lib/job).
  void write_metrics() {
    try {
      update_metrics(*env().config, *queue_, nullptr);
    } catch (const Error& e) {
      spdlog::warn("metrics: {}", e.what());
    }
  }

  JobEnv env() {
    std::lock_guard lk(m_);
    JobEnv e = env_;
    e.queue = queue_.get();
    return e;
  }

  // For --once: no job is queued, running, or waiting for a retry due within kOnceGrace. The
  // retries left waiting are logged, so a run that exits with work outstanding says so.
  bool nothing_due() {
    std::vector<Job> later;
    try {
      Time horizon = now_ms() + kOnceGrace;
      for (Job& j : queue_->active_jobs()) {
        if (j.state != JobState::RetryWait || !j.next_run_at || *j.next_run_at <= horizon)
          return false;
        later.push_back(std::move(j));
      }
    } catch (const Error& e) {
      spdlog::warn("{}", e.what());
      return false;
    }
    for (const Job& j : later)
      spdlog::info("job {} ({}): retry due at {:%Y-%m-%d %H:%M:%S}Z left queued; --once exits",
                   j.id, j.source,
                   std::chrono::time_point_cast<std::chrono::seconds>(*j.next_run_at));
    return true;
  }

  void work(int index) {
    std::string owner = fmt::format("{}:{}:{}", hostname(), ::getpid(), index);
    while (!done_ && !g_stop) {
      std::optional<Job> job;
      try {
        JobEnv e = env();
        job = queue_->claim(owner,
                            std::chrono::duration_cast<std::chrono::milliseconds>(e.config->lease),
                            now_ms());
        if (job) {
          --idle_workers_;
          LogContext lc{job->id, job->source, {}};
          if (auto it = e.config->sources.find(job->source); it != e.config->sources.end())
            lc.remote = it->second.remote;
          ScopedLogContext scoped(std::move(lc));
          JobState s = run_job(e, *job, owner);
          ++idle_workers_;
          spdlog::info("job {} ({}): {}", job->id, job->source, to_string(s));
          continue;
        }
      } catch (const Error& err) {
        if (job) ++idle_workers_;
        spdlog::error("{}", err.what());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  }

  // After a crash (kill -9, OOM, power loss) the jobs of the dead process still hold leases;
  // waiting them out would delay a restarted daemon by up to a lease for nothing. An owner
  // "HOST:PID:N" of this host whose PID no longer exists (or is not a diskferryd) is gone.
  void release_dead_workers() {
    std::string prefix = hostname() + ":";
    auto dead = [&](const std::string& owner) {
      if (owner.rfind(prefix, 0) != 0) return false;
      std::string rest = owner.substr(prefix.size());
      long pid = std::strtol(rest.c_str(), nullptr, 10);
      if (pid <= 0 || pid == ::getpid()) return false;
      if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return true;
      std::ifstream comm(fmt::format("/proc/{}/comm", pid));
      std::string name;
      std::getline(comm, name);
      return comm && name != "diskferryd";
    };
    if (size_t n = queue_->release_dead(dead, now_ms()))
      spdlog::info("resuming {} job(s) of a diskferryd that is gone", n);
  }

  static std::string hostname() {
    char buf[256] = {};
    ::gethostname(buf, sizeof buf - 1);
    return buf;
  }

  std::string file_;
  bool once_;
  std::mutex m_;
  std::shared_ptr<const Config> cfg_;  // the one the daemon started with (workers, state_dir)
  JobEnv env_;
  std::unique_ptr<Queue> queue_;
  std::atomic<int> idle_workers_{0};
  std::atomic<bool> done_{false};
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"diskferryd: the diskferry backup daemon (works the job queue)"};
  app.set_version_flag("--version", std::string("diskferryd ") + DISKFERRY_VERSION);
  std::string config;
  bool once = false;
  app.add_option("--config", config,
                 "Configuration file (default: $DISKFERRY_CONFIG, else "
                 "/etc/diskferry/diskferry.yaml)");
  app.add_flag("--once", once,
               "Work the jobs that are due (and retries due within 10 s), then exit; a retry "
               "due later stays queued for the next run (for timers, tests and the demo)");
  app.footer(
      "Jobs are queued with `diskferry enqueue`; watch them with `diskferry list` and `diskferry "
      "show ID`.\nSignals: TERM/INT stop at a resumable point, HUP reloads the configuration.\n"
      "Exit status: 0 stopped cleanly, 1 could not start (the message says why), 2 bad usage.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  std::signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaction(s, &sa, nullptr);
  setup_logging("diskferryd");
  try {
    Daemon d(config_path(config), once);
    return d.run();
  } catch (const diskferry::Error& e) {
    fmt::print(stderr, "diskferryd: {}\n", e.what());
    return 1;
  }
}
