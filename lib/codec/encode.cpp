#include "codec/encode.hpp"

#include <fmt/format.h>
#include <zlib.h>
#include <zstd.h>
#include <array>
#include <charconv>
#include <vector>

#include "util/error.hpp"

namespace diskferry {

StreamCompression StreamCompression::parse(const std::string& text) {
  StreamCompression c;
  auto colon = text.find(':');
  std::string name = text.substr(0, colon);
  auto bad = [&](const std::string& why) {
    return Error(ErrorKind::Usage, fmt::format("--compress '{}': {}", text, why));
  };
  if (name == "none") {
    if (colon != std::string::npos) throw bad("'none' takes no level");
    return c;
  }
  int lo, hi;
  if (name == "zstd") {
    c.codec = StreamCodec::Zstd;
    lo = 1;
    hi = ZSTD_maxCLevel();
  } else if (name == "gzip" || name == "gz") {
    c.codec = StreamCodec::Gzip;
    lo = 1;
    hi = 9;
  } else {
    throw bad("expected none, zstd[:LEVEL] or gzip[:LEVEL]");
  }
  if (colon != std::string::npos) {
    std::string lv = text.substr(colon + 1);
    auto [p, ec] = std::from_chars(lv.data(), lv.data() + lv.size(), c.level);
    if (ec != std::errc() || p != lv.data() + lv.size() || c.level < lo || c.level > hi)
      throw bad(fmt::format("level must be a number from {} to {}", lo, hi));
  }
  return c;
}

std::string StreamCompression::extension() const {
  switch (codec) {
    case StreamCodec::None:
      return "";
    case StreamCodec::Zstd:
      return ".zst";
    case StreamCodec::Gzip:
      return ".gz";
  }
  return "";
}

namespace {

constexpr size_t kOutBuf = 1 << 20;

class ZstdSink final : public FilterSink {
 public:
  ZstdSink(std::unique_ptr<Sink> inner, int level, int workers)
      : FilterSink(std::move(inner)), cctx_(ZSTD_createCCtx()), out_(kOutBuf) {
    if (!cctx_) throw Error(ErrorKind::Internal, "zstd: out of memory");
    check(ZSTD_CCtx_setParameter(cctx_, ZSTD_c_compressionLevel, level ? level : 3));
    check(ZSTD_CCtx_setParameter(cctx_, ZSTD_c_checksumFlag, 1));
    size_t rc = ZSTD_CCtx_setParameter(cctx_, ZSTD_c_nbWorkers, std::max(1, workers));
    if (ZSTD_isError(rc))
      throw Error(ErrorKind::Internal, "zstd: this libzstd was built without multithreading");
  }
  ~ZstdSink() override { ZSTD_freeCCtx(cctx_); }

  void write(Bytes data) override {
    ZSTD_inBuffer in{data.data(), data.size(), 0};
    while (in.pos < in.size) pump(&in, ZSTD_e_continue);
    pos_ += data.size();
  }
  void write_zeros(uint64_t n) override { Sink::write_zeros(n); }
  bool supports_rewrite() const override { return false; }
  void rewrite(uint64_t o, Bytes d) override { Sink::rewrite(o, d); }
  void commit() override {
    ZSTD_inBuffer in{nullptr, 0, 0};
    while (pump(&in, ZSTD_e_end) != 0) {
    }
    FilterSink::commit();
  }
  uint64_t position() const override { return pos_; }

 private:
  size_t pump(ZSTD_inBuffer* in, ZSTD_EndDirective mode) {
    ZSTD_outBuffer out{out_.data(), out_.size(), 0};
    size_t rc = ZSTD_compressStream2(cctx_, &out, in, mode);
    check(rc);
    if (out.pos) inner().write(Bytes(out_.data(), out.pos));
    return rc;
  }
  static void check(size_t rc) {
    if (ZSTD_isError(rc))
      throw Error(ErrorKind::Internal, fmt::format("zstd: {}", ZSTD_getErrorName(rc)));
  }

  ZSTD_CCtx* cctx_;
  std::vector<std::byte> out_;
  uint64_t pos_ = 0;
};

class GzipSink final : public FilterSink {
 public:
  GzipSink(std::unique_ptr<Sink> inner, int level) : FilterSink(std::move(inner)), out_(kOutBuf) {
    // 16 + MAX_WBITS: gzip framing. A fixed header (no name, no mtime) keeps output reproducible.
    if (deflateInit2(&zs_, level ? level : 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) !=
        Z_OK)
      throw Error(ErrorKind::Internal, "zlib: deflateInit2 failed");
  }
  ~GzipSink() override { deflateEnd(&zs_); }

  void write(Bytes data) override {
    while (!data.empty()) {
      size_t n = std::min<size_t>(data.size(), 1u << 30);
      zs_.next_in = const_cast<Bytef*>(reinterpret_cast<const Bytef*>(data.data()));
      zs_.avail_in = static_cast<uInt>(n);
      while (zs_.avail_in > 0) pump(Z_NO_FLUSH);
      data = data.subspan(n);
      pos_ += n;
    }
  }
  void write_zeros(uint64_t n) override { Sink::write_zeros(n); }
  bool supports_rewrite() const override { return false; }
  void rewrite(uint64_t o, Bytes d) override { Sink::rewrite(o, d); }
  void commit() override {
    zs_.avail_in = 0;
    while (pump(Z_FINISH) != Z_STREAM_END) {
    }
    FilterSink::commit();
  }
  uint64_t position() const override { return pos_; }

 private:
  int pump(int flush) {
    zs_.next_out = reinterpret_cast<Bytef*>(out_.data());
    zs_.avail_out = static_cast<uInt>(out_.size());
    int rc = deflate(&zs_, flush);
    if (rc == Z_STREAM_ERROR) throw Error(ErrorKind::Internal, "zlib: deflate failed");
    size_t n = out_.size() - zs_.avail_out;
    if (n) inner().write(Bytes(out_.data(), n));
    return rc;
  }

  z_stream zs_{};
  std::vector<std::byte> out_;
  uint64_t pos_ = 0;
};

}  // namespace

std::unique_ptr<Sink> make_compressing_sink(const StreamCompression& c, std::unique_ptr<Sink> inner,
                                            int workers) {
  switch (c.codec) {
    case StreamCodec::None:
      return inner;
    case StreamCodec::Zstd:
      return std::make_unique<ZstdSink>(std::move(inner), c.level, workers);
    case StreamCodec::Gzip:
      return std::make_unique<GzipSink>(std::move(inner), c.level);
  }
  return inner;
}

}  // namespace diskferry
