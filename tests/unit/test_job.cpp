#include <doctest/doctest.h>

#include <set>

#include "job/job.hpp"

using namespace diskferry;
using std::chrono::milliseconds;
using std::chrono::seconds;

TEST_CASE("retry_backoff: doubles from the minimum, capped at the maximum, jittered") {
  Retries r;
  r.backoff_min = seconds(30);
  r.backoff_max = seconds(30 * 60);
  // The first retry waits the minimum (the jitter never goes below it).
  for (int i = 0; i < 50; ++i) CHECK(retry_backoff(r, 1) == milliseconds(30000));
  // Attempt n: within [d/2, d] for d = min * 2^(n-1), and never below the minimum.
  for (int attempt = 2; attempt <= 6; ++attempt) {
    milliseconds d = std::min(milliseconds(30000 << (attempt - 1)), milliseconds(1800000));
    std::set<int64_t> seen;
    for (int i = 0; i < 200; ++i) {
      milliseconds w = retry_backoff(r, attempt);
      CHECK(w >= std::max(milliseconds(30000), d / 2));
      CHECK(w <= d);
      seen.insert(w.count());
    }
    CHECK(seen.size() > 100);  // jobs that failed together do not retry together
  }
  // Far past the cap: within the upper half of the maximum.
  for (int i = 0; i < 100; ++i) {
    milliseconds w = retry_backoff(r, 40);
    CHECK(w >= milliseconds(900000));
    CHECK(w <= milliseconds(1800000));
  }
}

TEST_CASE("retry_backoff: a fixed range (min == max) always waits that long") {
  Retries r;
  r.backoff_min = r.backoff_max = seconds(5);
  for (int attempt = 1; attempt < 10; ++attempt) CHECK(retry_backoff(r, attempt) == seconds(5));
}

TEST_CASE("backup_url: the relative name below the remote's directory") {
  RemoteConf rem;
  rem.url = sftp::parse_url("sftp://u@h:23/~/backups/");
  sftp::Url u = backup_url(rem, "web01/web01-1.qcow2");
  CHECK(u.remote_path() ==
        sftp::parse_url("sftp://u@h:23/~/backups/web01/web01-1.qcow2").remote_path());
  CHECK(u.port == 23);
}
