// `diskferry convert` and `diskferry measure`.
#include <fmt/format.h>
#include <unistd.h>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>

#include "commands.hpp"
#include "image/layout.hpp"
#include "pipeline/convert.hpp"
#include "remote_args.hpp"
#include "transport/sftp/remote_source.hpp"
#include "util/error.hpp"
#include "util/size.hpp"

namespace diskferry::cli {
namespace {

// Options shared by convert and measure.
struct ImageArgs {
  std::string source;
  std::string format;
  std::string cluster_size = "64K";
  std::string qcow2_compression;
  std::string block_size = "32M";
  std::string compress = "none";
  std::string layout;
  std::string source_format;
  int threads = 0;
  bool progress = false, no_progress = false;

  void add(CLI::App& c) {
    c.add_option("SOURCE", source,
                 "Raw or qcow2 image file or block device (qcow2 with its backing chain), "
                 "gzip/zstd-compressed raw image (detected by their magic bytes), or - for stdin")
        ->required();
    c.add_option("--source-format", source_format,
                 "Read SOURCE as raw or qcow2 instead of detecting it by its magic bytes");
    c.add_option("-O,--format", format,
                 "Output format: qcow2, vhdx, raw, or asis (the source file's bytes unchanged, "
                 "e.g. a qcow2 file itself; --compress applies)")
        ->required();
    c.add_option("--cluster-size", cluster_size,
                 "qcow2 cluster size, a power of two from 512 to 2M (default 64K)");
    c.add_option("--qcow2-compression", qcow2_compression,
                 "Compress each qcow2 cluster (like qemu-img convert -c): zlib or zstd. The "
                 "image stays directly usable by QEMU");
    c.add_option("--block-size", block_size,
                 "VHDX block size, a power of two from 1M to 256M (default 32M)");
    c.add_option("--compress", compress,
                 "Compress the whole output: none, zstd[:LEVEL] (1-19, all cores) or "
                 "gzip[:LEVEL] (1-9). Default none");
    c.add_option("--layout", layout,
                 "Read only the ranges listed in this `rbd diff --whole-object --format=json` "
                 "file; everything else is written as zeros");
    c.add_option("--threads", threads, "Compression threads (default: all cores)");
    c.add_flag("--progress", progress,
               "Show progress on stderr (default when stderr is a terminal)");
    c.add_flag("--no-progress", no_progress, "Never show progress");
  }

  ConvertOptions options() const {
    ConvertOptions o;
    o.writer.format = parse_format(format);
    uint64_t cs = parse_size(cluster_size, "--cluster-size");
    uint64_t bs = parse_size(block_size, "--block-size");
    if (cs > UINT32_MAX || bs > UINT32_MAX)
      throw Error(ErrorKind::Usage, "--cluster-size/--block-size: too large");
    o.writer.cluster_size = static_cast<uint32_t>(cs);
    o.writer.block_size = static_cast<uint32_t>(bs);
    if (qcow2_compression.empty())
      o.writer.cluster_codec = ClusterCodec::None;
    else if (qcow2_compression == "zlib" || qcow2_compression == "deflate")
      o.writer.cluster_codec = ClusterCodec::Deflate;
    else if (qcow2_compression == "zstd")
      o.writer.cluster_codec = ClusterCodec::Zstd;
    else
      throw Error(ErrorKind::Usage, fmt::format("--qcow2-compression '{}': expected zlib or zstd",
                                                qcow2_compression));
    o.compress = StreamCompression::parse(compress);
    int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (threads < 0 || threads > 1024)
      throw Error(ErrorKind::Usage, "--threads: expected a number from 1 to 1024");
    o.threads = threads ? threads : cores;
    o.writer.threads = o.threads;
    o.progress = !no_progress && (progress || ::isatty(STDERR_FILENO));
    o.writer.validate();
    return o;
  }

  // `remote`: the ssh options when SOURCE is an sftp:// URL (a restore).
  std::unique_ptr<Source> open(const RemoteArgs* remote = nullptr) const {
    SourceOptions so;
    so.threads = threads;  // inflating compressed qcow2 clusters (0: all cores)
    if (!source_format.empty()) so.format = parse_source_format(source_format);
    if (format == "asis") {
      if (!source_format.empty())
        throw Error(ErrorKind::Usage, "--source-format does not apply to -O asis");
      so.format = SourceFormat::File;
    }
    so.on_warning = [](const std::string& m) { fmt::print(stderr, "diskferry: warning: {}\n", m); };
    if (!layout.empty()) {
      so.layout = read_rbd_layout(layout);
      so.layout_name = layout;
    }
    if (source.rfind("sftp://", 0) == 0) {
      if (!remote) throw Error(ErrorKind::Usage, "this command cannot read an sftp:// source");
      return sftp::open_remote_source(sftp::parse_url(source), remote->read_options(), so);
    }
    return open_source(source, so);
  }
};

}  // namespace

Run add_convert(CLI::App& app) {
  auto args = std::make_shared<ImageArgs>();
  auto remote = std::make_shared<RemoteArgs>();
  auto dest = std::make_shared<std::string>();
  auto* c = app.add_subcommand(
      "convert",
      "Convert a disk image to qcow2, VHDX or raw as a stream (file, block device, pipe)");
  c->footer(
      "Never seeks back in the output. A file destination is written as DEST.partial and renamed "
      "when complete. Output bytes\n"
      "depend only on the source bytes and the options, so two runs give identical files.\n\n"
      "Examples:\n"
      "  diskferry convert vm.img -O qcow2 -o vm.qcow2\n"
      "  diskferry convert win11.img.gz -O vhdx -o - | ssh host 'cat > win11.vhdx'\n"
      "  zcat vm.img.gz | diskferry convert - -O qcow2 -o vm.qcow2   (single pass)\n"
      "  diskferry convert vm.img -O qcow2 --qcow2-compression zstd -o vm.qcow2\n"
      "  diskferry convert vm.img -O qcow2 --compress zstd -o - > vm.qcow2.zst\n"
      "  diskferry convert vm.img -O qcow2 --compress zstd --identity /etc/diskferry/id_ed25519 "
      "\\\n"
      "      -o sftp://u123456@u123456.your-storagebox.de:23/~/backups/vm.qcow2.zst\n"
      "  diskferry convert vm.img -O vhdx --bwlimit \"08:00,5M 23:00,off\" -o "
      "sftp://backupbox/srv/vm.vhdx\n"
      "      (backupbox: a Host alias from ~/.ssh/config)\n"
      "  diskferry convert sftp://backupbox/srv/web01.qcow2 -O raw -o /var/lib/libvirt/images/"
      "web01.img\n"
      "      (restore: streamed, nothing stored on the way; raw/.gz/.zst and qcow2 backups)\n\n"
      "To a file, qcow2/VHDX are written in one pass and the header is rewritten at the end.\n"
      "To a pipe (or with --compress), the source is read twice: once to plan, once to write.\n"
      "stdin to a pipe is impossible for qcow2/VHDX without a temporary copy, and is refused.\n\n"
      "To SFTP: written as NAME.partial, flushed (fsync@openssh.com), renamed into place, then\n"
      "NAME.sha256 (sha256sum -c format) beside it. Host keys are checked strictly. A dropped or\n"
      "stalled connection is resumed where every write was acknowledged (--retries); the bytes\n"
      "below that point are not sent again. Test a remote first: diskferry test-remote URL.\n\n"
      "Exit status: 0 success, 1 failure (the message names the file and the cause), 2 bad usage.");
  args->add(*c);
  c->add_option("-o,--output", *dest,
                "Destination: a file or block device, - for stdout, or "
                "sftp://USER@HOST[:PORT]/PATH (/~/PATH: relative to the login directory)")
      ->required();
  remote->add(*c);
  return [args, remote, dest]() {
    ConvertOptions o = args->options();
    auto src = args->open(remote.get());
    remote->apply_transfer_options(o);
    o.on_retry = [](const std::string& m) { fmt::print(stderr, "diskferry: warning: {}\n", m); };
    auto d = remote->open(*dest);
    auto r = convert(*src, *d, o);
    if (o.progress)
      fmt::print(stderr, "wrote {} {} ({} virtual) to {}{}\n", format_name(o.writer.format),
                 format_size(r.output_bytes), format_size(r.virtual_size),
                 *dest == "-" ? "stdout" : *dest,
                 r.sha256.empty() ? "" : fmt::format(", sha256 {}", r.sha256));
    return 0;
  };
}

Run add_measure(CLI::App& app) {
  auto args = std::make_shared<ImageArgs>();
  auto json = std::make_shared<bool>(false);
  auto* c = app.add_subcommand("measure",
                               "Print the exact size `convert` would write with the same options");
  c->footer(
      "Reads the source once to plan the layout. With --compress the whole output is compressed\n"
      "and counted (not stored), since its size is only known that way.\n\n"
      "Example: diskferry measure vm.img -O qcow2 --qcow2-compression zstd --json");
  args->add(*c);
  c->add_flag("--json", *json, "Print {\"size\": N, ...} as JSON");
  return [args, json]() {
    ConvertOptions o = args->options();
    auto src = args->open();
    auto r = measure(*src, o);
    if (*json) {
      nlohmann::json j{{"size", r.output_bytes},
                       {"image_size", r.image_bytes},
                       {"virtual_size", r.virtual_size},
                       {"format", format_name(o.writer.format)}};
      fmt::print("{}\n", j.dump());
    } else {
      fmt::print("size: {} ({})\nvirtual size: {} ({})\nformat: {}{}\n", r.output_bytes,
                 format_size(r.output_bytes), r.virtual_size, format_size(r.virtual_size),
                 format_name(o.writer.format), o.compress.extension());
    }
    return 0;
  };
}

}  // namespace diskferry::cli
