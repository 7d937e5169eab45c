#include "util/error.hpp"

#include <fmt/format.h>
#include <cstring>

namespace diskferry {

void throw_errno(ErrorKind kind, std::string_view thing, std::string_view what, int err) {
  throw Error(kind, fmt::format("{}: {}: {}", thing, what, std::strerror(err)));
}

}  // namespace diskferry
