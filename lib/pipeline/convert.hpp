// One conversion: source → format writer → outer compression → queue → destination.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "codec/encode.hpp"
#include "format/tar.hpp"
#include "format/writer.hpp"
#include "image/source.hpp"
#include "transport/destination.hpp"
#include "transport/sink.hpp"

namespace diskferry {

// What one output is: its image format, outer compression and container.
struct OutputSpec {
  WriterOptions writer;
  StreamCompression compress;
  ContainerOptions container;
};

struct ConvertOptions {
  // The output of convert() and measure(); convert_many() takes one per output instead.
  WriterOptions writer;
  StreamCompression compress;
  ContainerOptions container;
  OutputSpec output() const { return {writer, compress, container}; }
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

struct Output {
  OutputSpec spec;
  Destination* dest = nullptr;
};

struct OutputOutcome {
  ConvertResult result;
  std::exception_ptr error;  // null: committed
};

// Several outputs from one read of the source (per pass: a planning pass is shared too). An
// output that fails does not stop the others: it is aborted, retried on its own when resumable
// (a second read of the source, sending only what the destination lacks), and its error is
// returned in its outcome, in the order given. Errors of the source itself end every output and
// propagate.
std::vector<OutputOutcome> convert_many(Source& source, const std::vector<Output>& outputs,
                                        const ConvertOptions& options);

// The exact size `convert` would produce with the planned layout.
ConvertResult measure(Source& source, const ConvertOptions& options);

}  // namespace diskferry
