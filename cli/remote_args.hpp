// Command-line options for sftp:// destinations, shared by the commands that talk to a remote.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "transport/sftp/sftp_sink.hpp"
#include "transport/sink.hpp"
#include "util/error.hpp"

namespace diskferry::cli {

// Options for sftp:// destinations.
struct RemoteArgs {
  std::string identity, known_hosts, ssh_config;
  bool accept_new = false;
  int stall_timeout = 60;

  void add(CLI::App& c) {
    c.add_option("--identity", identity,
                 "SSH private key for sftp:// (must not be readable by group/others); default: "
                 "ssh-agent, then ~/.ssh/id_*");
    c.add_option("--known-hosts", known_hosts, "known_hosts file (default ~/.ssh/known_hosts)");
    c.add_flag("--accept-new-host-key", accept_new,
               "Trust and record the host key of a server not yet in known_hosts (like "
               "StrictHostKeyChecking=accept-new). A changed key is always refused");
    c.add_option("--ssh-config", ssh_config,
                 "ssh config file for Host aliases (default ~/.ssh/config)");
    c.add_option("--stall-timeout", stall_timeout,
                 "Seconds without progress before the connection counts as dropped (default 60)");
  }

  sftp::SinkOptions sink_options() const {
    sftp::SinkOptions o;
    if (!identity.empty()) o.ssh.identity = identity;
    if (!known_hosts.empty()) o.ssh.known_hosts = known_hosts;
    if (!ssh_config.empty()) o.ssh.ssh_config = ssh_config;
    o.ssh.accept_new_host_key = accept_new;
    if (stall_timeout < 1) throw Error(ErrorKind::Usage, "--stall-timeout: at least 1 second");
    o.stall_timeout = std::chrono::seconds(stall_timeout);
    return o;
  }

  std::unique_ptr<Sink> open(const std::string& dest) const {
    if (!sftp::is_sftp_url(dest)) return open_file_sink(dest);
    return sftp::open_sftp_sink(sftp::parse_url(dest), sink_options());
  }
};

}  // namespace diskferry::cli
