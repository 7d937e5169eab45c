// The SFTP destination: streams into NAME.partial with many WRITEs in flight, striped over
// several channels of one SSH connection; survives dropped connections by resuming where every
// write was acknowledged; publishes atomically on commit (fsync@openssh.com, then
// posix-rename@openssh.com to NAME) and writes NAME.sha256 next to it.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "transport/destination.hpp"
#include "transport/sftp/ssh_session.hpp"
#include "transport/sftp/url.hpp"

namespace diskferry::sftp {

struct SinkOptions {
  SshOptions ssh;
  std::chrono::seconds stall_timeout{60};
  // Channels a file's writes are spread over. One channel moves at most its 2 MiB window per
  // round trip (≈70 MB/s at 30 ms); more multiply that on one TCP connection.
  int streams = 4;
  // Bytes in flight per channel: above the 2 MiB window, so the window is the limit.
  size_t lane_inflight_bytes = 4u << 20;
  bool sha256_sidecar = true;
  // The daemon retries a job later, possibly from a new process after a crash:
  //  - keep_partial: a failed attempt never removes NAME.partial (discard() does, when the job
  //    is abandoned);
  //  - adopt_partial: a first attempt that finds NAME.partial resumes it, from a point safely
  //    below its end (what was in flight when the previous process died may be missing), after
  //    the usual comparison of the last MiB below that point.
  bool keep_partial = false, adopt_partial = false;
  // Owner of NAME.lock (see upload_lock.hpp): the daemon's is one per job, so that a restarted
  // daemon recognises its own lock and partial file. Empty: random, one per destination.
  std::string lock_token;
  // Told about things worth a user's attention that do not stop the upload.
  std::function<void(const std::string&)> on_warning;
  // Told where an attempt resumes NAME.partial (bytes kept) and how large it was.
  std::function<void(uint64_t kept, uint64_t partial_size)> on_resume;
};

std::unique_ptr<Destination> open_sftp_destination(const Url& url, const SinkOptions& options);

// Removes URL's NAME.partial if there is one, and NAME.lock if it is options.lock_token's (a job
// abandoned for good). Leaves both alone when another run holds the lock. Throws on failure.
void discard_partial(const Url& url, const SinkOptions& options);

}  // namespace diskferry::sftp
