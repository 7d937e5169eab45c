// A backup on an SFTP server as the source of a conversion (restore): `diskferry convert
// sftp://.../web01.qcow2 -O raw -o /var/lib/libvirt/images/web01.img`.
#pragma once

#include <memory>

#include "image/source.hpp"
#include "transport/sftp/remote_file.hpp"
#include "transport/sftp/url.hpp"

namespace diskferry::sftp {

// raw, .gz and .zst files are read front to back (each pass downloads again, since nothing is
// kept on local disk); a qcow2 or VHDX without outer compression is read like a local one, its
// data streamed in file order with pipelining and its tables fetched beside it. Refused, naming
// the file: a qcow2 or VHDX inside .gz/.zst (it needs random access), a qcow2 with a backing
// file, a differencing VHDX.
std::unique_ptr<Source> open_remote_source(const Url& url, const ReadOptions& read,
                                           const SourceOptions& options);

}  // namespace diskferry::sftp
