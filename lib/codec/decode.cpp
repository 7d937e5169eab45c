#include "codec/decode.hpp"

#include <fmt/format.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>
#include <cstring>
#include <vector>

namespace diskferry {
namespace {

constexpr size_t kInBuf = 256 * 1024;
constexpr int kMaxWindowLog = 27;

class FdReader final : public ByteReader {
 public:
  FdReader(UniqueFd fd, std::string name, std::vector<std::byte> prefix)
      : fd_(std::move(fd)), name_(std::move(name)), prefix_(std::move(prefix)) {}

  size_t read(MutableBytes buf) override {
    size_t done = 0;
    if (prefix_pos_ < prefix_.size()) {
      size_t n = std::min(buf.size(), prefix_.size() - prefix_pos_);
      std::memcpy(buf.data(), prefix_.data() + prefix_pos_, n);
      prefix_pos_ += n;
      done = n;
    }
    if (done < buf.size()) done += read_some(fd_.get(), buf.subspan(done), name_);
    consumed_ += done;
    return done;
  }
  uint64_t consumed() const override { return consumed_; }

 private:
  UniqueFd fd_;
  std::string name_;
  std::vector<std::byte> prefix_;
  size_t prefix_pos_ = 0;
  uint64_t consumed_ = 0;
};

class GzipReader final : public ByteReader {
 public:
  GzipReader(std::unique_ptr<ByteReader> inner, std::string name)
      : inner_(std::move(inner)), name_(std::move(name)), in_(kInBuf) {
    // 16 + MAX_WBITS: gzip wrapper only, so a zlib or raw stream is reported as corrupt.
    if (inflateInit2(&zs_, 16 + MAX_WBITS) != Z_OK)
      throw Error(ErrorKind::Internal, "zlib: inflateInit2 failed");
  }
  ~GzipReader() override { inflateEnd(&zs_); }

  size_t read(MutableBytes buf) override {
    size_t done = 0;
    while (done < buf.size() && !finished_) {
      if (zs_.avail_in == 0) {
        size_t n = inner_->read(in_);
        if (n == 0) {
          if (member_done_) {
            finished_ = true;
            break;
          }
          throw Error(ErrorKind::Input,
                      fmt::format("{}: truncated gzip stream (ends inside a member after {} "
                                  "compressed bytes)",
                                  name_, inner_->consumed()));
        }
        zs_.next_in = reinterpret_cast<Bytef*>(in_.data());
        zs_.avail_in = static_cast<uInt>(n);
      }
      if (member_done_) {
        // Another member follows (concatenated .gz files, pigz output).
        inflateReset(&zs_);
        member_done_ = false;
      }
      zs_.next_out = reinterpret_cast<Bytef*>(buf.data() + done);
      zs_.avail_out = static_cast<uInt>(std::min<size_t>(buf.size() - done, 1u << 30));
      size_t before = zs_.avail_out;
      int rc = inflate(&zs_, Z_NO_FLUSH);
      done += before - zs_.avail_out;
      if (rc == Z_STREAM_END) {
        member_done_ = true;
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        throw Error(ErrorKind::Input,
                    fmt::format("{}: corrupt gzip stream near compressed byte {}: {}", name_,
                                inner_->consumed() - zs_.avail_in, zs_.msg ? zs_.msg : "error"));
      }
    }
    return done;
  }
  uint64_t consumed() const override { return inner_->consumed(); }

 private:
  std::unique_ptr<ByteReader> inner_;
  std::string name_;
  std::vector<std::byte> in_;
  z_stream zs_{};
  bool member_done_ = false;
  bool finished_ = false;
};

class ZstdReader final : public ByteReader {
 public:
  ZstdReader(std::unique_ptr<ByteReader> inner, std::string name)
      : inner_(std::move(inner)),
        name_(std::move(name)),
        in_(ZSTD_DStreamInSize()),
        ds_(ZSTD_createDStream()) {
    if (!ds_) throw Error(ErrorKind::Internal, "zstd: out of memory");
    // Bounded memory even for hostile input: windows up to 128 MiB (zstd's own default limit;
    // `zstd --long` up to 27 fits). A 2 GiB window request was found by fuzz_decode.
    ZSTD_DCtx_setParameter(ds_, ZSTD_d_windowLogMax, kMaxWindowLog);
  }
  ~ZstdReader() override { ZSTD_freeDStream(ds_); }

  size_t read(MutableBytes buf) override {
    size_t done = 0;
    while (done < buf.size() && !finished_) {
      if (in_pos_ == in_len_) {
        in_len_ = inner_->read(in_);
        in_pos_ = 0;
        if (in_len_ == 0) {
          if (frame_done_) {
            finished_ = true;
            break;
          }
          throw Error(ErrorKind::Input,
                      fmt::format("{}: truncated zstd stream (ends inside a frame after {} "
                                  "compressed bytes)",
                                  name_, inner_->consumed()));
        }
      }
      ZSTD_inBuffer in{in_.data(), in_len_, in_pos_};
      ZSTD_outBuffer out{buf.data() + done, buf.size() - done, 0};
      size_t rc = ZSTD_decompressStream(ds_, &out, &in);
      in_pos_ = in.pos;
      done += out.pos;
      if (ZSTD_isError(rc)) {
        if (ZSTD_getErrorCode(rc) == ZSTD_error_frameParameter_windowTooLarge)
          throw Error(ErrorKind::Input,
                      fmt::format("{}: zstd stream needs a window above {} MiB (made with "
                                  "--long=28 or more?); recompress with a smaller --long",
                                  name_, (1u << kMaxWindowLog) >> 20));
        throw Error(ErrorKind::Input, fmt::format("{}: corrupt zstd stream near compressed byte "
                                                  "{}: {}",
                                                  name_, inner_->consumed() - (in_len_ - in_pos_),
                                                  ZSTD_getErrorName(rc)));
      }
      frame_done_ = (rc == 0);
    }
    return done;
  }
  uint64_t consumed() const override { return inner_->consumed(); }

 private:
  std::unique_ptr<ByteReader> inner_;
  std::string name_;
  std::vector<std::byte> in_;
  size_t in_pos_ = 0, in_len_ = 0;
  ZSTD_DStream* ds_;
  bool frame_done_ = true;  // an empty input is a complete (empty) stream only if nothing came
  bool finished_ = false;
};

}  // namespace

std::unique_ptr<ByteReader> make_fd_reader(UniqueFd fd, std::string name,
                                           std::vector<std::byte> prefix) {
  return std::make_unique<FdReader>(std::move(fd), std::move(name), std::move(prefix));
}

SourceCompression detect_compression(Bytes head) {
  auto at = [&](size_t i) { return std::to_integer<unsigned>(head[i]); };
  if (head.size() >= 2 && at(0) == 0x1f && at(1) == 0x8b) return SourceCompression::Gzip;
  if (head.size() >= 4 && at(0) == 0x28 && at(1) == 0xb5 && at(2) == 0x2f && at(3) == 0xfd)
    return SourceCompression::Zstd;
  return SourceCompression::None;
}

std::unique_ptr<ByteReader> make_decoder(SourceCompression c, std::unique_ptr<ByteReader> inner,
                                         std::string name) {
  switch (c) {
    case SourceCompression::None:
      return inner;
    case SourceCompression::Gzip:
      return std::make_unique<GzipReader>(std::move(inner), name);
    case SourceCompression::Zstd:
      return std::make_unique<ZstdReader>(std::move(inner), name);
  }
  throw Error(ErrorKind::Internal, "unknown compression");
}

}  // namespace diskferry
