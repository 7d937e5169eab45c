// Images inside a stream that can only be read front to back but can be read again from its
// start: a .qcow2.zst or .qcow2.gz, local or on an SFTP server. zstd and gzip streams cannot
// seek (there is no index into the compressed bytes: to reach byte N every byte before it must
// be decompressed), while an image's tables point anywhere in the file. So the image is read in
// several passes over the decoded stream, each one starting over from byte 0 (a new download and
// a new decoder): the tables are gathered level by level first, held in memory (8 bytes per
// cluster of the disk, at most), then the data streams past once in file order.
//
// `RestartableStream` is the generic part: a ReadAt over a re-openable stream, serving reads
// from captured ranges (tables) or from the stream at or after its position. Any image reader
// that takes a ReadAt and a file size (qcow2 here; VHDX could: header first, then one sweep for
// its BAT and metadata, then the payload in file order) plugs into it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "codec/decode.hpp"
#include "image/source.hpp"

namespace diskferry {

// The decoded stream from its first byte, new on every call.
using StreamOpener = std::function<std::unique_ptr<ByteReader>()>;

// What a file size is taken to be before the end of the stream has been seen: the readers'
// "beyond the end of the file" checks then never fire, and a truncated stream shows as a short
// read ("truncated inside ...") or as the decoder's own error.
inline constexpr uint64_t kUnknownStreamSize = uint64_t{1} << 62;

class RestartableStream {
 public:
  // `first`: an already open reader of the stream (at byte 0), used before `open` is called.
  RestartableStream(std::string name, StreamOpener open, std::unique_ptr<ByteReader> first = {});

  // Reads [offset, offset+buf.size()): from a captured range when one holds it all, else from
  // the stream, which goes forward (skipping) and starts over when the offset lies behind what
  // it still holds. Short only at the end of the stream. Thread-safe.
  size_t read_at(uint64_t offset, MutableBytes buf);

  // Reads and keeps these ranges (any order, not overlapping), in as few sweeps as possible:
  // the ones still ahead first, then, after one restart, those behind. Ranges past the end are
  // kept as far as the stream goes.
  void capture(std::vector<Extent> ranges);
  // The bytes of a captured range that starts at `offset` (nullptr: none).
  const std::vector<std::byte>* captured(uint64_t offset) const;
  // Takes a captured range out (empty when there is none), or puts bytes in as one.
  std::vector<std::byte> take_capture(uint64_t offset);
  void keep_captured(uint64_t offset, std::vector<std::byte> bytes);
  uint64_t captured_bytes() const { return captured_bytes_; }

  // Reads to the end of the stream (an incomplete zstd/gzip stream throws there), so a pass
  // that needed only part of the file still checks the whole of it.
  void drain();

  // Called with the compressed bytes consumed of the current sweep, as it goes.
  void on_progress(std::function<void(uint64_t)> fn) { progress_ = std::move(fn); }

  // The decoded size, once the end has been seen.
  std::optional<uint64_t> size() const { return size_; }
  uint64_t position() const { return pos_; }
  int sweeps() const { return sweeps_; }  // times the stream was (re)started
  const std::string& name() const { return name_; }

  // Bytes the stream keeps behind its position, so reads a little behind need no restart:
  // compressed qcow2 clusters share their last sector, and a reader that plans units ahead
  // (reading compressed clusters for later units first) reads the data of earlier ones after.
  size_t lookback() const { return lookback_; }
  void set_lookback(size_t bytes);

 private:
  size_t read_locked(uint64_t offset, MutableBytes buf);
  void restart();
  // Reads forward until pos_ >= target or the end; keeps the bytes from keep_from on.
  void advance(uint64_t target, uint64_t keep_from);
  uint64_t window_start() const { return pos_ - win_len_; }

  std::string name_;
  StreamOpener open_;
  std::unique_ptr<ByteReader> reader_;
  bool started_ = false;
  uint64_t pos_ = 0;  // decoded bytes read from the current sweep
  size_t lookback_ = 0;
  std::vector<std::byte> win_;
  size_t win_len_ = 0;  // win_ holds [pos_ - win_len_, pos_)
  bool eof_ = false;
  std::optional<uint64_t> size_;
  int sweeps_ = 0;
  std::function<void(uint64_t)> progress_;
  std::map<uint64_t, std::vector<std::byte>> captures_;
  uint64_t captured_bytes_ = 0;
  std::mutex mu_;
};

// A qcow2 image inside a re-openable stream (what open_source and open_stream_source return for
// a .qcow2.zst/.qcow2.gz). Pass 1 reads the header and (forward) the L1 table, keeping the bytes
// just before the L1 table, where diskferry's writer puts the L2 tables; pass 2, only when some
// L2 table was not among them, captures the rest in one sweep. Every Source pass then streams the
// data in file order. Data clusters out of guest order (a foreign image kept with -O asis) cost
// a sweep of the stream per descent; beyond a few, refused with how to get the image back.
// `first`: the decoder opened to detect the format (at byte 0). `input_bytes`: the compressed
// size, for progress. Backing files are refused.
std::unique_ptr<Source> open_qcow2_stream_source(const std::string& name, StreamOpener open,
                                                 std::unique_ptr<ByteReader> first,
                                                 std::optional<uint64_t> input_bytes,
                                                 const SourceOptions& options,
                                                 SourceCompression compression);

// A VHDX inside a re-openable stream (.vhdx.zst, .vhdx.gz): pass 1 keeps the header section and
// the regions its region table names (BAT, metadata) and reads on to the end; every Source pass
// then streams the payload blocks in file order. Blocks far out of guest order are refused as
// for qcow2.
std::unique_ptr<Source> open_vhdx_stream_source(const std::string& name, StreamOpener open,
                                                std::unique_ptr<ByteReader> first,
                                                std::optional<uint64_t> input_bytes,
                                                const SourceOptions& options,
                                                SourceCompression compression);

// At most this many sweeps of the stream per data pass (a foreign image's clusters out of
// order); more are refused before anything is written.
inline constexpr int kMaxDataSweeps = 4;

}  // namespace diskferry
