#include "transport/sftp/wire.hpp"

#include <fmt/format.h>
#include <cstring>

namespace diskferry::sftp {
namespace {

constexpr uint32_t kAttrSize = 0x1, kAttrUidGid = 0x2, kAttrPermissions = 0x4, kAttrAcmodtime = 0x8,
                   kAttrExtended = 0x80000000u;

}  // namespace

std::string_view status_name(uint32_t code) {
  switch (code) {
    case kOk:
      return "ok";
    case kEof:
      return "end of file";
    case kNoSuchFile:
      return "no such file";
    case kPermissionDenied:
      return "permission denied";
    case kFailure:
      return "failure";
    case kBadMessage:
      return "bad message";
    case kNoConnection:
      return "no connection";
    case kConnectionLost:
      return "connection lost";
    case kOpUnsupported:
      return "operation unsupported";
  }
  return "unknown status";
}

PacketWriter::PacketWriter(PacketType type, std::optional<uint32_t> id) {
  buf_.resize(4);
  u8(type);
  if (id) u32(*id);
}
PacketWriter& PacketWriter::u8(uint8_t v) {
  buf_.push_back(std::byte(v));
  return *this;
}
PacketWriter& PacketWriter::u32(uint32_t v) {
  size_t at = buf_.size();
  buf_.resize(at + 4);
  put_be32(buf_.data() + at, v);
  return *this;
}
PacketWriter& PacketWriter::u64(uint64_t v) {
  size_t at = buf_.size();
  buf_.resize(at + 8);
  put_be64(buf_.data() + at, v);
  return *this;
}
PacketWriter& PacketWriter::str(std::string_view s) {
  return bytes(Bytes(reinterpret_cast<const std::byte*>(s.data()), s.size()));
}
PacketWriter& PacketWriter::bytes(Bytes b) {
  u32(static_cast<uint32_t>(b.size()));
  buf_.insert(buf_.end(), b.begin(), b.end());
  return *this;
}
PacketWriter& PacketWriter::attrs(const Attrs& a) {
  uint32_t flags = (a.size ? kAttrSize : 0) | (a.uid && a.gid ? kAttrUidGid : 0) |
                   (a.permissions ? kAttrPermissions : 0) |
                   (a.atime && a.mtime ? kAttrAcmodtime : 0);
  u32(flags);
  if (a.size) u64(*a.size);
  if (flags & kAttrUidGid) u32(*a.uid).u32(*a.gid);
  if (a.permissions) u32(*a.permissions);
  if (flags & kAttrAcmodtime) u32(*a.atime).u32(*a.mtime);
  return *this;
}
const std::vector<std::byte>& PacketWriter::finish() {
  put_be32(buf_.data(), static_cast<uint32_t>(buf_.size() - 4));
  return buf_;
}

Bytes PacketReader::take(size_t n, const char* what) {
  if (n > p_.size())
    throw ProtocolError(fmt::format("malformed SFTP reply: truncated {} (needs {} bytes, {} left)",
                                    what, n, p_.size()));
  Bytes out = p_.first(n);
  p_ = p_.subspan(n);
  return out;
}
uint8_t PacketReader::u8(const char* what) {
  return std::to_integer<uint8_t>(take(1, what)[0]);
}
uint32_t PacketReader::u32(const char* what) {
  return get_be32(take(4, what).data());
}
uint64_t PacketReader::u64(const char* what) {
  return get_be64(take(8, what).data());
}
Bytes PacketReader::bytes(const char* what) {
  uint32_t n = u32(what);
  return take(n, what);
}
std::string PacketReader::str(const char* what) {
  Bytes b = bytes(what);
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}
Attrs PacketReader::attrs() {
  Attrs a;
  uint32_t flags = u32("attribute flags");
  if (flags & kAttrSize) a.size = u64("size attribute");
  if (flags & kAttrUidGid) {
    a.uid = u32("uid attribute");
    a.gid = u32("gid attribute");
  }
  if (flags & kAttrPermissions) a.permissions = u32("permissions attribute");
  if (flags & kAttrAcmodtime) {
    a.atime = u32("atime attribute");
    a.mtime = u32("mtime attribute");
  }
  if (flags & kAttrExtended) {
    uint32_t n = u32("extended attribute count");
    for (uint32_t i = 0; i < n; ++i) {
      bytes("extended attribute name");
      bytes("extended attribute data");
    }
  }
  return a;
}

Reply parse_reply(Bytes body) {
  PacketReader r(body);
  Reply rep;
  rep.type = r.u8("packet type");
  if (rep.type == kVersion) {
    rep.version = r.u32("version");
    while (!r.empty()) {
      std::string name = r.str("extension name");
      std::string data = r.str("extension data");
      rep.extensions.emplace_back(std::move(name), std::move(data));
    }
    return rep;
  }
  rep.id = r.u32("request id");
  switch (rep.type) {
    case kStatus:
      rep.status = r.u32("status code");
      // Some v3 servers omit message and language tag: both are optional here.
      if (!r.empty()) rep.message = r.str("status message");
      if (!r.empty()) r.bytes("language tag");
      break;
    case kHandle: {
      Bytes h = r.bytes("handle");
      if (h.size() > 256) throw ProtocolError("malformed SFTP reply: handle longer than 256 bytes");
      rep.data.assign(h.begin(), h.end());
      break;
    }
    case kData: {
      Bytes d = r.bytes("data");
      rep.data.assign(d.begin(), d.end());
      break;
    }
    case kName: {
      uint32_t n = r.u32("name count");
      // Each entry takes at least 12 bytes: a cheap bound before reserving anything.
      if (n > r.remaining() / 12) throw ProtocolError("malformed SFTP reply: name count too large");
      for (uint32_t i = 0; i < n; ++i) {
        std::string name = r.str("file name");
        r.bytes("long name");
        rep.names.emplace_back(std::move(name), r.attrs());
      }
      break;
    }
    case kAttrs:
      rep.attrs = r.attrs();
      break;
    case kExtendedReply: {
      rep.data.assign(body.begin() + 5, body.end());
      return rep;
    }
    default:
      throw ProtocolError(fmt::format("malformed SFTP reply: unexpected packet type {}", rep.type));
  }
  return rep;
}

void PacketFramer::feed(Bytes b) {
  if (pos_ > 0 && pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  } else if (pos_ > (1u << 20)) {
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<long>(pos_));
    pos_ = 0;
  }
  buf_.insert(buf_.end(), b.begin(), b.end());
}

std::optional<std::vector<std::byte>> PacketFramer::next() {
  if (buf_.size() - pos_ < 4) return std::nullopt;
  uint32_t len = get_be32(buf_.data() + pos_);
  if (len == 0) throw ProtocolError("malformed SFTP reply: packet length 0");
  if (len > kMaxPacket)
    throw ProtocolError(fmt::format(
        "malformed SFTP reply: packet length {} is too large (limit {})", len, kMaxPacket));
  if (buf_.size() - pos_ - 4 < len) return std::nullopt;
  std::vector<std::byte> body(buf_.begin() + static_cast<long>(pos_ + 4),
                              buf_.begin() + static_cast<long>(pos_ + 4 + len));
  pos_ += 4 + len;
  return body;
}

}  // namespace diskferry::sftp
