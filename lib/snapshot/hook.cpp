#include "snapshot/hook.hpp"

#include <fcntl.h>
#include <fmt/format.h>

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/error.hpp"
#include "util/fd.hpp"

namespace diskferry {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds kKillGrace{2000};
// How often the shell's exit is checked while its output pipe is quiet (or closed early by the
// hook); hooks run once per backup, so waking 50 times a second costs nothing.
constexpr milliseconds kTick{20};
constexpr size_t kMessageOutputMax = 1024;

class SpawnFileActions {
 public:
  SpawnFileActions() { ::posix_spawn_file_actions_init(&fa_); }
  ~SpawnFileActions() { ::posix_spawn_file_actions_destroy(&fa_); }
  SpawnFileActions(const SpawnFileActions&) = delete;
  SpawnFileActions& operator=(const SpawnFileActions&) = delete;
  posix_spawn_file_actions_t* get() { return &fa_; }

 private:
  posix_spawn_file_actions_t fa_;
};

class SpawnAttr {
 public:
  SpawnAttr() { ::posix_spawnattr_init(&attr_); }
  ~SpawnAttr() { ::posix_spawnattr_destroy(&attr_); }
  SpawnAttr(const SpawnAttr&) = delete;
  SpawnAttr& operator=(const SpawnAttr&) = delete;
  posix_spawnattr_t* get() { return &attr_; }

 private:
  posix_spawnattr_t attr_;
};

void check(int rc, const char* what) {
  if (rc != 0) throw_errno(ErrorKind::Internal, "hook", what, rc);
}

std::vector<std::string> make_environment(const HookEnv& extra) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  for (const auto& [key, value] : extra) {
    if (key.empty() || key.find('=') != std::string::npos || key.find('\0') != std::string::npos)
      throw Error(ErrorKind::Usage, fmt::format("hook environment: bad variable name '{}'", key));
    std::string prefix = key + "=";
    std::erase_if(env, [&](const std::string& kv) { return kv.starts_with(prefix); });
    env.push_back(prefix + value);
  }
  return env;
}

class OutputTail {
 public:
  void append(const char* data, size_t n) {
    text_.append(data, n);
    if (text_.size() > kHookOutputMax) {
      text_.erase(0, text_.size() - kHookOutputMax);
      truncated_ = true;
    }
  }
  std::string& text() { return text_; }
  bool truncated() const { return truncated_; }

 private:
  std::string text_;
  bool truncated_ = false;
};

// Waits up to `wait` for output, then takes everything the pipe holds. Sets eof once every
// writer (the shell and anything it started) has closed it.
void pump(int fd, bool& eof, OutputTail& tail, milliseconds wait) {
  int ms = static_cast<int>(std::max<milliseconds::rep>(wait.count(), 0));
  if (eof) {
    if (ms > 0) ::poll(nullptr, 0, ms);
    return;
  }
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, ms) <= 0) return;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      tail.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) eof = true;
    if (n < 0 && errno == EINTR) continue;
    return;  // EAGAIN: drained for now
  }
}

// Leaves the shell a zombie (WNOWAIT): while it is unreaped its pid cannot be reused, so the
// kill(-pid) calls below cannot hit an unrelated process group.
bool has_exited(pid_t pid) {
  siginfo_t info{};
  if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0)
    return errno == ECHILD;  // someone else reaped it (SIGCHLD ignored): stop waiting
  return info.si_pid == pid;
}

std::string one_line(const std::string& output, bool truncated) {
  std::string_view v = output;
  while (!v.empty() && std::string_view(" \t\r\n").find(v.back()) != std::string_view::npos)
    v.remove_suffix(1);
  if (v.size() > kMessageOutputMax) {
    v.remove_prefix(v.size() - kMessageOutputMax);
    truncated = true;
  }
  std::string out = truncated ? "..." : "";
  for (char c : v) {
    if (c == '\n')
      out += " | ";
    else if (static_cast<unsigned char>(c) < 0x20 && c != '\t')
      out += '?';
    else
      out += c;
  }
  return out;
}

}  // namespace

HookResult run_hook(const std::string& command, std::chrono::seconds timeout,
                    const HookEnv& extra_env) {
  if (timeout.count() < 1) throw Error(ErrorKind::Usage, "hook timeout must be at least 1 s");
  std::vector<std::string> env = make_environment(extra_env);
  std::vector<char*> envp;
  for (auto& kv : env) envp.push_back(kv.data());
  envp.push_back(nullptr);
  std::string arg0 = "sh", arg1 = "-c", arg2 = command;
  char* argv[] = {arg0.data(), arg1.data(), arg2.data(), nullptr};

  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw_errno(ErrorKind::Internal, "hook", "pipe", errno);
  UniqueFd out_r(fds[0]), out_w(fds[1]);

  SpawnFileActions fa;
  check(::posix_spawn_file_actions_addopen(fa.get(), 0, "/dev/null", O_RDONLY, 0), "spawn setup");
  check(::posix_spawn_file_actions_adddup2(fa.get(), out_w.get(), 1), "spawn setup");
  check(::posix_spawn_file_actions_adddup2(fa.get(), out_w.get(), 2), "spawn setup");
  // Not every descriptor in a daemon is O_CLOEXEC (libraries open their own).
  check(::posix_spawn_file_actions_addclosefrom_np(fa.get(), 3), "spawn setup");

  // The daemon may block or ignore signals (signalfd, SIGPIPE); the hook must not inherit that,
  // or SIGTERM on timeout would not reach it.
  SpawnAttr attr;
  sigset_t none, all;
  sigemptyset(&none);
  sigemptyset(&all);
  for (int s = 1; s < NSIG; ++s)
    if (s != SIGKILL && s != SIGSTOP) sigaddset(&all, s);
  check(::posix_spawnattr_setflags(
            attr.get(), POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF),
        "spawn setup");
  check(::posix_spawnattr_setpgroup(attr.get(), 0), "spawn setup");
  check(::posix_spawnattr_setsigmask(attr.get(), &none), "spawn setup");
  check(::posix_spawnattr_setsigdefault(attr.get(), &all), "spawn setup");

  // posix_spawn returns after the child's exec (or its failure), so the process group exists
  // before any kill(-pid) below.
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, "/bin/sh", fa.get(), attr.get(), argv, envp.data());
  if (rc != 0) throw_errno(ErrorKind::Input, "hook", "cannot start /bin/sh", rc);
  out_w.reset();  // the pipe reports EOF only once no hook process holds it
  ::fcntl(out_r.get(), F_SETFL, ::fcntl(out_r.get(), F_GETFL) | O_NONBLOCK);

  OutputTail tail;
  bool eof = false, exited = false, timed_out = false;
  auto deadline = Clock::now() + timeout;
  while (!exited) {
    // Rounded up: truncating would end the hook's time up to 1 ms before it is over.
    auto left = std::chrono::ceil<milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pump(out_r.get(), eof, tail, std::min(left, kTick));
    exited = has_exited(pid);
  }

  ::kill(-pid, SIGTERM);
  auto grace_end = Clock::now() + kKillGrace;
  while (!(exited && eof) && Clock::now() < grace_end) {
    pump(out_r.get(), eof, tail, kTick);
    if (!exited) exited = has_exited(pid);
  }
  ::kill(-pid, SIGKILL);
  int status = 0;
  pid_t reaped = -1;
  while ((reaped = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
  }
  pump(out_r.get(), eof, tail, milliseconds{0});  // what was written before the kill

  HookResult r;
  r.output = std::move(tail.text());
  r.truncated = tail.truncated();
  if (timed_out) {
    r.end = HookResult::End::TimedOut;
  } else if (reaped < 0) {
    throw Error(ErrorKind::Internal,
                "hook: its exit status was reaped elsewhere (is SIGCHLD ignored?)");
  } else if (WIFSIGNALED(status)) {
    r.end = HookResult::End::Signaled;
    r.signal = WTERMSIG(status);
  } else {
    r.exit_code = WEXITSTATUS(status);
  }
  return r;
}

std::string describe_hook_failure(const char* which, const std::string& command,
                                  std::chrono::seconds timeout, const HookResult& result) {
  std::string how;
  switch (result.end) {
    case HookResult::End::Exited:
      how = fmt::format("exited with status {}", result.exit_code);
      break;
    case HookResult::End::Signaled: {
      const char* name = ::sigabbrev_np(result.signal);
      how = name ? fmt::format("was killed by SIG{}", name)
                 : fmt::format("was killed by signal {}", result.signal);
      break;
    }
    case HookResult::End::TimedOut:
      how = fmt::format("did not finish within {} s and was killed", timeout.count());
      break;
  }
  std::string output = one_line(result.output, result.truncated);
  return fmt::format("{} hook \"{}\" {}{}", which, command, how,
                     output.empty() ? " (no output)" : ": " + output);
}

namespace detail {

namespace {

// The failure message, or nothing if the hook succeeded (or there is none).
std::optional<std::string> run_one(const char* which, const std::string& command,
                                   std::chrono::seconds timeout, HookEnv env,
                                   const HookReport& report) {
  if (command.empty()) return std::nullopt;
  try {
    HookResult r = run_hook(command, timeout, env);
    if (r.ok()) {
      if (report) {
        std::string out = r.output;
        while (!out.empty() && std::isspace(static_cast<unsigned char>(out.back()))) out.pop_back();
        report(fmt::format("{} hook \"{}\" ok{}{}", which, command, out.empty() ? "" : ": ", out));
      }
      return std::nullopt;
    }
    return describe_hook_failure(which, command, timeout, r);
  } catch (const std::exception& e) {
    return fmt::format("{} hook \"{}\": {}", which, command, e.what());
  }
}

}  // namespace

void run_with_hooks(const std::string& pre, const std::string& post, std::chrono::seconds timeout,
                    const HookEnv& env, const std::function<void()>& fn, const HookReport& report) {
  HookEnv pre_env = env, post_env = env;
  pre_env.emplace_back("DISKFERRY_HOOK", "pre");
  post_env.emplace_back("DISKFERRY_HOOK", "post");

  std::optional<std::string> pre_failure = run_one("pre", pre, timeout, pre_env, report);
  std::exception_ptr fn_error;
  if (!pre_failure) {
    try {
      fn();
    } catch (...) {
      fn_error = std::current_exception();
    }
  }
  post_env.emplace_back("DISKFERRY_SNAPSHOT", pre_failure ? "skipped" : fn_error ? "failed" : "ok");
  std::optional<std::string> post_failure = run_one("post", post, timeout, post_env, report);

  std::string also = post_failure ? "; and the " + *post_failure : "";
  if (pre_failure) throw Error(ErrorKind::Input, *pre_failure + also);
  if (fn_error) {
    if (!post_failure) std::rethrow_exception(fn_error);
    try {
      std::rethrow_exception(fn_error);
    } catch (const Error& e) {
      throw Error(e.kind(), e.what() + also);
    } catch (const std::exception& e) {
      throw Error(ErrorKind::Internal, e.what() + also);
    }
  }
  if (post_failure) throw Error(ErrorKind::Input, *post_failure);
}

}  // namespace detail
}  // namespace diskferry
