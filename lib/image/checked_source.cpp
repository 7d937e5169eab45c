#include "image/checked_source.hpp"

#include <fmt/format.h>
#include <algorithm>

#include "codec/decode.hpp"
#include "pipeline/checksum.hpp"

namespace diskferry {
namespace {

constexpr uint64_t kAhead = 32u << 20;  // reads further ahead of the hashed prefix are not kept
constexpr size_t kHold = 16u << 20;     // bytes kept ahead of the prefix at most
constexpr size_t kChunk = 1u << 20;

class CheckedReader final : public ByteReader {
 public:
  CheckedReader(std::unique_ptr<ByteReader> inner, std::shared_ptr<const ExpectedSha256> want)
      : inner_(std::move(inner)), want_(std::move(want)), hash_(std::make_unique<Sha256>()) {}
  size_t read(MutableBytes buf) override {
    size_t n = inner_->read(buf);
    if (hash_) {
      hash_->update(buf.first(n));
      if (n < buf.size()) {
        std::string got = hash_->hex();
        hash_.reset();
        want_->check(got);
      }
    }
    return n;
  }
  uint64_t consumed() const override { return inner_->consumed(); }

 private:
  std::unique_ptr<ByteReader> inner_;
  std::shared_ptr<const ExpectedSha256> want_;
  std::unique_ptr<Sha256> hash_;  // null once checked
};

}  // namespace

void ExpectedSha256::check(const std::string& got) const {
  if (got != hex)
    throw ChecksumMismatch(fmt::format(
        "{}: checksum mismatch: its bytes hash to sha256 {}, {} says {}: the backup is damaged "
        "or was changed after it was written (--no-verify-checksum reads it anyway)",
        file, got, sidecar, hex));
}

std::unique_ptr<ByteReader> make_checked_reader(std::unique_ptr<ByteReader> inner,
                                                std::shared_ptr<const ExpectedSha256> want) {
  return std::make_unique<CheckedReader>(std::move(inner), std::move(want));
}

HashedReadAt::HashedReadAt(ReadAt inner, uint64_t file_size, ExpectedSha256 want)
    : inner_(std::move(inner)), size_(file_size), want_(std::move(want)) {}

HashedReadAt::~HashedReadAt() = default;

size_t HashedReadAt::read(MutableBytes buf, uint64_t offset) {
  std::lock_guard lock(mu_);
  size_t n = inner_(buf, offset);
  if (!active_ || n == 0) return n;
  if (offset <= cursor_ && offset + n > cursor_) {
    hash_->update(Bytes(buf.data() + (cursor_ - offset), offset + n - cursor_));
    cursor_ = offset + n;
    take_pending();
  } else if (offset > cursor_ && offset - cursor_ <= kAhead && n <= kHold) {
    auto& kept = pending_[offset];
    if (kept.size() < n) {
      pending_bytes_ += n - kept.size();
      kept.assign(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n));
    }
    trim_pending();
  }
  return n;
}

void HashedReadAt::take_pending() {
  while (!pending_.empty() && pending_.begin()->first <= cursor_) {
    auto it = pending_.begin();
    const uint64_t end = it->first + it->second.size();
    if (end > cursor_) {
      hash_->update(Bytes(it->second.data() + (cursor_ - it->first), end - cursor_));
      cursor_ = end;
    }
    pending_bytes_ -= it->second.size();
    pending_.erase(it);
  }
}

void HashedReadAt::trim_pending() {
  // The reader has moved on past the gap below the lowest kept read (a header, a log, tables
  // read before the pass): reading it now costs what the end of the pass would.
  while (pending_bytes_ > kHold) hash_through(pending_.begin()->first);
}

void HashedReadAt::hash_through(uint64_t end) {
  std::vector<std::byte> buf;
  while (cursor_ < end) {
    uint64_t stop = end;
    if (!pending_.empty()) stop = std::min(stop, pending_.begin()->first);
    buf.resize(static_cast<size_t>(std::min<uint64_t>(kChunk, stop - cursor_)));
    size_t n = inner_(buf, cursor_);
    if (n == 0)
      throw Error(ErrorKind::Input, fmt::format("{}: the file ends at {} bytes, it had {} when "
                                                "opened (truncated, or still being written)",
                                                want_.file, cursor_, size_));
    hash_->update(Bytes(buf.data(), n));
    cursor_ += n;
    take_pending();
  }
}

void HashedReadAt::begin() {
  std::lock_guard lock(mu_);
  active_ = true;
  cursor_ = 0;
  hash_ = std::make_unique<Sha256>();
  pending_.clear();
  pending_bytes_ = 0;
}

void HashedReadAt::finish() {
  std::lock_guard lock(mu_);
  if (!active_) return;
  hash_through(size_);
  active_ = false;
  pending_.clear();
  pending_bytes_ = 0;
  want_.check(hash_->hex());
}

namespace {

class HashedPass final : public Pass {
 public:
  HashedPass(std::unique_ptr<Pass> inner, std::shared_ptr<HashedReadAt> hashed)
      : inner_(std::move(inner)), hashed_(std::move(hashed)) {}
  std::optional<Chunk> next(MutableBytes buf) override {
    auto c = inner_->next(buf);
    if (!c && !checked_) {
      checked_ = true;
      hashed_->finish();
    }
    return c;
  }
  uint64_t size() const override { return inner_->size(); }
  uint64_t consumed() const override { return inner_->consumed(); }

 private:
  std::unique_ptr<Pass> inner_;
  std::shared_ptr<HashedReadAt> hashed_;
  bool checked_ = false;
};

class CheckedSource final : public Source {
 public:
  CheckedSource(std::unique_ptr<Source> inner, std::shared_ptr<HashedReadAt> hashed,
                std::function<void()> before_pass)
      : inner_(std::move(inner)),
        hashed_(std::move(hashed)),
        before_pass_(std::move(before_pass)) {}
  const std::string& name() const override { return inner_->name(); }
  std::optional<uint64_t> known_size() const override { return inner_->known_size(); }
  std::optional<uint64_t> input_bytes() const override { return inner_->input_bytes(); }
  bool rereadable() const override { return inner_->rereadable(); }
  std::unique_ptr<Pass> open_pass(uint32_t unit) override {
    if (before_pass_) before_pass_();
    hashed_->begin();
    return std::make_unique<HashedPass>(inner_->open_pass(unit), hashed_);
  }

 private:
  std::unique_ptr<Source> inner_;
  std::shared_ptr<HashedReadAt> hashed_;
  std::function<void()> before_pass_;
};

}  // namespace

std::unique_ptr<Source> make_checked_source(std::unique_ptr<Source> inner,
                                            std::shared_ptr<HashedReadAt> hashed,
                                            std::function<void()> before_pass) {
  return std::make_unique<CheckedSource>(std::move(inner), std::move(hashed),
                                         std::move(before_pass));
}

}  // namespace diskferry
