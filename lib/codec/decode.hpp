// Byte-stream readers: a plain fd, and gzip/zstd decompressors layered on it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "image/source.hpp"
#include "util/bytes.hpp"
#include "util/fd.hpp"

namespace diskferry {

class ByteReader {
 public:
  virtual ~ByteReader() = default;
  // Fills as much of buf as the stream has; returns less than buf.size() only at the end.
  // Throws Error(Input) on I/O errors, corrupt or truncated streams.
  virtual size_t read(MutableBytes buf) = 0;
  // Bytes taken from the underlying file so far.
  virtual uint64_t consumed() const = 0;
};

// Reads fd (owned), first returning `prefix` (bytes already peeked for magic detection).
std::unique_ptr<ByteReader> make_fd_reader(UniqueFd fd, std::string name,
                                           std::vector<std::byte> prefix = {});

// Sniffs the first bytes of a stream.
SourceCompression detect_compression(Bytes head);

// Wraps `inner` in the decompressor for `c` (None returns inner unchanged). Multi-member gzip
// and multi-frame zstd streams are read to their end, as gzip -d and zstd -d do.
std::unique_ptr<ByteReader> make_decoder(SourceCompression c, std::unique_ptr<ByteReader> inner,
                                         std::string name);

}  // namespace diskferry
