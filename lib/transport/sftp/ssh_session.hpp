// One authenticated SSH connection (libssh), host key verified strictly.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "transport/sftp/url.hpp"
#include "util/error.hpp"

struct ssh_session_struct;

namespace diskferry::sftp {

class SshSession;
// Steps of SshSession's constructor, reported to SshOptions::on_step as each one succeeds.
enum class ConnectStep { Connected, HostKeyVerified };

struct SshOptions {
  std::optional<std::string> identity;     // private key file; absent: ssh-agent, then defaults
  std::optional<std::string> known_hosts;  // default ~/.ssh/known_hosts
  std::optional<std::string> ssh_config;   // default ~/.ssh/config (Host aliases)
  bool accept_new_host_key = false;        // like StrictHostKeyChecking=accept-new
  std::chrono::seconds timeout{30};        // connect and each blocking call
  // Called after the key exchange and after the host key check (`diskferry test-remote`).
  std::function<void(const SshSession&, ConnectStep)> on_step;
};

// Why a connection attempt failed; decides whether retrying can help.
// HostUnknown: the name does not resolve; a configuration error to the CLI, which the daemon
// retries all the same (DNS may be down for a while).
enum class ConnectFailure {
  Unreachable,
  HostUnknown,
  HostKeyUnknown,
  HostKeyChanged,
  AuthRefused,
  Protocol
};

class ConnectError : public Error {
 public:
  ConnectError(ConnectFailure f, const std::string& what)
      : Error(ErrorKind::Output, what), failure_(f) {}
  ConnectFailure failure() const { return failure_; }
  bool retryable() const { return failure_ == ConnectFailure::Unreachable; }
  bool transient() const noexcept override { return retryable(); }

 private:
  ConnectFailure failure_;
};

class SshSession {
 public:
  // Connects, verifies the host key and authenticates; throws ConnectError or Error(Usage).
  SshSession(const Url& url, const SshOptions& options);
  SshSession(const SshSession&) = delete;
  SshSession& operator=(const SshSession&) = delete;

  ssh_session_struct* get() const { return s_.get(); }
  const std::string& where() const { return where_; }  // user@host:port, for messages
  const std::string& fingerprint() const { return fingerprint_; }
  std::string cipher() const;
  std::string kex() const;
  const std::string& host_key_type() const { return host_key_type_; }
  const std::string& known_hosts() const { return known_hosts_; }
  bool host_key_added() const { return host_key_added_; }  // by accept_new_host_key
  std::string banner() const;  // the server's version string, e.g. "SSH-2.0-OpenSSH_9.2p1"
  // Bounds every later blocking libssh call, e.g. a write waiting for the peer's window.
  void set_timeout(std::chrono::seconds t);

 private:
  void verify_host_key(const SshOptions& o);
  // config: the ssh config file read (for its IdentityFile entries); alias: the host as given.
  void authenticate(const SshOptions& o, const std::string& config, const std::string& alias);

  struct Free {
    void operator()(ssh_session_struct* s) const;
  };
  // Owned from the first line of the constructor, so a refused connection frees it too.
  std::unique_ptr<ssh_session_struct, Free> s_;
  std::string where_, fingerprint_, known_hosts_, host_key_type_;
  bool host_key_added_ = false;
};

// Refuses a private key readable by group or others, as ssh does. Throws Error(Usage).
void check_private_key_permissions(const std::string& path);

}  // namespace diskferry::sftp
