#include "format/writer.hpp"

#include <fmt/format.h>

#include "util/error.hpp"
#include "util/size.hpp"

namespace diskferry {

std::unique_ptr<FormatWriter> make_raw_writer(const WriterOptions& o);
std::unique_ptr<FormatWriter> make_qcow2_writer(const WriterOptions& o);
std::unique_ptr<FormatWriter> make_vhdx_writer(const WriterOptions& o);

std::string format_name(ImageFormat f) {
  switch (f) {
    case ImageFormat::Raw:
      return "raw";
    case ImageFormat::Qcow2:
      return "qcow2";
    case ImageFormat::Vhdx:
      return "vhdx";
    case ImageFormat::Asis:
      return "asis";
  }
  return "?";
}

ImageFormat parse_format(const std::string& text) {
  if (text == "raw") return ImageFormat::Raw;
  if (text == "qcow2") return ImageFormat::Qcow2;
  if (text == "vhdx") return ImageFormat::Vhdx;
  if (text == "asis") return ImageFormat::Asis;
  throw Error(
      ErrorKind::Usage,
      fmt::format("-O '{}': unknown output format (expected qcow2, vhdx, raw or asis)", text));
}

namespace {
bool pow2(uint64_t v) {
  return v && !(v & (v - 1));
}
}  // namespace

void WriterOptions::validate() const {
  if (!pow2(cluster_size) || cluster_size < 512 || cluster_size > (2u << 20))
    throw Error(ErrorKind::Usage,
                fmt::format("--cluster-size {}: must be a power of two from 512 B to 2 MiB",
                            format_size(cluster_size)));
  if (!pow2(block_size) || block_size < (1u << 20) || block_size > (256u << 20))
    throw Error(ErrorKind::Usage,
                fmt::format("--block-size {}: must be a power of two from 1 MiB to 256 MiB",
                            format_size(block_size)));
  if (cluster_codec != ClusterCodec::None && format != ImageFormat::Qcow2)
    throw Error(ErrorKind::Usage, "--qcow2-compression applies to -O qcow2 only");
}

std::unique_ptr<FormatWriter> make_writer(const WriterOptions& o) {
  o.validate();
  switch (o.format) {
    case ImageFormat::Raw:
    case ImageFormat::Asis:
      return make_raw_writer(o);
    case ImageFormat::Qcow2:
      return make_qcow2_writer(o);
    case ImageFormat::Vhdx:
      return make_vhdx_writer(o);
  }
  throw Error(ErrorKind::Internal, "unknown format");
}

}  // namespace diskferry
