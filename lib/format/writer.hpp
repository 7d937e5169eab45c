// Streaming image writers. A writer turns the source's units into the bytes of one image file,
// written front to back. It works in one of two ways, and both give the same bytes:
//   planned:     plan() sees every unit of a first pass; the header is then known, and one
//                streaming pass writes the whole file in order (any destination, pipes included).
//   single pass: the header cluster(s) are written as placeholders, data follows as it comes,
//                tables after it, and the placeholders are rewritten once at the end (only on
//                sinks that support_rewrite(): files, block devices, SFTP).
// Metadata goes after the data in both, which is why the two give identical files.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "codec/cluster.hpp"
#include "transport/sink.hpp"
#include "util/bytes.hpp"

namespace diskferry {

// Asis: the source file's bytes unchanged (no decompression, no qcow2 reading), e.g. to upload a
// reflinked qcow2 file itself.
enum class ImageFormat { Raw, Qcow2, Vhdx, Asis };

std::string format_name(ImageFormat f);
ImageFormat parse_format(const std::string& text);  // throws Error(Usage)

struct WriterOptions {
  ImageFormat format = ImageFormat::Qcow2;
  uint32_t cluster_size = 64 * 1024;  // qcow2: 512 B .. 2 MiB, power of two
  ClusterCodec cluster_codec = ClusterCodec::None;
  uint32_t block_size = 32 * 1024 * 1024;  // vhdx: 1 MiB .. 256 MiB, power of two
  int threads = 1;                         // cluster compression workers
  // Checks ranges and powers of two; throws Error(Usage) naming the option.
  void validate() const;
};

class FormatWriter {
 public:
  virtual ~FormatWriter() = default;
  // The unit the writer wants source passes to use (a multiple of its cluster/block granularity,
  // or a divisor of the block).
  virtual uint32_t unit() const = 0;
  // Whether a planning pass is needed before a streaming write (raw needs none).
  virtual bool needs_header_fixup() const = 0;

  // Planning pass: every unit the source hands out, in order; then the source size.
  virtual void plan(uint64_t offset, Bytes data) = 0;
  virtual void end_plan(uint64_t source_size) = 0;
  // Exact size of the output file; valid after end_plan().
  virtual uint64_t planned_size() const = 0;
  // The largest output a source of `source_size` bytes can give (every cluster or block
  // holding data, none compressed); exact for raw. Checks a fixed-size destination up front.
  virtual uint64_t max_size(uint64_t source_size) const = 0;

  // Writing pass. planned=true after a planning pass over the same bytes; otherwise the sink
  // must support_rewrite() (qcow2/vhdx) and the header is rewritten in finish().
  virtual void begin(Sink& sink, bool planned) = 0;
  virtual void write(uint64_t offset, Bytes data) = 0;
  virtual void finish(uint64_t source_size) = 0;
};

std::unique_ptr<FormatWriter> make_writer(const WriterOptions& options);

}  // namespace diskferry
