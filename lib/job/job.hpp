// One backup job, end to end: snapshot → convert → upload → publish → retention → cleanup.
// The daemon's workers call run_job() for each job they claim; the CLI's `prune` calls
// prune_source(). Everything a job must survive (a dropped connection, a killed daemon) is
// carried by the queue row (snapshot path, remote name) and the remote NAME.partial.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "job/retention.hpp"
#include "pipeline/rate_limit.hpp"
#include "queue/queue.hpp"
#include "transport/sftp/sftp_sink.hpp"
#include "transport/sftp/url.hpp"

namespace diskferry {

// What the workers of one daemon share.
struct JobEnv {
  std::shared_ptr<const Config> config;
  Queue* queue = nullptr;
  std::shared_ptr<RateLimiter> global_limit;                          // may be null
  std::map<std::string, std::shared_ptr<RateLimiter>> remote_limits;  // by remote name
  const std::atomic<bool>* stopping = nullptr;  // shutdown: stop at a resumable point
  std::function<void(const std::string&)> log;  // one line per event worth logging
};

// Runs one claimed attempt of `job` (held by `owner`) and leaves the job in its next state:
// done, retry_wait (transient failure, or interrupted by shutdown), failed or cancelled. Renews
// the lease while it runs. Returns the state it left the job in; a lease lost to another worker
// returns Running and touches nothing.
JobState run_job(const JobEnv& env, const Job& job, const std::string& owner);

// The SFTP options for a remote from the configuration (strict host keys, always).
sftp::SinkOptions sink_options(const Config& config, const RemoteConf& remote);
// The remote's URL with `relative` appended to its path.
sftp::Url backup_url(const RemoteConf& remote, const std::string& relative);

// The backups of a source on its remote (only names its template produces: nothing else in the
// directory is ever considered), and what its retention policy keeps. Without dry_run, removes
// the others and their .sha256 sidecars; `removed` lists what went.
struct PruneResult {
  RetentionPlan plan;
  std::vector<std::string> removed;
};
PruneResult prune_source(const Config& config, const SourceConf& source, bool dry_run);

// Exponential backoff within [min, max], with jitter, before attempt `attempt` + 1.
std::chrono::milliseconds retry_backoff(const Retries& retries, int attempt);

}  // namespace diskferry
