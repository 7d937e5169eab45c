// Prometheus metrics for node_exporter's textfile collector: STATE in one file,
// METRICS_DIR/diskferry.prom, replaced atomically (written beside it, then renamed) after every
// attempt, so a scrape never sees half a file. The file is also the memory of the counters
// (failures_total): each update reads it back first, so they survive daemon restarts; several
// daemons on one host serialise their updates with an flock on the directory.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "job/report.hpp"
#include "queue/queue.hpp"

namespace diskferry {

inline constexpr std::string_view kMetricsFile = "diskferry.prom";

struct SourceMetrics {
  double last_success = 0;   // unix seconds; 0: never
  double last_end = 0;       // the last attempt that ended
  double last_duration = 0;  // seconds it ran
  uint64_t last_bytes_sent = 0;
  uint64_t bytes_on_remote = 0;  // the newest published backup
  int last_attempts = 0;         // of the last job, so far
  int last_ok = 0;               // 1: the last job that ended is done; 0: failed (or none)
  uint64_t failures_total = 0;   // jobs that ended failed (after their last attempt)
  uint64_t successes_total = 0;
};

struct RemoteMetrics {
  int up = 0;             // 1: the last attempt that tried reached it
  double last_check = 0;  // when that was
};

struct Metrics {
  std::map<std::string, SourceMetrics> sources;
  std::map<std::string, RemoteMetrics> remotes;
};

// The text exposition format, with HELP and TYPE lines, sorted by source and remote.
std::string render_metrics(const Metrics& m);
// Reads back what render_metrics wrote; lines it does not know are skipped (a damaged file
// costs the counters, not the update).
Metrics parse_metrics(std::string_view text);
// Folds one ended attempt in (a report in state Running changes nothing).
void apply_report(Metrics& m, const JobReport& r);

// Replaces DIR/NAME with `content`: a hidden temporary file in DIR, fsync, rename, fsync of DIR.
// Readers see the old file or the new one, whole. Throws Error(Output) naming the file; no
// temporary file is left behind.
void write_file_atomically(const std::string& dir, std::string_view name, std::string_view content);

// Brings METRICS_DIR/diskferry.prom up to date for `config` (nothing when metrics_dir is
// empty): reads it back, applies `report` if given, takes each source's last success time from
// the queue (the truth, even if the file was lost), drops sources and remotes that are no longer
// configured and lists the new ones, writes it. Throws Error.
void update_metrics(const Config& config, const Queue& queue, const JobReport* report);

}  // namespace diskferry
