// CRC-32C (Castagnoli), as VHDX headers and region tables use. zlib only offers CRC-32.
#pragma once

#include <cstdint>

#include "util/bytes.hpp"

namespace diskferry {

uint32_t crc32c(Bytes data, uint32_t crc = 0) noexcept;

}  // namespace diskferry
