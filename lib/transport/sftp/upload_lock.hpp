// NAME.lock on the server: which run may write NAME.partial and publish NAME and NAME.sha256.
// Created exclusively (CREAT|EXCL) before the partial file is touched and removed after the
// sidecar is in place, so two runs aimed at one NAME never share a partial file: the second one
// refuses, naming the first. It holds the owner's host, machine id, pid, process start time and
// a token (random per CLI run; per job for the daemon, so a restarted daemon recognises the lock
// and the partial file of its own job). A lock whose process is gone from this machine is stale
// and taken over; one from another machine is refused with how to clear it, since nothing here
// can tell whether that run still lives.
#pragma once

#include <string>

#include "transport/sftp/channel.hpp"

namespace diskferry::sftp {

// Another run holds NAME.lock. Not transient: waiting for a run that may take hours (or that
// died on another host) is not what a retry is for.
class LockedError : public Error {
 public:
  explicit LockedError(const std::string& what) : Error(ErrorKind::Output, what) {}
};

enum class LockTaken {
  Fresh,     // there was no lock
  Own,       // the lock was this token's already: an earlier attempt, or a killed process of
             // the same job; the partial file under it is this job's and may be resumed
  TakenOver  // a stale lock of another run, replaced: its partial file is not ours
};

// A token for a run that has none of its own (the CLI): random.
std::string random_lock_token();

std::string lock_path(const std::string& final_path);

// Takes the lock of `final_path` for `token`. Throws LockedError when a live run holds it, or one
// on another machine; StatusError when the lock file cannot be created. `exclusive_create`:
// whether the server honours OPEN with EXCL (rclone serve sftp does not, and its RENAME and
// MKDIR replace or succeed as well: there the lock is written, left to settle and read back).
LockTaken take_lock(Channel& ch, const std::string& final_path, const std::string& token,
                    bool exclusive_create);

// Throws LockedError unless the lock of `final_path` is still `token`'s (before publishing).
void check_lock(Channel& ch, const std::string& final_path, const std::string& token);

// Whether a lock of `final_path` exists and is not `token`'s.
bool held_by_other(Channel& ch, const std::string& final_path, const std::string& token);

// Removes the lock of `final_path` when it is `token`'s. Returns whether the lock is now gone or
// was not there; false when another run holds it.
bool release_lock(Channel& ch, const std::string& final_path, const std::string& token);

}  // namespace diskferry::sftp
