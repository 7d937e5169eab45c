// The configuration's notify commands (on_success, on_failure) after a job ends, with the job's
// facts in DISKFERRY_* variables (configs/diskferry.yaml lists them). They run like the snapshot
// hooks (snapshot/hook.hpp: /bin/sh -c, own process group, timeout) and can only report: the job
// has ended before they start, and nothing they do changes its outcome.
#pragma once

#include <optional>
#include <string>

#include "config/config.hpp"
#include "job/report.hpp"
#include "snapshot/hook.hpp"

namespace diskferry {

// The variables a notify command sees for `r`.
HookEnv notify_env(const JobReport& r);

struct NotifyOutcome {
  bool ok = false;
  std::string message;  // one line for the job's events and the log
};

// Runs the source's on_success for a done job, on_failure for a failed one. Nothing (nullopt)
// for other states or when that command is not configured. Never throws for the command's
// sake: a command that cannot start, fails or times out is an outcome with ok = false.
std::optional<NotifyOutcome> run_notify(const Notify& notify, const JobReport& r);

}  // namespace diskferry
