// A sink takes the output bytes in order. Every stage after the format writer is a sink that
// wraps the next one (codec, meter, limiter, queue), ending at a destination (file, stdout, sftp).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "util/bytes.hpp"
#include "util/file_identity.hpp"

namespace diskferry {

class Sink {
 public:
  virtual ~Sink() = default;
  virtual void write(Bytes data) = 0;
  // Appends n zero bytes. Destinations that can leave holes skip ahead instead of writing.
  virtual void write_zeros(uint64_t n);
  // Whether one positioned rewrite of already-written bytes is possible before commit(). This is
  // the only backward movement allowed, and what lets qcow2/VHDX be written in a single pass.
  virtual bool supports_rewrite() const { return false; }
  virtual void rewrite(uint64_t offset, Bytes data);
  // The exact number of bytes that will be written, when known before writing (planned layout,
  // no outer compression). Lets a destination refuse early when it cannot hold them.
  virtual void expect_size(uint64_t) {}
  // At most that many bytes will be written (outer compression of an output of known size).
  // Lets a destination warn when it may not hold them.
  virtual void expect_at_most(uint64_t) {}
  // The most bytes the destination can take, when it has a fixed size (a block device).
  virtual std::optional<uint64_t> capacity() const { return std::nullopt; }
  // The SHA-256 (hex) of everything written, given just before commit() to destinations that
  // publish a checksum next to the file.
  virtual void set_sha256(const std::string&) {}
  // Makes the output final: flush, sync, publish under the final name.
  virtual void commit() = 0;
  // Drops partial output (no file is left under the final name). Must not throw.
  virtual void abort() noexcept = 0;
  // Bytes accepted so far.
  virtual uint64_t position() const = 0;
};

// Forwards everything to an inner sink; stages override what they change.
class FilterSink : public Sink {
 public:
  explicit FilterSink(std::unique_ptr<Sink> inner) : inner_(std::move(inner)) {}
  void write(Bytes data) override { inner_->write(data); }
  void write_zeros(uint64_t n) override { inner_->write_zeros(n); }
  bool supports_rewrite() const override { return inner_->supports_rewrite(); }
  void rewrite(uint64_t offset, Bytes data) override { inner_->rewrite(offset, data); }
  void expect_size(uint64_t n) override { inner_->expect_size(n); }
  void expect_at_most(uint64_t n) override { inner_->expect_at_most(n); }
  std::optional<uint64_t> capacity() const override { return inner_->capacity(); }
  void set_sha256(const std::string& hex) override { inner_->set_sha256(hex); }
  void commit() override { inner_->commit(); }
  void abort() noexcept override { inner_->abort(); }
  uint64_t position() const override { return inner_->position(); }

 protected:
  Sink& inner() { return *inner_; }

 private:
  std::unique_ptr<Sink> inner_;
};

// "-" is stdout; a regular file is written as PATH.partial and renamed on commit; an existing
// block or character device is written in place (a block device opened exclusively: refused
// while mounted or written by another run). PATH.partial is locked (flock) for the whole run:
// a second run writing the same PATH is refused (Error(Usage)), a partial left by a killed run
// is taken over. A PATH that is a symbolic link is written where it points. A block device's zero
// ranges are zeroed with BLKZEROOUT where it has it (it keeps old data where nothing is written);
// `discard`: first try to deallocate them in a way that guarantees zeros (fallocate PUNCH_HOLE,
// never BLKDISCARD).
struct FileSinkOptions {
  // A block device's zero ranges are deallocated where that keeps them reading as zeros.
  bool discard = false;
  // fsync before the rename (and the directory after it), so a crash never leaves a file under
  // the final name whose data is not on disk. Off only on request, for scratch copies.
  bool sync = true;
  // The files the run reads: refused as the destination or its partial file, before anything
  // is written.
  FileIdentities inputs;
};
std::unique_ptr<Sink> open_file_sink(const std::string& path, const FileSinkOptions& options = {});

// Counts bytes and drops them (measure with outer compression).
std::unique_ptr<Sink> make_counting_sink();

// Hands writes to a background thread through a bounded queue of buffers, so the producer
// (reading, compressing) and the destination (disk, network) work at the same time.
std::unique_ptr<Sink> make_queued_sink(std::unique_ptr<Sink> inner, size_t buffers = 8,
                                       size_t buffer_size = 1 << 20);

}  // namespace diskferry
