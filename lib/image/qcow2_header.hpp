// The qcow2 header (v2 and v3) and its extensions, parsed and checked before anything else of
// the image is read: every field a reader relies on is validated here, so the table walk can
// trust offsets to be aligned and sizes to fit (docs/formats.md lists what is refused).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "codec/cluster.hpp"
#include "util/bytes.hpp"

namespace diskferry {

inline constexpr uint32_t kQcow2Magic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kQcow2MinClusterBits = 9;  // what QEMU accepts
inline constexpr uint32_t kQcow2MaxClusterBits = 21;
// QEMU's QCOW_MAX_L1_SIZE: 32 MiB of L1 entries. Also our bound on the L1 allocation.
inline constexpr uint64_t kQcow2MaxL1Bytes = 32u << 20;

bool is_qcow2_magic(Bytes head);

struct Qcow2Header {
  uint32_t version = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;  // guest-visible bytes (QEMU counts whole sectors: rounded down to 512)
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;  // entries
  uint32_t refcount_order = 4;
  uint32_t header_length = 0;
  uint64_t incompatible = 0, compatible = 0, autoclear = 0;
  ClusterCodec compression = ClusterCodec::Deflate;
  bool dirty = false;
  std::string backing_file;                   // empty: none
  std::optional<std::string> backing_format;  // from the backing-format extension

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t l2_bits() const { return cluster_bits - 3; }  // an L2 table is one cluster of u64
  // Guest bytes one L1 entry maps.
  uint64_t l1_coverage() const { return uint64_t{1} << (cluster_bits + l2_bits()); }
};

// Parses the header from the image's first cluster (`head`: the first min(2 MiB, file size)
// bytes, or fewer for a short file) and checks it against the file size. Throws
// Error(Input) for damage (truncated, tables beyond the end, sizes that overflow) and
// Error(Format) for valid images using features diskferry cannot read (encryption, external
// data files, extended L2, unknown incompatible bits), naming `name` and the cause.
Qcow2Header parse_qcow2_header(Bytes head, uint64_t file_size, const std::string& name);

}  // namespace diskferry
