// Shared by the source fuzz targets: reads up to `max_chunks` units of one pass and aborts when
// the Pass contract breaks (units aligned, increasing, non-empty, inside the disk).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "image/source.hpp"

namespace diskferry::fuzz {

inline void read_pass(Source& src, uint32_t unit, size_t max_chunks) {
  auto pass = src.open_pass(unit);
  std::vector<std::byte> buf(unit);
  uint64_t last_end = 0;
  for (size_t n = 0; n < max_chunks; ++n) {
    auto c = pass->next(buf);
    if (!c) break;
    if (c->offset % unit || c->offset < last_end || c->length == 0 || c->length > unit ||
        c->offset + c->length > *src.known_size())
      abort();
    last_end = c->offset + c->length;
  }
}

}  // namespace diskferry::fuzz
