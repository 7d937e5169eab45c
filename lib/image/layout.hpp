// Reads the ranges to copy from `rbd diff --whole-object --format=json` output.
#pragma once

#include <string>
#include <vector>

#include "image/source.hpp"

namespace diskferry {

// Entries with "exists": "false" (or false) are skipped. Throws Error(Usage) naming the file and,
// for a bad entry, its index.
std::vector<Extent> read_rbd_layout(const std::string& path);
std::vector<Extent> parse_rbd_layout(const std::string& text, const std::string& name);

}  // namespace diskferry
