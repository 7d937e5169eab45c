// Pre/post snapshot hooks: the admin's own shell commands that quiesce a guest around the
// snapshot (virsh domfsfreeze / domfsthaw, a database flush), run with a deadline.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diskferry {

using HookEnv = std::vector<std::pair<std::string, std::string>>;

inline constexpr size_t kHookOutputMax = 4096;

struct HookResult {
  enum class End { Exited, Signaled, TimedOut };
  End end = End::Exited;
  int exit_code = 0;       // End::Exited
  int signal = 0;          // End::Signaled
  std::string output;      // the last kHookOutputMax bytes of stdout and stderr, as interleaved
  bool truncated = false;  // earlier output was dropped
  bool ok() const noexcept { return end == End::Exited && exit_code == 0; }
};

// Runs `/bin/sh -c COMMAND` in a process group of its own, stdin from /dev/null, no inherited
// descriptors beyond 0-2, default signal dispositions, the daemon's environment plus extra_env
// (which overrides). COMMAND is the admin's text, passed to the shell as one argument and
// never assembled from job data; pass job data in extra_env.
// On timeout, and also once the shell has exited, whatever is left in its process group gets
// SIGTERM and, 2 s later, SIGKILL: a hook cannot leave processes behind (one that must start a
// long-lived process has to detach it with setsid). Throws Error only if the shell cannot be
// started, or Error(Usage) for a timeout under 1 s or an empty or '='-containing variable name.
HookResult run_hook(const std::string& command, std::chrono::seconds timeout,
                    const HookEnv& extra_env);

// One line for an error message: `pre hook "CMD" exited with status 3: LAST OUTPUT`.
std::string describe_hook_failure(const char* which, const std::string& command,
                                  std::chrono::seconds timeout, const HookResult& result);

// Told of each hook that ran and succeeded: `pre hook "CMD" ok: OUTPUT` (for the job's log,
// so an admin sees that the guest really was frozen).
using HookReport = std::function<void(const std::string&)>;

namespace detail {
void run_with_hooks(const std::string& pre, const std::string& post, std::chrono::seconds timeout,
                    const HookEnv& env, const std::function<void()>& fn, const HookReport& report);
}

// Runs PRE, then fn (the snapshot), then POST, and returns what fn returned. An empty command is
// no hook. POST runs whatever happened before it, because PRE may have half-frozen the guest:
//  * PRE fails: fn is not run, POST runs, Error(Input) names PRE (and POST if it failed too);
//  * fn throws: POST runs, fn's exception propagates (as Error with POST's failure appended if
//    POST failed too);
//  * POST fails after fn succeeded: Error(Input) naming POST; fn's result is dropped (a snapshot
//    stays on disk, and the retry reuses it).
// Hooks see DISKFERRY_HOOK=pre|post, and POST also DISKFERRY_SNAPSHOT=ok|failed|skipped.
template <class Fn>
auto with_hooks(const std::string& pre, const std::string& post, std::chrono::seconds timeout,
                Fn&& fn, const HookEnv& env = {}, const HookReport& report = {}) {
  using R = std::invoke_result_t<Fn&>;
  if constexpr (std::is_void_v<R>) {
    detail::run_with_hooks(
        pre, post, timeout, env, [&] { fn(); }, report);
  } else {
    std::optional<R> result;
    detail::run_with_hooks(
        pre, post, timeout, env, [&] { result.emplace(fn()); }, report);
    return std::move(*result);
  }
}

}  // namespace diskferry
