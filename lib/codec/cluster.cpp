#include "codec/cluster.hpp"

#include <zlib.h>
#include <zstd.h>

#include "util/error.hpp"

namespace diskferry {

struct ClusterCompressor::State {
  ClusterCodec codec;
  z_stream zs{};
  ZSTD_CCtx* cctx = nullptr;
};

ClusterCompressor::ClusterCompressor(ClusterCodec codec) : s_(std::make_unique<State>()) {
  s_->codec = codec;
  if (codec == ClusterCodec::Deflate) {
    // Raw deflate with a 4 KiB window (windowBits -12): what QEMU writes and reads.
    if (deflateInit2(&s_->zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) !=
        Z_OK)
      throw Error(ErrorKind::Internal, "zlib: deflateInit2 failed");
  } else if (codec == ClusterCodec::Zstd) {
    s_->cctx = ZSTD_createCCtx();
    if (!s_->cctx) throw Error(ErrorKind::Internal, "zstd: out of memory");
    // No frame checksum: QEMU stops reading once the cluster is full and would see a trailing
    // checksum as an incomplete frame.
    ZSTD_CCtx_setParameter(s_->cctx, ZSTD_c_compressionLevel, ZSTD_CLEVEL_DEFAULT);
    ZSTD_CCtx_setParameter(s_->cctx, ZSTD_c_checksumFlag, 0);
  }
}

ClusterCompressor::~ClusterCompressor() {
  if (s_->codec == ClusterCodec::Deflate) deflateEnd(&s_->zs);
  ZSTD_freeCCtx(s_->cctx);
}

size_t ClusterCompressor::compress(Bytes in, MutableBytes out) {
  if (s_->codec == ClusterCodec::Deflate) {
    z_stream& zs = s_->zs;
    deflateReset(&zs);
    zs.next_in = const_cast<Bytef*>(reinterpret_cast<const Bytef*>(in.data()));
    zs.avail_in = static_cast<uInt>(in.size());
    zs.next_out = reinterpret_cast<Bytef*>(out.data());
    zs.avail_out = static_cast<uInt>(out.size());
    int rc = deflate(&zs, Z_FINISH);
    if (rc != Z_STREAM_END) return 0;  // did not fit: incompressible
    size_t n = out.size() - zs.avail_out;
    return n < out.size() ? n : 0;
  }
  if (s_->codec == ClusterCodec::Zstd) {
    size_t n = ZSTD_compress2(s_->cctx, out.data(), out.size(), in.data(), in.size());
    if (ZSTD_isError(n) || n >= out.size()) return 0;
    return n;
  }
  return 0;
}

}  // namespace diskferry
