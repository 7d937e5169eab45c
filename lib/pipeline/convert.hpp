// One conversion: source → format writer → outer compression → queue → destination.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "codec/encode.hpp"
#include "format/writer.hpp"
#include "image/source.hpp"
#include "transport/destination.hpp"
#include "transport/sink.hpp"

namespace diskferry {

struct ConvertOptions {
  WriterOptions writer;
  StreamCompression compress;
  bool progress = false;
  int threads = 1;  // cluster compression and zstd workers
  // Attempts after the first when the destination drops (resumable destinations only), and the
  // wait before the first of them; the wait doubles up to max_retry_delay.
  int retries = 5;
  std::chrono::milliseconds retry_delay{2000};
  std::chrono::milliseconds max_retry_delay{60000};
  // The caller retries later (the daemon's queue): a transient failure propagates unchanged
  // (its type says it is transient) instead of being retried here.
  bool caller_retries = false;
  // Told about each retry (one line, no trailing newline); default: silent.
  std::function<void(const std::string&)> on_retry;
  // Called for every unit read: source bytes consumed in this pass, the source's size when
  // known, and whether this is the pass that writes (the planning pass only reads). May throw to
  // stop the conversion (a cancelled job, a daemon shutting down); the error propagates.
  std::function<void(uint64_t done, std::optional<uint64_t> total, bool writing)> on_progress;
  // Wraps the destination's sink of each attempt (bandwidth limits); identity when empty.
  std::function<std::unique_ptr<Sink>(std::unique_ptr<Sink>)> wrap_destination;
};

struct ConvertResult {
  uint64_t virtual_size = 0;
  uint64_t image_bytes = 0;   // size of the image before outer compression
  uint64_t output_bytes = 0;  // bytes that reached the destination
  bool single_pass = false;
  std::string sha256;  // of the output, when the destination asked for it
  int attempts = 1;
  uint64_t resent_bytes = 0;  // sent more than once because of dropped connections
};

// Writes the image to `dest` and commits it; on any error the destination is aborted (no file
// under the final name) and the error propagates. A transient failure of a resumable destination
// is retried up to options.retries times when the source can be read again; each attempt
// regenerates the same bytes and the destination sends only what it does not have yet.
ConvertResult convert(Source& source, Destination& dest, const ConvertOptions& options);
ConvertResult convert(Source& source, std::unique_ptr<Sink> dest, const ConvertOptions& options);

// The exact size `convert` would produce with the planned layout.
ConvertResult measure(Source& source, const ConvertOptions& options);

}  // namespace diskferry
