// What one attempt of a job did, as told to metrics (metrics.hpp) and notify commands
// (notify.hpp) once it has ended. run_job fills it in as the attempt goes.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "queue/queue.hpp"

namespace diskferry {

struct JobReport {
  int64_t job_id = 0;
  std::string source, remote;  // names from the configuration
  JobState state = JobState::Running;
  int attempt = 0;  // this one's number: the job's attempts so far
  Time ended;
  std::chrono::milliseconds duration{0};  // how long this attempt ran
  uint64_t bytes_sent = 0;                // to the remote, in this attempt
  uint64_t bytes_on_remote = 0;           // the published file (done only; 0 when not known)
  std::string remote_path, url, sha256, error, error_class;
  // Whether this attempt connected to the remote (logged in, SFTP up); unknown when it ended
  // before trying.
  std::optional<bool> remote_reached;
};

}  // namespace diskferry
