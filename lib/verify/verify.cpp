#include "verify/verify.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstring>

#include "codec/decode.hpp"
#include "pipeline/checksum.hpp"
#include "transport/sftp/channel.hpp"
#include "verify/qcow2_check.hpp"
#include "verify/vhdx_check.hpp"

namespace diskferry {
namespace {

constexpr size_t kUnit = 1 << 20;
// A compressed stream cannot be read twice cheaply, and qcow2 keeps its tables after the data:
// the last bytes of the decoded stream are kept to read them from (diskferry's tables take about
// 1 MiB per 512 GiB of disk at 64 KiB clusters, so this covers any disk it writes).
constexpr size_t kTailKeep = 64u << 20;

// Hashes what the decoder takes from the remote file.
class HashingReader final : public ByteReader {
 public:
  HashingReader(sftp::RemoteFile& f, Sha256& h) : f_(f), h_(h) {}
  size_t read(MutableBytes buf) override {
    size_t n = f_.read(buf);
    h_.update(Bytes(buf.data(), n));
    return n;
  }
  uint64_t consumed() const override { return f_.consumed(); }

 private:
  sftp::RemoteFile& f_;
  Sha256& h_;
};

// The last kTailKeep bytes of a stream.
class Tail {
 public:
  void add(Bytes d) {
    if (buf_.empty()) buf_.resize(kTailKeep);
    for (size_t i = 0; i < d.size();) {
      size_t at = static_cast<size_t>(total_ % kTailKeep);
      size_t n = std::min(d.size() - i, kTailKeep - at);
      std::memcpy(buf_.data() + at, d.data() + i, n);
      i += n;
      total_ += n;
    }
  }
  bool holds(uint64_t off, size_t len) const {
    uint64_t first = total_ > kTailKeep ? total_ - kTailKeep : 0;
    return off >= first && off + len <= total_;
  }
  std::vector<std::byte> at(uint64_t off, size_t len) const {
    std::vector<std::byte> out(len);
    for (size_t i = 0; i < len; ++i) out[i] = buf_[static_cast<size_t>((off + i) % kTailKeep)];
    return out;
  }

 private:
  std::vector<std::byte> buf_;
  uint64_t total_ = 0;
};

std::string format_of(Bytes head) {
  if (is_qcow2(head)) return "qcow2";
  if (head.size() >= 8 && std::memcmp(head.data(), "vhdxfile", 8) == 0) return "vhdx";
  return "raw";
}

std::string base_name(const std::string& path) {
  auto s = path.find_last_of('/');
  return s == std::string::npos ? path : path.substr(s + 1);
}

}  // namespace

VerifyReport verify_remote(const sftp::Url& url, const sftp::ReadOptions& options,
                           const std::string& expected_sha256) {
  VerifyReport r;
  const std::string name = url.str();
  std::unique_ptr<sftp::RemoteFile> file;
  std::optional<std::string> sidecar;
  sftp::Url side = url;
  side.path += ".sha256";
  try {
    file = std::make_unique<sftp::RemoteFile>(url, options);
    sidecar = sftp::read_small_file(side, options.ssh, options.stall_timeout);
  } catch (const sftp::StatusError& e) {
    // The server was reached and said so: the backup itself is gone, which no retry mends.
    r.status = e.code() == sftp::kNoSuchFile ? VerifyStatus::Missing : VerifyStatus::Unreachable;
    r.problem = e.what();
    return r;
  } catch (const Error& e) {
    r.status = VerifyStatus::Unreachable;
    r.problem = e.what();
    return r;
  }
  r.size = file->size();

  std::string structure_problem;
  auto structure = [&](const std::string& what) {
    if (structure_problem.empty()) structure_problem = what;
  };
  try {
    std::vector<std::byte> head(std::min<uint64_t>(kUnit, r.size));
    head.resize(file->pread(0, head));
    SourceCompression outer = detect_compression(head);
    r.outer = outer == SourceCompression::Zstd   ? "zstd"
              : outer == SourceCompression::Gzip ? "gzip"
                                                 : "none";
    Sha256 hash;
    std::vector<std::byte> buf(kUnit);
    if (outer == SourceCompression::None) {
      r.format = format_of(head);
      std::optional<Qcow2Check> q;
      if (r.format == "qcow2") {
        try {
          q.emplace(head, r.size, name);
          q->check_tables([&](uint64_t off, size_t len) {
            std::vector<std::byte> d(len);
            d.resize(file->pread(off, d));
            return d;
          });
          r.virtual_size = q->virtual_size();
        } catch (const StructureError& e) {
          structure(e.what());
          q.reset();
        }
      } else if (r.format == "vhdx") {
        try {
          r.virtual_size = check_vhdx(
                               [&](uint64_t off, size_t len) {
                                 std::vector<std::byte> d(len);
                                 d.resize(file->pread(off, d));
                                 return d;
                               },
                               r.size, name)
                               .virtual_size;
        } catch (const StructureError& e) {
          structure(e.what());
        }
      }
      file->seek(0);
      uint64_t off = 0;
      while (size_t n = file->read(buf)) {
        hash.update(Bytes(buf.data(), n));
        if (q) {
          try {
            q->feed(off, Bytes(buf.data(), n));
          } catch (const StructureError& e) {
            structure(e.what());
            q.reset();
          }
        }
        off += n;
      }
      if (q) {
        try {
          q->finish();
        } catch (const StructureError& e) {
          structure(e.what());
        }
      }
    } else {
      file->seek(0);
      auto dec = make_decoder(outer, std::make_unique<HashingReader>(*file, hash), name);
      std::vector<std::byte> inner_head;
      Tail tail;
      uint64_t total = 0;
      try {
        while (size_t n = dec->read(buf)) {
          Bytes d(buf.data(), n);
          if (inner_head.size() < kUnit) {
            size_t k = std::min(n, kUnit - inner_head.size());
            inner_head.insert(inner_head.end(), d.begin(), d.begin() + static_cast<long>(k));
          }
          if (!inner_head.empty() && (is_qcow2(inner_head) || format_of(inner_head) == "vhdx"))
            tail.add(d);
          total += n;
        }
      } catch (const Error& e) {
        if (e.kind() != ErrorKind::Input) throw;
        structure(fmt::format("the {} stream: {}", r.outer, e.what()));
        // Hash the rest of the file anyway, so the checksum verdict is about the whole file.
        while (size_t n = file->read(buf)) hash.update(Bytes(buf.data(), n));
      }
      r.format = format_of(inner_head);
      if (structure_problem.empty() && r.format == "qcow2") {
        try {
          Qcow2Check q(inner_head, total, name);
          r.virtual_size = q.virtual_size();
          bool in_tail = true;
          q.check_tables([&](uint64_t off, size_t len) {
            if (!tail.holds(off, len)) {
              in_tail = false;
              throw StructureError("");
            }
            return tail.at(off, len);
          });
          if (q.compressed_clusters())
            r.notes.push_back(fmt::format(
                "{} compressed clusters inside a {} stream were not inflated (one pass)",
                q.compressed_clusters(), r.outer));
        } catch (const StructureError& e) {
          if (std::string(e.what()).empty())
            r.notes.push_back(
                "the qcow2 tables are not in the last 64 MiB of the stream; "
                "they were not checked");
          else
            structure(e.what());
        }
      }
      if (structure_problem.empty() && r.format == "vhdx") {
        // The header section is the first MiB, kept in inner_head; diskferry writes the BAT and
        // the metadata last, so they are in the tail.
        bool in_tail = true;
        try {
          r.virtual_size = check_vhdx(
                               [&](uint64_t off, size_t len) {
                                 if (off + len <= inner_head.size())
                                   return std::vector<std::byte>(
                                       inner_head.begin() + static_cast<long>(off),
                                       inner_head.begin() + static_cast<long>(off + len));
                                 if (!tail.holds(off, len)) {
                                   in_tail = false;
                                   throw StructureError("");
                                 }
                                 return tail.at(off, len);
                               },
                               total, name)
                               .virtual_size;
        } catch (const StructureError& e) {
          if (!in_tail)
            r.notes.push_back(
                "the VHDX tables are not in the last 64 MiB of the stream; they were not "
                "checked");
          else
            structure(e.what());
        }
      }
    }
    r.sha256 = hash.hex();
  } catch (const sftp::DisconnectedError& e) {
    r.status = VerifyStatus::Unreachable;
    r.problem = e.what();
    return r;
  } catch (const sftp::ConnectError& e) {
    r.status = VerifyStatus::Unreachable;
    r.problem = e.what();
    return r;
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Input && e.kind() != ErrorKind::Format) throw;
    structure(e.what());  // e.g. the file is shorter than when it was opened
  }

  // A broken structure explains a checksum mismatch too; say the more specific thing.
  if (!structure_problem.empty()) {
    r.status = VerifyStatus::StructureInvalid;
    r.problem = structure_problem;
    return r;
  }
  std::string why;
  if (!sidecar) {
    r.status = VerifyStatus::ChecksumMismatch;
    r.problem = fmt::format("{}: no {} to compare the checksum with", name, base_name(side.path));
    return r;
  }
  auto want = parse_sha256_sidecar(*sidecar, base_name(url.path), why);
  if (!want) {
    r.status = VerifyStatus::ChecksumMismatch;
    r.problem = fmt::format("{}: {}", side.str(), why);
    return r;
  }
  r.sidecar_sha256 = *want;
  if (r.sha256 != *want) {
    r.status = VerifyStatus::ChecksumMismatch;
    r.problem = fmt::format("{}: sha256 {} does not match {} ({})", name, r.sha256,
                            base_name(side.path), *want);
    return r;
  }
  if (!expected_sha256.empty() && r.sha256 != expected_sha256) {
    r.status = VerifyStatus::ChecksumMismatch;
    r.problem = fmt::format("{}: sha256 {} does not match the queue's record {}", name, r.sha256,
                            expected_sha256);
  }
  return r;
}

}  // namespace diskferry
