// A remote file read over SFTP with many READ requests in flight, striped over the channels of
// one SSH connection: the download side of the transport (restore, verify). A READ costs a
// round trip, so one at a time (libssh 0.10's sftp_read) moves at most one request size per
// round trip; this keeps up to `lane_budget` bytes requested per channel.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "codec/decode.hpp"
#include "transport/sftp/ssh_session.hpp"
#include "transport/sftp/url.hpp"

namespace diskferry::sftp {

struct ReadOptions {
  SshOptions ssh;
  int streams = 4;  // channels; fewer when the server grants fewer
  std::chrono::seconds stall_timeout{60};
  size_t lane_budget = 8u << 20;  // bytes requested and not yet received, per channel
  int retries = 5;                // reconnects after a dropped connection (reads are idempotent)
};

class RemoteFile final : public ByteReader {
 public:
  // Connects and opens url's file for reading. Throws ConnectError, StatusError (e.g. no such
  // file: code kNoSuchFile) naming the file.
  RemoteFile(const Url& url, const ReadOptions& options);
  ~RemoteFile() override;
  RemoteFile(const RemoteFile&) = delete;
  RemoteFile& operator=(const RemoteFile&) = delete;

  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }  // at open time
  // Sequential reads from the current position (0 at first); short only at the end of file.
  // A file that ends before the size it had at open time is an Error(Input) ("truncated").
  size_t read(MutableBytes buf) override;
  uint64_t consumed() const override { return pos_; }
  // Positioned read (tables of an image); does not move the sequential position. Fills buf
  // fully unless the file ends; returns the bytes read.
  size_t pread(uint64_t offset, MutableBytes buf);
  // Restarts sequential reading at `offset` (drops what was read ahead).
  void seek(uint64_t offset);
  // Reads for an image reader that mostly moves forward (a qcow2 whose data is in guest order):
  // at or a little past the sequential position through the pipeline; small reads elsewhere
  // (tables) on a channel of their own, so the read-ahead goes on; large ones by seeking.
  // Fills buf unless the file ends; returns the bytes read.
  size_t read_at(uint64_t offset, MutableBytes buf);

 private:
  template <class Fn>
  size_t retrying(Fn&& fn);
  size_t pread_once(uint64_t offset, MutableBytes buf);
  size_t side_read(uint64_t offset, MutableBytes buf);

  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string name_;
  uint64_t size_ = 0;
  uint64_t pos_ = 0;
};

// The text of a small remote file (a .sha256 sidecar): nullopt when it does not exist; at most
// `limit` bytes.
std::optional<std::string> read_small_file(const Url& url, const SshOptions& ssh,
                                           std::chrono::seconds stall_timeout,
                                           size_t limit = 64 * 1024);

}  // namespace diskferry::sftp
