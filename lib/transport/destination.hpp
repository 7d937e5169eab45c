// Where a conversion's output goes, possibly over several attempts. A destination hands out one
// sink per attempt; a resumable one (SFTP) keeps what earlier attempts got acknowledged, so a new
// attempt — fed the same deterministic bytes from the start — only sends what is missing.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "transport/sink.hpp"

namespace diskferry {

class Destination {
 public:
  virtual ~Destination() = default;
  // For messages: the path or URL the user gave.
  virtual const std::string& name() const = 0;
  // A sink for the next attempt. It receives the whole output from byte 0 every time.
  virtual std::unique_ptr<Sink> open_attempt() = 0;
  // Whether an attempt that failed with a transient error can be continued by another.
  virtual bool resumable() const { return false; }
  // Where the next attempt will start sending (bytes below it are already there).
  virtual uint64_t resume_offset() const { return 0; }
  // Bytes sent more than once across attempts so far (what each drop cost).
  virtual uint64_t resent_bytes() const { return 0; }
  // Whether the destination publishes a SHA-256 sidecar (the pipeline computes it then).
  virtual bool wants_sha256() const { return false; }
  // Whether a planned layout (two reads of the source, no rewrite) is better here than the
  // single pass, when the source can be read twice.
  virtual bool prefers_planned() const { return false; }
  // Called once when no further attempt will be made after a failure: remove leftovers where
  // possible. Must not throw.
  virtual void give_up() noexcept {}
};

// A destination used for one attempt only: files, block devices, stdout, a counting sink.
std::unique_ptr<Destination> make_single_destination(std::string name, std::unique_ptr<Sink> sink);

}  // namespace diskferry
