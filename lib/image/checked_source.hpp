// A backup checked against its NAME.sha256 sidecar while it is read for a restore. The check
// fails the pass that read the file's last byte, so an output is never committed from bytes that
// do not match: the pipeline aborts its DEST.partial instead of renaming it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "image/image_chain.hpp"
#include "image/source.hpp"
#include "util/error.hpp"

namespace diskferry {

class ByteReader;
class Sha256;

// The whole file read did not hash to the sidecar's SHA-256.
class ChecksumMismatch final : public Error {
 public:
  explicit ChecksumMismatch(const std::string& message) : Error(ErrorKind::Input, message) {}
};

// What a file's bytes must hash to.
struct ExpectedSha256 {
  std::string file;     // the backup, for messages
  std::string sidecar;  // its NAME.sha256, for messages
  std::string hex;      // lower case
  // Throws ChecksumMismatch when `got` differs.
  void check(const std::string& got) const;
};

// Hashes the bytes of a reader that goes from the file's first byte to its end; at the end
// (a short read) compares. A reader dropped before its end checks nothing.
std::unique_ptr<ByteReader> make_checked_reader(std::unique_ptr<ByteReader> inner,
                                                std::shared_ptr<const ExpectedSha256> want);

// Random access (a qcow2 or VHDX read through a ReadAt): each pass hashes the file in order
// from byte 0 as the image reader's reads reach the hashed prefix. Reads a little ahead are kept
// until the prefix reaches them (the reader plans ahead: compressed clusters of later units
// before the data of earlier ones); reads behind the prefix or far ahead (tables at the end)
// are not hashed. At the pass's end whatever was not read yet is read, so every byte is hashed
// exactly once and in order; for an image whose data is in file order that is the tables and
// the space before the first data read, not a second download.
class HashedReadAt {
 public:
  HashedReadAt(ReadAt inner, uint64_t file_size, ExpectedSha256 want);
  ~HashedReadAt();
  size_t read(MutableBytes buf, uint64_t offset);
  void begin();   // a pass starts: hashing from byte 0
  void finish();  // the pass ended: reads the rest, compares (throws ChecksumMismatch)

 private:
  void hash_through(uint64_t end);
  void take_pending();
  void trim_pending();

  std::mutex mu_;
  ReadAt inner_;
  uint64_t size_;
  ExpectedSha256 want_;
  bool active_ = false;
  uint64_t cursor_ = 0;  // bytes [0, cursor_) are hashed
  std::unique_ptr<Sha256> hash_;
  std::map<uint64_t, std::vector<std::byte>> pending_;  // read ahead of cursor_, not yet hashed
  size_t pending_bytes_ = 0;
};

// `inner` reads through `hashed`; every pass of the result is checked. `before_pass` runs first
// (the remote file restarts its read-ahead at byte 0).
std::unique_ptr<Source> make_checked_source(std::unique_ptr<Source> inner,
                                            std::shared_ptr<HashedReadAt> hashed,
                                            std::function<void()> before_pass = {});

}  // namespace diskferry
