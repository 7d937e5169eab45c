#include "verify/vhdx_check.hpp"

#include <algorithm>
#include <cstring>

#include "image/vhdx_header.hpp"

namespace diskferry {

VhdxSummary check_vhdx(const VhdxReadAt& at, uint64_t file_size, const std::string& name) {
  ReadAt read = [&](MutableBytes buf, uint64_t offset) {
    std::vector<std::byte> d = at(offset, buf.size());
    size_t n = std::min(d.size(), buf.size());
    std::memcpy(buf.data(), d.data(), n);
    return n;
  };
  try {
    VhdxImage img = read_vhdx(read, file_size, name, /*strict=*/true);
    return {img.virtual_size, img.block_size, img.present_blocks};
  } catch (const StructureError&) {
    throw;
  } catch (const Error& e) {
    // Damage and what diskferry cannot read alike: the backup does not restore as it is.
    if (e.kind() != ErrorKind::Input && e.kind() != ErrorKind::Format) throw;
    throw StructureError(e.what());
  }
}

}  // namespace diskferry
