// The SFTP destination: streams into NAME.partial with many WRITEs in flight, supports the one
// positioned rewrite of a single-pass image, and publishes atomically on commit
// (fsync@openssh.com, then posix-rename@openssh.com to NAME).
#pragma once

#include <chrono>
#include <memory>

#include "transport/sftp/ssh_session.hpp"
#include "transport/sftp/url.hpp"
#include "transport/sink.hpp"

namespace diskferry::sftp {

struct SinkOptions {
  SshOptions ssh;
  std::chrono::seconds stall_timeout{60};
  size_t max_inflight_bytes = 8u << 20;  // above one channel's 2 MiB window: never the limit
};

std::unique_ptr<Sink> open_sftp_sink(const Url& url, const SinkOptions& options);

}  // namespace diskferry::sftp
