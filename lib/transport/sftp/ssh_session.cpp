#include "transport/sftp/ssh_session.hpp"

#include "transport/sftp/ssh_identities.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <libssh/libssh.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <optional>
#include <vector>

namespace diskferry::sftp {
namespace {

bool cpu_has_aes() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("aes");
#else
  return false;
#endif
}

struct KeyFree {
  void operator()(ssh_key k) const { ssh_key_free(k); }
};
using Key = std::unique_ptr<ssh_key_struct, KeyFree>;

}  // namespace

void check_private_key_permissions(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_errno(ErrorKind::Usage, path, "identity file", errno);
  if (st.st_mode & 077)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: private key is accessible by group or others (mode {:04o}); "
                            "run: chmod 600 {}",
                            path, st.st_mode & 07777, path));
}

void SshSession::Free::operator()(ssh_session_struct* s) const {
  ssh_disconnect(s);
  ssh_free(s);
}

SshSession::SshSession(const Url& url, const SshOptions& o) : s_(ssh_new()) {
  if (!s_.get()) throw Error(ErrorKind::Internal, "libssh: ssh_new failed");
  // Only the config file we name is read: a daemon must not depend on whose HOME it runs with.
  int no = 0, yes = 1;
  ssh_options_set(s_.get(), SSH_OPTIONS_PROCESS_CONFIG, &no);
  ssh_options_set(s_.get(), SSH_OPTIONS_HOST, url.host.c_str());
  std::string config = expand_home(o.ssh_config.value_or("~/.ssh/config"));
  if (::access(config.c_str(), R_OK) == 0 &&
      ssh_options_parse_config(s_.get(), config.c_str()) != 0)
    throw Error(ErrorKind::Usage, fmt::format("{}: cannot parse ssh config", config));
  if (url.user) ssh_options_set(s_.get(), SSH_OPTIONS_USER, url.user->c_str());
  if (url.port) {
    unsigned int port = static_cast<unsigned>(*url.port);
    ssh_options_set(s_.get(), SSH_OPTIONS_PORT, &port);
  }
  known_hosts_ = expand_home(o.known_hosts.value_or("~/.ssh/known_hosts"));
  ssh_options_set(s_.get(), SSH_OPTIONS_KNOWNHOSTS, known_hosts_.c_str());
  // Request/response traffic stalls on Nagle + delayed ACK without this.
  ssh_options_set(s_.get(), SSH_OPTIONS_NODELAY, &yes);
  long timeout = static_cast<long>(o.timeout.count());
  ssh_options_set(s_.get(), SSH_OPTIONS_TIMEOUT, &timeout);
  // AES-GCM is the fastest authenticated cipher where the CPU has AES instructions;
  // chacha20-poly1305 where it has not.
  const char* ciphers = cpu_has_aes() ? "aes128-gcm@openssh.com,aes256-gcm@openssh.com,"
                                        "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"
                                      : "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,"
                                        "aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";
  ssh_options_set(s_.get(), SSH_OPTIONS_CIPHERS_C_S, ciphers);
  ssh_options_set(s_.get(), SSH_OPTIONS_CIPHERS_S_C, ciphers);

  char* user = nullptr;
  ssh_options_get(s_.get(), SSH_OPTIONS_USER, &user);
  unsigned int port = 22;
  ssh_options_get_port(s_.get(), &port);
  char* host = nullptr;
  ssh_options_get(s_.get(), SSH_OPTIONS_HOST, &host);
  const std::string host_name = host ? host : url.host;
  // No user from the URL or the config: libssh logs in as the local user.
  const passwd* me = user ? nullptr : getpwuid(getuid());
  where_ = fmt::format("{}@{}:{}", user ? user : me ? me->pw_name : "?", host_name, port);
  ssh_string_free_char(user);
  ssh_string_free_char(host);

  if (ssh_connect(s_.get()) != SSH_OK) {
    // libssh says "failed to resolve" for a name that does not exist and for a DNS server that
    // did not answer alike; only the first is a mistake in the name. A ProxyCommand (or
    // ProxyJump) resolves the name elsewhere.
    char* proxy = nullptr;
    bool direct = ssh_options_get(s_.get(), SSH_OPTIONS_PROXYCOMMAND, &proxy) != SSH_OK;
    ssh_string_free_char(proxy);
    addrinfo* ai = nullptr;
    int rc = direct ? ::getaddrinfo(host_name.c_str(), nullptr, nullptr, &ai) : 0;
    if (ai) freeaddrinfo(ai);
    if (rc == EAI_NONAME || rc == EAI_FAIL || rc == EAI_NODATA)
      throw ConnectError(
          ConnectFailure::HostUnknown,
          fmt::format("{}: cannot connect: cannot resolve host name '{}'", where_, host_name));
    throw ConnectError(ConnectFailure::Unreachable,
                       fmt::format("{}: cannot connect: {}", where_, ssh_get_error(s_.get())));
  }
  int fd = ssh_get_fd(s_.get());
  if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &yes, sizeof yes);
  if (o.on_step) o.on_step(*this, ConnectStep::Connected);
  verify_host_key(o);
  if (o.on_step) o.on_step(*this, ConnectStep::HostKeyVerified);
  authenticate(o, config, url.host);
}

std::string SshSession::cipher() const {
  const char* c = ssh_get_cipher_out(s_.get());
  return c ? c : "?";
}

std::string SshSession::kex() const {
  const char* k = ssh_get_kex_algo(s_.get());
  return k ? k : "?";
}

void SshSession::set_timeout(std::chrono::seconds t) {
  long secs = static_cast<long>(t.count());
  ssh_options_set(s_.get(), SSH_OPTIONS_TIMEOUT, &secs);
}

std::string SshSession::banner() const {
  const char* b = ssh_get_serverbanner(s_.get());
  return b ? b : "";
}

void SshSession::verify_host_key(const SshOptions& o) {
  ssh_key raw = nullptr;
  if (ssh_get_server_publickey(s_.get(), &raw) != SSH_OK)
    throw ConnectError(ConnectFailure::Protocol,
                       fmt::format("{}: server sent no host key", where_));
  Key key(raw);
  unsigned char* hash = nullptr;
  size_t hlen = 0;
  if (ssh_get_publickey_hash(key.get(), SSH_PUBLICKEY_HASH_SHA256, &hash, &hlen) != 0)
    throw ConnectError(ConnectFailure::Protocol, fmt::format("{}: cannot hash host key", where_));
  char* fp = ssh_get_fingerprint_hash(SSH_PUBLICKEY_HASH_SHA256, hash, hlen);
  ssh_clean_pubkey_hash(&hash);
  fingerprint_ = fp ? fp : "?";
  ssh_string_free_char(fp);
  std::string type = ssh_key_type_to_char(ssh_key_type(key.get()));
  host_key_type_ = type;

  switch (ssh_session_is_known_server(s_.get())) {
    case SSH_KNOWN_HOSTS_OK:
      return;
    case SSH_KNOWN_HOSTS_CHANGED:
    case SSH_KNOWN_HOSTS_OTHER:
      // Never overridable by a flag: a changed key is either a re-installed server (fix
      // known_hosts by hand, after checking) or an attack.
      throw ConnectError(
          ConnectFailure::HostKeyChanged,
          fmt::format("{}: HOST KEY CHANGED: the server now presents {} {} which does not match "
                      "{}. This may be an attack. If the server's key was really replaced, check "
                      "the new fingerprint with the provider, remove the old entry (ssh-keygen -R "
                      "HOST -f {}) and connect again",
                      where_, type, fingerprint_, known_hosts_, known_hosts_));
    case SSH_KNOWN_HOSTS_UNKNOWN:
    case SSH_KNOWN_HOSTS_NOT_FOUND:
      if (o.accept_new_host_key) {
        if (ssh_session_update_known_hosts(s_.get()) != SSH_OK)
          throw Error(ErrorKind::Output, fmt::format("{}: cannot add host key to {}: {}", where_,
                                                     known_hosts_, ssh_get_error(s_.get())));
        host_key_added_ = true;
        return;
      }
      throw ConnectError(
          ConnectFailure::HostKeyUnknown,
          fmt::format("{}: unknown host key {} {} (not in {}); if that is the server's key, run "
                      "again with --accept-new-host-key to add it",
                      where_, type, fingerprint_, known_hosts_));
    case SSH_KNOWN_HOSTS_ERROR:
      break;
  }
  throw ConnectError(ConnectFailure::Protocol,
                     fmt::format("{}: cannot check host key in {}: {}", where_, known_hosts_,
                                 ssh_get_error(s_.get())));
}

// Keys are tried here rather than by libssh's publickey_auto, which reads any key file it is
// given whatever its mode (and writes NAME.pub beside it), and cannot say which keys it tried.
void SshSession::authenticate(const SshOptions& o, const std::string& config,
                              const std::string& alias) {
  auto refused = [&](const std::string& what) {
    return ConnectError(ConnectFailure::AuthRefused,
                        fmt::format("{}: authentication refused for {} (is its public key in the "
                                    "server's authorized keys?)",
                                    where_, what));
  };
  auto failed = [&] {
    return ConnectError(ConnectFailure::Unreachable, fmt::format("{}: authentication failed: {}",
                                                                 where_, ssh_get_error(s_.get())));
  };
  // Permission first, like ssh: a key others can read is refused before it is used. A key that
  // cannot be read (a passphrase) ends the login when it was named, and is passed over when it
  // is one of the candidates (`unreadable` is then set).
  auto try_key = [&](const std::string& path, bool* unreadable = nullptr) {
    check_private_key_permissions(path);
    ssh_key raw = nullptr;
    if (ssh_pki_import_privkey_file(path.c_str(), nullptr, nullptr, nullptr, &raw) != SSH_OK) {
      if (unreadable) {
        *unreadable = true;
        return false;
      }
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: cannot read private key (passphrase-protected keys need "
                              "ssh-agent)",
                              path));
    }
    Key key(raw);
    int rc = ssh_userauth_publickey(s_.get(), nullptr, key.get());
    if (rc == SSH_AUTH_ERROR) throw failed();
    return rc == SSH_AUTH_SUCCESS;
  };
  if (o.identity) {
    if (try_key(*o.identity)) return;
    throw refused("key " + *o.identity);
  }

  std::optional<int> agent_keys = agent_key_count();
  int rc = ssh_userauth_agent(s_.get(), nullptr);
  if (rc == SSH_AUTH_SUCCESS) return;
  if (rc == SSH_AUTH_ERROR) throw failed();

  char* user = nullptr;
  ssh_options_get(s_.get(), SSH_OPTIONS_USER, &user);
  char* host = nullptr;
  ssh_options_get(s_.get(), SSH_OPTIONS_HOST, &host);
  SshTarget target{alias, host ? host : alias, user ? user : "", 22};
  ssh_string_free_char(user);
  ssh_string_free_char(host);
  ssh_options_get_port(s_.get(), &target.port);
  std::vector<std::string> files = config_identity_files(config, target);
  for (std::string& f : default_identity_files()) files.push_back(std::move(f));

  std::vector<std::string> seen, tried;
  for (const std::string& f : files) {
    struct stat st {};
    if (std::find(seen.begin(), seen.end(), f) != seen.end() || ::stat(f.c_str(), &st) != 0)
      continue;
    seen.push_back(f);
    bool unreadable = false;
    if (try_key(f, &unreadable)) return;
    tried.push_back(unreadable ? f + " (unreadable: passphrase-protected keys need ssh-agent)" : f);
  }
  std::string agent = !agent_keys        ? "ssh-agent (none running)"
                      : *agent_keys == 1 ? "ssh-agent (1 key)"
                                         : fmt::format("ssh-agent ({} keys)", *agent_keys);
  if (tried.empty())
    throw ConnectError(ConnectFailure::AuthRefused,
                       fmt::format("{}: authentication refused for {}, and there is no key file "
                                   "(none of {}); give one with --identity or IdentityFile",
                                   where_, agent, fmt::join(files, ", ")));
  throw refused(fmt::format("{} and {}", agent, fmt::join(tried, ", ")));
}

}  // namespace diskferry::sftp
