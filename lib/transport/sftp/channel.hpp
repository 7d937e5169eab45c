// One SFTP v3 session on one SSH channel: sends requests, matches replies by id, and offers the
// few file operations diskferry needs. Pipelining is the caller's choice: send() many requests,
// then take replies as they come (see writer.hpp). libssh 0.10's own sftp_write() waits for every
// reply (≈7 MB/s at 30 ms RTT), which is why this exists.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "transport/sftp/ssh_session.hpp"
#include "transport/sftp/wire.hpp"

struct ssh_channel_struct;

namespace diskferry::sftp {

// A request the server answered with an error status.
class StatusError : public Error {
 public:
  StatusError(uint32_t code, const std::string& what)
      : Error(ErrorKind::Output, what), code_(code) {}
  uint32_t code() const { return code_; }

 private:
  uint32_t code_;
};

// The connection or channel is gone, or the server went silent; retrying may help.
class DisconnectedError : public Error {
 public:
  explicit DisconnectedError(const std::string& what) : Error(ErrorKind::Output, what) {}
  bool transient() const noexcept override { return true; }
};

struct StatVfs {
  uint64_t block_size = 0, blocks_avail = 0;
  uint64_t bytes_avail() const { return block_size * blocks_avail; }
};

class Channel {
 public:
  Channel(SshSession& session, std::chrono::seconds stall_timeout);
  // Opens up to `n` channels on one connection at once: each setup step (channel open, sftp
  // subsystem, INIT, limits@openssh.com) goes out on every channel before any reply is awaited,
  // so the setup costs the round trips of one channel, not n (≈19 round trips saved for n = 4,
  // 0.6 s at 30 ms). Returns fewer when the server refuses the extra channels (OpenSSH's
  // MaxSessions, 10 by default); throws when it refuses the first.
  static std::vector<std::unique_ptr<Channel>> open_many(SshSession& session, int n,
                                                         std::chrono::seconds stall_timeout);
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  const std::map<std::string, std::string>& extensions() const { return extensions_; }
  bool has(const std::string& ext) const { return extensions_.count(ext) != 0; }
  // Largest WRITE payload the server takes: limits@openssh.com when offered, else 32 KiB.
  uint32_t max_write() const { return max_write_; }
  // Largest READ the server answers in full: limits@openssh.com when offered, else 32 KiB.
  uint32_t max_read() const { return max_read_; }
  const std::string& where() const { return session_.where(); }

  // Set once the connection failed: later requests fail at once instead of waiting again.
  bool broken() const { return broken_; }
  // False once the connection failed or the server sent a reply that made no sense on this
  // channel (its byte stream can no longer be trusted; other channels may still be fine).
  bool usable() const { return !broken_ && !poisoned_; }

  uint32_t next_id() { return ++last_id_; }
  // Sends one finished packet; its request id counts as outstanding until its reply arrives.
  void send(const std::vector<std::byte>& packet);
  // Blocks until any reply arrives (or the stall timeout passes: DisconnectedError). A reply that
  // cannot be parsed, or whose id is not outstanding (never sent, or answered already), is a
  // ProtocolError naming the server.
  Reply receive();
  // A reply that has already arrived, without waiting; nullopt when none has. Checked like
  // receive().
  std::optional<Reply> poll();
  // Blocks until the reply to `id`; replies to other requests are kept for later.
  Reply wait(uint32_t id);

  // Synchronous operations; errors throw StatusError naming the path.
  std::string open(const std::string& path, uint32_t flags, const Attrs& attrs = {});
  // open() in two halves, so that several channels' opens share one round trip.
  uint32_t send_open(const std::string& path, uint32_t flags, const Attrs& attrs = {});
  std::string opened(uint32_t id, const std::string& path);
  // close() in two halves, likewise.
  uint32_t send_close(const std::string& handle);
  void closed(uint32_t id);
  void close(const std::string& handle);
  std::optional<Attrs> stat(const std::string& path);  // nullopt: no such file
  void mkdir(const std::string& path);
  void mkdirs(const std::string& dir);  // every missing component
  void remove(const std::string& path);
  // posix-rename@openssh.com (replaces `to` atomically) when offered, else plain RENAME, which
  // fails rather than replacing an existing `to`.
  void rename(const std::string& from, const std::string& to);
  void fsync(const std::string& handle);  // fsync@openssh.com; no-op when not offered
  void truncate(const std::string& handle, uint64_t size);
  std::optional<StatVfs> statvfs(const std::string& path);
  // One WRITE, waiting for its reply (small files: sidecars, locks).
  void write(const std::string& handle, uint64_t offset, Bytes data);
  // Up to `length` bytes at `offset` (fewer near the end; empty at or past it).
  std::vector<std::byte> read(const std::string& handle, uint64_t offset, uint32_t length);
  std::string realpath(const std::string& path);
  // Every entry of a directory but "." and "..", with its attributes; nullopt: no such directory.
  std::optional<std::vector<std::pair<std::string, Attrs>>> list_dir(std::string_view dir);

  // Throws StatusError for a non-OK STATUS reply, naming `what`.
  static void expect_ok(const Reply& r, const std::string& what);

 private:
  struct Deferred {};  // the ssh channel only, nothing opened yet (open_many's first step)

 public:
  Channel(SshSession& session, std::chrono::seconds stall_timeout, Deferred);

 private:
  void send_init();
  void take_version();
  uint32_t send_limits();  // 0: not offered
  void take_limits(uint32_t id);
  Reply request(PacketWriter& w, uint32_t id);
  // The next complete reply already received, checked (see receive()); nullopt: none yet.
  std::optional<Reply> buffered_reply();
  [[noreturn]] void lost(const std::string& what);

  SshSession& session_;
  struct Free {
    void operator()(ssh_channel_struct* c) const;
  };
  std::unique_ptr<ssh_channel_struct, Free> ch_;  // freed even when the constructor throws
  std::chrono::seconds stall_;
  PacketFramer framer_;
  std::map<uint32_t, Reply> early_;
  std::set<uint32_t> outstanding_;  // ids sent and not yet answered
  std::map<std::string, std::string> extensions_;
  uint32_t last_id_ = 0;
  uint32_t max_write_ = 32 * 1024;
  uint32_t max_read_ = 32 * 1024;
  bool broken_ = false;
  bool poisoned_ = false;
};

}  // namespace diskferry::sftp
