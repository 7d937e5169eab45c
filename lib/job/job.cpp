#include "job/job.hpp"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "image/source.hpp"
#include "job/metrics.hpp"
#include "job/notify.hpp"
#include "pipeline/convert.hpp"
#include "snapshot/hook.hpp"
#include "snapshot/snapshot.hpp"
#include "transport/sftp/channel.hpp"
#include "transport/sftp/upload_lock.hpp"
#include "transport/sink.hpp"
#include "util/size.hpp"
#include "verify/verify.hpp"

namespace diskferry {
namespace {

using Clock = std::chrono::system_clock;

Time now_ms() {
  return std::chrono::time_point_cast<std::chrono::milliseconds>(Clock::now());
}

// Thrown from the conversion's progress callback to stop it.
class Stopped : public Error {
 public:
  Stopped(const std::string& what, bool resumable)
      : Error(ErrorKind::Output, what), resumable_(resumable) {}
  bool resumable() const { return resumable_; }

 private:
  bool resumable_;
};

std::string parent_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return "";
  return path.substr(0, slash);
}

// Why a job failed, for `diskferry list` and monitoring: transient failures are retried, the
// others need a person.
std::string error_class(const Error& e) {
  if (auto* c = dynamic_cast<const sftp::ConnectError*>(&e);
      c && c->failure() == sftp::ConnectFailure::HostUnknown)
    return "dns";
  if (e.transient()) return "transient";
  if (dynamic_cast<const VerifyError*>(&e)) return "verify";
  if (dynamic_cast<const sftp::LockedError*>(&e)) return "locked";
  if (auto* c = dynamic_cast<const sftp::ConnectError*>(&e)) {
    switch (c->failure()) {
      case sftp::ConnectFailure::HostKeyChanged:
      case sftp::ConnectFailure::HostKeyUnknown:
        return "host-key";
      case sftp::ConnectFailure::AuthRefused:
        return "auth";
      default:
        return "remote";
    }
  }
  if (auto* s = dynamic_cast<const sftp::StatusError*>(&e))
    return s->code() == sftp::kPermissionDenied ? "permission" : "remote";
  switch (e.kind()) {
    case ErrorKind::Usage:
      return "config";
    case ErrorKind::Input:
      return "source";
    case ErrorKind::Output:
      return "remote";
    case ErrorKind::Format:
      return "format";
    case ErrorKind::Internal:
      return "internal";
  }
  return "unknown";
}

// Renews the job's lease every third of its length while the job runs; tells the job to stop
// when renewing fails (cancelled, or the lease was taken by another worker).
class Heartbeat {
 public:
  Heartbeat(Queue& q, int64_t id, std::string owner, std::chrono::milliseconds lease)
      : q_(q), id_(id), owner_(std::move(owner)), lease_(lease), t_([this] { run(); }) {}
  ~Heartbeat() {
    {
      std::lock_guard lk(m_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }
  bool lost() const { return lost_; }

 private:
  void run() {
    std::unique_lock lk(m_);
    // At most 2 s between beats: renewing is also how a `diskferry cancel` reaches the job, and
    // a user waiting for a cancel should not wait a third of the lease.
    const auto period = std::min<std::chrono::milliseconds>(lease_ / 3, std::chrono::seconds(2));
    while (!cv_.wait_for(lk, period, [this] { return done_; })) {
      lk.unlock();
      bool ok = true;
      try {
        ok = q_.renew(id_, owner_, now_ms() + lease_);
      } catch (const Error&) {
        // A locked database: try again at the next beat, the lease has slack for it.
      }
      lk.lock();
      if (!ok) {
        lost_ = true;
        return;
      }
    }
  }

  Queue& q_;
  int64_t id_;
  std::string owner_;
  std::chrono::milliseconds lease_;
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::atomic<bool> lost_{false};
  std::thread t_;
};

struct Published {
  std::string sha256;
  uint64_t size = 0;
};

// A file NAME and its NAME.sha256 both on the remote: an earlier attempt published it (the
// daemon died before it could record that). Returns the checksum from the sidecar. `reached`:
// set once logged in.
std::optional<Published> already_published(const sftp::Url& url, const sftp::SinkOptions& so,
                                           std::optional<bool>& reached) {
  sftp::SshSession session(url, so.ssh);
  sftp::Channel ch(session, so.stall_timeout);
  reached = true;
  std::string path = url.remote_path();
  auto attrs = ch.stat(path);
  if (!attrs) return std::nullopt;
  std::string side = fmt::format("{}.sha256", path);
  if (!ch.stat(side)) return std::nullopt;
  std::string h = ch.open(side, sftp::kOpenRead);
  auto bytes = ch.read(h, 0, 4096);
  ch.close(h);
  std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  auto sp = text.find(' ');
  if (sp != 64) return std::nullopt;
  return Published{text.substr(0, 64), attrs->size.value_or(0)};
}

// Counts the bytes sent to the remote (zeros the sink may turn into holes are not sent).
class SentCounter final : public FilterSink {
 public:
  SentCounter(std::unique_ptr<Sink> inner, std::shared_ptr<std::atomic<uint64_t>> n)
      : FilterSink(std::move(inner)), n_(std::move(n)) {}
  void write(Bytes d) override {
    FilterSink::write(d);
    n_->fetch_add(d.size(), std::memory_order_relaxed);
  }

 private:
  std::shared_ptr<std::atomic<uint64_t>> n_;
};

// Whether the newest jobs of the source hold `name` already (jobs of one source run one at a
// time, so the one before is among the newest).
bool name_taken(Queue& q, const Job& job, const std::string& name) {
  JobFilter f;
  f.source = job.source;
  f.limit = 8;
  for (const Job& other : q.list(f))
    if (other.id != job.id && other.remote_path == name) return true;
  return false;
}

std::vector<std::shared_ptr<RateLimiter>> limiters_for(const JobEnv& env, const SourceConf& src) {
  std::vector<std::shared_ptr<RateLimiter>> l;
  if (auto it = env.remote_limits.find(src.remote); it != env.remote_limits.end() && it->second)
    l.push_back(it->second);
  if (env.global_limit) l.push_back(env.global_limit);
  return l;
}

}  // namespace

sftp::SinkOptions sink_options(const Config& config, const RemoteConf& remote) {
  sftp::SinkOptions so;
  if (!remote.identity.empty()) so.ssh.identity = remote.identity;
  if (!remote.known_hosts.empty()) so.ssh.known_hosts = remote.known_hosts;
  if (!remote.ssh_config.empty()) so.ssh.ssh_config = remote.ssh_config;
  so.ssh.accept_new_host_key = false;  // a daemon never trusts a key nobody has checked
  so.stall_timeout = config.stall_timeout;
  so.streams = remote.streams;
  return so;
}

sftp::Url backup_url(const RemoteConf& remote, const std::string& relative) {
  sftp::Url u = remote.url;
  while (!u.path.empty() && u.path.back() == '/') u.path.pop_back();
  u.path = u.path.empty() ? relative : fmt::format("{}/{}", u.path, relative);
  return u;
}

std::chrono::milliseconds retry_backoff(const Retries& r, int attempt) {
  using std::chrono::milliseconds;
  auto lo = std::chrono::duration_cast<milliseconds>(r.backoff_min);
  auto hi = std::chrono::duration_cast<milliseconds>(r.backoff_max);
  auto d = lo;
  for (int i = 1; i < attempt && d < hi; ++i) d *= 2;
  d = std::min(d, hi);
  // Jitter over the upper half, so jobs that failed together do not retry together.
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::uniform_int_distribution<int64_t> jitter(d.count() / 2, d.count());
  return std::max(lo, milliseconds(jitter(rng)));
}

namespace {

// One attempt; fills `r` in as it goes (run_job reports it once the attempt has ended).
JobState attempt(const JobEnv& env, const Job& job, const std::string& owner, JobReport& r) {
  Queue& q = *env.queue;
  const Config& cfg = *env.config;
  auto log = [&](const std::string& m) {
    if (env.log) env.log(fmt::format("job {} ({}): {}", job.id, job.source, m));
  };
  auto src_it = cfg.sources.find(job.source);
  if (src_it == cfg.sources.end()) {
    std::string why = fmt::format("source {} is no longer in {}", job.source, cfg.path);
    log(why);
    r.error = why;
    r.error_class = "config";
    return q.finish_failed(job.id, owner, why, "config");
  }
  const SourceConf& src = src_it->second;
  r.remote = src.remote;
  const RemoteConf& rem = cfg.remotes.at(src.remote);
  sftp::SinkOptions so = sink_options(cfg, rem);
  so.keep_partial = so.adopt_partial = true;
  // One per job, the same in every process: a restarted daemon finds its own NAME.lock and may
  // resume the NAME.partial under it.
  so.lock_token = fmt::format("job{}-{}", job.id, job.created.time_since_epoch().count());
  so.on_warning = [&](const std::string& w) { q.event(job.id, "warning", w); };
  so.on_resume = [&](uint64_t kept, uint64_t size) {
    q.event(job.id, "resumed",
            fmt::format("upload resumed at {} of the {} already on the remote", format_size(kept),
                        format_size(size)));
  };

  Heartbeat beat(q, job.id, owner,
                 std::chrono::duration_cast<std::chrono::milliseconds>(cfg.lease));
  std::string snapshot = job.snapshot_path;
  // The name is fixed by the first attempt, so every later one (and a restarted daemon) resumes
  // the same NAME.partial.
  std::string rel = job.remote_path;
  if (rel.empty()) {
    rel = render_name(src, Clock::now());
    // A job queued again within the template's resolution (one second by default) would get
    // the name of the one before and be taken for it (already_published): wait for a name of its
    // own. A coarser template (a warning at config load) keeps the name after 2 s.
    for (int i = 0; i < 20 && name_taken(q, job, rel); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      rel = render_name(src, Clock::now());
    }
    q.set_remote_path(job.id, rel);
  }
  sftp::Url url = backup_url(rem, rel);
  // Every output of the source's one read: the source's own, then extra_outputs, named like
  // the first with their own {ext} and the same time (so each attempt finds the same names).
  struct Out {
    SourceConf view;
    std::string rel;
    sftp::Url url;
  };
  std::vector<Out> outs;
  {
    auto when = match_name(src, rel);
    for (size_t i = 0; i < src.output_count(); ++i) {
      SourceConf v = src.output(i);
      std::string n = i == 0 ? rel : render_name(v, when.value_or(Clock::now()));
      outs.push_back({v, n, backup_url(rem, n)});
    }
  }
  r.remote_path = rel;
  r.url = url.str();
  q.event(job.id, "attempt",
          fmt::format("attempt {} of {}: {} to {}", job.attempt, src.retries.max_attempts, src.path,
                      url.str()));
  log(fmt::format("attempt {} of {} to {}", job.attempt, src.retries.max_attempts, url.str()));

  auto drop_snapshot = [&] {
    if (snapshot.empty()) return;
    try {
      remove_snapshot(snapshot);
      q.set_snapshot(job.id, "");
    } catch (const Error& e) {
      q.event(job.id, "warning", e.what());
    }
  };

  // Retention after every published backup, also one a killed process published and could not
  // prune after.
  // verify: after_upload. Before retention, so a bad new backup never makes an old one go.
  auto verify_published = [&](const sftp::Url& target, const std::string& sha) {
    if (!src.verify_after_upload) return;
    sftp::ReadOptions ro;
    ro.ssh = so.ssh;
    ro.streams = so.streams;
    ro.stall_timeout = so.stall_timeout;
    VerifyReport v = verify_remote(target, ro, sha);
    if (v.status == VerifyStatus::Ok) {
      q.event(job.id, "verified",
              fmt::format("{}: intact, read back (sha256 {})", target.str(), v.sha256));
      return;
    }
    if (v.status == VerifyStatus::Unreachable)  // retried; the next attempt verifies again
      throw sftp::DisconnectedError(fmt::format("verify after upload: {}", v.problem));
    // Nothing may take a backup that does not verify for a good one: not retention, not the
    // next attempt's "already published" check. Take it away, keep the older ones.
    try {
      sftp::SshSession session(target, so.ssh);
      sftp::Channel ch(session, so.stall_timeout);
      ch.remove(target.remote_path() + ".sha256");
      ch.remove(target.remote_path());
    } catch (const Error& e) {
      q.event(job.id, "warning", fmt::format("could not remove {}: {}", target.str(), e.what()));
    }
    throw VerifyError(
        fmt::format("verify after upload: {} (the new backup was removed)", v.problem));
  };

  auto prune = [&] {
    for (const auto& out : outs) {
      try {
        PruneResult p = prune_source(cfg, out.view, false);
        for (auto& name : p.removed) q.event(job.id, "pruned", name);
      } catch (const Error& e) {
        // The backup is safe; a failed prune is tried again after the next one.
        q.event(job.id, "warning", fmt::format("retention: {}", e.what()));
      }
    }
  };
  // `only`: just the outputs it has a value for.
  auto discard_partials = [&](const std::vector<std::optional<Published>>* only = nullptr) {
    for (size_t i = 0; i < outs.size(); ++i) {
      const auto& out = outs[i];
      if (only && !(*only)[i]) continue;
      try {
        sftp::discard_partial(out.url, so);
      } catch (const Error& de) {
        q.event(job.id, "warning",
                fmt::format("could not remove {}.partial: {}", out.url.str(), de.what()));
      }
    }
  };

  auto sent = std::make_shared<std::atomic<uint64_t>>(0);
  try {
    // What an earlier attempt (or a killed daemon) already published is checked, not sent again.
    std::vector<std::optional<Published>> pub(outs.size());
    bool all_published = true;
    for (size_t i = 0; i < outs.size(); ++i) {
      pub[i] = already_published(outs[i].url, so, r.remote_reached);
      if (!pub[i]) {
        all_published = false;
        continue;
      }
      q.event(job.id, "published",
              fmt::format("{} was already published by an earlier attempt", outs[i].url.str()));
      verify_published(outs[i].url, pub[i]->sha256);
    }
    auto published_all = [&](const std::string& sha) {
      prune();
      drop_snapshot();
      q.finish_done(job.id, owner, sha, rel);
      r.sha256 = sha;
      return JobState::Done;
    };
    if (all_published) {
      // A process killed between publishing and unlocking left its lock.
      discard_partials(&pub);
      for (auto& p : pub) r.bytes_on_remote += p->size;
      return published_all(pub[0]->sha256);
    }
    std::string input = src.path;
    if (src.snapshot == SnapshotMode::Reflink) {
      struct stat st {};
      if (snapshot.empty() || ::stat(snapshot.c_str(), &st) != 0) {
        HookEnv henv{{"DISKFERRY_SOURCE", src.name},
                     {"DISKFERRY_IMAGE", src.path},
                     {"DISKFERRY_JOB_ID", std::to_string(job.id)}};
        Snapshot s = with_hooks(
            src.hooks.pre_snapshot, src.hooks.post_snapshot, src.hooks.timeout,
            [&] { return take_snapshot(src.path, src.snapshot_dir, fmt::format("job{}", job.id)); },
            henv, [&](const std::string& m) { q.event(job.id, "hook", m); });
        snapshot = s.path;
        q.set_snapshot(job.id, snapshot);
        q.event(job.id, "snapshot",
                fmt::format("{} {}", s.reused ? "reused" : "reflinked", snapshot));
      } else {
        q.event(job.id, "snapshot", fmt::format("reused {}", snapshot));
      }
      input = snapshot;
    }
    SourceOptions sopts;
    if (src.format == ImageFormat::Asis) sopts.format = SourceFormat::File;
    sopts.on_warning = [&](const std::string& w) { q.event(job.id, "warning", w); };
    auto source = open_source(input, sopts);

    ConvertOptions o;
    o.threads = std::max(1u, std::thread::hardware_concurrency());
    o.caller_retries = true;  // the queue retries, with the configured backoff and events
    auto limits = limiters_for(env, src);
    o.wrap_destination = [limits, sent](std::unique_ptr<Sink> s) -> std::unique_ptr<Sink> {
      if (!limits.empty()) s = make_rate_limited_sink(std::move(s), limits);
      return std::make_unique<SentCounter>(std::move(s), sent);
    };
    auto last = std::chrono::steady_clock::now();
    uint64_t last_sent = 0;
    o.on_progress = [&](uint64_t done, std::optional<uint64_t> total, bool writing) {
      if (beat.lost())
        throw Stopped("the job was cancelled or taken over by another worker", false);
      if (env.stopping && env.stopping->load())
        throw Stopped("interrupted: the daemon is shutting down; the upload resumes on restart",
                      true);
      auto t = std::chrono::steady_clock::now();
      if (!writing || t - last < std::chrono::seconds(1)) return;
      // The rate is what goes to the remote (what --bwlimit limits); progress is through the
      // source, the only total known in advance.
      double secs = std::chrono::duration<double>(t - last).count();
      uint64_t now_sent = sent->load();
      auto rate = static_cast<uint64_t>(static_cast<double>(now_sent - last_sent) / secs);
      q.progress(job.id, done, total, rate);
      last = t;
      last_sent = now_sent;
    };
    std::vector<std::unique_ptr<Destination>> dests;
    std::vector<Output> outputs;
    std::vector<size_t> which;  // outs index of each output
    for (size_t i = 0; i < outs.size(); ++i) {
      if (pub[i]) continue;
      OutputSpec spec;
      spec.writer.format = outs[i].view.format;
      spec.writer.cluster_codec = outs[i].view.cluster_codec;
      spec.writer.threads = o.threads;
      spec.compress = outs[i].view.compress;
      dests.push_back(sftp::open_sftp_destination(outs[i].url, so));
      outputs.push_back({spec, dests.back().get()});
      which.push_back(i);
    }
    auto results = convert_many(*source, outputs, o);
    r.bytes_sent = sent->load();
    std::exception_ptr failed;
    std::string sha = pub[0] ? pub[0]->sha256 : "";
    for (size_t k = 0; k < results.size(); ++k) {
      const Out& out = outs[which[k]];
      if (results[k].error) {
        if (!failed) failed = results[k].error;
        continue;
      }
      const ConvertResult& c = results[k].result;
      if (which[k] == 0) sha = c.sha256;
      r.bytes_on_remote += c.output_bytes;
      q.event(
          job.id, "published",
          fmt::format("{} ({}, sha256 {})", out.url.str(), format_size(c.output_bytes), c.sha256));
      log(fmt::format("published {} ({})", out.url.str(), format_size(c.output_bytes)));
      verify_published(out.url, c.sha256);
    }
    // The outputs that made it stay published; the next attempt sends only the others.
    if (failed) std::rethrow_exception(failed);
    for (size_t i = 0; i < outs.size(); ++i)
      if (pub[i]) r.bytes_on_remote += pub[i]->size;
    return published_all(sha);
  } catch (const LeaseLost&) {
    return JobState::Running;
  } catch (const Error& e) {
    auto* stopped = dynamic_cast<const Stopped*>(&e);
    r.bytes_sent = sent->load();
    // It failed before logging in: the remote was not reached, unless it refused what we asked.
    if (!r.remote_reached)
      r.remote_reached = !e.transient() && !dynamic_cast<const sftp::ConnectError*>(&e);
    if (beat.lost()) {
      auto j = q.get(job.id);
      if (!j || !j->cancel_requested) return JobState::Running;  // another worker has it
      discard_partials();
      drop_snapshot();
      q.finish_cancelled(job.id, owner);
      log("cancelled");
      return JobState::Cancelled;
    }
    std::string cls = stopped ? "interrupted" : error_class(e);
    r.error = e.what();
    r.error_class = cls;
    log(e.what());
    // A name that does not resolve is retried too: a daemon outlives a DNS outage.
    bool retry = (stopped && stopped->resumable()) ||
                 ((e.transient() || cls == "dns") && job.attempt < src.retries.max_attempts);
    if (retry) {
      auto wait = stopped ? std::chrono::milliseconds(0) : retry_backoff(src.retries, job.attempt);
      return q.finish_retry(job.id, owner, e.what(), cls, now_ms() + wait);
    }
    discard_partials();
    drop_snapshot();
    return q.finish_failed(job.id, owner, e.what(), cls);
  }
}

// Metrics and notify commands once an attempt has ended. Neither may change the job: failures
// are warnings in its events and the log.
void report(const JobEnv& env, const Job& job, const JobReport& r) {
  Queue& q = *env.queue;
  auto warn = [&](const std::string& m) {
    if (env.log) env.log(fmt::format("job {} ({}): warning: {}", job.id, job.source, m));
    try {
      q.event(job.id, "warning", m);
    } catch (const Error&) {
    }
  };
  try {
    update_metrics(*env.config, q, &r);
  } catch (const Error& e) {
    warn(fmt::format("metrics: {}", e.what()));
  }
  auto src = env.config->sources.find(job.source);
  if (src == env.config->sources.end()) return;
  if (auto n = run_notify(src->second.notify, r)) {
    if (!n->ok) return warn(n->message);
    if (env.log) env.log(fmt::format("job {} ({}): {}", job.id, job.source, n->message));
    try {
      q.event(job.id, "notify", n->message);
    } catch (const Error&) {
    }
  }
}

}  // namespace

JobState run_job(const JobEnv& env, const Job& job, const std::string& owner) {
  JobReport r;
  r.job_id = job.id;
  r.source = job.source;
  r.attempt = job.attempt;
  auto t0 = std::chrono::steady_clock::now();
  r.state = attempt(env, job, owner, r);
  r.ended = now_ms();
  r.duration =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  if (r.state != JobState::Running) report(env, job, r);
  return r.state;
}

PruneResult prune_source(const Config& cfg, const SourceConf& src, bool dry_run) {
  const RemoteConf& rem = cfg.remotes.at(src.remote);
  sftp::SinkOptions so = sink_options(cfg, rem);
  // Backups live in the directory the template renders to (its directories carry no time).
  std::string sample = render_name(src, Clock::now());
  std::string rel_dir = parent_of(sample);
  sftp::Url dir_url = rel_dir.empty() ? rem.url : backup_url(rem, rel_dir);
  sftp::SshSession session(dir_url, so.ssh);
  sftp::Channel ch(session, so.stall_timeout);
  const std::string dir = dir_url.remote_path();
  std::vector<Backup> backups;
  if (auto entries = ch.list_dir(dir.empty() ? std::string_view(".") : dir)) {
    for (auto& [name, attrs] : *entries) {
      if (attrs.permissions && (*attrs.permissions & 0170000) != 0100000) continue;
      std::string rel = rel_dir.empty() ? name : fmt::format("{}/{}", rel_dir, name);
      if (auto t = match_name(src, rel)) backups.push_back({rel, *t});
    }
  }
  PruneResult r;
  RetentionPolicy pol{static_cast<unsigned>(src.retention.keep_last),
                      static_cast<unsigned>(src.retention.keep_daily),
                      static_cast<unsigned>(src.retention.keep_weekly),
                      static_cast<unsigned>(src.retention.keep_monthly)};
  r.plan = plan_retention(std::move(backups), pol);
  if (dry_run) return r;
  for (auto& d : r.plan.remove) {
    std::string path = backup_url(rem, d.backup.name).remote_path();
    ch.remove(path);
    std::string side = fmt::format("{}.sha256", path);
    if (ch.stat(side)) ch.remove(side);
    r.removed.push_back(d.backup.name);
  }
  return r;
}

}  // namespace diskferry
