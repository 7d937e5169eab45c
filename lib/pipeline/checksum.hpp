// The SHA-256 meter stage: hashes the final bytes on their way to the destination, so a backup's
// checksum costs no second read. It sits after the queue (on the sending thread, overlapping
// the producer) and hands the digest to the destination just before commit().
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "transport/sink.hpp"

namespace diskferry {

// `digest` (may be null) receives the hex SHA-256 at commit. A positioned rewrite makes a
// streaming hash impossible: then no digest is given (and `digest` stays empty).
std::unique_ptr<Sink> make_sha256_sink(std::unique_ptr<Sink> inner, std::string* digest);

// Hex SHA-256 of a byte range (tests, sidecars).
std::string sha256_hex(Bytes data);

// The SHA-256 in a NAME.sha256 sidecar ("HEX  NAME", sha256sum's format, text or binary mode
// marker), lower case; nullopt with `why` set when the text is not that for `name`.
std::optional<std::string> parse_sha256_sidecar(const std::string& text, const std::string& name,
                                                std::string& why);

// Incremental SHA-256 (verify hashes what it downloads).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(Bytes data);
  std::string hex();  // once

 private:
  struct Ctx;
  std::unique_ptr<Ctx> c_;
};

}  // namespace diskferry
