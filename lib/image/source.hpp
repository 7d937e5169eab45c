// A source is the guest-visible disk as bytes. Readers hand it out in aligned units, in
// increasing offset order, skipping units they know are zero (holes, ranges a layout file leaves
// out). Callers own the buffers (zstd-style), so nothing is allocated per unit.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "util/bytes.hpp"
#include "util/file_identity.hpp"

namespace diskferry {

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t end() const { return offset + length; }
};

struct Chunk {
  uint64_t offset = 0;  // multiple of the pass unit
  size_t length = 0;    // the unit, or less for the last unit of the disk
};

// One read of the source from start to end.
class Pass {
 public:
  virtual ~Pass() = default;
  // Fills buf (at least `unit` bytes) with the next unit that may hold data.
  // Returns nullopt at the end; units never returned read as zeros.
  virtual std::optional<Chunk> next(MutableBytes buf) = 0;
  // Virtual size in bytes. For streams it is known only once next() has returned nullopt.
  virtual uint64_t size() const = 0;
  // Source bytes consumed so far (compressed bytes for .gz/.zst), for progress.
  virtual uint64_t consumed() const = 0;
};

class Source {
 public:
  virtual ~Source() = default;
  virtual const std::string& name() const = 0;
  // Known before reading for files and block devices; nullopt for streams.
  virtual std::optional<uint64_t> known_size() const = 0;
  // Total bytes a pass will consume when known (file size, compressed size), for progress.
  virtual std::optional<uint64_t> input_bytes() const = 0;
  // Whether open_pass can be called more than once (false for stdin).
  virtual bool rereadable() const = 0;
  // `unit` is a power of two; offsets handed out are multiples of it.
  virtual std::unique_ptr<Pass> open_pass(uint32_t unit) = 0;

  // The local files the source reads (the image, and a qcow2's backing files), so that no
  // destination overwrites one of them. Empty for remote sources and pipes.
  const FileIdentities& files() const { return files_; }
  void set_files(FileIdentities files) { files_ = std::move(files); }

 private:
  FileIdentities files_;
};

enum class SourceCompression { None, Gzip, Zstd };

// What the (decompressed) bytes are. Auto: qcow2 or VHDX when they start with its magic, else
// raw. File: the file's own bytes, neither decompressed nor read as an image (for -O asis).
enum class SourceFormat { Auto, Raw, Qcow2, Vhdx, File };

struct SourceOptions {
  // Ranges to read (from an rbd diff layout file); everything else reads as zero.
  std::optional<std::vector<Extent>> layout;
  std::string layout_name;  // the layout file, for error messages
  SourceFormat format = SourceFormat::Auto;
  // Threads that inflate compressed qcow2 clusters, a window of units ahead of the reader
  // (0: one per core; 1: the pass inflates them itself, nothing read ahead).
  int threads = 0;
  // Told about oddities that do not stop the read (a dirty qcow2 image), one line each without
  // a trailing newline; default: silent.
  std::function<void(const std::string&)> on_warning;
  // Show on stderr the passes a source makes before the conversion's own (the table passes of
  // a qcow2 inside .zst/.gz), and which data pass is running.
  bool progress = false;
  // A restore: check the bytes of an sftp:// SOURCE against its NAME.sha256 sidecar (missing:
  // a warning), failing the pass that reads the last byte when they differ.
  bool verify_checksum = false;
};

// "raw", "qcow2" or "vhdx" (as --source-format takes it). Throws Error(Usage) otherwise.
SourceFormat parse_source_format(const std::string& s);

// PATH or "-" (stdin). gzip and zstd input is detected by magic bytes, not by name, and so are
// qcow2 and VHDX (read at random offsets in a file or block device; a qcow2 inside a .gz/.zst
// file is read in passes over the decompressed stream: image/stream_image.hpp).
// Throws Error(Input|Format) naming the path and the cause.
std::unique_ptr<Source> open_source(const std::string& path, const SourceOptions& options = {});

class ByteReader;
// A source read front to back through `open()`, called again for every pass (a file on an SFTP
// server): gzip/zstd found by magic and undone; a qcow2 inside read in passes over the stream
// (image/stream_image.hpp), a VHDX inside refused as for stdin.
// `input_bytes`: what a pass reads (the compressed size), for progress.
std::unique_ptr<Source> open_stream_source(const std::string& name,
                                           std::function<std::unique_ptr<ByteReader>()> open,
                                           std::optional<uint64_t> input_bytes,
                                           const SourceOptions& options = {});

// The virtual size the images describe: rounded up to whole 512-byte sectors, as qemu-img does.
inline uint64_t virtual_disk_size(uint64_t source_bytes) {
  return round_up(source_bytes, 512);
}

}  // namespace diskferry
