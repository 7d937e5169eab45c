// Outer compression of the whole output stream (`.qcow2.zst`, `.raw.gz`), as sink stages.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "transport/sink.hpp"

namespace diskferry {

enum class StreamCodec { None, Zstd, Gzip };

struct StreamCompression {
  StreamCodec codec = StreamCodec::None;
  int level = 0;  // 0: the codec's default (zstd 3, gzip 6)
  // Parses "none", "zstd", "zstd:19", "gzip", "gzip:9"; throws Error(Usage).
  static StreamCompression parse(const std::string& text);
  std::string extension() const;  // "", ".zst", ".gz"
};

// zstd compresses on its own worker threads (all cores). Output does not depend on the number of
// workers as long as it is at least one, so we always use >= 1 and the bytes are reproducible on
// any machine.
std::unique_ptr<Sink> make_compressing_sink(const StreamCompression& c, std::unique_ptr<Sink> inner,
                                            int workers);

}  // namespace diskferry
