#include "job/notify.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cctype>
#include <exception>

namespace diskferry {

HookEnv notify_env(const JobReport& r) {
  bool done = r.state == JobState::Done;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return {{"DISKFERRY_EVENT", done ? "success" : "failure"},
          {"DISKFERRY_STATE", std::string(to_string(r.state))},
          {"DISKFERRY_SOURCE", r.source},
          {"DISKFERRY_JOB_ID", std::to_string(r.job_id)},
          {"DISKFERRY_ATTEMPTS", std::to_string(r.attempt)},
          {"DISKFERRY_REMOTE", r.remote},
          {"DISKFERRY_REMOTE_PATH", r.remote_path},
          {"DISKFERRY_URL", r.url},
          {"DISKFERRY_SHA256", done ? r.sha256 : ""},
          {"DISKFERRY_BYTES", done && r.bytes_on_remote ? std::to_string(r.bytes_on_remote) : ""},
          {"DISKFERRY_ERROR", done ? "" : r.error},
          {"DISKFERRY_ERROR_CLASS", done ? "" : r.error_class},
          {"DISKFERRY_DURATION", fmt::format("{}", (r.duration.count() + 500) / 1000)},
          {"DISKFERRY_HOST", host}};
}

std::optional<NotifyOutcome> run_notify(const Notify& notify, const JobReport& r) {
  const char* which = r.state == JobState::Done     ? "on_success"
                      : r.state == JobState::Failed ? "on_failure"
                                                    : nullptr;
  if (!which) return std::nullopt;
  const std::string& command = r.state == JobState::Done ? notify.on_success : notify.on_failure;
  if (command.empty()) return std::nullopt;
  try {
    HookResult h = run_hook(command, notify.timeout, notify_env(r));
    if (!h.ok())
      return NotifyOutcome{false, describe_hook_failure(which, command, notify.timeout, h)};
    std::string out = h.output;
    while (!out.empty() && std::isspace(static_cast<unsigned char>(out.back()))) out.pop_back();
    if (out.size() > 200) out = "..." + out.substr(out.size() - 200);
    for (char& c : out)
      if (c == '\n' || c == '\r') c = ' ';
    return NotifyOutcome{
        true, fmt::format("{} hook \"{}\" ok{}{}", which, command, out.empty() ? "" : ": ", out)};
  } catch (const std::exception& e) {
    return NotifyOutcome{false, fmt::format("{} hook \"{}\": {}", which, command, e.what())};
  }
}

}  // namespace diskferry
