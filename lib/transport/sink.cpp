#include "transport/sink.hpp"

#include <fmt/format.h>
#include <algorithm>
#include <array>

#include "util/error.hpp"

namespace diskferry {

void Sink::write_zeros(uint64_t n) {
  static const std::array<std::byte, 64 * 1024> zeros{};
  while (n > 0) {
    size_t k = static_cast<size_t>(std::min<uint64_t>(n, zeros.size()));
    write(Bytes(zeros.data(), k));
    n -= k;
  }
}

void Sink::rewrite(uint64_t, Bytes) {
  throw Error(ErrorKind::Internal, "this destination cannot rewrite bytes already written");
}

namespace {

class CountingSink final : public Sink {
 public:
  void write(Bytes data) override { pos_ += data.size(); }
  void write_zeros(uint64_t n) override { pos_ += n; }
  void commit() override {}
  void abort() noexcept override {}
  uint64_t position() const override { return pos_; }

 private:
  uint64_t pos_ = 0;
};

}  // namespace

std::unique_ptr<Sink> make_counting_sink() {
  return std::make_unique<CountingSink>();
}

}  // namespace diskferry
