#include "queue/queue.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <iterator>
#include <mutex>
#include <utility>

#include "queue/sqlite.hpp"
#include "util/fd.hpp"

namespace diskferry {

namespace {

using sqlite::Db;
using sqlite::Statement;
using sqlite::Transaction;

// "DFry" in the database header: how we tell our file from any other SQLite database.
constexpr int64_t kApplicationId = 0x44467279;

// kMigrations[v] takes the schema from version v to v + 1, inside the transaction that opens the
// database. A released step is never edited: a schema change is a new step appended here.
constexpr const char* kMigrations[] = {
    // v1
    R"sql(
CREATE TABLE jobs (
  id               INTEGER PRIMARY KEY,
  source           TEXT NOT NULL,
  state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'retry_wait', 'done',
                                                  'failed', 'cancelled')),
  attempt          INTEGER NOT NULL DEFAULT 0,
  created          INTEGER NOT NULL,
  updated          INTEGER NOT NULL,
  finished         INTEGER,
  next_run_at      INTEGER,
  lease_owner      TEXT,
  lease_until      INTEGER,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  snapshot_path    TEXT,
  remote_path      TEXT,
  bytes_done       INTEGER NOT NULL DEFAULT 0,
  bytes_total      INTEGER,
  rate             INTEGER NOT NULL DEFAULT 0,
  sha256           TEXT,
  error            TEXT,
  error_class      TEXT,
  -- A lease exists exactly while the job runs, so a stale owner can never match.
  CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_until IS NOT NULL)),
  CHECK (state <> 'retry_wait' OR next_run_at IS NOT NULL),
  CHECK (cancel_requested = 0 OR state = 'running')
) STRICT;
-- At most one active job per source: what keeps enqueue idempotent and two workers off one
-- disk, whatever the processes racing for it do.
CREATE UNIQUE INDEX jobs_one_active_per_source ON jobs (source)
  WHERE state IN ('queued', 'running', 'retry_wait');
CREATE INDEX jobs_by_state ON jobs (state, created, id);
CREATE INDEX jobs_by_source ON jobs (source, state, finished);
CREATE TABLE events (
  id      INTEGER PRIMARY KEY,
  job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  at      INTEGER NOT NULL,
  kind    TEXT NOT NULL,
  message TEXT NOT NULL
) STRICT;
CREATE INDEX events_by_job ON events (job_id, id);
)sql",
};
constexpr int64_t kSchemaVersion = static_cast<int64_t>(std::size(kMigrations));

// Spelled exactly as in the partial index, so that SQLite uses it.
#define ACTIVE_STATES "('queued', 'running', 'retry_wait')"
// What every transition out of running clears.
#define LEAVE_RUNNING "lease_owner = NULL, lease_until = NULL, cancel_requested = 0"

constexpr const char* kJobColumns =
    "id, source, state, attempt, created, updated, finished, next_run_at, lease_owner, "
    "lease_until, cancel_requested, snapshot_path, remote_path, bytes_done, bytes_total, rate, "
    "sha256, error, error_class";

int64_t ms(Time t) {
  return t.time_since_epoch().count();
}
Time from_ms(int64_t v) {
  return Time{std::chrono::milliseconds{v}};
}
std::optional<Time> from_ms(std::optional<int64_t> v) {
  if (!v) return std::nullopt;
  return from_ms(*v);
}

Time system_now() {
  return std::chrono::time_point_cast<std::chrono::milliseconds>(std::chrono::system_clock::now());
}

std::string with_class(const std::string& error, const std::string& error_class) {
  if (error_class.empty()) return error;
  return fmt::format("({}) {}", error_class, error);
}

Job read_job(const Statement& s, const std::string& db_path) {
  Job j;
  j.id = s.int64(0);
  j.source = s.text(1);
  const std::string state = s.text(2);
  const auto parsed = parse_job_state(state);
  if (!parsed) {
    throw Error(ErrorKind::Input,
                fmt::format("{}: job {} has an unknown state '{}'", db_path, j.id, state));
  }
  j.state = *parsed;
  j.attempt = static_cast<int>(s.int64(3));
  j.created = from_ms(s.int64(4));
  j.updated = from_ms(s.int64(5));
  j.finished = from_ms(s.opt_int64(6));
  j.next_run_at = from_ms(s.opt_int64(7));
  j.lease_owner = s.text(8);
  j.lease_until = from_ms(s.opt_int64(9));
  j.cancel_requested = s.int64(10) != 0;
  j.snapshot_path = s.text(11);
  j.remote_path = s.text(12);
  j.bytes_done = static_cast<uint64_t>(s.int64(13));
  if (auto total = s.opt_int64(14)) j.bytes_total = static_cast<uint64_t>(*total);
  j.rate = static_cast<uint64_t>(s.int64(15));
  j.sha256 = s.text(16);
  j.error = s.text(17);
  j.error_class = s.text(18);
  return j;
}

struct Header {
  int64_t application_id, user_version, objects;
};

int64_t query_int(Db& db, const char* sql) {
  auto s = db.prepare(sql);
  if (!s.step()) return 0;
  return s.int64(0);
}

Header read_header(Db& db) {
  return {query_int(db, "PRAGMA application_id"), query_int(db, "PRAGMA user_version"),
          query_int(db, "SELECT count(*) FROM sqlite_schema")};
}

// Accepts our own database at a version we know, and a brand new (empty) one.
void check_header(const Db& db, const Header& h) {
  if (h.application_id == kApplicationId) {
    if (h.user_version > kSchemaVersion) {
      throw Error(ErrorKind::Input,
                  fmt::format("{}: schema version {} is newer than this diskferry knows (up to "
                              "{}); it was written by a newer diskferry: upgrade this one",
                              db.path(), h.user_version, kSchemaVersion));
    }
    return;
  }
  if (h.application_id == 0 && h.user_version == 0 && h.objects == 0) return;
  throw Error(ErrorKind::Input,
              fmt::format("{}: not a diskferry database (an SQLite database with application_id "
                          "{:#x}, user_version {} and {} tables or indexes); not touching it",
                          db.path(), h.application_id, h.user_version, h.objects));
}

void migrate(Db& db) {
  Header h = read_header(db);
  if (h.application_id == kApplicationId && h.user_version == kSchemaVersion) return;
  Transaction tx(db);
  h = read_header(db);  // another process may have migrated it while we waited for the lock
  check_header(db, h);
  const int64_t from = h.application_id == kApplicationId ? h.user_version : 0;
  for (int64_t v = from; v < kSchemaVersion; ++v) db.exec(kMigrations[v]);
  // PRAGMAs take no bound parameters; these are our own constants.
  db.exec(fmt::format("PRAGMA application_id = {}", kApplicationId));
  db.exec(fmt::format("PRAGMA user_version = {}", kSchemaVersion));
  tx.commit();
}

void open_database(Db& db) {
  db.exec("PRAGMA foreign_keys = ON");  // per connection: SQLite does not store it in the file
  // The first read: a file that is not SQLite fails here, and someone else's database is
  // refused, before anything below writes to either.
  check_header(db, read_header(db));
  {
    // WAL: the CLI reads while the daemon writes, and a commit is one sequential append.
    auto s = db.prepare("PRAGMA journal_mode = WAL");
    const std::string mode = s.step() ? s.text(0) : "";
    if (mode != "wal") {
      throw Error(ErrorKind::Output,
                  fmt::format("{}: cannot use write-ahead logging (journal mode stays '{}'); a "
                              "network file system cannot hold the state directory",
                              db.path(), mode));
    }
  }
  // NORMAL, not FULL: in WAL mode a commit is appended to the WAL without an fsync (the WAL is
  // synced at checkpoints). A crash of the process, the failure the daemon resumes from, loses
  // no committed transaction: it is in the kernel's page cache. A power loss can roll back the
  // last few commits but never corrupts the file, and every state such a rollback leaves is one
  // the queue recovers from anyway: a lost claim or renew comes back as an expired lease, a lost
  // finish_done re-runs an upload that is deterministic and published atomically (the remote
  // listing is the truth about which backups exist). FULL would fsync on every progress() and
  // renew() of every worker for that.
  db.exec("PRAGMA synchronous = NORMAL");
  migrate(db);
}

[[noreturn]] void no_such_job(int64_t id) {
  throw Error(ErrorKind::Usage, fmt::format("job {} does not exist", id));
}

}  // namespace

std::string_view to_string(JobState state) {
  switch (state) {
    case JobState::Queued:
      return "queued";
    case JobState::Running:
      return "running";
    case JobState::RetryWait:
      return "retry_wait";
    case JobState::Done:
      return "done";
    case JobState::Failed:
      return "failed";
    case JobState::Cancelled:
      return "cancelled";
  }
  return "unknown";
}

std::optional<JobState> parse_job_state(std::string_view text) {
  for (JobState s : {JobState::Queued, JobState::Running, JobState::RetryWait, JobState::Done,
                     JobState::Failed, JobState::Cancelled}) {
    if (to_string(s) == text) return s;
  }
  return std::nullopt;
}

bool is_active(JobState state) {
  return state == JobState::Queued || state == JobState::Running || state == JobState::RetryWait;
}

std::string default_db_path(const std::string& state_dir) {
  return (std::filesystem::path(state_dir) / "diskferry.db").string();
}

// One connection behind a mutex rather than one connection per thread: SQLite lets one writer
// at a time into the file whatever we do, and our transactions are a handful of row updates, so
// more connections would only let reads run in parallel, which a daemon with a few workers does
// not need. They would also turn contention between our own threads into busy-timeout polling
// (and "locked" errors under load) where a mutex simply queues them. Other processes, the CLI,
// open their own connection; WAL lets them read while we write.
struct Queue::Impl {
  Impl(const std::string& path, QueueOptions options)
      : db(path, options.busy_timeout), clock(std::move(options.clock)) {
    // Setting up a new file (WAL mode, the schema) from two processes at once (the daemon
    // starting while `diskferry list` runs) deadlocked in SQLite's locks until the busy timeout,
    // or showed one a half-made header ("not a diskferry database"): seen in CI. Opening is
    // serialised between processes by a lock file beside the database; only opening.
    UniqueFd lock(::open((path + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!lock) throw_errno(ErrorKind::Output, path + ".lock", "cannot open", errno);
    while (::flock(lock.get(), LOCK_EX) != 0) {
      if (errno != EINTR) throw_errno(ErrorKind::Output, path + ".lock", "cannot lock", errno);
    }
    open_database(db);
  }

  Time now() const { return clock ? clock() : system_now(); }

  std::optional<Job> find(int64_t id) {
    auto s = db.prepare(std::string("SELECT ") + kJobColumns + " FROM jobs WHERE id = ?1");
    s.bind_all(id);
    if (!s.step()) return std::nullopt;
    return read_job(s, db.path());
  }

  // A worker's finish after a cancel request: the job is cancelled instead, with its error.
  bool cancel_if_requested(const Job& job, Time t, const std::string& error,
                           const std::string& error_class) {
    if (!job.cancel_requested) return false;
    cancel_now(job.id, t, error, error_class);
    add_event(job.id, t, "cancelled",
              fmt::format("stopped on cancel request: {}", with_class(error, error_class)));
    return true;
  }

  Job load(int64_t id) {
    auto job = find(id);
    if (!job) no_such_job(id);
    return std::move(*job);
  }

  std::optional<int64_t> active_job_of(const std::string& source) {
    auto s = db.prepare("SELECT id FROM jobs WHERE source = ?1 AND state IN " ACTIVE_STATES);
    s.bind_all(source);
    if (!s.step()) return std::nullopt;
    return s.int64(0);
  }

  // The job, if `owner` holds its lease; otherwise the worker has to let go of it.
  Job held(int64_t id, const std::string& owner) {
    auto job = find(id);
    if (!job) throw LeaseLost(fmt::format("job {}: lease lost: the job no longer exists", id));
    if (job->state != JobState::Running) {
      throw LeaseLost(
          fmt::format("job {}: lease lost: the job is {} now", id, to_string(job->state)));
    }
    if (job->lease_owner != owner) {
      throw LeaseLost(fmt::format("job {}: lease lost: the lease of {} expired and {} took over",
                                  id, owner, job->lease_owner));
    }
    return std::move(*job);
  }

  void add_event(int64_t job_id, Time at, std::string_view kind, std::string_view message) {
    db.prepare("INSERT INTO events (job_id, at, kind, message) VALUES (?1, ?2, ?3, ?4)")
        .bind_all(job_id, ms(at), kind, message)
        .run();
  }

  // Leaves running (or any state) for cancelled; the error, if any, is the reason it stopped.
  void cancel_now(int64_t id, Time t, const std::string& error, const std::string& error_class) {
    db.prepare(
          "UPDATE jobs SET state = 'cancelled', finished = ?2, updated = ?2, "
          "next_run_at = NULL, error = NULLIF(?3, ''), error_class = NULLIF(?4, ''), "
          "rate = 0, " LEAVE_RUNNING " WHERE id = ?1")
        .bind_all(id, ms(t), error, error_class)
        .run();
  }

  void set_text(const char* sql, int64_t id, const std::string& value) {
    db.prepare(sql).bind_all(id, value, ms(now())).run();
    if (db.changes() == 0) no_such_job(id);
  }

  mutable std::mutex mu;
  Db db;
  std::function<Time()> clock;
};

namespace {
// The state directory of a first run (systemd's StateDirectory= makes it under the unit; a
// hand-run `diskferry enqueue` or `diskferryd --once` must not need a mkdir first). 0700: the
// database names hosts, paths and errors.
const std::string& with_parent_dir(const std::string& path) {
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (dir.empty() || std::filesystem::is_directory(dir, ec)) return path;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    throw Error(ErrorKind::Output, fmt::format("{}: cannot create the state directory: {}",
                                               dir.string(), ec.message()));
  std::filesystem::permissions(dir, std::filesystem::perms::owner_all, ec);
  return path;
}
}  // namespace

Queue::Queue(const std::string& path, QueueOptions options)
    : impl_(std::make_unique<Impl>(with_parent_dir(path), std::move(options))) {}

Queue::~Queue() = default;

const std::string& Queue::path() const {
  return impl_->db.path();
}

EnqueueResult Queue::enqueue(const std::string& source) {
  if (source.empty()) throw Error(ErrorKind::Usage, "cannot enqueue a job without a source");
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  // IMMEDIATE: the check and the insert must see the same database, also when another process
  // enqueues the same source at the same moment.
  Transaction tx(db);
  if (auto existing = impl_->active_job_of(source)) {
    Job job = impl_->load(*existing);
    tx.commit();
    return {std::move(job), false};
  }
  const Time t = impl_->now();
  db.prepare("INSERT INTO jobs (source, state, created, updated) VALUES (?1, 'queued', ?2, ?2)")
      .bind_all(source, ms(t))
      .run();
  const int64_t id = db.last_insert_rowid();
  impl_->add_event(id, t, "enqueued", "queued");
  Job job = impl_->load(id);
  tx.commit();
  return {std::move(job), true};
}

std::optional<Job> Queue::claim(const std::string& owner, std::chrono::milliseconds lease, Time now,
                                const std::set<std::string>& busy_sources) {
  if (owner.empty()) throw Error(ErrorKind::Usage, "cannot claim a job without an owner name");
  if (lease <= std::chrono::milliseconds::zero())
    throw Error(ErrorKind::Usage, "cannot claim a job with a lease that is not positive");
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);

  // A cancel request whose worker died: nobody is left to call finish_cancelled.
  std::vector<std::pair<int64_t, std::string>> orphans;
  {
    auto s = db.prepare(
        "SELECT id, lease_owner FROM jobs WHERE state = 'running' AND "
        "cancel_requested = 1 AND lease_until <= ?1");
    s.bind_all(ms(now));
    while (s.step()) orphans.emplace_back(s.int64(0), s.text(1));
  }
  for (const auto& [id, old_owner] : orphans) {
    impl_->cancel_now(id, now, "", "");
    impl_->add_event(id, now, "cancelled",
                     fmt::format("cancel requested, and the lease of {} expired", old_owner));
  }

  struct Pick {
    int64_t id;
    std::string state, old_owner;
  };
  std::optional<Pick> pick;
  {
    // A source never has two active jobs (the unique index), so a runnable job's source is
    // never running elsewhere; busy_sources adds what the caller knows to be busy besides.
    auto s = db.prepare(
        "SELECT id, source, state, lease_owner FROM jobs WHERE state = 'queued' "
        "OR (state = 'retry_wait' AND next_run_at <= ?1) "
        "OR (state = 'running' AND lease_until <= ?1 AND cancel_requested = 0) "
        "ORDER BY created, id");
    s.bind_all(ms(now));
    while (s.step()) {
      if (busy_sources.count(s.text(1))) continue;
      pick = Pick{s.int64(0), s.text(2), s.text(3)};
      break;
    }
  }
  if (!pick) {
    tx.commit();  // the orphans above
    return std::nullopt;
  }
  db.prepare(
        "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = ?2, "
        "lease_until = ?3, next_run_at = NULL, rate = 0, updated = ?4 WHERE id = ?1")
      .bind_all(pick->id, owner, ms(now + lease), ms(now))
      .run();
  Job job = impl_->load(pick->id);
  if (pick->state == "running") {
    impl_->add_event(job.id, now, "resumed",
                     fmt::format("lease expired, resumed: {} stopped renewing; attempt {} by {}",
                                 pick->old_owner, job.attempt, owner));
  } else {
    impl_->add_event(job.id, now, "claimed", fmt::format("attempt {} by {}", job.attempt, owner));
  }
  tx.commit();
  return job;
}

bool Queue::renew(int64_t job_id, const std::string& owner, Time until) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  db.prepare(
        "UPDATE jobs SET lease_until = ?3, updated = ?4 WHERE id = ?1 AND "
        "state = 'running' AND lease_owner = ?2 AND cancel_requested = 0")
      .bind_all(job_id, owner, ms(until), ms(impl_->now()))
      .run();
  return db.changes() == 1;
}

size_t Queue::release_dead(const std::function<bool(const std::string& owner)>& is_dead, Time now) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);
  std::vector<std::pair<int64_t, std::string>> dead;
  {
    auto s =
        db.prepare("SELECT id, lease_owner FROM jobs WHERE state = 'running' AND lease_until > ?1");
    s.bind_all(ms(now));
    while (s.step())
      if (is_dead(s.text(1))) dead.emplace_back(s.int64(0), s.text(1));
  }
  for (const auto& [id, owner] : dead) {
    db.prepare("UPDATE jobs SET lease_until = ?2, updated = ?2 WHERE id = ?1")
        .bind_all(id, ms(now))
        .run();
    impl_->add_event(id, now, "lease_released",
                     fmt::format("{} no longer exists; its lease ends now", owner));
  }
  tx.commit();
  return dead.size();
}

void Queue::progress(int64_t job_id, uint64_t bytes_done, std::optional<uint64_t> bytes_total,
                     uint64_t rate) {
  std::optional<int64_t> total;
  if (bytes_total) total = static_cast<int64_t>(*bytes_total);
  std::lock_guard lock(impl_->mu);
  impl_->db
      .prepare(
          "UPDATE jobs SET bytes_done = ?2, bytes_total = ?3, rate = ?4, updated = ?5 "
          "WHERE id = ?1 AND state = 'running'")
      .bind_all(job_id, static_cast<int64_t>(bytes_done), total, static_cast<int64_t>(rate),
                ms(impl_->now()))
      .run();
}

void Queue::set_snapshot(int64_t job_id, const std::string& path) {
  std::lock_guard lock(impl_->mu);
  impl_->set_text("UPDATE jobs SET snapshot_path = NULLIF(?2, ''), updated = ?3 WHERE id = ?1",
                  job_id, path);
}

void Queue::set_remote_path(int64_t job_id, const std::string& path) {
  std::lock_guard lock(impl_->mu);
  impl_->set_text("UPDATE jobs SET remote_path = NULLIF(?2, ''), updated = ?3 WHERE id = ?1",
                  job_id, path);
}

void Queue::finish_done(int64_t job_id, const std::string& owner, const std::string& sha256,
                        const std::string& remote_path) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);
  const Job job = impl_->held(job_id, owner);
  const Time t = impl_->now();
  db.prepare(
        "UPDATE jobs SET state = 'done', finished = ?2, updated = ?2, "
        "sha256 = NULLIF(?3, ''), remote_path = NULLIF(?4, ''), error = NULL, "
        "error_class = NULL, " LEAVE_RUNNING " WHERE id = ?1")
      .bind_all(job_id, ms(t), sha256, remote_path)
      .run();
  impl_->add_event(
      job_id, t, "done",
      fmt::format(
          "{} (sha256 {}){}", remote_path, sha256.empty() ? "-" : sha256,
          job.cancel_requested ? "; it completed before the cancel request took effect" : ""));
  tx.commit();
}

JobState Queue::finish_retry(int64_t job_id, const std::string& owner, const std::string& error,
                             const std::string& error_class, Time next_run_at) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);
  const Job job = impl_->held(job_id, owner);
  const Time t = impl_->now();
  if (impl_->cancel_if_requested(job, t, error, error_class)) {
    tx.commit();
    return JobState::Cancelled;
  }
  db.prepare(
        "UPDATE jobs SET state = 'retry_wait', next_run_at = ?3, updated = ?2, "
        "error = NULLIF(?4, ''), error_class = NULLIF(?5, ''), rate = 0, " LEAVE_RUNNING
        " WHERE id = ?1")
      .bind_all(job_id, ms(t), ms(next_run_at), error, error_class)
      .run();
  const auto wait = std::max<int64_t>(
      0, std::chrono::duration_cast<std::chrono::seconds>(next_run_at - t).count());
  impl_->add_event(job_id, t, "retry_wait",
                   fmt::format("attempt {} failed: {}; next try in {} s", job.attempt,
                               with_class(error, error_class), wait));
  tx.commit();
  return JobState::RetryWait;
}

JobState Queue::finish_failed(int64_t job_id, const std::string& owner, const std::string& error,
                              const std::string& error_class) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);
  const Job job = impl_->held(job_id, owner);
  const Time t = impl_->now();
  if (impl_->cancel_if_requested(job, t, error, error_class)) {
    tx.commit();
    return JobState::Cancelled;
  }
  db.prepare(
        "UPDATE jobs SET state = 'failed', finished = ?2, updated = ?2, "
        "error = NULLIF(?3, ''), error_class = NULLIF(?4, ''), rate = 0, " LEAVE_RUNNING
        " WHERE id = ?1")
      .bind_all(job_id, ms(t), error, error_class)
      .run();
  impl_->add_event(
      job_id, t, "failed",
      fmt::format("attempt {} failed: {}", job.attempt, with_class(error, error_class)));
  tx.commit();
  return JobState::Failed;
}

void Queue::finish_cancelled(int64_t job_id, const std::string& owner) {
  std::lock_guard lock(impl_->mu);
  Transaction tx(impl_->db);
  const Job job = impl_->held(job_id, owner);
  const Time t = impl_->now();
  impl_->cancel_now(job_id, t, "", "");
  impl_->add_event(
      job_id, t, "cancelled",
      fmt::format("stopped by {}{}", owner, job.cancel_requested ? " on cancel request" : ""));
  tx.commit();
}

CancelResult Queue::cancel(int64_t job_id) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);
  const Job job = impl_->load(job_id);
  const Time t = impl_->now();
  switch (job.state) {
    case JobState::Queued:
    case JobState::RetryWait:
      impl_->cancel_now(job_id, t, job.error, job.error_class);
      impl_->add_event(job_id, t, "cancelled",
                       fmt::format("cancelled while {}", to_string(job.state)));
      tx.commit();
      return CancelResult::Cancelled;
    case JobState::Running:
      if (job.cancel_requested) return CancelResult::Requested;
      db.prepare("UPDATE jobs SET cancel_requested = 1, updated = ?2 WHERE id = ?1")
          .bind_all(job_id, ms(t))
          .run();
      impl_->add_event(job_id, t, "cancel_requested",
                       fmt::format("{} is asked to stop", job.lease_owner));
      tx.commit();
      return CancelResult::Requested;
    case JobState::Cancelled:
      return CancelResult::AlreadyCancelled;
    case JobState::Done:
      throw Error(ErrorKind::Usage, fmt::format("job {} is already done", job_id));
    case JobState::Failed:
      throw Error(ErrorKind::Usage,
                  fmt::format("job {} has already failed (retry it, or leave it)", job_id));
  }
  throw Error(ErrorKind::Internal, fmt::format("job {}: unhandled state", job_id));
}

void Queue::retry(int64_t job_id) {
  std::lock_guard lock(impl_->mu);
  Db& db = impl_->db;
  Transaction tx(db);
  const Job job = impl_->load(job_id);
  if (job.state != JobState::Failed && job.state != JobState::Cancelled) {
    throw Error(ErrorKind::Usage,
                fmt::format("job {} is {}: only failed or cancelled jobs can be retried", job_id,
                            to_string(job.state)));
  }
  if (auto other = impl_->active_job_of(job.source)) {
    throw Error(ErrorKind::Usage,
                fmt::format("job {}: source {} already has an active job ({}); not retrying",
                            job_id, job.source, *other));
  }
  const Time t = impl_->now();
  db.prepare(
        "UPDATE jobs SET state = 'queued', attempt = 0, finished = NULL, next_run_at = NULL, "
        "error = NULL, error_class = NULL, bytes_done = 0, bytes_total = NULL, rate = 0, "
        "updated = ?2, " LEAVE_RUNNING " WHERE id = ?1")
      .bind_all(job_id, ms(t))
      .run();
  impl_->add_event(
      job_id, t, "retried",
      fmt::format("{} -> queued after {} attempt(s)", to_string(job.state), job.attempt));
  tx.commit();
}

void Queue::event(int64_t job_id, const std::string& kind, const std::string& message) {
  if (kind.empty()) throw Error(ErrorKind::Usage, "an event needs a kind");
  std::lock_guard lock(impl_->mu);
  Transaction tx(impl_->db);
  impl_->load(job_id);  // a clear "does not exist" rather than a foreign key failure
  impl_->add_event(job_id, impl_->now(), kind, message);
  tx.commit();
}

std::vector<Job> Queue::list(const JobFilter& filter) const {
  std::lock_guard lock(impl_->mu);
  auto s = impl_->db.prepare(std::string("SELECT ") + kJobColumns +
                             " FROM jobs WHERE ?1 IS NULL OR source = ?1 ORDER BY id DESC");
  s.bind_all(filter.source);
  std::vector<Job> jobs;
  while (s.step()) {
    Job job = read_job(s, impl_->db.path());
    if (!filter.states.empty() &&
        std::find(filter.states.begin(), filter.states.end(), job.state) == filter.states.end())
      continue;
    jobs.push_back(std::move(job));
    if (filter.limit != 0 && jobs.size() >= filter.limit) break;
  }
  return jobs;
}

std::optional<Job> Queue::get(int64_t job_id) const {
  std::lock_guard lock(impl_->mu);
  return impl_->find(job_id);
}

std::vector<Event> Queue::events(int64_t job_id) const {
  std::lock_guard lock(impl_->mu);
  auto s = impl_->db.prepare(
      "SELECT id, job_id, at, kind, message FROM events WHERE job_id = ?1 ORDER BY id");
  s.bind_all(job_id);
  std::vector<Event> out;
  while (s.step())
    out.push_back({s.int64(0), s.int64(1), from_ms(s.int64(2)), s.text(3), s.text(4)});
  return out;
}

std::optional<LastSuccess> Queue::last_success(const std::string& source) const {
  std::lock_guard lock(impl_->mu);
  auto s = impl_->db.prepare(
      "SELECT id, finished, remote_path, sha256 FROM jobs WHERE source = ?1 AND state = 'done' "
      "ORDER BY finished DESC, id DESC LIMIT 1");
  s.bind_all(source);
  if (!s.step()) return std::nullopt;
  return LastSuccess{s.int64(0), from_ms(s.int64(1)), s.text(2), s.text(3)};
}

std::vector<Job> Queue::active_jobs() const {
  std::lock_guard lock(impl_->mu);
  auto s = impl_->db.prepare(std::string("SELECT ") + kJobColumns +
                             " FROM jobs WHERE state IN " ACTIVE_STATES " ORDER BY created, id");
  std::vector<Job> jobs;
  while (s.step()) jobs.push_back(read_job(s, impl_->db.path()));
  return jobs;
}

std::vector<std::string> Queue::integrity_check() const {
  std::lock_guard lock(impl_->mu);
  std::vector<std::string> problems;
  {
    auto s = impl_->db.prepare("PRAGMA integrity_check");
    while (s.step()) {
      if (std::string row = s.text(0); row != "ok") problems.push_back(std::move(row));
    }
  }
  auto s = impl_->db.prepare("PRAGMA foreign_key_check");
  while (s.step()) {
    problems.push_back(
        fmt::format("{} row {} refers to a missing row of {}", s.text(0), s.int64(1), s.text(2)));
  }
  return problems;
}

}  // namespace diskferry
