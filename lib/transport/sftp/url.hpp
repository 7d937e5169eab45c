// sftp://[USER@]HOST[:PORT]/PATH — PATH is absolute on the server ("/" is the chroot);
// /~/PATH is relative to the login directory (what a Hetzner Storage Box expects).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace diskferry::sftp {

struct Url {
  std::optional<std::string> user;  // absent: from ~/.ssh/config, else the local user
  std::string host;                 // a name, an address, or a Host alias of ~/.ssh/config
  std::optional<int> port;          // absent: from ~/.ssh/config, else 22
  std::string path;                 // without the leading "/" or "/~/"
  bool home_relative = false;

  // The path as the server wants it: "/abs/path" or "rel/path" (relative to the login dir).
  std::string remote_path() const { return home_relative ? path : std::string("/").append(path); }
  std::string str() const;  // canonical text, for messages (no secrets: URLs carry none)
};

bool is_sftp_url(std::string_view text);
// Throws Error(Usage) saying what is wrong with the URL.
Url parse_url(std::string_view text);

}  // namespace diskferry::sftp
