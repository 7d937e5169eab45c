#include "transport/sftp/sftp_sink.hpp"

#include <fmt/format.h>
#include <algorithm>
#include <map>
#include <set>

#include "image/source.hpp"
#include "transport/sftp/channel.hpp"

namespace diskferry::sftp {
namespace {

// Keeps WRITE requests in flight up to a byte budget and takes their replies as they come.
// The first failed write poisons the file; every byte below acked_prefix() is on the server.
class PipelinedWriter {
 public:
  PipelinedWriter(Channel& ch, std::string handle, std::string name, size_t max_inflight)
      : ch_(ch), handle_(std::move(handle)), name_(std::move(name)), max_inflight_(max_inflight) {}

  void write(uint64_t offset, Bytes data) {
    while (!data.empty()) {
      size_t n = std::min<size_t>(data.size(), ch_.max_write());
      while (inflight_bytes_ + n > max_inflight_ && !inflight_.empty()) reap_one();
      uint32_t id = ch_.next_id();
      PacketWriter w(kWrite, id);
      w.str(handle_).u64(offset).bytes(data.first(n));
      ch_.send(w.finish());
      inflight_.emplace(id, Extent{offset, n});
      starts_.insert(offset);
      inflight_bytes_ += n;
      issued_end_ = std::max(issued_end_, offset + n);
      offset += n;
      data = data.subspan(n);
    }
  }

  void flush() {
    while (!inflight_.empty()) reap_one();
  }

  uint64_t acked_prefix() const { return starts_.empty() ? issued_end_ : *starts_.begin(); }

 private:
  void reap_one() {
    Reply r = ch_.receive();
    auto it = r.id ? inflight_.find(*r.id) : inflight_.end();
    if (it == inflight_.end())
      throw ProtocolError(fmt::format("{}: reply for unknown request id {}", ch_.where(),
                                      r.id ? static_cast<int64_t>(*r.id) : -1));
    Extent e = it->second;
    inflight_.erase(it);
    starts_.erase(starts_.find(e.offset));
    inflight_bytes_ -= e.length;
    Channel::expect_ok(r, fmt::format("{}: {}: write of {} bytes at offset {} failed", ch_.where(),
                                      name_, e.length, e.offset));
  }

  Channel& ch_;
  std::string handle_, name_;
  size_t max_inflight_;
  std::map<uint32_t, Extent> inflight_;
  std::multiset<uint64_t> starts_;
  size_t inflight_bytes_ = 0;
  uint64_t issued_end_ = 0;
};

std::string parent_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return "";
  return slash == 0 ? "/" : path.substr(0, slash);
}

class SftpSink final : public Sink {
 public:
  SftpSink(const Url& url, const SinkOptions& o)
      : final_(url.remote_path()),
        partial_(final_ + ".partial"),
        session_(std::make_unique<SshSession>(url, o.ssh)),
        channel_(std::make_unique<Channel>(*session_, o.stall_timeout)) {
    if (url.path.empty() || url.path.back() == '/')
      throw Error(ErrorKind::Usage, fmt::format("{}: name a file, not a directory", url.str()));
    channel_->mkdirs(parent_of(final_));
    handle_ = channel_->open(partial_, kOpenWrite | kOpenCreate | kOpenTrunc);
    writer_.emplace(*channel_, handle_, partial_, o.max_inflight_bytes);
  }
  ~SftpSink() override {
    if (!done_) abort();
  }

  void write(Bytes data) override {
    writer_->write(pos_, data);
    pos_ += data.size();
  }
  // Zeros are not sent: writing past them leaves a hole on the server, and commit() sets the
  // final size, so trailing zeros cost nothing either.
  void write_zeros(uint64_t n) override { pos_ += n; }
  bool supports_rewrite() const override { return true; }
  void rewrite(uint64_t offset, Bytes data) override { writer_->write(offset, data); }

  void commit() override {
    writer_->flush();
    channel_->truncate(handle_, pos_);
    channel_->fsync(handle_);
    channel_->close(handle_);
    handle_.clear();
    channel_->rename(partial_, final_);
    done_ = true;
  }
  void abort() noexcept override {
    if (done_) return;
    done_ = true;
    try {
      if (!handle_.empty()) channel_->close(handle_);
      channel_->remove(partial_);
    } catch (...) {
      // The connection may be the thing that failed; a stale .partial is overwritten next time.
    }
  }
  uint64_t position() const override { return pos_; }

 private:
  std::string final_, partial_;
  std::unique_ptr<SshSession> session_;
  std::unique_ptr<Channel> channel_;
  std::string handle_;
  std::optional<PipelinedWriter> writer_;
  uint64_t pos_ = 0;
  bool done_ = false;
};

}  // namespace

std::unique_ptr<Sink> open_sftp_sink(const Url& url, const SinkOptions& options) {
  return std::make_unique<SftpSink>(url, options);
}

}  // namespace diskferry::sftp
