// `diskferry verify`: proves a backup on the remote is intact without writing it anywhere. The
// file is streamed once: its SHA-256 is compared with the NAME.sha256 sidecar (and the queue's
// record), an outer zstd/gzip stream is decoded to its end, and a qcow2 inside is validated
// (tables, refcounts, every compressed cluster inflated).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "transport/sftp/remote_file.hpp"
#include "transport/sftp/url.hpp"

namespace diskferry {

enum class VerifyStatus {
  Ok = 0,
  ChecksumMismatch = 4,  // or no sidecar to compare with
  StructureInvalid = 5,  // truncated stream, bad tables, refcounts, clusters
  Unreachable = 6,       // cannot connect, log in, or open the file
  Missing = 7,           // the server answered: there is no such file
};

struct VerifyReport {
  VerifyStatus status = VerifyStatus::Ok;
  std::string problem;  // one line, when not Ok
  std::string sha256;   // of the remote file, when it could be read to the end
  std::string sidecar_sha256;
  uint64_t size = 0;   // bytes on the remote
  std::string outer;   // "zstd", "gzip", "none"
  std::string format;  // "qcow2", "vhdx", "raw"
  std::optional<uint64_t> virtual_size;
  std::vector<std::string> notes;  // what was not checked, and why
};

// A backup that did not verify (the daemon's verify: after_upload): permanent for the job.
class VerifyError : public Error {
 public:
  explicit VerifyError(const std::string& what) : Error(ErrorKind::Format, what) {}
};

// `expected_sha256`: the queue's record of the upload, checked too when given.
VerifyReport verify_remote(const sftp::Url& url, const sftp::ReadOptions& options,
                           const std::string& expected_sha256 = "");

}  // namespace diskferry
