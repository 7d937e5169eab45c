// Structural validation of a qcow2 image as `diskferry verify` does it: without writing anything
// and, for the image's data, in one forward pass. The tables are read first (through a callback:
// positioned SFTP reads, or the tail of a decompressed stream), then the data streams past and
// every compressed cluster is inflated on the way. Refcounts are recomputed from every reference
// and compared with the stored ones, as `qemu-img check` does.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "util/bytes.hpp"
#include "util/error.hpp"

namespace diskferry {

// The image breaks its format: the message says where and how.
class StructureError : public Error {
 public:
  explicit StructureError(const std::string& what) : Error(ErrorKind::Format, what) {}
};

bool is_qcow2(Bytes head);

class Qcow2Check {
 public:
  // Reads the header from the file's first bytes (at least 512). Throws StructureError.
  Qcow2Check(Bytes head, uint64_t file_size, std::string name);

  // Reads `length` bytes at `offset` of the image; short only past its end.
  using ReadAt = std::function<std::vector<std::byte>(uint64_t offset, size_t length)>;
  // L1, L2, refcount table and blocks: every entry in range and aligned, refcounts equal to the
  // references. Throws StructureError.
  void check_tables(const ReadAt& at);

  // The image's bytes in file order (after check_tables): compressed clusters are inflated as
  // they pass. finish() checks that every one was seen.
  void feed(uint64_t offset, Bytes data);
  void finish();

  uint64_t virtual_size() const { return size_; }
  uint32_t cluster_size() const { return 1u << cluster_bits_; }
  uint64_t data_clusters() const { return data_clusters_; }
  uint64_t compressed_clusters() const { return compressed_.size(); }

 private:
  struct Compressed {
    uint64_t offset, length;  // the compressed bytes in the file
    uint64_t guest;           // guest offset, for messages
  };
  [[noreturn]] void bad(const std::string& what) const;
  void inflate(const Compressed& c, Bytes data);

  std::string name_;
  uint64_t file_size_;
  uint32_t version_ = 0, cluster_bits_ = 0, refcount_order_ = 4;
  uint64_t size_ = 0, l1_offset_ = 0, rt_offset_ = 0;
  uint32_t l1_size_ = 0, rt_clusters_ = 0;
  uint8_t compression_type_ = 0;
  uint64_t data_clusters_ = 0;
  std::vector<Compressed> compressed_;  // sorted by offset
  size_t next_compressed_ = 0;
  std::vector<std::byte> pending_;  // the compressed cluster being collected
};

}  // namespace diskferry
