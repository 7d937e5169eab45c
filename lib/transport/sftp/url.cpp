#include "transport/sftp/url.hpp"

#include <fmt/format.h>
#include <charconv>

#include "util/error.hpp"

namespace diskferry::sftp {

bool is_sftp_url(std::string_view text) {
  return text.rfind("sftp://", 0) == 0;
}

std::string Url::str() const {
  std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return fmt::format("sftp://{}{}{}/{}{}", user ? *user + "@" : "", h,
                     port ? ":" + std::to_string(*port) : "", home_relative ? "~/" : "", path);
}

Url parse_url(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Error(ErrorKind::Usage, fmt::format("'{}': {} (expected sftp://USER@HOST[:PORT]/PATH, "
                                               "or /~/PATH for a path in the login directory)",
                                               text, why));
  };
  if (!is_sftp_url(text)) throw bad("not an sftp:// URL");
  std::string_view rest = text.substr(7);
  size_t slash = rest.find('/');
  if (slash == std::string_view::npos) throw bad("no path after the host");
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = rest.substr(slash + 1);
  Url u;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    if (at == 0) throw bad("empty user name");
    u.user = std::string(authority.substr(0, at));
    if (u.user->find_first_of(":;") != std::string::npos)
      throw bad("passwords in URLs are not supported; use a key (--identity) or ssh-agent");
    authority = authority.substr(at + 1);
  }
  std::string_view port;
  if (!authority.empty() && authority.front() == '[') {
    auto close = authority.find(']');
    if (close == std::string_view::npos) throw bad("unterminated [IPv6 address]");
    u.host = std::string(authority.substr(1, close - 1));
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') throw bad("junk after ]");
      port = after.substr(1);
    }
  } else {
    auto colon = authority.find(':');
    u.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
  }
  if (u.host.empty()) throw bad("empty host");
  if (u.host.find_first_of(" /\\") != std::string::npos) throw bad("invalid host name");
  if (port.data()) {
    int p = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
    if (port.empty() || ec != std::errc() || end != port.data() + port.size() || p < 1 || p > 65535)
      throw bad("port must be a number from 1 to 65535");
    u.port = p;
  }
  if (path.rfind("~/", 0) == 0) {
    u.home_relative = true;
    path = path.substr(2);
  } else if (path == "~") {
    u.home_relative = true;
    path = "";
  }
  u.path = std::string(path);
  for (char c : u.path)
    if (static_cast<unsigned char>(c) < 0x20) throw bad("control character in the path");
  return u;
}

}  // namespace diskferry::sftp
