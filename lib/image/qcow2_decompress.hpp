// Inflates one compressed qcow2 cluster (deflate or zstd, per the header's compression_type).
#pragma once

#include <memory>

#include "codec/cluster.hpp"
#include "util/bytes.hpp"

namespace diskferry {

// One per pass: keeps the codec state so nothing is allocated per cluster.
class ClusterDecompressor {
 public:
  explicit ClusterDecompressor(ClusterCodec codec);
  ~ClusterDecompressor();
  ClusterDecompressor(const ClusterDecompressor&) = delete;
  ClusterDecompressor& operator=(const ClusterDecompressor&) = delete;

  // Inflates `in` so that it fills `out` exactly. `in` may run on past the end of the stream
  // (QEMU records compressed sizes in whole sectors, so the next cluster's bytes follow).
  // Returns nullptr on success, else why the data is not one compressed cluster.
  const char* decompress(Bytes in, MutableBytes out);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace diskferry
