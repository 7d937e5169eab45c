// The structure of a VHDX image (MS-VHDX), read and checked before any data is: file identifier,
// the two headers (the valid one with the higher sequence number is used), the region table,
// the metadata items and the whole BAT. Everything is read through a ReadAt, so the same code
// serves a local file, a file on an SFTP server and `diskferry verify`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "image/image_chain.hpp"
#include "util/bytes.hpp"

namespace diskferry {

// BAT entry: state in bits 0-2, file offset (a multiple of 1 MiB) in bits 20-63.
inline constexpr uint64_t kVhdxStateMask = 7;
inline constexpr uint64_t kVhdxOffsetMask = ~((uint64_t{1} << 20) - 1);
// Payload block states. NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED all read as zeros on a disk
// without a parent; PARTIALLY_PRESENT exists only in differencing disks.
inline constexpr uint64_t kVhdxBlockNotPresent = 0;
inline constexpr uint64_t kVhdxBlockUndefined = 1;
inline constexpr uint64_t kVhdxBlockZero = 2;
inline constexpr uint64_t kVhdxBlockUnmapped = 3;
inline constexpr uint64_t kVhdxBlockFullyPresent = 6;
inline constexpr uint64_t kVhdxBlockPartiallyPresent = 7;

bool is_vhdx_magic(Bytes head);  // "vhdxfile"

struct VhdxRegion {
  uint64_t offset = 0, length = 0;
  uint64_t end() const { return offset + length; }
};

struct VhdxImage {
  uint64_t file_size = 0;
  uint64_t virtual_size = 0;
  uint32_t block_size = 0;
  uint32_t logical_sector = 0, physical_sector = 0;
  uint64_t chunk_ratio = 0;      // payload entries per sector-bitmap entry in the BAT
  bool leave_allocated = false;  // a fixed disk
  int header = 0;                // 1 or 2: the header in use
  uint64_t sequence = 0;         // its sequence number
  VhdxRegion log, bat, metadata;
  // One entry per payload block, in guest order (the sector-bitmap entries left out).
  std::vector<uint64_t> blocks;
  uint64_t present_blocks = 0;  // FULLY_PRESENT ones

  uint64_t block_state(uint64_t b) const { return blocks[b] & kVhdxStateMask; }
  uint64_t block_offset(uint64_t b) const { return blocks[b] & kVhdxOffsetMask; }
  // Bytes of block b inside the disk: the block size, less for a short last block.
  uint64_t block_bytes(uint64_t b) const;
};

// Reads and checks the image `name` of `file_size` bytes. Throws Error(Input) naming the file
// and the cause for damage (bad signatures or CRC-32C, truncation, regions or BAT entries out of
// range or overlapping, absurd sizes) and Error(Format) for images diskferry cannot read: a
// differencing disk, a log that needs replaying, unknown required regions or metadata.
// `strict` (verify): also both headers and both region tables must be intact and alike.
VhdxImage read_vhdx(const ReadAt& read, uint64_t file_size, const std::string& name,
                    bool strict = false);

}  // namespace diskferry
