// The SHA-256 meter stage: hashes the final bytes on their way to the destination, so a backup's
// checksum costs no second read. It sits after the queue (on the sending thread, overlapping
// the producer) and hands the digest to the destination just before commit().
#pragma once

#include <memory>
#include <string>

#include "transport/sink.hpp"

namespace diskferry {

// `digest` (may be null) receives the hex SHA-256 at commit. A positioned rewrite makes a
// streaming hash impossible: then no digest is given (and `digest` stays empty).
std::unique_ptr<Sink> make_sha256_sink(std::unique_ptr<Sink> inner, std::string* digest);

// Hex SHA-256 of a byte range (tests, sidecars).
std::string sha256_hex(Bytes data);

}  // namespace diskferry
