#include <doctest/doctest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "queue/queue.hpp"
#include "queue/sqlite.hpp"
#include "util/error.hpp"

using namespace diskferry;
using namespace std::chrono_literals;

namespace {

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "diskferry-queue-XXXXXX").string();
    if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Wall-clock time that moves only when a test moves it: leases and retry times without sleeping.
struct FakeClock {
  Time t = Time{std::chrono::hours{24 * 20'000}};  // in 2024
  QueueOptions options(std::chrono::milliseconds busy_timeout = 5000ms) {
    return {busy_timeout, [this] { return t; }};
  }
};

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

std::vector<std::string> kinds(const Queue& q, int64_t job_id) {
  std::vector<std::string> out;
  for (const Event& e : q.events(job_id)) out.push_back(e.kind);
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

int64_t query_int(sqlite::Db& db, const char* sql) {
  auto s = db.prepare(sql);
  REQUIRE(s.step());
  return s.int64(0);
}

std::string query_text(sqlite::Db& db, const char* sql) {
  auto s = db.prepare(sql);
  REQUIRE(s.step());
  return s.text(0);
}

}  // namespace

TEST_CASE("queue: a new database gets the current schema, in WAL mode") {
  TempDir dir;
  const std::string path = dir.file("diskferry.db");
  {
    Queue q(path);
    CHECK(q.path() == path);
    CHECK(q.list().empty());
    CHECK(q.integrity_check().empty());
  }
  sqlite::Db raw(path, 1000ms);
  CHECK(query_int(raw, "PRAGMA user_version") == 1);
  CHECK(query_int(raw, "PRAGMA application_id") == 0x44467279);
  CHECK(query_text(raw, "PRAGMA journal_mode") == "wal");
  CHECK(query_int(raw, "SELECT count(*) FROM sqlite_schema WHERE name IN ('jobs', 'events')") == 2);

  // An empty file is an empty database (what `touch` or a provisioning tool leaves).
  const std::string empty = dir.file("empty.db");
  spit(empty, "");
  Queue q(empty);
  CHECK(q.enqueue("vm").created);

  CHECK(default_db_path("/var/lib/diskferry") == "/var/lib/diskferry/diskferry.db");
  CHECK(default_db_path("/var/lib/diskferry/") == "/var/lib/diskferry/diskferry.db");
}

TEST_CASE("queue: reopening keeps jobs, their progress and events") {
  TempDir dir;
  const std::string path = dir.file("diskferry.db");
  FakeClock clock;
  int64_t id = 0;
  {
    Queue q(path, clock.options());
    id = q.enqueue("web01").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    q.progress(id, 100, 1000, 10);
    q.set_snapshot(id, "/var/lib/diskferry/snap/web01");
    q.set_remote_path(id, "/backups/web01.qcow2");
  }
  Queue q(path, clock.options());
  const auto job = q.get(id);
  REQUIRE(job);
  CHECK(job->source == "web01");
  CHECK(job->state == JobState::Running);
  CHECK(job->attempt == 1);
  CHECK(job->lease_owner == "w1");
  CHECK(job->lease_until == clock.t + 60s);
  CHECK(job->bytes_done == 100);
  CHECK(job->bytes_total == 1000);
  CHECK(job->rate == 10);
  CHECK(job->snapshot_path == "/var/lib/diskferry/snap/web01");
  CHECK(job->remote_path == "/backups/web01.qcow2");
  CHECK(job->created == clock.t);
  CHECK(kinds(q, id) == std::vector<std::string>{"enqueued", "claimed"});
  CHECK(!q.get(id + 1));
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: enqueue returns the active job of a source instead of a second one") {
  TempDir dir;
  const std::string path = dir.file("diskferry.db");
  FakeClock clock;
  Queue q(path, clock.options());

  const auto first = q.enqueue("a");
  CHECK(first.created);
  CHECK(first.job.state == JobState::Queued);
  CHECK(first.job.attempt == 0);
  auto again = q.enqueue("a");
  CHECK(!again.created);
  CHECK(again.job.id == first.job.id);

  REQUIRE(q.claim("w1", 60s, clock.t));
  again = q.enqueue("a");  // running
  CHECK(!again.created);
  CHECK(again.job.id == first.job.id);
  CHECK(again.job.state == JobState::Running);

  CHECK(q.finish_retry(first.job.id, "w1", "timeout", "transient", clock.t + 10s) ==
        JobState::RetryWait);
  again = q.enqueue("a");  // retry_wait
  CHECK(!again.created);
  CHECK(again.job.id == first.job.id);

  // A second connection (what another process has) sees the same job.
  Queue other(path, clock.options());
  again = other.enqueue("a");
  CHECK(!again.created);
  CHECK(again.job.id == first.job.id);

  clock.t += 10s;
  REQUIRE(q.claim("w1", 60s, clock.t));
  q.finish_done(first.job.id, "w1", "00ff", "/r/a.qcow2");
  const auto next = other.enqueue("a");  // only done jobs left: a new one
  CHECK(next.created);
  CHECK(next.job.id != first.job.id);
  CHECK(q.list(JobFilter{"a", {}, 0}).size() == 2);
  CHECK(q.active_jobs().size() == 1);
  CHECK(error_of([&] { q.enqueue(""); }) == "cannot enqueue a job without a source");
}

TEST_CASE("queue: two connections enqueueing the same sources from two threads make one job each") {
  TempDir dir;
  const std::string path = dir.file("diskferry.db");
  { Queue init(path); }
  constexpr int kSources = 100;
  std::atomic<int> created{0};
  auto run = [&] {
    Queue q(path);  // its own connection, as a second process would have
    for (int i = 0; i < kSources; ++i) {
      if (q.enqueue("vm" + std::to_string(i)).created) ++created;
    }
  };
  std::thread a(run), b(run);
  a.join();
  b.join();
  Queue q(path);
  CHECK(created.load() == kSources);
  CHECK(q.list().size() == kSources);
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: a forked process enqueueing concurrently with its parent: one job per source") {
  TempDir dir;
  const std::string path = dir.file("diskferry.db");
  // Created before the fork, and closed: an SQLite connection must never cross a fork (the child
  // would inherit lock state it does not own).
  { Queue init(path); }
  constexpr int kSources = 200;
  auto enqueue_all = [&path] {
    Queue q(path);
    int created = 0;
    for (int i = 0; i < kSources; ++i) {
      if (q.enqueue("vm" + std::to_string(i)).created) ++created;
    }
    return created;
  };

  int go[2], result[2];
  REQUIRE(pipe(go) == 0);
  REQUIRE(pipe(result) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int created = -1;
    char c = 0;
    try {
      if (read(go[0], &c, 1) == 1) created = enqueue_all();
    } catch (...) {
      created = -1;
    }
    const bool sent = write(result[1], &created, sizeof created) == ssize_t{sizeof created};
    _exit(sent ? 0 : 1);  // no doctest reporting, no atexit handlers in the child
  }
  REQUIRE(write(go[1], "g", 1) == 1);
  const int parent_created = enqueue_all();
  int child_created = -2;
  CHECK(read(result[0], &child_created, sizeof child_created) == ssize_t{sizeof child_created});
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  for (int fd : {go[0], go[1], result[0], result[1]}) close(fd);

  CHECK(child_created >= 0);
  CHECK(parent_created + child_created == kSources);
  Queue q(path);
  const auto jobs = q.list();
  CHECK(jobs.size() == kSources);
  std::set<std::string> sources;
  for (const Job& j : jobs) sources.insert(j.source);
  CHECK(sources.size() == kSources);
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: claim takes the oldest runnable job, never a busy source") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());
  const int64_t a = q.enqueue("a").job.id;
  clock.t += 1s;
  const int64_t b = q.enqueue("b").job.id;
  clock.t += 1s;
  const int64_t c = q.enqueue("c").job.id;

  const auto j1 = q.claim("w1", 60s, clock.t);
  REQUIRE(j1);
  CHECK(j1->id == a);
  CHECK(j1->state == JobState::Running);
  CHECK(j1->attempt == 1);
  CHECK(j1->lease_owner == "w1");
  CHECK(j1->lease_until == clock.t + 60s);

  const auto j2 = q.claim("w2", 60s, clock.t, {"b"});  // the caller knows b's disk is busy
  REQUIRE(j2);
  CHECK(j2->id == c);
  CHECK(!q.claim("w3", 60s, clock.t, {"b"}));
  const auto j3 = q.claim("w3", 60s, clock.t);
  REQUIRE(j3);
  CHECK(j3->id == b);

  // Every source is running with a live lease; a new request for one is that same job.
  CHECK(!q.claim("w4", 60s, clock.t));
  CHECK(q.enqueue("a").job.id == a);
  CHECK(!q.claim("w4", 60s, clock.t + 59s));

  const auto active = q.active_jobs();
  REQUIRE(active.size() == 3);
  CHECK(active[0].id == a);
  CHECK(active[1].id == b);
  CHECK(active[2].id == c);
  CHECK(error_of([&] { (void)q.claim("", 60s, clock.t); }) ==
        "cannot claim a job without an owner name");
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: an expired lease is resumed by another worker; the old owner cannot finish") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());
  const int64_t id = q.enqueue("a").job.id;
  const Time t0 = clock.t;
  REQUIRE(q.claim("w1", 60s, t0));

  CHECK(!q.claim("w2", 60s, t0 + 59s));
  CHECK(q.renew(id, "w1", t0 + 90s));
  CHECK(!q.claim("w2", 60s, t0 + 89s));

  clock.t = t0 + 90s;  // w1 stopped renewing (crashed, or hung)
  const auto resumed = q.claim("w2", 60s, clock.t);
  REQUIRE(resumed);
  CHECK(resumed->id == id);
  CHECK(resumed->attempt == 2);
  CHECK(resumed->lease_owner == "w2");
  const auto log = q.events(id);
  REQUIRE(!log.empty());
  CHECK(log.back().kind == "resumed");
  CHECK(contains(log.back().message, "lease expired, resumed"));
  CHECK(contains(log.back().message, "w1"));

  CHECK(!q.renew(id, "w1", clock.t + 60s));
  CHECK_THROWS_AS(q.finish_done(id, "w1", "aa", "/r/a"), LeaseLost);
  CHECK_THROWS_AS(q.finish_retry(id, "w1", "e", "", clock.t), LeaseLost);
  CHECK_THROWS_AS(q.finish_failed(id, "w1", "e", ""), LeaseLost);
  CHECK_THROWS_AS(q.finish_cancelled(id, "w1"), LeaseLost);
  CHECK(contains(error_of([&] { q.finish_done(id, "w1", "aa", "/r/a"); }),
                 "job " + std::to_string(id) +
                     ": lease lost: the lease of w1 expired and w2 took "
                     "over"));
  CHECK(q.get(id)->state == JobState::Running);

  clock.t += 5s;
  q.finish_done(id, "w2", "abcd", "/r/a.qcow2");
  const auto done = q.get(id);
  CHECK(done->state == JobState::Done);
  CHECK(done->lease_owner.empty());
  CHECK(!done->lease_until);
  CHECK(done->finished == clock.t);
  CHECK(done->sha256 == "abcd");
  CHECK(contains(error_of([&] { q.finish_done(id, "w2", "abcd", "/r/a.qcow2"); }), "is done now"));

  const auto last = q.last_success("a");
  REQUIRE(last);
  CHECK(last->job_id == id);
  CHECK(last->at == clock.t);
  CHECK(last->remote_path == "/r/a.qcow2");
  CHECK(last->sha256 == "abcd");
  CHECK(!q.last_success("b"));

  // An expired lease nobody took is still the owner's: its work is not thrown away.
  const int64_t b = q.enqueue("b").job.id;
  REQUIRE(q.claim("w1", 60s, clock.t));
  clock.t += 10min;
  CHECK(q.renew(b, "w1", clock.t + 60s));
  q.finish_done(b, "w1", "ef", "/r/b.qcow2");
  CHECK(q.get(b)->state == JobState::Done);
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: retry_wait runs again only from next_run_at; retry requeues a failed job") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());
  const int64_t id = q.enqueue("a").job.id;
  const Time t0 = clock.t;
  REQUIRE(q.claim("w1", 60s, t0));
  q.progress(id, 500, std::nullopt, 100);
  CHECK(q.finish_retry(id, "w1", "connection reset", "transient", t0 + 300s) ==
        JobState::RetryWait);

  auto job = q.get(id);
  CHECK(job->state == JobState::RetryWait);
  CHECK(job->next_run_at == t0 + 300s);
  CHECK(job->error == "connection reset");
  CHECK(job->error_class == "transient");
  CHECK(job->lease_owner.empty());
  CHECK(!job->bytes_total);
  CHECK(contains(q.events(id).back().message,
                 "attempt 1 failed: (transient) connection reset; next try in 300 s"));

  CHECK(!q.claim("w2", 60s, t0 + 299s));
  const auto again = q.claim("w2", 60s, t0 + 300s);
  REQUIRE(again);
  CHECK(again->id == id);
  CHECK(again->attempt == 2);
  CHECK(!again->next_run_at);
  CHECK(again->error == "connection reset");  // the last error stays visible while it runs

  CHECK(q.finish_failed(id, "w2", "permission denied", "auth") == JobState::Failed);
  job = q.get(id);
  CHECK(job->state == JobState::Failed);
  CHECK(job->finished == clock.t);
  CHECK(job->error == "permission denied");
  CHECK(!q.claim("w2", 60s, t0 + 1h));

  q.retry(id);
  job = q.get(id);
  CHECK(job->state == JobState::Queued);
  CHECK(job->attempt == 0);
  CHECK(job->error.empty());
  CHECK(!job->finished);
  const auto third = q.claim("w3", 60s, t0 + 1h);
  REQUIRE(third);
  CHECK(third->attempt == 1);
  CHECK(contains(error_of([&] { q.retry(id); }),
                 "is running: only failed or cancelled jobs can be retried"));
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: cancel") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());

  SUBCASE("a queued job is cancelled at once") {
    const int64_t id = q.enqueue("a").job.id;
    CHECK(q.cancel(id) == CancelResult::Cancelled);
    CHECK(q.get(id)->state == JobState::Cancelled);
    CHECK(q.get(id)->finished == clock.t);
    CHECK(!q.claim("w1", 60s, clock.t));
    CHECK(q.cancel(id) == CancelResult::AlreadyCancelled);
    CHECK(kinds(q, id) == std::vector<std::string>{"enqueued", "cancelled"});
    // Retried unless the source has a newer active job.
    const int64_t newer = q.enqueue("a").job.id;
    CHECK(contains(error_of([&] { q.retry(id); }),
                   "source a already has an active job (" + std::to_string(newer) + ")"));
    CHECK(q.cancel(newer) == CancelResult::Cancelled);
    q.retry(id);
    CHECK(q.get(id)->state == JobState::Queued);
  }

  SUBCASE("a job waiting to retry is cancelled at once") {
    const int64_t id = q.enqueue("a").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    (void)q.finish_retry(id, "w1", "timeout", "transient", clock.t + 1h);
    CHECK(q.cancel(id) == CancelResult::Cancelled);
    CHECK(q.get(id)->state == JobState::Cancelled);
    CHECK(!q.get(id)->next_run_at);
    CHECK(!q.claim("w1", 60s, clock.t + 2h));
  }

  SUBCASE("a running job is asked to stop, through renew") {
    const int64_t id = q.enqueue("a").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    CHECK(q.cancel(id) == CancelResult::Requested);
    CHECK(q.cancel(id) == CancelResult::Requested);
    CHECK(q.get(id)->state == JobState::Running);
    CHECK(q.get(id)->cancel_requested);
    CHECK(!q.renew(id, "w1", clock.t + 60s));
    q.finish_cancelled(id, "w1");
    CHECK(q.get(id)->state == JobState::Cancelled);
    CHECK(!q.get(id)->cancel_requested);
    CHECK(kinds(q, id) ==
          std::vector<std::string>{"enqueued", "claimed", "cancel_requested", "cancelled"});
  }

  SUBCASE("a worker failing after a cancel request cancels the job instead") {
    const int64_t id = q.enqueue("a").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    CHECK(q.cancel(id) == CancelResult::Requested);
    CHECK(q.finish_retry(id, "w1", "interrupted", "", clock.t + 1min) == JobState::Cancelled);
    CHECK(q.get(id)->state == JobState::Cancelled);
    CHECK(q.get(id)->error == "interrupted");
  }

  SUBCASE("a cancel request whose worker died ends cancelled, not resumed") {
    const int64_t id = q.enqueue("a").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    CHECK(q.cancel(id) == CancelResult::Requested);
    CHECK(!q.claim("w2", 60s, clock.t + 60s));
    CHECK(q.get(id)->state == JobState::Cancelled);
    CHECK(contains(q.events(id).back().message, "lease of w1 expired"));
  }

  SUBCASE("finished jobs cannot be cancelled") {
    const int64_t done = q.enqueue("a").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    q.finish_done(done, "w1", "ab", "/r/a");
    CHECK(error_of([&] { q.cancel(done); }) == "job " + std::to_string(done) + " is already done");
    const int64_t failed = q.enqueue("b").job.id;
    REQUIRE(q.claim("w1", 60s, clock.t));
    (void)q.finish_failed(failed, "w1", "bad", "input");
    CHECK(contains(error_of([&] { q.cancel(failed); }), "has already failed"));
    CHECK(error_of([&] { q.cancel(999); }) == "job 999 does not exist");
    try {
      q.cancel(999);
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::Usage);
    }
  }
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: every transition writes an event, stamped with the time") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());
  const Time t0 = clock.t;
  const int64_t id = q.enqueue("a").job.id;
  REQUIRE(q.claim("w1", 60s, t0 + 1s));
  clock.t = t0 + 2s;
  (void)q.finish_retry(id, "w1", "timeout", "transient", t0 + 10s);
  REQUIRE(q.claim("w1", 60s, t0 + 10s));
  REQUIRE(q.claim("w2", 60s, t0 + 70s));  // w1's lease ran out
  clock.t = t0 + 80s;
  q.event(id, "hook", "post-snapshot hook: ok");
  q.progress(id, 1, 2, 3);  // no event
  clock.t = t0 + 90s;
  q.finish_done(id, "w2", "ff", "/r/a");

  const auto log = q.events(id);
  std::vector<std::string> seen;
  for (const auto& e : log) seen.push_back(e.kind);
  CHECK(seen == std::vector<std::string>{"enqueued", "claimed", "retry_wait", "claimed", "resumed",
                                         "hook", "done"});
  REQUIRE(log.size() == 7);
  CHECK(log[0].at == t0);
  CHECK(log[1].at == t0 + 1s);
  CHECK(log[2].at == t0 + 2s);
  CHECK(log[4].at == t0 + 70s);
  CHECK(log[5].message == "post-snapshot hook: ok");
  CHECK(log[6].at == t0 + 90s);
  CHECK(contains(log[6].message, "/r/a"));
  for (const auto& e : log) CHECK(e.job_id == id);
  CHECK(error_of([&] { q.event(42, "hook", "x"); }) == "job 42 does not exist");
}

TEST_CASE("queue: list filters by source and state, newest first") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());
  const int64_t a1 = q.enqueue("a").job.id;
  REQUIRE(q.claim("w", 60s, clock.t));
  q.finish_done(a1, "w", "1", "/r/1");
  const int64_t a2 = q.enqueue("a").job.id;
  const int64_t b1 = q.enqueue("b").job.id;

  auto ids = [&](const JobFilter& f) {
    std::vector<int64_t> out;
    for (const Job& j : q.list(f)) out.push_back(j.id);
    return out;
  };
  CHECK(ids({}) == std::vector<int64_t>{b1, a2, a1});
  CHECK(ids({"a", {}, 0}) == std::vector<int64_t>{a2, a1});
  CHECK(ids({std::nullopt, {JobState::Queued}, 0}) == std::vector<int64_t>{b1, a2});
  CHECK(ids({std::nullopt, {JobState::Done, JobState::Failed}, 0}) == std::vector<int64_t>{a1});
  CHECK(ids({std::nullopt, {}, 1}) == std::vector<int64_t>{b1});
}

TEST_CASE("queue: worker threads sharing one Queue run every job exactly once") {
  TempDir dir;
  FakeClock clock;
  Queue q(dir.file("diskferry.db"), clock.options());
  constexpr int kJobs = 60;
  for (int i = 0; i < kJobs; ++i) q.enqueue("vm" + std::to_string(i));
  std::mutex mu;
  std::vector<int64_t> finished;
  auto worker = [&](std::string owner) {
    while (auto job = q.claim(owner, 60s, clock.t)) {
      q.progress(job->id, 10, 10, 1);
      if (!q.renew(job->id, owner, clock.t + 60s)) break;
      q.finish_done(job->id, owner, "00", "/r/" + job->source);
      std::lock_guard lock(mu);
      finished.push_back(job->id);
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back(worker, "w" + std::to_string(i));
  for (auto& t : threads) t.join();
  CHECK(finished.size() == kJobs);
  CHECK(std::set<int64_t>(finished.begin(), finished.end()).size() == kJobs);
  for (int64_t id : finished) {
    CHECK(kinds(q, id) == std::vector<std::string>{"enqueued", "claimed", "done"});
  }
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: a database locked by another process gives a clear error, and readers go on") {
  TempDir dir;
  const std::string path = dir.file("diskferry.db");
  Queue q(path, QueueOptions{200ms, {}});
  q.enqueue("a");

  sqlite::Db other(path, 1000ms);
  other.exec("BEGIN EXCLUSIVE");
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  bool transient = false;
  try {
    q.enqueue("b");
  } catch (const sqlite::DbError& e) {
    message = e.what();
    transient = e.transient();
  }
  const auto waited = std::chrono::steady_clock::now() - start;
  CHECK(message == path +
                       ": the database is locked by another process (gave up after waiting "
                       "200 ms)");
  CHECK(transient);
  CHECK(waited >= 150ms);
  // WAL: reading (the CLI's list, a second process opening the file) never waits for a writer.
  CHECK(q.list().size() == 1);
  Queue reader(path, QueueOptions{200ms, {}});
  CHECK(reader.active_jobs().size() == 1);

  other.exec("ROLLBACK");
  CHECK(q.enqueue("b").created);
  CHECK(q.integrity_check().empty());
}

TEST_CASE("queue: files that are not a usable diskferry database are refused, untouched") {
  TempDir dir;

  SUBCASE("garbage") {
    const std::string path = dir.file("garbage.db");
    std::string junk;
    for (int i = 0; i < 300; ++i) junk += "this is not an SQLite database. ";
    spit(path, junk);
    const std::string message = error_of([&] { Queue q(path); });
    CHECK(contains(message,
                   path + ": not a valid SQLite database, or corrupt: file is not a database"));
    CHECK(slurp(path) == junk);
    CHECK(!std::filesystem::exists(path + "-wal"));
  }

  SUBCASE("another program's SQLite database") {
    const std::string path = dir.file("photos.db");
    {
      sqlite::Db db(path, 1000ms);
      db.exec("CREATE TABLE photos (name TEXT)");
    }
    const std::string before = slurp(path);
    const std::string message = error_of([&] { Queue q(path); });
    CHECK(contains(message, path + ": not a diskferry database"));
    CHECK(contains(message, "not touching it"));
    CHECK(slurp(path) == before);
    sqlite::Db db(path, 1000ms);
    CHECK(query_text(db, "PRAGMA journal_mode") == "delete");
  }

  SUBCASE("a newer schema") {
    const std::string path = dir.file("diskferry.db");
    { Queue q(path); }
    {
      sqlite::Db db(path, 1000ms);
      db.exec("PRAGMA user_version = 7");
    }
    const std::string message = error_of([&] { Queue q(path); });
    CHECK(contains(message, path + ": schema version 7 is newer than this diskferry knows"));
    try {
      Queue q(path);
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::Input);
    }
  }

  SUBCASE("corrupt pages") {
    const std::string path = dir.file("diskferry.db");
    {
      Queue q(path);
      for (int i = 0; i < 200; ++i) q.enqueue("vm" + std::to_string(i));
    }
    std::string bytes = slurp(path);
    REQUIRE(bytes.size() > 3 * 4096);
    for (size_t i = 4096; i < bytes.size(); ++i) bytes[i] = '\x5a';  // all but the first page
    spit(path, bytes);
    const std::string message = error_of([&] {
      Queue q(path);
      q.list();
    });
    CHECK(contains(message, path + ": not a valid SQLite database, or corrupt"));
  }

  SUBCASE("a missing state directory is made, owner-only") {
    const std::string path = dir.file("missing/state/diskferry.db");
    {
      Queue q(path);
      q.enqueue("vm");
    }
    struct stat st {};
    REQUIRE(::stat(dir.file("missing/state").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0700);
    CHECK(Queue(path).list().size() == 1);
  }

  SUBCASE("a state directory that cannot be made") {
    spit(dir.file("afile"), "x");
    const std::string path = dir.file("afile/state/diskferry.db");
    const std::string message = error_of([&] { Queue q(path); });
    CHECK(contains(message, dir.file("afile/state") + ": cannot create the state directory"));
  }
}
