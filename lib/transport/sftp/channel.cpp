#include "transport/sftp/channel.hpp"

#include <fmt/format.h>
#include <libssh/libssh.h>
#include <poll.h>
#include <algorithm>
#include <array>

namespace diskferry::sftp {

Channel::Channel(SshSession& session, std::chrono::seconds stall_timeout, Deferred)
    : session_(session), ch_(ssh_channel_new(session.get())), stall_(stall_timeout) {
  if (!ch_.get()) throw Error(ErrorKind::Internal, "libssh: ssh_channel_new failed");
}

Channel::Channel(SshSession& session, std::chrono::seconds stall_timeout)
    : Channel(session, stall_timeout, Deferred{}) {
  if (ssh_channel_open_session(ch_.get()) != SSH_OK)
    throw DisconnectedError(
        fmt::format("{}: cannot open a channel: {}", where(), ssh_get_error(session_.get())));
  if (ssh_channel_request_subsystem(ch_.get(), "sftp") != SSH_OK)
    throw ConnectError(ConnectFailure::Protocol,
                       fmt::format("{}: the server refused the sftp subsystem: {}", where(),
                                   ssh_get_error(session_.get())));
  send_init();
  take_version();
  take_limits(send_limits());
}

namespace {

// libssh's channel open and channel requests return SSH_AGAIN instead of waiting when the
// session is non-blocking; that is how several of them are in flight at once.
class NonBlocking {
 public:
  explicit NonBlocking(ssh_session s) : s_(s) { ssh_set_blocking(s_, 0); }
  ~NonBlocking() { ssh_set_blocking(s_, 1); }
  NonBlocking(const NonBlocking&) = delete;
  NonBlocking& operator=(const NonBlocking&) = delete;

 private:
  ssh_session s_;
};

// Calls step(i) for every i until none returns SSH_AGAIN, waiting for the socket in between.
// Returns each one's final result (SSH_OK or SSH_ERROR).
template <class Step>
std::vector<int> all_at_once(ssh_session s, size_t n, std::chrono::seconds limit, Step step) {
  std::vector<int> rc(n, SSH_AGAIN);
  auto deadline = std::chrono::steady_clock::now() + limit;
  NonBlocking nb(s);
  for (;;) {
    bool pending = false;
    for (size_t i = 0; i < n; ++i) {
      if (rc[i] == SSH_AGAIN) rc[i] = step(i);
      pending |= rc[i] == SSH_AGAIN;
    }
    if (!pending) return rc;
    if (std::chrono::steady_clock::now() > deadline) {
      for (auto& r : rc)
        if (r == SSH_AGAIN) r = SSH_ERROR;
      return rc;
    }
    pollfd p{ssh_get_fd(s), POLLIN, 0};
    ::poll(&p, 1, 50);
  }
}

}  // namespace

std::vector<std::unique_ptr<Channel>> Channel::open_many(SshSession& session, int n,
                                                         std::chrono::seconds stall_timeout) {
  std::vector<std::unique_ptr<Channel>> chs;
  for (int i = 0; i < n; ++i)
    chs.push_back(std::make_unique<Channel>(session, stall_timeout, Deferred{}));
  auto opened = all_at_once(session.get(), chs.size(), stall_timeout,
                            [&](size_t i) { return ssh_channel_open_session(chs[i]->ch_.get()); });
  // Keep the channels the server granted, as long as it granted the first.
  if (opened[0] != SSH_OK)
    throw DisconnectedError(fmt::format("{}: cannot open a channel: {}", session.where(),
                                        ssh_get_error(session.get())));
  size_t granted = 1;
  while (granted < chs.size() && opened[granted] == SSH_OK) ++granted;
  chs.resize(granted);
  auto sub = all_at_once(session.get(), chs.size(), stall_timeout, [&](size_t i) {
    return ssh_channel_request_subsystem(chs[i]->ch_.get(), "sftp");
  });
  for (int r : sub)
    if (r != SSH_OK)
      throw ConnectError(ConnectFailure::Protocol,
                         fmt::format("{}: the server refused the sftp subsystem: {}",
                                     session.where(), ssh_get_error(session.get())));
  for (auto& c : chs) c->send_init();
  for (auto& c : chs) c->take_version();
  std::vector<uint32_t> ids;
  for (auto& c : chs) ids.push_back(c->send_limits());
  for (size_t i = 0; i < chs.size(); ++i) chs[i]->take_limits(ids[i]);
  return chs;
}

void Channel::send_init() {
  PacketWriter init(kInit, std::nullopt);
  init.u32(3);
  send(init.finish());
}

void Channel::take_version() {
  Reply v = receive();
  if (v.type != kVersion)
    throw ProtocolError(
        fmt::format("{}: expected SFTP VERSION, got packet type {}", where(), v.type));
  if (v.version < 3)
    throw ProtocolError(
        fmt::format("{}: server speaks SFTP version {}, need 3", where(), v.version));
  for (auto& [name, data] : v.extensions) extensions_[name] = data;
}

uint32_t Channel::send_limits() {
  if (!has("limits@openssh.com")) return 0;
  uint32_t id = next_id();
  PacketWriter w(kExtended, id);
  w.str("limits@openssh.com");
  send(w.finish());
  return id;
}

void Channel::take_limits(uint32_t id) {
  if (!id) return;
  Reply r = wait(id);
  if (r.type != kExtendedReply) return;
  PacketReader rd(r.data);
  rd.u64("max packet length");
  uint64_t max_read = rd.u64("max read length");
  uint64_t max_write = rd.u64("max write length");
  if (max_read >= 4096)
    max_read_ = static_cast<uint32_t>(std::min<uint64_t>(max_read, 1u << 18) / 4096 * 4096);
  // Whole pages: OpenSSH offers 261120 bytes (255 KiB), and writes of that size start mid-page,
  // so neighbouring writes (often on different channels, so different server processes) share
  // a page of the server's page cache.
  if (max_write >= 4096)
    max_write_ = static_cast<uint32_t>(std::min<uint64_t>(max_write, 1u << 18) / 4096 * 4096);
}

void Channel::Free::operator()(ssh_channel_struct* c) const {
  // Only an open channel may be closed: libssh would send CLOSE for a refused one with remote
  // id 0, which closes someone else's channel (OpenSSH: "close rcvd twice", then it stalls).
  if (ssh_channel_is_open(c)) ssh_channel_close(c);
  ssh_channel_free(c);
}

void Channel::lost(const std::string& what) {
  broken_ = true;
  throw DisconnectedError(what);
}

void Channel::send(const std::vector<std::byte>& packet) {
  if (broken_) lost(fmt::format("{}: connection already lost", where()));
  // Every request but INIT carries its id right after the length and the type byte.
  if (packet.size() >= 9 && std::to_integer<uint8_t>(packet[4]) != kInit)
    outstanding_.insert(get_be32(packet.data() + 5));
  size_t done = 0;
  auto deadline = std::chrono::steady_clock::now() + stall_;
  while (done < packet.size()) {
    int n = ssh_channel_write(ch_.get(), packet.data() + done,
                              static_cast<uint32_t>(packet.size() - done));
    if (n == SSH_ERROR) {
      // The connection is up but the channel refuses data: the server ended the SFTP session
      // (its process exited), as receive() reports when it sees the close first.
      if (ssh_is_connected(session_.get()))
        lost(fmt::format("{}: the server closed the SFTP channel", where()));
      lost(fmt::format("{}: connection lost while sending: {}", where(),
                       ssh_get_error(session_.get())));
    }
    if (n > 0) {
      done += static_cast<size_t>(n);
      deadline = std::chrono::steady_clock::now() + stall_;
    } else if (std::chrono::steady_clock::now() > deadline) {
      // libssh returns without progress when the server's window stays closed past its timeout.
      lost(fmt::format("{}: the server accepted no data for {} s (stalled connection)", where(),
                       stall_.count()));
    }
  }
}

std::optional<Reply> Channel::buffered_reply() {
  std::optional<Reply> r;
  try {
    if (auto body = framer_.next()) r = parse_reply(*body);
  } catch (const ProtocolError& e) {
    poisoned_ = true;
    throw ProtocolError(fmt::format("{}: {}", where(), e.what()));
  }
  // An id we are not waiting for would otherwise be kept (or dropped) while the request it
  // stands in for waits for a reply that never comes: a "stall" that is really a bad reply.
  if (r && r->id && outstanding_.erase(*r->id) == 0) {
    poisoned_ = true;
    throw ProtocolError(fmt::format("{}: reply for unknown request id {}", where(), *r->id));
  }
  return r;
}

Reply Channel::receive() {
  if (broken_) lost(fmt::format("{}: connection already lost", where()));
  std::array<std::byte, 64 * 1024> buf;
  auto deadline = std::chrono::steady_clock::now() + stall_;
  for (;;) {
    if (auto r = buffered_reply()) return std::move(*r);
    int n = ssh_channel_read_timeout(ch_.get(), buf.data(), buf.size(), 0, 1000);
    if (n == SSH_ERROR)
      lost(fmt::format("{}: connection lost: {}", where(), ssh_get_error(session_.get())));
    if (n > 0) {
      framer_.feed(Bytes(buf.data(), static_cast<size_t>(n)));
      deadline = std::chrono::steady_clock::now() + stall_;
      continue;
    }
    if (ssh_channel_is_eof(ch_.get()) || ssh_channel_is_closed(ch_.get()))
      lost(fmt::format("{}: the server closed the SFTP channel", where()));
    if (std::chrono::steady_clock::now() > deadline)
      lost(fmt::format("{}: no reply for {} s (stalled connection)", where(), stall_.count()));
  }
}

std::optional<Reply> Channel::poll() {
  if (broken_) lost(fmt::format("{}: connection already lost", where()));
  for (;;) {
    if (auto r = buffered_reply()) return r;
    int avail = ssh_channel_poll(ch_.get(), 0);
    if (avail == SSH_ERROR)
      lost(fmt::format("{}: connection lost: {}", where(), ssh_get_error(session_.get())));
    if (avail <= 0) return std::nullopt;  // nothing yet, or end of file: receive() reports it
    std::array<std::byte, 64 * 1024> buf;
    int n = ssh_channel_read_nonblocking(ch_.get(), buf.data(), buf.size(), 0);
    if (n == SSH_ERROR)
      lost(fmt::format("{}: connection lost: {}", where(), ssh_get_error(session_.get())));
    if (n <= 0) return std::nullopt;
    framer_.feed(Bytes(buf.data(), static_cast<size_t>(n)));
  }
}

Reply Channel::wait(uint32_t id) {
  if (auto it = early_.find(id); it != early_.end()) {
    Reply r = std::move(it->second);
    early_.erase(it);
    return r;
  }
  for (;;) {
    Reply r = receive();
    if (!r.id) throw ProtocolError(fmt::format("{}: unexpected VERSION packet", where()));
    if (*r.id == id) return r;
    early_.emplace(*r.id, std::move(r));  // receive() let it through: a request still waiting
  }
}

Reply Channel::request(PacketWriter& w, uint32_t id) {
  send(w.finish());
  return wait(id);
}

void Channel::expect_ok(const Reply& r, const std::string& what) {
  if (r.type != kStatus)
    throw ProtocolError(
        fmt::format("{}: expected a status reply, got packet type {}", what, r.type));
  if (r.status != kOk)
    throw StatusError(r.status, fmt::format("{}: {}{}", what, status_name(r.status),
                                            r.message.empty() || r.message == status_name(r.status)
                                                ? ""
                                                : " (" + r.message + ")"));
}

uint32_t Channel::send_open(const std::string& path, uint32_t flags, const Attrs& attrs) {
  uint32_t id = next_id();
  PacketWriter w(kOpen, id);
  w.str(path).u32(flags).attrs(attrs);
  send(w.finish());
  return id;
}

std::string Channel::opened(uint32_t id, const std::string& path) {
  Reply r = wait(id);
  if (r.type == kHandle)
    return std::string(reinterpret_cast<const char*>(r.data.data()), r.data.size());
  expect_ok(r, fmt::format("{}: {}: cannot open", where(), path));
  throw ProtocolError(fmt::format("{}: open {}: no handle in reply", where(), path));
}

std::string Channel::open(const std::string& path, uint32_t flags, const Attrs& attrs) {
  return opened(send_open(path, flags, attrs), path);
}

uint32_t Channel::send_close(const std::string& handle) {
  uint32_t id = next_id();
  PacketWriter w(kClose, id);
  w.str(handle);
  send(w.finish());
  return id;
}

void Channel::closed(uint32_t id) {
  expect_ok(wait(id), fmt::format("{}: close", where()));
}

void Channel::close(const std::string& handle) {
  closed(send_close(handle));
}

std::optional<Attrs> Channel::stat(const std::string& path) {
  uint32_t id = next_id();
  PacketWriter w(kStat, id);
  w.str(path);
  Reply r = request(w, id);
  if (r.type == kAttrs) return r.attrs;
  if (r.type == kStatus && r.status == kNoSuchFile) return std::nullopt;
  expect_ok(r, fmt::format("{}: {}: stat", where(), path));
  throw ProtocolError(fmt::format("{}: stat {}: no attributes in reply", where(), path));
}

void Channel::mkdir(const std::string& path) {
  uint32_t id = next_id();
  PacketWriter w(kMkdir, id);
  w.str(path).attrs({});
  expect_ok(request(w, id), fmt::format("{}: {}: cannot create directory", where(), path));
}

void Channel::mkdirs(const std::string& dir) {
  if (dir.empty() || dir == "/" || dir == ".") return;
  if (auto a = stat(dir)) {
    if (a->permissions && (*a->permissions & 0170000) != 0040000)
      throw StatusError(kFailure,
                        fmt::format("{}: {}: exists and is not a directory", where(), dir));
    return;
  }
  auto slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0) mkdirs(dir.substr(0, slash));
  try {
    mkdir(dir);
  } catch (const StatusError&) {
    // Another upload (a second worker, another host) may have created it meanwhile: SFTP v3
    // has no "already exists" status, so only a second look tells.
    auto a = stat(dir);
    if (!a || (a->permissions && (*a->permissions & 0170000) != 0040000)) throw;
  }
}

void Channel::remove(const std::string& path) {
  uint32_t id = next_id();
  PacketWriter w(kRemove, id);
  w.str(path);
  expect_ok(request(w, id), fmt::format("{}: {}: cannot remove", where(), path));
}

void Channel::rename(const std::string& from, const std::string& to) {
  uint32_t id = next_id();
  if (has("posix-rename@openssh.com")) {
    PacketWriter w(kExtended, id);
    w.str("posix-rename@openssh.com").str(from).str(to);
    expect_ok(request(w, id), fmt::format("{}: cannot rename {} to {}", where(), from, to));
    return;
  }
  PacketWriter w(kRename, id);
  w.str(from).str(to);
  expect_ok(request(w, id), fmt::format("{}: cannot rename {} to {} (server lacks "
                                        "posix-rename, so an existing target is not replaced)",
                                        where(), from, to));
}

void Channel::fsync(const std::string& handle) {
  if (!has("fsync@openssh.com")) return;
  uint32_t id = next_id();
  PacketWriter w(kExtended, id);
  w.str("fsync@openssh.com").str(handle);
  expect_ok(request(w, id), fmt::format("{}: fsync", where()));
}

void Channel::truncate(const std::string& handle, uint64_t size) {
  uint32_t id = next_id();
  PacketWriter w(kFsetstat, id);
  Attrs a;
  a.size = size;
  w.str(handle).attrs(a);
  expect_ok(request(w, id), fmt::format("{}: cannot set file size to {}", where(), size));
}

std::optional<StatVfs> Channel::statvfs(const std::string& path) {
  if (!has("statvfs@openssh.com")) return std::nullopt;
  uint32_t id = next_id();
  PacketWriter w(kExtended, id);
  w.str("statvfs@openssh.com").str(path);
  Reply r = request(w, id);
  if (r.type != kExtendedReply) {
    expect_ok(r, fmt::format("{}: {}: statvfs", where(), path));
    return std::nullopt;
  }
  PacketReader rd(r.data);
  StatVfs s;
  s.block_size = rd.u64("f_bsize");
  uint64_t frsize = rd.u64("f_frsize");
  rd.u64("f_blocks");
  rd.u64("f_bfree");
  s.blocks_avail = rd.u64("f_bavail");
  if (frsize) s.block_size = frsize;
  return s;
}

std::string Channel::realpath(const std::string& path) {
  uint32_t id = next_id();
  PacketWriter w(kRealpath, id);
  w.str(path);
  Reply r = request(w, id);
  if (r.type == kName && r.names.size() == 1) return r.names[0].first;
  expect_ok(r, fmt::format("{}: {}: realpath", where(), path));
  throw ProtocolError(fmt::format("{}: realpath {}: malformed reply", where(), path));
}

void Channel::write(const std::string& handle, uint64_t offset, Bytes data) {
  uint32_t id = next_id();
  PacketWriter w(kWrite, id);
  w.str(handle).u64(offset).bytes(data);
  expect_ok(request(w, id),
            fmt::format("{}: write of {} bytes at offset {} failed", where(), data.size(), offset));
}

std::vector<std::byte> Channel::read(const std::string& handle, uint64_t offset, uint32_t length) {
  uint32_t id = next_id();
  PacketWriter w(kRead, id);
  w.str(handle).u64(offset).u32(length);
  Reply r = request(w, id);
  if (r.type == kData) {
    if (r.data.size() > length)
      throw ProtocolError(
          fmt::format("{}: READ of {} bytes answered with {}", where(), length, r.data.size()));
    return std::move(r.data);
  }
  if (r.type == kStatus && r.status == kEof) return {};
  expect_ok(r, fmt::format("{}: read of {} bytes at offset {}", where(), length, offset));
  throw ProtocolError(fmt::format("{}: READ answered with a success status but no data", where()));
}

std::optional<std::vector<std::pair<std::string, Attrs>>> Channel::list_dir(std::string_view dir) {
  uint32_t id = next_id();
  PacketWriter w(kOpendir, id);
  w.str(dir);
  Reply r = request(w, id);
  if (r.type == kStatus && r.status == kNoSuchFile) return std::nullopt;
  if (r.type != kHandle) {
    expect_ok(r, fmt::format("{}: {}: cannot list", where(), dir));
    throw ProtocolError(fmt::format("{}: opendir {}: no handle in reply", where(), dir));
  }
  std::string h(reinterpret_cast<const char*>(r.data.data()), r.data.size());
  std::vector<std::pair<std::string, Attrs>> out;
  for (;;) {
    uint32_t rid = next_id();
    PacketWriter rd(kReaddir, rid);
    rd.str(h);
    Reply names = request(rd, rid);
    if (names.type == kStatus && names.status == kEof) break;
    if (names.type != kName) {
      expect_ok(names, fmt::format("{}: {}: cannot list", where(), dir));
      throw ProtocolError(fmt::format("{}: readdir {}: no names in reply", where(), dir));
    }
    for (auto& [name, attrs] : names.names)
      if (name != "." && name != "..") out.emplace_back(std::move(name), attrs);
  }
  close(h);
  return out;
}

}  // namespace diskferry::sftp
