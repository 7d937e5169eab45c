// One conversion: source → format writer → outer compression → queue → destination.
#pragma once

#include <cstdint>
#include <memory>

#include "codec/encode.hpp"
#include "format/writer.hpp"
#include "image/source.hpp"
#include "transport/sink.hpp"

namespace diskferry {

struct ConvertOptions {
  WriterOptions writer;
  StreamCompression compress;
  bool progress = false;
  int threads = 1;  // cluster compression and zstd workers
};

struct ConvertResult {
  uint64_t virtual_size = 0;
  uint64_t image_bytes = 0;   // size of the image before outer compression
  uint64_t output_bytes = 0;  // bytes that reached the destination
  bool single_pass = false;
};

// Writes the image to `dest` and commits it; on any error the destination is aborted (no file
// under the final name) and the error propagates.
ConvertResult convert(Source& source, std::unique_ptr<Sink> dest, const ConvertOptions& options);

// The exact size `convert` would produce with the planned layout.
ConvertResult measure(Source& source, const ConvertOptions& options);

}  // namespace diskferry
