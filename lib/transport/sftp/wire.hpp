// SFTP v3 packet encoding and decoding (draft-ietf-secsh-filexfer-02). No I/O here: the reply
// parser sees bytes from the server, so it checks every length and is fuzzed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "util/bytes.hpp"
#include "util/error.hpp"

namespace diskferry::sftp {

enum PacketType : uint8_t {
  kInit = 1,
  kVersion = 2,
  kOpen = 3,
  kClose = 4,
  kRead = 5,
  kWrite = 6,
  kLstat = 7,
  kFstat = 8,
  kSetstat = 9,
  kFsetstat = 10,
  kOpendir = 11,
  kReaddir = 12,
  kRemove = 13,
  kMkdir = 14,
  kRmdir = 15,
  kRealpath = 16,
  kStat = 17,
  kRename = 18,
  kStatus = 101,
  kHandle = 102,
  kData = 103,
  kName = 104,
  kAttrs = 105,
  kExtended = 200,
  kExtendedReply = 201,
};

enum OpenFlags : uint32_t {
  kOpenRead = 1,
  kOpenWrite = 2,
  kOpenAppend = 4,
  kOpenCreate = 8,
  kOpenTrunc = 0x10,
  kOpenExcl = 0x20,
};

enum StatusCode : uint32_t {
  kOk = 0,
  kEof = 1,
  kNoSuchFile = 2,
  kPermissionDenied = 3,
  kFailure = 4,
  kBadMessage = 5,
  kNoConnection = 6,
  kConnectionLost = 7,
  kOpUnsupported = 8,
};

std::string_view status_name(uint32_t code);

// A reply that breaks the protocol: too short, too long, an unknown type or request id.
class ProtocolError : public Error {
 public:
  explicit ProtocolError(const std::string& what) : Error(ErrorKind::Output, what) {}
};

// Largest packet we accept from a server: OpenSSH caps messages at 256 KiB, ProFTPD at 512 KiB;
// a data reply to our largest read fits well below this.
inline constexpr uint32_t kMaxPacket = 1u << 20;

struct Attrs {
  std::optional<uint64_t> size;
  std::optional<uint32_t> uid, gid, permissions, atime, mtime;
};

// Builds one packet: length prefix, type, fields.
class PacketWriter {
 public:
  PacketWriter(PacketType type, std::optional<uint32_t> id);
  PacketWriter& u8(uint8_t v);
  PacketWriter& u32(uint32_t v);
  PacketWriter& u64(uint64_t v);
  PacketWriter& str(std::string_view s);
  PacketWriter& bytes(Bytes b);  // as an SFTP string
  PacketWriter& attrs(const Attrs& a);
  // The finished packet, length prefix filled in.
  const std::vector<std::byte>& finish();

 private:
  std::vector<std::byte> buf_;
};

// Reads fields of one received packet (without its length prefix); every read is bounds-checked
// and throws ProtocolError naming what was being read.
class PacketReader {
 public:
  explicit PacketReader(Bytes body) : p_(body) {}
  uint8_t u8(const char* what);
  uint32_t u32(const char* what);
  uint64_t u64(const char* what);
  Bytes bytes(const char* what);  // an SFTP string, as a view into the packet
  std::string str(const char* what);
  Attrs attrs();
  bool empty() const { return p_.empty(); }
  size_t remaining() const { return p_.size(); }

 private:
  Bytes take(size_t n, const char* what);
  Bytes p_;
};

// A decoded server reply. `id` is absent only for VERSION.
struct Reply {
  uint8_t type = 0;
  std::optional<uint32_t> id;
  // STATUS
  uint32_t status = 0;
  std::string message;
  // HANDLE / DATA (bytes), EXTENDED_REPLY (raw payload)
  std::vector<std::byte> data;
  // NAME
  std::vector<std::pair<std::string, Attrs>> names;
  // ATTRS
  Attrs attrs;
  // VERSION
  uint32_t version = 0;
  std::vector<std::pair<std::string, std::string>> extensions;
};

// Parses one packet body (type byte onward). Throws ProtocolError on malformed input.
Reply parse_reply(Bytes body);

// Splits a byte stream into packets: feed() bytes as they arrive, next() yields complete bodies.
class PacketFramer {
 public:
  void feed(Bytes b);
  // The next complete packet body (type byte onward), or nullopt when more bytes are needed.
  // Throws ProtocolError for a length of 0 or above kMaxPacket.
  std::optional<std::vector<std::byte>> next();
  size_t buffered() const { return buf_.size() - pos_; }

 private:
  std::vector<std::byte> buf_;
  size_t pos_ = 0;
};

}  // namespace diskferry::sftp
