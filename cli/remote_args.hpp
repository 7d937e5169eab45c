// Command-line options for sftp:// destinations, shared by the commands that talk to a remote.
#pragma once

#include <fmt/format.h>
#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "pipeline/convert.hpp"
#include "pipeline/rate_limit.hpp"
#include "transport/destination.hpp"
#include "transport/sftp/remote_file.hpp"
#include "transport/sftp/sftp_sink.hpp"
#include "util/error.hpp"

namespace diskferry::cli {

// How to log in and check the host: every command that talks to a remote.
struct SshArgs {
  std::string identity, known_hosts, ssh_config;

  void add(CLI::App& c) {
    c.add_option("--identity", identity,
                 "SSH private key for sftp:// (must not be readable by group/others); default: "
                 "ssh-agent, then the ssh config's IdentityFile keys and ~/.ssh/id_* (the same "
                 "rule for each; ~ is the home in the password database, as for ssh, not $HOME)");
    c.add_option("--known-hosts", known_hosts, "known_hosts file (default ~/.ssh/known_hosts)");
    c.add_option("--ssh-config", ssh_config,
                 "ssh config file for Host aliases (default ~/.ssh/config)");
  }
  void apply(sftp::SshOptions& o) const {
    if (!identity.empty()) o.identity = identity;
    if (!known_hosts.empty()) o.known_hosts = known_hosts;
    if (!ssh_config.empty()) o.ssh_config = ssh_config;
  }
};

// Options for sftp:// destinations.
struct RemoteArgs {
  SshArgs ssh;
  bool accept_new = false;
  int stall_timeout = 60;
  int retries = 5;
  double retry_delay = 2;
  int streams = 4;
  std::string bwlimit;
  bool discard = false;
  bool no_sync = false;

  // Options of a block-device destination (convert only).
  void add_device_options(CLI::App& c) {
    c.add_flag("--discard", discard,
               "Writing to a block device: deallocate (unmap) its zero ranges instead of zeroing "
               "them, where the device guarantees they then read as zeros (the kernel's "
               "write-zeroes with unmap; else BLKZEROOUT, else written zeros). Plain discard, "
               "after which a device may return old data, is never used");
    c.add_flag("--no-sync", no_sync,
               "Do not fsync a file or device destination when done (as qemu-img convert does "
               "not by default): faster, but after a crash the file may hold less than it "
               "says. For scratch copies, not backups");
  }

  void add(CLI::App& c) {
    ssh.add(c);
    c.add_flag("--accept-new-host-key", accept_new,
               "Trust and record the host key of a server not yet in known_hosts (like "
               "StrictHostKeyChecking=accept-new). A changed key is always refused");
    c.add_option("--stall-timeout", stall_timeout,
                 "Seconds without progress before the connection counts as dropped (default 60)");
    c.add_option("--retries", retries,
                 "Reconnect and resume this many times after a dropped connection, waiting 2 s, "
                 "4 s, ... up to 60 s between attempts (default 5; 0: fail at the first drop)");
    c.add_option("--retry-delay", retry_delay,
                 "Seconds to wait before the first retry; each further wait doubles, up to 60 "
                 "(default 2)");
    c.add_option("--bwlimit", bwlimit,
                 "Limit the upload rate: 20M (bytes/s, K/M/G = 1024 multiples), off, or a "
                 "timetable like rclone's: \"08:00,5M 23:00,off\" or \"Mon-08:00,5M "
                 "Sat-00:00,off\" (each entry holds until the next)");
    c.add_option("--streams", streams,
                 "SFTP channels one upload is spread over, on one SSH connection (default 4, "
                 "1-16): more help on long round trips");
  }

  sftp::SinkOptions sink_options() const {
    sftp::SinkOptions o;
    ssh.apply(o.ssh);
    o.ssh.accept_new_host_key = accept_new;
    if (stall_timeout < 1) throw Error(ErrorKind::Usage, "--stall-timeout: at least 1 second");
    o.stall_timeout = std::chrono::seconds(stall_timeout);
    o.on_warning = [](const std::string& m) { fmt::print(stderr, "diskferry: warning: {}\n", m); };
    if (streams < 1 || streams > 16) throw Error(ErrorKind::Usage, "--streams: expected 1 to 16");
    o.streams = streams;
    return o;
  }

  // For an sftp:// source: the same login, --streams and --stall-timeout.
  sftp::ReadOptions read_options() const {
    sftp::SinkOptions so = sink_options();
    sftp::ReadOptions o;
    o.ssh = so.ssh;
    o.streams = so.streams;
    o.stall_timeout = so.stall_timeout;
    o.retries = retries;
    return o;
  }

  // --retries, --retry-delay and --bwlimit into the conversion's options.
  void apply_transfer_options(ConvertOptions& o) const {
    if (retries < 0 || retries > 1000)
      throw Error(ErrorKind::Usage, "--retries: expected a number from 0 to 1000");
    if (!(retry_delay >= 0 && retry_delay <= 3600))
      throw Error(ErrorKind::Usage, "--retry-delay: expected 0 to 3600 seconds");
    o.retries = retries;
    o.retry_delay = std::chrono::milliseconds(static_cast<int64_t>(retry_delay * 1000));
    o.max_retry_delay = std::max(o.retry_delay, o.max_retry_delay);
    if (!bwlimit.empty()) {
      auto limiter = std::make_shared<RateLimiter>(parse_bwlimit(bwlimit));
      o.wrap_destination = [limiter](std::unique_ptr<Sink> s) {
        return make_rate_limited_sink(std::move(s), {limiter});
      };
    }
  }

  // `inputs`: the local files the run reads; `source`: SOURCE as given. Neither may be the
  // destination (Error(Usage)).
  std::unique_ptr<Destination> open(const std::string& dest, const FileIdentities& inputs,
                                    const std::string& source) const {
    if (!sftp::is_sftp_url(dest))
      return make_single_destination(dest == "-" ? "stdout" : dest,
                                     open_file_sink(dest, {discard, !no_sync, inputs}));
    sftp::Url url = sftp::parse_url(dest);
    // Only the URLs are compared: an alias and its host name, or /~/ and the absolute path,
    // would take a connection to tell apart.
    if (sftp::is_sftp_url(source) && sftp::parse_url(source).str() == url.str())
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: is also the source of this run; uploading to it while "
                              "restoring from it would destroy it: name another destination",
                              dest));
    return sftp::open_sftp_destination(url, sink_options());
  }
};

}  // namespace diskferry::cli
