// Per-cluster compression inside qcow2 (what `qemu-img convert -c` does): each cluster is one
// independent deflate or zstd stream that QEMU can inflate on its own.
#pragma once

#include <cstddef>
#include <memory>

#include "util/bytes.hpp"

namespace diskferry {

enum class ClusterCodec { None, Deflate, Zstd };

// One per thread; keeps codec state between clusters so nothing is allocated per cluster.
class ClusterCompressor {
 public:
  explicit ClusterCompressor(ClusterCodec codec);
  ~ClusterCompressor();
  ClusterCompressor(const ClusterCompressor&) = delete;
  ClusterCompressor& operator=(const ClusterCompressor&) = delete;

  // Compresses `in` into `out`. Returns the compressed size, or 0 when the result would not be
  // smaller than out.size() (QEMU then stores the cluster uncompressed, and so do we).
  size_t compress(Bytes in, MutableBytes out);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace diskferry
