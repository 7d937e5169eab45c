#include "image/qcow2_decompress.hpp"

#include <zlib.h>
#include <zstd.h>

#include "util/error.hpp"

namespace diskferry {

struct ClusterDecompressor::State {
  ClusterCodec codec = ClusterCodec::None;
  z_stream zs{};
  bool zs_ready = false;
  struct FreeDctx {
    void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
  };
  std::unique_ptr<ZSTD_DCtx, FreeDctx> dctx;
  ~State() {
    if (zs_ready) inflateEnd(&zs);
  }
};

ClusterDecompressor::ClusterDecompressor(ClusterCodec codec) : s_(std::make_unique<State>()) {
  s_->codec = codec;
  if (codec == ClusterCodec::Deflate) {
    // Raw deflate with the 4 KiB window QEMU reads with (windowBits -12): a stream QEMU
    // cannot inflate is refused here too, so the result is always what qemu-img would read.
    if (inflateInit2(&s_->zs, -12) != Z_OK)
      throw Error(ErrorKind::Internal, "zlib: inflateInit2 failed");
    s_->zs_ready = true;
  } else if (codec == ClusterCodec::Zstd) {
    s_->dctx.reset(ZSTD_createDCtx());
    if (!s_->dctx) throw Error(ErrorKind::Internal, "zstd: out of memory");
  }
}

ClusterDecompressor::~ClusterDecompressor() = default;

const char* ClusterDecompressor::decompress(Bytes in, MutableBytes out) {
  if (s_->codec == ClusterCodec::Deflate) {
    z_stream& zs = s_->zs;
    inflateReset(&zs);
    zs.next_in = const_cast<Bytef*>(reinterpret_cast<const Bytef*>(in.data()));
    zs.avail_in = static_cast<uInt>(in.size());
    zs.next_out = reinterpret_cast<Bytef*>(out.data());
    zs.avail_out = static_cast<uInt>(out.size());
    int rc = inflate(&zs, Z_FINISH);
    if (rc != Z_STREAM_END && rc != Z_BUF_ERROR) return "deflate data is corrupt";
    if (zs.avail_out != 0) return "deflate data inflates to less than one cluster";
    if (rc == Z_STREAM_END) return nullptr;
    // The cluster is full but the stream has not ended: one byte more tells whether the stream
    // holds more than a cluster (refused) or merely ends past the recorded size (QEMU reads it).
    std::byte extra{};
    zs.next_out = reinterpret_cast<Bytef*>(&extra);
    zs.avail_out = 1;
    rc = inflate(&zs, Z_FINISH);
    if (zs.avail_out == 0) return "deflate data inflates to more than one cluster";
    if (rc != Z_STREAM_END && rc != Z_BUF_ERROR) return "deflate data is corrupt";
    return nullptr;
  }
  if (s_->codec == ClusterCodec::Zstd) {
    // As QEMU: frames are read until the cluster is full; the last one must end exactly there.
    ZSTD_DCtx* d = s_->dctx.get();
    ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    ZSTD_outBuffer ob{out.data(), out.size(), 0};
    size_t rc = 0;
    while (ob.pos < ob.size) {
      size_t in_before = ib.pos, out_before = ob.pos;
      rc = ZSTD_decompressStream(d, &ob, &ib);
      if (ZSTD_isError(rc)) return "zstd data is corrupt";
      if (ib.pos == in_before && ob.pos == out_before)
        return "zstd data inflates to less than one cluster";
    }
    if (rc != 0) return "zstd data inflates to more than one cluster";
    return nullptr;
  }
  return "no compression type";
}

}  // namespace diskferry
