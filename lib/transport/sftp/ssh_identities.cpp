#include "transport/sftp/ssh_identities.hpp"

#include <fmt/format.h>
#include <fnmatch.h>
#include <glob.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string_view>

#include "util/fd.hpp"

namespace diskferry::sftp {
namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// One config line as ssh reads it: a keyword, then arguments separated by whitespace (or one '='
// after the keyword), double quotes grouping; '#' starts a comment line.
std::vector<std::string> split_line(std::string_view line) {
  std::vector<std::string> out;
  size_t i = 0;
  auto skip_space = [&] {
    while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
  };
  skip_space();
  if (i == line.size() || line[i] == '#') return out;
  size_t start = i;
  while (i < line.size() && !std::isspace(static_cast<unsigned char>(line[i])) && line[i] != '=')
    ++i;
  out.emplace_back(line.substr(start, i - start));
  skip_space();
  if (i < line.size() && line[i] == '=') ++i;
  for (;;) {
    skip_space();
    if (i == line.size()) break;
    std::string tok;
    bool quoted = false;
    for (; i < line.size(); ++i) {
      char c = line[i];
      if (c == '"') {
        quoted = !quoted;
      } else if (!quoted && std::isspace(static_cast<unsigned char>(c))) {
        break;
      } else {
        tok += c;
      }
    }
    out.push_back(std::move(tok));
  }
  return out;
}

// A comma-separated pattern list: some pattern matches and no !pattern does.
bool list_matches(std::string_view list, const std::string& value) {
  bool matched = false;
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t comma = list.find(',', pos);
    if (comma == std::string_view::npos) comma = list.size();
    std::string pattern(list.substr(pos, comma - pos));
    bool negated = !pattern.empty() && pattern[0] == '!';
    if (negated) pattern.erase(0, 1);
    if (!pattern.empty() && ::fnmatch(pattern.c_str(), value.c_str(), FNM_CASEFOLD) == 0) {
      if (negated) return false;
      matched = true;
    }
    pos = comma + 1;
  }
  return matched;
}

bool host_applies(const std::vector<std::string>& words, const std::string& alias) {
  bool matched = false;
  for (size_t i = 1; i < words.size(); ++i) {
    // A negated pattern that matches rules the line out, whatever else matched.
    if (words[i].starts_with('!') && list_matches(words[i].substr(1), alias)) return false;
    matched = matched || list_matches(words[i], alias);
  }
  return matched;
}

bool match_applies(const std::vector<std::string>& words, const std::string& alias) {
  bool result = true;
  for (size_t i = 1; i < words.size(); ++i) {
    bool negated = words[i].starts_with('!');
    std::string kw = lower(negated ? words[i].substr(1) : words[i]);
    if (kw == "all") {
      result = result && !negated;
    } else if (kw == "canonical" || kw == "final") {
      continue;  // no effect here, as in libssh
    } else if (kw == "host" && i + 1 < words.size()) {
      result = result && (list_matches(words[++i], alias) != negated);
    } else {
      // user, localuser, exec, originalhost, ...: not evaluated here; the block is skipped.
      if (i + 1 < words.size()) ++i;
      result = false;
    }
  }
  return result;
}

std::string local_user() {
  if (const passwd* pw = ::getpwuid(::getuid())) return pw->pw_name;
  return "";
}

std::string expand(const std::string& value, const SshTarget& t) {
  std::string v = expand_home(value);
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] != '%' || i + 1 == v.size()) {
      out += v[i];
      continue;
    }
    switch (v[++i]) {
      case 'd':
        out += ssh_home() + "/.ssh";
        break;
      case 'h':
        out += t.host;
        break;
      case 'r':
        out += t.user;
        break;
      case 'u':
        out += local_user();
        break;
      case 'p':
        out += std::to_string(t.port);
        break;
      case '%':
        out += '%';
        break;
      default:
        out += '%', out += v[i];
    }
  }
  return out;
}

struct GlobFree {
  glob_t g{};
  ~GlobFree() { ::globfree(&g); }
};

// Reads one file; `applies` is shared with the files it Includes, as in ssh (a Host line in an
// included file decides for the lines after the Include too).
void read_config(const std::string& file, const SshTarget& t, bool& applies, int depth,
                 std::vector<std::string>& out) {
  if (depth > 16) return;  // an Include loop; libssh stops at the same depth
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> w = split_line(line);
    if (w.empty()) continue;
    std::string kw = lower(w[0]);
    if (kw == "host") {
      applies = host_applies(w, t.alias);
    } else if (kw == "match") {
      applies = match_applies(w, t.alias);
    } else if (kw == "identityfile" && applies && w.size() > 1) {
      out.push_back(expand(w[1], t));
    } else if (kw == "include" && applies) {
      for (size_t i = 1; i < w.size(); ++i) {
        std::string p = expand_home(w[i]);
        if (!p.starts_with('/')) p = ssh_home() + "/.ssh/" + p;
        GlobFree g;
        if (::glob(p.c_str(), 0, nullptr, &g.g) != 0) continue;
        for (size_t k = 0; k < g.g.gl_pathc; ++k)
          read_config(g.g.gl_pathv[k], t, applies, depth + 1, out);
      }
    }
  }
}

}  // namespace

// OpenSSH takes the home from the password database and ignores $HOME, and libssh expands "~"
// in IdentityFile and Include (and finds its default keys) the same way, with no option to
// change that. Taking ~/.ssh/config and ~/.ssh/known_hosts from there too puts every file of
// one login in one directory, the one `ssh` itself would use, whatever HOME sudo or a service
// manager left behind.
std::string ssh_home() {
  if (const passwd* pw = ::getpwuid(::getuid()); pw && pw->pw_dir && *pw->pw_dir) return pw->pw_dir;
  if (const char* h = std::getenv("HOME"); h && *h) return h;
  return "/";
}

std::string expand_home(const std::string& path) {
  if (path == "~") return ssh_home();
  return path.starts_with("~/") ? ssh_home() + path.substr(1) : path;
}

std::vector<std::string> config_identity_files(const std::string& config, const SshTarget& t) {
  std::vector<std::string> out;
  bool applies = true;  // lines before the first Host apply to every host
  read_config(config, t, applies, 0, out);
  return out;
}

std::vector<std::string> default_identity_files() {
  std::string dir = ssh_home() + "/.ssh/";
  return {dir + "id_ed25519", dir + "id_ecdsa", dir + "id_rsa"};
}

std::optional<int> agent_key_count() {
  const char* sock = std::getenv("SSH_AUTH_SOCK");
  if (!sock || !*sock) return std::nullopt;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (std::strlen(sock) >= sizeof addr.sun_path) return std::nullopt;
  std::strcpy(addr.sun_path, sock);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return std::nullopt;
  timeval tv{2, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    return std::nullopt;
  // SSH_AGENTC_REQUEST_IDENTITIES (11); the answer (12) starts with the number of keys.
  const std::array<unsigned char, 5> request{0, 0, 0, 1, 11};
  if (::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL) != 5) return std::nullopt;
  std::array<unsigned char, 9> head{};
  size_t got = 0;
  while (got < head.size()) {
    ssize_t n = ::recv(fd.get(), head.data() + got, head.size() - got, 0);
    if (n <= 0) return std::nullopt;
    got += static_cast<size_t>(n);
  }
  if (head[4] != 12) return std::nullopt;
  uint32_t n = (uint32_t{head[5]} << 24) | (uint32_t{head[6]} << 16) | (uint32_t{head[7]} << 8) |
               uint32_t{head[8]};
  if (n > 10000) return std::nullopt;
  return static_cast<int>(n);
}

}  // namespace diskferry::sftp
