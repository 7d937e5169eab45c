// The job store shared by diskferryd and the CLI: one SQLite file (STATE_DIR/diskferry.db) holding
// jobs, their state machine, worker leases and an event log. Any number of processes may open it
// at once; every change is one transaction that also writes its event row.
//
//   queued ──claim──► running ──finish_done──► done
//     │                │  ▲ ──finish_failed──► failed ──retry──► queued
//     │                │  └─claim (next_run_at ≤ now, or the lease expired: crash recovery)
//     │                └────finish_retry──► retry_wait
//     └─cancel─► cancelled ◄─cancel (queued, retry_wait) / finish_* after a cancel request
//
// Times are unix milliseconds (UTC) in the database and Time in this interface.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "util/error.hpp"

namespace diskferry {

using Time = std::chrono::sys_time<std::chrono::milliseconds>;

enum class JobState { Queued, Running, RetryWait, Done, Failed, Cancelled };
std::string_view to_string(JobState state);  // "queued", "running", "retry_wait", ...
std::optional<JobState> parse_job_state(std::string_view text);
// Queued, running or retry_wait: a source has at most one such job.
bool is_active(JobState state);

struct Job {
  int64_t id = 0;
  std::string source;
  JobState state = JobState::Queued;
  int attempt = 0;  // claims since it was enqueued or retried; 1 while the first one runs
  Time created, updated;
  std::optional<Time> finished;     // entered done, failed or cancelled
  std::optional<Time> next_run_at;  // retry_wait only
  std::string lease_owner;          // running only
  std::optional<Time> lease_until;  // running only
  bool cancel_requested = false;    // running: the worker is asked to stop
  std::string snapshot_path, remote_path;
  uint64_t bytes_done = 0;
  std::optional<uint64_t> bytes_total;  // unknown until the worker says
  uint64_t rate = 0;                    // bytes/s, as last reported
  std::string sha256, error, error_class;
};

struct Event {
  int64_t id = 0, job_id = 0;
  Time at;
  std::string kind, message;
};

struct EnqueueResult {
  Job job;
  bool created = false;  // false: the source already had an active job, which this is
};

struct LastSuccess {
  int64_t job_id = 0;
  Time at;  // when it finished
  std::string remote_path, sha256;
};

struct JobFilter {
  std::optional<std::string> source;
  std::vector<JobState> states;  // empty: any state
  size_t limit = 0;              // 0: no limit
};

enum class CancelResult {
  Cancelled,         // it was queued or waiting to retry, and is cancelled now
  Requested,         // it is running: the worker stops when renew() tells it to
  AlreadyCancelled,  // nothing to do
};

// The worker no longer holds the job: its lease expired and another worker claimed it, or the
// job was cancelled and finished meanwhile. The worker must stop without touching the job.
class LeaseLost : public Error {
 public:
  explicit LeaseLost(const std::string& message) : Error(ErrorKind::Output, message) {}
};

struct QueueOptions {
  // How long a write waits for another process's transaction before failing with "the
  // database is locked by another process".
  std::chrono::milliseconds busy_timeout{5000};
  std::function<Time()> clock;  // stamps created/updated/events; empty: the system clock
};

std::string default_db_path(const std::string& state_dir);  // STATE_DIR/diskferry.db

// Thread-safe: calls are serialised on one connection (see queue.cpp for why). Failures throw
// Error naming the database file; asking for the impossible (cancel a done job, an unknown id)
// throws Error(Usage).
class Queue {
 public:
  // Creates or migrates the schema. Refuses (Error(Input), nothing modified) a file that is not
  // a diskferry database, is corrupt, or has a newer schema than this build knows.
  explicit Queue(const std::string& path, QueueOptions options = {});
  ~Queue();
  Queue(const Queue&) = delete;
  Queue& operator=(const Queue&) = delete;

  const std::string& path() const;

  // Idempotent, also between processes: a source with an active job gets that job back.
  EnqueueResult enqueue(const std::string& source);

  // Takes the oldest runnable job: queued; retry_wait with next_run_at <= now; or running with a
  // lease that ended by now (its worker died: event "resumed"). Skips busy_sources. Running
  // jobs whose cancel was requested and whose lease ended become cancelled instead. Every claim
  // counts an attempt, a resumed one too: a crash mid-upload cost an attempt.
  [[nodiscard]] std::optional<Job> claim(const std::string& owner, std::chrono::milliseconds lease,
                                         Time now, const std::set<std::string>& busy_sources = {});
  // False when the worker must stop: the job was cancelled (then finish_cancelled) or the
  // lease was taken by another worker (then leave the job alone). A lease that ended but was
  // not taken is still the owner's.
  [[nodiscard]] bool renew(int64_t job_id, const std::string& owner, Time until);

  // Ends at once the leases of running jobs whose owner `is_dead` says is gone (a worker of a
  // process on this host that no longer exists), so a restarted daemon resumes them without
  // waiting out the lease. Returns how many; each gets an event.
  size_t release_dead(const std::function<bool(const std::string& owner)>& is_dead, Time now);

  // Cheap, no event; ignored unless the job is running.
  void progress(int64_t job_id, uint64_t bytes_done, std::optional<uint64_t> bytes_total,
                uint64_t rate);
  // Remembered across attempts so a resumed job can reuse them; "" clears.
  void set_snapshot(int64_t job_id, const std::string& path);
  void set_remote_path(int64_t job_id, const std::string& path);

  // Each throws LeaseLost unless `owner` holds the job's lease. After a cancel request,
  // finish_retry and finish_failed cancel the job instead (returned); finish_done still
  // records the backup, which exists.
  void finish_done(int64_t job_id, const std::string& owner, const std::string& sha256,
                   const std::string& remote_path);
  JobState finish_retry(int64_t job_id, const std::string& owner, const std::string& error,
                        const std::string& error_class, Time next_run_at);
  JobState finish_failed(int64_t job_id, const std::string& owner, const std::string& error,
                         const std::string& error_class);
  void finish_cancelled(int64_t job_id, const std::string& owner);

  // Done and failed jobs cannot be cancelled (Error(Usage) "job N is already done").
  CancelResult cancel(int64_t job_id);
  // Failed or cancelled → queued with attempt 0, unless the source has another active job.
  void retry(int64_t job_id);
  // A free-form entry in the job's log (hook output, a warning).
  void event(int64_t job_id, const std::string& kind, const std::string& message);

  std::vector<Job> list(const JobFilter& filter = {}) const;  // newest first
  std::optional<Job> get(int64_t job_id) const;
  std::vector<Event> events(int64_t job_id) const;  // oldest first
  std::optional<LastSuccess> last_success(const std::string& source) const;
  std::vector<Job> active_jobs() const;  // in claim order

  // PRAGMA integrity_check and foreign_key_check; empty when the database is sound.
  std::vector<std::string> integrity_check() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diskferry
