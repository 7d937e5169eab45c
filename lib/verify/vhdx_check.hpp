// Structural validation of a VHDX image for `diskferry verify`: both headers and both region
// tables intact (CRC-32C) and alike, the metadata items present and sane, no log to replay,
// every BAT entry a valid state, every allocated block inside the file and overlapping neither
// the header section, log, BAT, metadata nor another block. The image's tables are read
// through a callback (positioned SFTP reads, or the kept tail of a decompressed stream).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "verify/qcow2_check.hpp"

namespace diskferry {

struct VhdxSummary {
  uint64_t virtual_size = 0;
  uint32_t block_size = 0;
  uint64_t present_blocks = 0;
};

// Reads `length` bytes at `offset` of the image; short only past its end.
using VhdxReadAt = std::function<std::vector<std::byte>(uint64_t offset, size_t length)>;

// Throws StructureError naming `name` and what is wrong.
VhdxSummary check_vhdx(const VhdxReadAt& at, uint64_t file_size, const std::string& name);

}  // namespace diskferry
