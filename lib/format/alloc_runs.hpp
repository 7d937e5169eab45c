// The allocated clusters (or blocks) of an image, in increasing order, as runs: memory grows with
// fragmentation, not with the virtual size.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace diskferry {

class AllocRuns {
 public:
  struct Run {
    uint64_t first = 0;
    uint64_t count = 0;
  };

  // idx must be greater than every index added before.
  void add(uint64_t idx) {
    if (!runs_.empty() && runs_.back().first + runs_.back().count == idx)
      ++runs_.back().count;
    else
      runs_.push_back({idx, 1});
    ++total_;
  }
  uint64_t total() const { return total_; }
  const std::vector<Run>& runs() const { return runs_; }
  void clear() {
    runs_.clear();
    total_ = 0;
  }

  // Walks the indices in order.
  class Cursor {
   public:
    explicit Cursor(const AllocRuns& r) : r_(&r) {}
    std::optional<uint64_t> peek() const {
      if (run_ == r_->runs_.size()) return std::nullopt;
      return r_->runs_[run_].first + in_run_;
    }
    void advance() {
      if (++in_run_ == r_->runs_[run_].count) {
        ++run_;
        in_run_ = 0;
      }
    }

   private:
    const AllocRuns* r_;
    size_t run_ = 0;
    uint64_t in_run_ = 0;
  };

 private:
  std::vector<Run> runs_;
  uint64_t total_ = 0;
};

}  // namespace diskferry
