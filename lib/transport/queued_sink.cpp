#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "transport/sink.hpp"
#include "util/error.hpp"

namespace diskferry {
namespace {

class QueuedSink final : public Sink {
 public:
  QueuedSink(std::unique_ptr<Sink> inner, size_t buffers, size_t buffer_size)
      : inner_(std::move(inner)), buffer_size_(buffer_size) {
    for (size_t i = 0; i < buffers; ++i) {
      free_.emplace_back();
      free_.back().reserve(buffer_size);
    }
    thread_ = std::thread([this] { run(); });
  }
  ~QueuedSink() override {
    stop();
    if (!done_) inner_->abort();
  }

  void write(Bytes data) override {
    flush_zeros();
    append(data);
  }
  void write_zeros(uint64_t n) override {
    // Zeros accumulate; a long run travels as a marker so the destination can leave a hole,
    // a short one as bytes: a hole per 64 KiB granule costs more syscalls (and fragments the
    // file more) than it saves.
    zeros_ += n;
    pos_ += n;
  }
  bool supports_rewrite() const override { return inner_->supports_rewrite(); }
  void rewrite(uint64_t offset, Bytes data) override {
    drain();
    inner_->rewrite(offset, data);
  }
  void expect_size(uint64_t n) override {
    drain();  // the sending thread is idle then, and the call happens on this one
    inner_->expect_size(n);
  }
  void expect_at_most(uint64_t n) override {
    drain();
    inner_->expect_at_most(n);
  }
  std::optional<uint64_t> capacity() const override { return inner_->capacity(); }
  void commit() override {
    drain();
    stop();
    inner_->commit();
    done_ = true;
  }
  void abort() noexcept override {
    {
      std::lock_guard lk(mu_);
      queue_.clear();  // nothing queued matters once the output is dropped
    }
    stop();
    inner_->abort();
    done_ = true;
  }
  uint64_t position() const override { return pos_; }

 private:
  static constexpr uint64_t kMinHole = 256 * 1024;

  struct Item {
    std::vector<std::byte> data;
    uint64_t zeros = 0;
  };

  void flush_zeros() {
    if (zeros_ == 0) return;
    uint64_t n = std::exchange(zeros_, 0);
    if (n >= kMinHole) {
      push_current();
      push(Item{{}, n});
      return;
    }
    static const std::vector<std::byte> zero_block(kMinHole);
    pos_ -= n;  // append() counts them again
    append(Bytes(zero_block.data(), static_cast<size_t>(n)));
  }

  void append(Bytes data) {
    while (!data.empty()) {
      if (!current_) current_ = take_free();
      size_t n = std::min(data.size(), buffer_size_ - current_->size());
      current_->insert(current_->end(), data.begin(), data.begin() + static_cast<long>(n));
      data = data.subspan(n);
      pos_ += n;
      if (current_->size() == buffer_size_) push_current();
    }
  }
  std::vector<std::byte> take_free_buffer() {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return !free_.empty() || error_; });
    rethrow_locked();
    auto b = std::move(free_.front());
    free_.pop_front();
    b.clear();
    return b;
  }
  std::optional<std::vector<std::byte>> take_free() { return take_free_buffer(); }

  void push_current() {
    if (!current_) return;
    if (!current_->empty())
      push(Item{std::move(*current_), 0});
    else
      return_free(std::move(*current_));
    current_.reset();
  }
  void push(Item item) {
    std::unique_lock lk(mu_);
    rethrow_locked();
    queue_.push_back(std::move(item));
    cv_.notify_all();
  }
  void return_free(std::vector<std::byte> b) {
    std::lock_guard lk(mu_);
    free_.push_back(std::move(b));
    cv_.notify_all();
  }
  void drain() {
    flush_zeros();
    push_current();
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return (queue_.empty() && !busy_) || error_; });
    rethrow_locked();
  }
  void rethrow_locked() {
    if (error_) std::rethrow_exception(error_);
  }
  void stop() noexcept {
    {
      std::lock_guard lk(mu_);
      stopping_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }
  void run() {
    for (;;) {
      Item item;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty() || stopping_; });
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      try {
        if (item.zeros)
          inner_->write_zeros(item.zeros);
        else
          inner_->write(item.data);
      } catch (...) {
        std::lock_guard lk(mu_);
        error_ = std::current_exception();
        busy_ = false;
        queue_.clear();
        cv_.notify_all();
        return;
      }
      std::lock_guard lk(mu_);
      busy_ = false;
      if (!item.zeros) free_.push_back(std::move(item.data));
      cv_.notify_all();
    }
  }

  std::unique_ptr<Sink> inner_;
  size_t buffer_size_;
  std::optional<std::vector<std::byte>> current_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::vector<std::byte>> free_;
  std::deque<Item> queue_;
  std::exception_ptr error_;
  bool busy_ = false, stopping_ = false, done_ = false;
  uint64_t pos_ = 0, zeros_ = 0;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<Sink> make_queued_sink(std::unique_ptr<Sink> inner, size_t buffers,
                                       size_t buffer_size) {
  return std::make_unique<QueuedSink>(std::move(inner), buffers, buffer_size);
}

}  // namespace diskferry
