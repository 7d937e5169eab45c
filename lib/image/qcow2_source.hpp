// qcow2 images (v2, v3) with their backing chains as a Source: the guest-visible disk, what
// `qemu-img convert -O raw` of the image gives. The allocation map comes from the L1/L2 tables
// of the whole chain, so unallocated and zero ranges are never read.
#pragma once

#include <memory>
#include <string>

#include "image/image_chain.hpp"
#include "image/source.hpp"
#include "util/fd.hpp"

namespace diskferry {

// `fd` is the open image named `path` (a regular file or block device: qcow2 needs random
// access). Throws Error(Input|Format) naming the file and the cause.
std::unique_ptr<Source> open_qcow2_source(UniqueFd fd, const std::string& path,
                                          const SourceOptions& options);

// A qcow2 image without a backing file read through `read` (an SFTP server's file).
std::unique_ptr<Source> open_remote_qcow2_source(ReadAt read, uint64_t file_size,
                                                 const std::string& name,
                                                 const SourceOptions& options);

}  // namespace diskferry
