// Where an SSH login looks for its keys: the home directory, the IdentityFile entries of an ssh
// config that apply to a host, and how many keys ssh-agent holds. SshSession tries the keys itself
// (not libssh's publickey_auto) so that every key file passes the same permission check as
// --identity and a refusal can name what was tried.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace diskferry::sftp {

// The user's home from the password database ($HOME only when there is no entry), as OpenSSH
// and libssh take it; see the definition for why not $HOME.
std::string ssh_home();
// "~/x" → ssh_home() + "/x"; anything else unchanged.
std::string expand_home(const std::string& path);

// What %h, %r and %p stand for in an IdentityFile (the values after the config was read).
struct SshTarget {
  std::string alias;  // the host name as given (what Host and Match host patterns see)
  std::string host, user;
  unsigned port = 22;
};

// The IdentityFile entries of the ssh config file `config` (and the files it Includes) that
// apply to target.alias, in file order, with ~ and %d/%h/%r/%u/%p/%% expanded. Host patterns (*,
// ?, !negation, comma lists) and "Match all" / "Match host" are evaluated; any other Match block
// is taken not to apply (diskferry runs no Match exec). A missing file gives an empty list.
std::vector<std::string> config_identity_files(const std::string& config, const SshTarget& target);

// The default key files tried after those, as libssh has them: ~/.ssh/id_ed25519, id_ecdsa,
// id_rsa.
std::vector<std::string> default_identity_files();

// How many keys the agent at $SSH_AUTH_SOCK holds; nullopt when there is none or it does not
// answer (within 2 s).
std::optional<int> agent_key_count();

}  // namespace diskferry::sftp
