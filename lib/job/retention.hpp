// Which backups to keep: Proxmox Backup Server's prune rules (keep-last, -daily, -weekly,
// -monthly), as a pure function over a listing so the decision can be shown before acting on it.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace diskferry {

struct Backup {
  std::string name;  // as listed on the remote; passed through untouched
  std::chrono::system_clock::time_point time;
};

// 0 turns a rule off. A policy with every rule off keeps everything.
struct RetentionPolicy {
  unsigned keep_last = 0;
  unsigned keep_daily = 0;
  unsigned keep_weekly = 0;  // ISO 8601 weeks (Monday to Sunday, week-numbering year)
  unsigned keep_monthly = 0;

  bool keeps_something() const noexcept {
    return keep_last || keep_daily || keep_weekly || keep_monthly;
  }
};

struct RetentionDecision {
  Backup backup;
  // Keep: the rule and period that keep it ("keep-last 2", "daily 2026-11-30",
  // "weekly 2026-W48", "monthly 2026-11", ...). Remove: why no rule wants it.
  std::string reason;
};

struct RetentionPlan {
  std::vector<RetentionDecision> keep;    // newest first
  std::vector<RetentionDecision> remove;  // newest first
};

// Periods are UTC. Backups with the same time are ordered by name (the greater name counts as
// the newer). The newest backup is always kept. The caller decides which files are backups at
// all: pass only what diskferry itself created.
RetentionPlan plan_retention(std::vector<Backup> backups, const RetentionPolicy& policy);

}  // namespace diskferry
