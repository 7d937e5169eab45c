#include "transport/sftp/remote_file.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "transport/sftp/channel.hpp"

namespace diskferry::sftp {
namespace {

struct Request {
  uint64_t offset;
  uint32_t length;
};

// One channel with its own handle on the file and its READs in flight.
struct ReadLane {
  std::unique_ptr<Channel> ch;
  std::string handle;
  std::map<uint32_t, Request> inflight;
  size_t bytes = 0;
};

}  // namespace

struct RemoteFile::Impl {
  Url url;
  ReadOptions opts;
  std::string path;
  uint64_t size = 0;
  std::unique_ptr<SshSession> session;
  std::vector<ReadLane> lanes;    // destroyed before the session
  std::unique_ptr<Channel> side;  // positioned reads beside the pipeline (read_at)
  std::string side_handle;
  uint32_t chunk = 32 * 1024;
  size_t next_lane = 0;
  uint64_t requested_end = 0;  // everything below was requested (or delivered)
  std::map<uint64_t, std::vector<std::byte>> ready;  // arrived, not yet delivered, by offset
  size_t ready_bytes = 0;
  std::map<uint64_t, size_t> owner;  // offset of a request in flight → its lane

  Impl(const Url& u, const ReadOptions& o) : url(u), opts(o), path(u.remote_path()) { connect(); }

  ~Impl() {
    lanes.clear();
    side.reset();
    session.reset();
  }

  void connect() {
    lanes.clear();
    side.reset();
    session = std::make_unique<SshSession>(url, opts.ssh);
    session->set_timeout(opts.stall_timeout);
    // rclone's server reads any order, unlike its writes; several channels are fine.
    auto chans = Channel::open_many(*session, std::max(1, opts.streams), opts.stall_timeout);
    auto attrs = chans[0]->stat(path);
    if (!attrs)
      throw StatusError(kNoSuchFile, fmt::format("{}: {}: no such file", session->where(), path));
    if (attrs->permissions && (*attrs->permissions & 0170000) == 0040000)
      throw Error(ErrorKind::Usage, fmt::format("{}: {}: is a directory", session->where(), path));
    size = attrs->size.value_or(0);
    std::vector<uint32_t> ids;
    for (auto& c : chans) ids.push_back(c->send_open(path, kOpenRead));
    chunk = UINT32_MAX;
    for (size_t i = 0; i < chans.size(); ++i) {
      std::string h = chans[i]->opened(ids[i], path);
      chunk = std::min(chunk, chans[i]->max_read());
      lanes.push_back(ReadLane{std::move(chans[i]), std::move(h), {}, 0});
    }
  }

  // Drops everything in flight and read ahead; the next read starts at `pos`.
  void reset(uint64_t pos) {
    for (auto& l : lanes) {
      while (!l.inflight.empty()) {
        Reply r = l.ch->receive();
        if (r.id) l.inflight.erase(*r.id);
      }
      l.bytes = 0;
    }
    ready.clear();
    ready_bytes = 0;
    owner.clear();
    requested_end = pos;
  }

  void issue(ReadLane& lane, uint64_t offset, uint32_t length) {
    uint32_t id = lane.ch->next_id();
    PacketWriter w(kRead, id);
    w.str(lane.handle).u64(offset).u32(length);
    lane.ch->send(w.finish());
    lane.inflight.emplace(id, Request{offset, length});
    lane.bytes += length;
    owner[offset] = static_cast<size_t>(&lane - lanes.data());
  }

  // Keeps every lane's budget of READs in flight, in file order, round robin.
  void fill() {
    size_t total_budget = opts.lane_budget * lanes.size();
    while (requested_end < size) {
      size_t in_flight = 0;
      for (auto& l : lanes) in_flight += l.bytes;
      ReadLane& lane = lanes[next_lane % lanes.size()];
      auto n = static_cast<uint32_t>(std::min<uint64_t>(chunk, size - requested_end));
      if (lane.bytes + n > opts.lane_budget || in_flight + ready_bytes + n > total_budget) break;
      issue(lane, requested_end, n);
      requested_end += n;
      ++next_lane;
    }
  }

  void take(ReadLane& lane, Reply r) {
    auto it = r.id ? lane.inflight.find(*r.id) : lane.inflight.end();
    if (it == lane.inflight.end())
      throw ProtocolError(fmt::format("{}: reply for unknown request id {}", lane.ch->where(),
                                      r.id ? static_cast<int64_t>(*r.id) : -1));
    Request q = it->second;
    lane.inflight.erase(it);
    lane.bytes -= q.length;
    owner.erase(q.offset);
    if (r.type == kStatus && r.status == kEof)
      throw Error(ErrorKind::Input,
                  fmt::format("{}: {}: the file ends at {} bytes, it had {} when opened "
                              "(truncated, or still being written)",
                              lane.ch->where(), path, q.offset, size));
    if (r.type != kData) {
      Channel::expect_ok(r, fmt::format("{}: {}: read of {} bytes at offset {}", lane.ch->where(),
                                        path, q.length, q.offset));
      throw ProtocolError(
          fmt::format("{}: READ answered with success but no data", lane.ch->where()));
    }
    if (r.data.empty() || r.data.size() > q.length)
      throw ProtocolError(fmt::format("{}: READ of {} bytes answered with {}", lane.ch->where(),
                                      q.length, r.data.size()));
    // A short read mid-file is legal SFTP: ask for the rest at once, on the same channel.
    if (r.data.size() < q.length)
      issue(lane, q.offset + r.data.size(), static_cast<uint32_t>(q.length - r.data.size()));
    ready_bytes += r.data.size();
    ready.emplace(q.offset, std::move(r.data));
  }

  // Waits until the bytes at `pos` have arrived.
  void await(uint64_t pos) {
    while (!ready.count(pos)) {
      fill();
      auto o = owner.find(pos);
      if (o == owner.end())
        throw Error(ErrorKind::Internal,
                    fmt::format("{}: no request in flight for offset {}", path, pos));
      ReadLane& lane = lanes[o->second];
      take(lane, lane.ch->receive());
      for (auto& l : lanes)
        while (auto r = l.ch->poll()) take(l, std::move(*r));
    }
  }

  size_t read(uint64_t pos, MutableBytes buf) {
    size_t done = 0;
    while (done < buf.size() && pos < size) {
      fill();
      await(pos);
      auto it = ready.begin();
      std::vector<std::byte>& d = it->second;
      size_t n = std::min(d.size(), buf.size() - done);
      std::memcpy(buf.data() + done, d.data(), n);
      done += n;
      pos += n;
      ready_bytes -= n;
      if (n == d.size()) {
        ready.erase(it);
      } else {
        std::vector<std::byte> rest(d.begin() + static_cast<std::ptrdiff_t>(n), d.end());
        ready.erase(it);
        ready.emplace(pos, std::move(rest));
      }
    }
    fill();
    return done;
  }
};

RemoteFile::RemoteFile(const Url& url, const ReadOptions& options)
    : impl_(std::make_unique<Impl>(url, options)), name_(url.str()), size_(impl_->size) {}

RemoteFile::~RemoteFile() = default;

// Reads are idempotent: after a dropped connection, reconnect and do the same read again (the
// sequential position is only moved by a read that succeeded).
template <class Fn>
size_t RemoteFile::retrying(Fn&& fn) {
  int attempt = 0;
  for (;;) {
    try {
      if (impl_->lanes.empty()) {  // a reconnect failed last time
        impl_->connect();
        impl_->reset(pos_);
      }
      return fn();
    } catch (const Error& e) {
      if (!e.transient() || attempt >= impl_->opts.retries) throw;
      impl_->lanes.clear();
      impl_->side.reset();
      std::this_thread::sleep_for(std::chrono::seconds(std::min(1 << attempt, 30)));
      ++attempt;
    }
  }
}

size_t RemoteFile::read(MutableBytes buf) {
  return retrying([&] {
    size_t n = impl_->read(pos_, buf);
    pos_ += n;
    return n;
  });
}

size_t RemoteFile::pread(uint64_t offset, MutableBytes buf) {
  return retrying([&] { return pread_once(offset, buf); });
}

size_t RemoteFile::pread_once(uint64_t offset, MutableBytes buf) {
  // Channel::read waits for its own reply, keeping the others aside where the pipeline would
  // not look: drop the read-ahead first (the next read() requests from pos_ again).
  impl_->reset(pos_);
  Channel& ch = *impl_->lanes[0].ch;
  size_t done = 0;
  while (done < buf.size()) {
    auto n = static_cast<uint32_t>(std::min<size_t>(buf.size() - done, ch.max_read()));
    auto d = ch.read(impl_->lanes[0].handle, offset + done, n);
    if (d.empty()) break;
    std::memcpy(buf.data() + done, d.data(), d.size());
    done += d.size();
  }
  return done;
}

size_t RemoteFile::read_at(uint64_t offset, MutableBytes buf) {
  constexpr uint64_t kNear = 4u << 20;
  if (offset > pos_ && offset - pos_ <= kNear) {
    std::vector<std::byte> gap(static_cast<size_t>(offset - pos_));
    for (size_t got = 0; got < gap.size();) {
      size_t n = read(MutableBytes(gap).subspan(got));
      if (!n) return 0;
      got += n;
    }
  }
  if (offset == pos_) {
    size_t done = 0;
    while (done < buf.size()) {
      size_t n = read(buf.subspan(done));
      if (!n) break;
      done += n;
    }
    return done;
  }
  if (buf.size() <= kNear) return retrying([&] { return side_read(offset, buf); });
  seek(offset);
  return read_at(offset, buf);
}

size_t RemoteFile::side_read(uint64_t offset, MutableBytes buf) {
  if (!impl_->side) {
    try {
      impl_->side = std::make_unique<Channel>(*impl_->session, impl_->opts.stall_timeout);
      impl_->side_handle = impl_->side->open(impl_->path, kOpenRead);
    } catch (const Error&) {
      // The server allows no further channel (MaxSessions): read where the pipeline reads.
      impl_->side.reset();
      return pread_once(offset, buf);
    }
  }
  Channel& ch = *impl_->side;
  size_t done = 0;
  while (done < buf.size()) {
    auto n = static_cast<uint32_t>(std::min<size_t>(buf.size() - done, ch.max_read()));
    auto d = ch.read(impl_->side_handle, offset + done, n);
    if (d.empty()) break;
    std::memcpy(buf.data() + done, d.data(), d.size());
    done += d.size();
  }
  return done;
}

void RemoteFile::seek(uint64_t offset) {
  impl_->reset(offset);
  pos_ = offset;
}

std::optional<std::string> read_small_file(const Url& url, const SshOptions& ssh,
                                           std::chrono::seconds stall_timeout, size_t limit) {
  SshSession session(url, ssh);
  Channel ch(session, stall_timeout);
  std::string path = url.remote_path();
  if (!ch.stat(path)) return std::nullopt;
  std::string h = ch.open(path, kOpenRead);
  std::string text;
  while (text.size() < limit) {
    auto d = ch.read(h, text.size(),
                     static_cast<uint32_t>(std::min<size_t>(limit - text.size(), ch.max_read())));
    if (d.empty()) break;
    text.append(reinterpret_cast<const char*>(d.data()), d.size());
  }
  ch.close(h);
  return text;
}

}  // namespace diskferry::sftp
