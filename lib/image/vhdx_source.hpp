// VHDX images (dynamic and fixed, MS-VHDX) as a Source: the guest-visible disk, what
// `qemu-img convert -O raw` of the image gives. The structure is read and checked once
// (image/vhdx_header); a pass then walks the BAT and reads only FULLY_PRESENT blocks, so zero,
// unmapped and not-present blocks cost nothing.
#pragma once

#include <memory>
#include <string>

#include "image/image_chain.hpp"
#include "image/source.hpp"
#include "util/fd.hpp"

namespace diskferry {

// `fd` is the open image named `path` of `file_size` bytes (a regular file or block device).
// Throws Error(Input|Format) naming the file and the cause.
std::unique_ptr<Source> open_vhdx_source(UniqueFd fd, const std::string& path, uint64_t file_size,
                                         const SourceOptions& options);

// A VHDX read through `read` (a file on an SFTP server, or any other random-access reader of
// `file_size` bytes). `read` is used by one pass at a time and must stay valid as long as the
// source does.
std::unique_ptr<Source> open_vhdx_source_at(ReadAt read, uint64_t file_size,
                                            const std::string& name, const SourceOptions& options);

}  // namespace diskferry
