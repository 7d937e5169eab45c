#include <doctest/doctest.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "config/config.hpp"
#include "job/metrics.hpp"
#include "job/notify.hpp"
#include "queue/queue.hpp"
#include "util/error.hpp"

using namespace diskferry;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/df-metrics-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

Time at_seconds(int64_t s) {
  return Time(std::chrono::milliseconds(s * 1000));
}

JobReport report(JobState state, int attempt, int64_t ended) {
  JobReport r;
  r.job_id = 7;
  r.source = "web01";
  r.remote = "box";
  r.state = state;
  r.attempt = attempt;
  r.ended = at_seconds(ended);
  r.duration = std::chrono::milliseconds(12500);
  r.bytes_sent = 1000;
  r.remote_reached = true;
  if (state == JobState::Done) {
    r.bytes_on_remote = 4096;
    r.sha256 = std::string(64, 'a');
  }
  return r;
}

bool has_line(const std::string& text, const std::string& line) {
  return ("\n" + text).find("\n" + line + "\n") != std::string::npos;
}

}  // namespace

TEST_CASE("metrics: the text format node_exporter reads, with HELP and TYPE") {
  Metrics m;
  apply_report(m, report(JobState::Done, 2, 1700000000));
  m.remotes["other"] = RemoteMetrics{};
  std::string t = render_metrics(m);
  CHECK(has_line(t, "# TYPE diskferry_source_last_success_timestamp_seconds gauge"));
  CHECK(
      has_line(t, "diskferry_source_last_success_timestamp_seconds{source=\"web01\"} 1700000000"));
  CHECK(has_line(t, "diskferry_source_last_duration_seconds{source=\"web01\"} 12.5"));
  CHECK(has_line(t, "diskferry_source_last_sent_bytes{source=\"web01\"} 1000"));
  CHECK(has_line(t, "diskferry_source_remote_bytes{source=\"web01\"} 4096"));
  CHECK(has_line(t, "diskferry_source_last_attempts{source=\"web01\"} 2"));
  CHECK(has_line(t, "diskferry_source_last_ok{source=\"web01\"} 1"));
  CHECK(has_line(t, "# TYPE diskferry_source_failures_total counter"));
  CHECK(has_line(t, "diskferry_source_failures_total{source=\"web01\"} 0"));
  CHECK(has_line(t, "diskferry_remote_up{remote=\"box\"} 1"));
  CHECK(has_line(t, "diskferry_remote_up{remote=\"other\"} 0"));
  // Every sample line is NAME{LABEL="VALUE"} NUMBER, and each family has HELP and TYPE once.
  std::istringstream lines(t);
  std::string line;
  int help = 0, type = 0, samples = 0;
  while (std::getline(lines, line)) {
    if (line.rfind("# HELP ", 0) == 0)
      ++help;
    else if (line.rfind("# TYPE ", 0) == 0)
      ++type;
    else
      ++samples;
  }
  CHECK(help == 11);
  CHECK(type == 11);
  CHECK(samples == 9 + 2 * 2);
  CHECK(t.back() == '\n');
}

TEST_CASE("metrics: read back, counters carry on; failures and successes counted per job end") {
  Metrics m;
  apply_report(m, report(JobState::Done, 1, 1700000000));
  apply_report(m, report(JobState::RetryWait, 1, 1700086400));  // not an end: no count
  Metrics back = parse_metrics(render_metrics(m));
  CHECK(render_metrics(back) == render_metrics(m));
  JobReport f = report(JobState::Failed, 3, 1700090000);
  f.remote_reached = false;
  apply_report(back, f);
  apply_report(back, report(JobState::Running, 1, 1700090001));  // lease lost: nothing
  const SourceMetrics& s = back.sources.at("web01");
  CHECK(s.failures_total == 1);
  CHECK(s.successes_total == 1);
  CHECK(s.last_ok == 0);
  CHECK(s.last_attempts == 3);
  CHECK(s.last_success == 1700000000);  // the success before, still
  CHECK(s.bytes_on_remote == 4096);     // the newest published backup is still that one
  CHECK(s.last_end == 1700090000);
  CHECK(back.remotes.at("box").up == 0);
  CHECK(back.remotes.at("box").last_check == 1700090000);
  // A failure before the remote was tried says nothing about it.
  JobReport cfg = report(JobState::Failed, 1, 1700090100);
  cfg.remote_reached.reset();
  apply_report(back, cfg);
  CHECK(back.remotes.at("box").last_check == 1700090000);
  // Foreign or damaged lines are skipped, the rest is read.
  Metrics d = parse_metrics(
      "garbage\nother_metric{source=\"web01\"} 5\ndiskferry_source_failures_total{source=\"x\"} "
      "abc\ndiskferry_source_failures_total{source=\"web01\"} 4\n");
  CHECK(d.sources.size() == 1);
  CHECK(d.sources.at("web01").failures_total == 4);
}

TEST_CASE("metrics: label values are escaped and read back") {
  Metrics m;
  m.sources["a\"b\\c"].failures_total = 3;
  std::string t = render_metrics(m);
  CHECK(t.find("{source=\"a\\\"b\\\\c\"} 3") != std::string::npos);
  CHECK(parse_metrics(t).sources.at("a\"b\\c").failures_total == 3);
}

TEST_CASE("metrics: the file is replaced atomically, no temporary file left") {
  TempDir dir;
  std::string d = dir.path.string();
  write_file_atomically(d, "x.prom", "one\n");
  // A reader holding the old file keeps reading it whole while the new one replaces it.
  int old_fd = ::open((dir.path / "x.prom").c_str(), O_RDONLY);
  REQUIRE(old_fd >= 0);
  struct stat before {};
  ::fstat(old_fd, &before);
  write_file_atomically(d, "x.prom", "two\n");
  char buf[16] = {};
  CHECK(::pread(old_fd, buf, sizeof buf, 0) == 4);
  CHECK(std::string(buf) == "one\n");
  ::close(old_fd);
  struct stat after {};
  REQUIRE(::stat((dir.path / "x.prom").c_str(), &after) == 0);
  CHECK(after.st_ino != before.st_ino);  // a new file renamed over, not rewritten in place
  CHECK((after.st_mode & 07777) == 0644);
  CHECK(slurp(dir.path / "x.prom") == "two\n");
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
  // A directory that cannot be written: an error naming the file, nothing left.
  CHECK_THROWS_WITH_AS(write_file_atomically(d + "/missing", "x.prom", "x"),
                       doctest::Contains("missing/x.prom"), Error);
}

TEST_CASE("metrics: update_metrics lists every configured source, last success from the queue") {
  TempDir dir;
  fs::create_directory(dir.path / "prom");
  Config c = parse_config(
      "metrics_dir: prom\nremotes:\n  box: {url: \"sftp://u@h/x\"}\n  spare: {url: "
      "\"sftp://u@h/y\"}\nsources:\n  web01: {path: /a.img, remote: box}\n  db01: {path: "
      "/b.img, remote: box}\n",
      "/x.yaml", dir.path.string());
  Queue q((dir.path / "q.db").string());
  auto prom = dir.path / "prom" / "diskferry.prom";
  update_metrics(c, q, nullptr);
  std::string t = slurp(prom);
  CHECK(has_line(t, "diskferry_source_last_success_timestamp_seconds{source=\"db01\"} 0"));
  CHECK(has_line(t, "diskferry_source_last_success_timestamp_seconds{source=\"web01\"} 0"));
  CHECK(has_line(t, "diskferry_remote_up{remote=\"spare\"} 0"));

  // A job done in the queue: its finish time, to the millisecond.
  auto j = q.enqueue("web01").job;
  auto claimed = q.claim("me", std::chrono::seconds(60), at_seconds(1));
  REQUIRE(claimed);
  q.finish_done(j.id, "me", std::string(64, 'b'), "web01/x.qcow2");
  double finished = static_cast<double>(q.last_success("web01")->at.time_since_epoch().count());
  JobReport r = report(JobState::Failed, 1, 1700000000);
  r.source = "db01";
  update_metrics(c, q, &r);
  update_metrics(c, q, &r);
  t = slurp(prom);
  CHECK(has_line(t, "diskferry_source_failures_total{source=\"db01\"} 2"));
  CHECK(t.find(fmt::format("diskferry_source_last_success_timestamp_seconds{{source=\"web01\"}} {}",
                           finished / 1000)) != std::string::npos);
  // A source removed from the configuration is dropped from the file.
  c.sources.erase("db01");
  update_metrics(c, q, nullptr);
  CHECK(slurp(prom).find("db01") == std::string::npos);
  // No metrics_dir: nothing is written anywhere.
  c.metrics_dir.clear();
  update_metrics(c, q, &r);
}

TEST_CASE("notify: the right command for the end, the job's facts in the environment") {
  TempDir dir;
  std::string out = (dir.path / "env").string();
  Notify n;
  n.on_success = "env | grep ^DISKFERRY_ | sort > " + out + "; echo sent";
  n.on_failure = "echo failed: \"$DISKFERRY_ERROR\" > " + out + "; exit 3";
  JobReport r = report(JobState::Done, 2, 1700000000);
  r.remote_path = "web01/web01-x.qcow2";
  r.url = "sftp://u@h/x/web01/web01-x.qcow2";
  auto o = run_notify(n, r);
  REQUIRE(o);
  CHECK(o->ok);
  CHECK(o->message == "on_success hook \"" + n.on_success + "\" ok: sent");
  std::string env = slurp(out);
  for (const char* want : {"DISKFERRY_EVENT=success", "DISKFERRY_STATE=done",
                           "DISKFERRY_SOURCE=web01", "DISKFERRY_JOB_ID=7", "DISKFERRY_ATTEMPTS=2",
                           "DISKFERRY_REMOTE=box", "DISKFERRY_REMOTE_PATH=web01/web01-x.qcow2",
                           "DISKFERRY_DURATION=13", "DISKFERRY_BYTES=4096", "DISKFERRY_ERROR="})
    CHECK_MESSAGE(has_line(env, want), want, "\n", env);
  CHECK(has_line(env, "DISKFERRY_SHA256=" + std::string(64, 'a')));

  JobReport f = report(JobState::Failed, 5, 1700000000);
  f.error = "connection refused";
  o = run_notify(n, f);
  REQUIRE(o);
  CHECK(!o->ok);
  CHECK(o->message.find("on_failure hook") == 0);
  CHECK(o->message.find("exited with status 3") != std::string::npos);
  CHECK(slurp(out) == "failed: connection refused\n");
  // Nothing for other states, or without a command.
  CHECK(!run_notify(n, report(JobState::RetryWait, 1, 1)));
  CHECK(!run_notify(n, report(JobState::Cancelled, 1, 1)));
  CHECK(!run_notify(Notify{}, r));
  // A command that hangs is stopped after the timeout and reported.
  Notify slow;
  slow.on_failure = "sleep 30";
  slow.timeout = std::chrono::seconds(1);
  o = run_notify(slow, f);
  REQUIRE(o);
  CHECK(!o->ok);
  CHECK(o->message.find("did not finish within 1 s") != std::string::npos);
}
