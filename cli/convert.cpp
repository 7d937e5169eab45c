// `diskferry convert` and `diskferry measure`.
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>

#include "commands.hpp"
#include "image/checked_source.hpp"
#include "image/layout.hpp"
#include "pipeline/convert.hpp"
#include "remote_args.hpp"
#include "transport/sftp/remote_source.hpp"
#include "util/error.hpp"
#include "util/size.hpp"

namespace diskferry::cli {
namespace {

// What makes one output: its format and the options that shape its bytes. The command's flags
// give the defaults; each --to may override them.
struct OutputText {
  std::string format;
  std::string cluster_size = "64K";
  std::string qcow2_compression;
  std::string block_size = "32M";
  std::string compress = "none";
  std::string container = "none";
  std::vector<std::string> container_files;
  std::string container_name;

  // "KEY=VALUE" from a --to spec.
  void set(const std::string& spec, const std::string& kv) {
    auto eq = kv.find('=');
    std::string key = kv.substr(0, eq), value = eq == std::string::npos ? "" : kv.substr(eq + 1);
    if (eq == std::string::npos || value.empty())
      throw Error(ErrorKind::Usage, fmt::format("--to '{}': '{}' is not KEY=VALUE", spec, kv));
    if (key == "compress")
      compress = value;
    else if (key == "cluster-size")
      cluster_size = value;
    else if (key == "qcow2-compression")
      qcow2_compression = value;
    else if (key == "block-size")
      block_size = value;
    else if (key == "container")
      container = value;
    else if (key == "container-file")
      container_files.push_back(value);
    else if (key == "container-name")
      container_name = value;
    else
      throw Error(ErrorKind::Usage,
                  fmt::format("--to '{}': unknown key '{}' (expected compress, cluster-size, "
                              "qcow2-compression, block-size, container, container-file or "
                              "container-name)",
                              spec, key));
  }

  OutputSpec spec(int threads) const {
    OutputSpec o;
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
    o.writer.threads = threads;
    o.writer.validate();
    o.compress = StreamCompression::parse(compress);
    if (container == "tar" || container == "ova")
      o.container.tar = true;
    else if (container != "none")
      throw Error(
          ErrorKind::Usage,
          fmt::format("--container '{}': expected tar (ova is the same) or none", container));
    if (!o.container.tar && (!container_files.empty() || !container_name.empty()))
      throw Error(ErrorKind::Usage, "--container-file/--container-name need --container tar");
    for (const auto& f : container_files) o.container.files.push_back(read_container_file(f));
    return o;
  }
};

// Where the image goes inside a container, unless --container-name says: the destination's
// base name without its container and compression extensions, with the format's own extension
// ("vm.ova" holds "vm.qcow2").
std::string default_member_name(const std::string& dest, const std::string& source,
                                ImageFormat format) {
  auto base = [](std::string p) {
    auto slash = p.rfind('/');
    return slash == std::string::npos ? p : p.substr(slash + 1);
  };
  auto strip = [](std::string& n, std::initializer_list<const char*> exts) {
    for (const char* e : exts) {
      std::string x = e;
      if (n.size() > x.size() && n.compare(n.size() - x.size(), x.size(), x) == 0) {
        n.resize(n.size() - x.size());
        return;
      }
    }
  };
  if (format == ImageFormat::Asis) return source == "-" ? "disk" : base(source);
  std::string ext = format == ImageFormat::Raw ? ".img" : "." + format_name(format);
  std::string n = dest == "-" ? "disk" : base(dest);
  strip(n, {".zst", ".gz"});
  strip(n, {".ova", ".tar"});
  if (n.empty()) n = "disk";
  if (n.size() < ext.size() || n.compare(n.size() - ext.size(), ext.size(), ext) != 0) n += ext;
  return n;
}

// Options shared by convert and measure.
struct ImageArgs {
  std::string source;
  std::vector<std::string> formats;
  OutputText defaults;
  std::string layout;
  std::string source_format;
  int threads = 0;
  bool progress = false, no_progress = false;
  bool no_verify_checksum = false;

  void add(CLI::App& c, bool several) {
    c.add_option("SOURCE", source,
                 "Raw, qcow2 or VHDX image file or block device (qcow2 with its backing chain), "
                 "gzip/zstd-compressed raw image (detected by their magic bytes), or - for stdin")
        ->required();
    c.add_option("--source-format", source_format,
                 "Read SOURCE as raw, qcow2 or vhdx instead of detecting it by its magic bytes");
    auto* f = c.add_option("-O,--format", formats,
                           several ? "Output format: qcow2, vhdx, raw, or asis (the source file's "
                                     "bytes unchanged, e.g. a qcow2 file itself; --compress "
                                     "applies). Repeat -O with -o for several outputs"
                                   : "Output format: qcow2, vhdx, raw, or asis");
    if (!several) f->required()->expected(1);
    c.add_option("--cluster-size", defaults.cluster_size,
                 "qcow2 cluster size, a power of two from 512 to 2M (default 64K)");
    c.add_option("--qcow2-compression", defaults.qcow2_compression,
                 "Compress each qcow2 cluster (like qemu-img convert -c): zlib or zstd. The "
                 "image stays directly usable by QEMU. To a pipe or SFTP every cluster is "
                 "compressed twice (its size is needed before the first byte); --compress zstd "
                 "compresses once");
    c.add_option("--block-size", defaults.block_size,
                 "VHDX block size, a power of two from 1M to 256M (default 32M). An empty "
                 "(0-byte) disk gets 1M blocks whatever is given: QEMU opens an empty VHDX only "
                 "with a BAT region of 8 MiB per MiB of block size (it miscounts the entries of "
                 "an empty disk), which would be 256 MiB of zeros at 32M and 2 GiB, more than "
                 "it reads, at 256M");
    c.add_option("--compress", defaults.compress,
                 "Compress the whole output: none, zstd[:LEVEL] (1-19, all cores) or "
                 "gzip[:LEVEL] (1-9). Default none");
    c.add_option("--container", defaults.container,
                 "Wrap the image in a POSIX tar archive: tar (or ova), default none. Needs the "
                 "image size first, so the source is read twice (a file, not a pipe)");
    c.add_option("--container-file", defaults.container_files,
                 "A file put into the archive before the image, under its base name (repeat; "
                 "an .ovf descriptor first makes an OVA)");
    c.add_option("--container-name", defaults.container_name,
                 "The image's name inside the archive (default: the destination's name with "
                 "the format's extension, e.g. vm.ova holds vm.qcow2)");
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
    int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (threads < 0 || threads > 1024)
      throw Error(ErrorKind::Usage, "--threads: expected a number from 1 to 1024");
    o.threads = threads ? threads : cores;
    o.progress = !no_progress && (progress || ::isatty(STDERR_FILENO));
    return o;
  }

  // The one output of measure.
  OutputSpec spec(const ConvertOptions& o) const {
    OutputText t = defaults;
    t.format = formats.at(0);
    OutputSpec s = t.spec(o.threads);
    if (s.container.tar)
      s.container.image_name = !t.container_name.empty()
                                   ? t.container_name
                                   : default_member_name("-", source, s.writer.format);
    s.container.image_mtime = source_mtime();
    return s;
  }

  // The image member's time in a container: the source file's (stable across the attempts and
  // runs of one backup, unlike the clock); 0 for stdin and remote sources.
  int64_t source_mtime() const {
    struct stat st {};
    if (source == "-" || source.rfind("sftp://", 0) == 0 || ::stat(source.c_str(), &st) != 0)
      return 0;
    return st.st_mtime;
  }

  // `remote`: the ssh options when SOURCE is an sftp:// URL (a restore). `asis`: read the
  // source file's own bytes.
  std::unique_ptr<Source> open(bool asis, const RemoteArgs* remote = nullptr) const {
    SourceOptions so;
    so.threads = threads;  // inflating compressed qcow2 clusters (0: all cores)
    if (!source_format.empty()) so.format = parse_source_format(source_format);
    if (asis) {
      if (!source_format.empty())
        throw Error(ErrorKind::Usage, "--source-format does not apply to -O asis");
      so.format = SourceFormat::File;
    }
    so.on_warning = [](const std::string& m) { fmt::print(stderr, "diskferry: warning: {}\n", m); };
    so.progress = !no_progress && (progress || ::isatty(STDERR_FILENO));
    so.verify_checksum = !no_verify_checksum;
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

// One destination of convert, with what it is to hold.
struct Target {
  std::string dest;
  OutputSpec spec;
};

// FORMAT[,KEY=VALUE...]:DEST into `t`; returns DEST. A value runs to the next ',' or ':', except
// that compress takes NAME[:LEVEL]: "compress=zstd:9:vm.vhdx.zst" is level 9 into vm.vhdx.zst.
std::string parse_to(const std::string& to, OutputText& t) {
  auto bad = [&] {
    return Error(ErrorKind::Usage,
                 fmt::format("--to '{}': expected FORMAT[,KEY=VALUE...]:DEST, e.g. "
                             "qcow2,compress=zstd:3:sftp://box/vm.qcow2.zst",
                             to));
  };
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  size_t at = to.find_first_of(",:");
  if (at == std::string::npos) throw bad();
  t.format = to.substr(0, at);
  while (to[at] == ',') {
    const size_t start = at + 1;
    size_t end = to.find_first_of(",:", start);
    if (end == std::string::npos) throw bad();
    if (to.compare(start, 9, "compress=") == 0 && to[end] == ':') {
      size_t level = end + 1;
      while (level < to.size() && digit(to[level])) ++level;
      if (level > end + 1 && (level == to.size() || to[level] == ',' || to[level] == ':'))
        end = level;
      if (end == to.size()) throw bad();
    }
    t.set(to, to.substr(start, end - start));
    at = end;
  }
  std::string dest = to.substr(at + 1);
  if (dest.empty()) throw bad();
  // What an option left behind (a level after a key that takes none, KEY=VALUE after the ':')
  // is almost never a file name; ./NAME says it is one.
  size_t digits = 0;
  while (digits < dest.size() && digit(dest[digits])) ++digits;
  const size_t eq = dest.find('='), slash = dest.find('/');
  if ((digits > 0 && digits < dest.size() && dest[digits] == ':') ||
      (eq != std::string::npos && eq < slash))
    throw Error(ErrorKind::Usage,
                fmt::format("--to '{}': DEST '{}' looks like a leftover option: options go "
                            "before the ':' that starts DEST, each after a ',' (e.g. "
                            "vhdx,compress=zstd:9:vm.vhdx.zst); for a file of that name give "
                            "./{}",
                            to, dest, dest));
  return dest;
}

// -O/-o pairs in order, then each --to FORMAT[,KEY=VALUE...]:DEST.
std::vector<Target> targets(const ImageArgs& a, const std::vector<std::string>& dests,
                            const std::vector<std::string>& tos, int threads) {
  std::vector<std::pair<OutputText, std::string>> texts;
  if (a.formats.size() > 1 && a.formats.size() != dests.size())
    throw Error(ErrorKind::Usage,
                fmt::format("{} -O and {} -o given: with several outputs, give one -O per -o (in "
                            "the same order), or use --to FORMAT:DEST",
                            a.formats.size(), dests.size()));
  if (!dests.empty() && a.formats.empty())
    throw Error(ErrorKind::Usage, "-o needs -O FORMAT (or use --to FORMAT:DEST)");
  if (dests.empty() && !a.formats.empty())
    throw Error(ErrorKind::Usage, "-O needs -o DEST (use - for stdout)");
  for (size_t i = 0; i < dests.size(); ++i) {
    OutputText t = a.defaults;
    t.format = a.formats.size() == 1 ? a.formats[0] : a.formats[i];
    texts.emplace_back(t, dests[i]);
  }
  for (const auto& to : tos) {
    OutputText t = a.defaults;
    t.container_files.clear();  // a --to lists its own members
    std::string dest = parse_to(to, t);
    texts.emplace_back(t, dest);
  }
  if (texts.empty()) throw Error(ErrorKind::Usage, "no output: give -O FORMAT -o DEST or --to");
  std::vector<Target> out;
  int64_t mtime = a.source_mtime();
  for (auto& [t, dest] : texts) {
    Target tg{dest, t.spec(threads)};
    if (tg.spec.container.tar)
      tg.spec.container.image_name =
          !t.container_name.empty() ? t.container_name
                                    : default_member_name(dest, a.source, tg.spec.writer.format);
    tg.spec.container.image_mtime = mtime;
    for (const auto& other : out)
      if (other.dest == dest && dest != "/dev/null")
        throw Error(ErrorKind::Usage, fmt::format("{}: given as the destination twice", dest));
    if (dest == "-")
      for (const auto& other : out)
        if (other.dest == "-") throw Error(ErrorKind::Usage, "stdout given twice");
    out.push_back(std::move(tg));
  }
  bool asis = out[0].spec.writer.format == ImageFormat::Asis;
  for (const auto& t : out)
    if ((t.spec.writer.format == ImageFormat::Asis) != asis)
      throw Error(ErrorKind::Usage,
                  "-O asis (the source file's own bytes) cannot share a read with image formats "
                  "(the disk inside): run them as two commands");
  return out;
}

// An option given on the command line that applies to none of the run's outputs (--cluster-size
// with -O vhdx, --streams with only local files) would be ignored: refused instead, since the
// user meant something by it. `pairs`: the -O/-o outputs, first in `ts`.
void refuse_unused_options(const CLI::App& c, const ImageArgs& a, const std::vector<Target>& ts,
                           size_t pairs) {
  auto any = [&](auto&& pred) { return std::any_of(ts.begin(), ts.end(), pred); };
  auto format_is = [](ImageFormat f) {
    return [f](const Target& t) { return t.spec.writer.format == f; };
  };
  auto check = [&](const char* name, const char* applies_to, bool applies) {
    const CLI::Option* o = c.get_option_no_throw(name);
    if (o && o->count() > 0 && !applies)
      throw Error(ErrorKind::Usage,
                  fmt::format("{} applies to {}, and this run has none", name, applies_to));
  };
  check("--cluster-size", "qcow2 outputs", any(format_is(ImageFormat::Qcow2)));
  check("--qcow2-compression", "qcow2 outputs", any(format_is(ImageFormat::Qcow2)));
  check("--block-size", "VHDX outputs", any(format_is(ImageFormat::Vhdx)));
  check("--container-name", "outputs in a tar container (--container tar)",
        any([](const Target& t) { return t.spec.container.tar; }));
  check("--container-file", "-O/-o outputs in a tar container (a --to lists its own)",
        std::any_of(ts.begin(), ts.begin() + static_cast<std::ptrdiff_t>(pairs),
                    [](const Target& t) { return t.spec.container.tar; }));
  const bool sftp_source = a.source.rfind("sftp://", 0) == 0;
  const bool sftp_dest = any([](const Target& t) { return sftp::is_sftp_url(t.dest); });
  for (const char* name : {"--streams", "--stall-timeout", "--retries", "--accept-new-host-key",
                           "--identity", "--known-hosts", "--ssh-config"})
    check(name, "sftp:// sources and destinations", sftp_source || sftp_dest);
  // A download reconnects on its own schedule; the wait applies to resuming an upload.
  check("--retry-delay", "sftp:// destinations", sftp_dest);
  check("--no-verify-checksum", "an sftp:// SOURCE (a restore)", sftp_source);
  check("--discard", "block-device destinations", any([](const Target& t) {
          struct stat st {};
          return ::stat(t.dest.c_str(), &st) == 0 && S_ISBLK(st.st_mode);
        }));
  check("--no-sync", "file and block-device destinations",
        any([](const Target& t) { return t.dest != "-" && !sftp::is_sftp_url(t.dest); }));
}

// A block device cannot be left untouched by a failed restore: by the time the last byte of the
// backup shows that it does not match its checksum, the device holds what was written.
void warn_if_device_suspect(const std::string& dest, const std::exception_ptr& error) {
  struct stat st {};
  if (::stat(dest.c_str(), &st) != 0 || !S_ISBLK(st.st_mode)) return;
  try {
    std::rethrow_exception(error);
  } catch (const ChecksumMismatch&) {
    fmt::print(stderr,
               "diskferry: {}: WARNING: this block device now holds data from a backup that "
               "failed its checksum: its contents are suspect, do not use them\n",
               dest);
  } catch (...) {
  }
}

// Every local file the run reads: no destination may be one of them.
FileIdentities input_files(const ImageArgs& a, const Source& src, const std::vector<Target>& ts) {
  FileIdentities in = src.files();
  if (auto layout = identify_path(a.layout, "the --layout file " + a.layout)) in.push_back(*layout);
  for (const auto& t : ts)
    for (const auto& m : t.spec.container.files)
      if (m.file) in.push_back(*m.file);
  return in;
}

}  // namespace

Run add_convert(CLI::App& app) {
  auto args = std::make_shared<ImageArgs>();
  auto remote = std::make_shared<RemoteArgs>();
  auto dests = std::make_shared<std::vector<std::string>>();
  auto tos = std::make_shared<std::vector<std::string>>();
  auto* c = app.add_subcommand(
      "convert",
      "Convert a disk image to qcow2, VHDX or raw as a stream (file, block device, pipe, SFTP)");
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
      "Several outputs from one read of the source (each -O goes with the -o in the same place;\n"
      "--to FORMAT[,KEY=VALUE...]:DEST gives an output its own options, KEY being compress,\n"
      "cluster-size, qcow2-compression, block-size, container, container-file, container-name):\n"
      "  diskferry convert vm.qcow2 -O qcow2 -o vm-flat.qcow2 -O vhdx -o vm.vhdx\n"
      "  diskferry convert vm.img --to qcow2,compress=zstd:sftp://box/vm.qcow2.zst --to "
      "vhdx:/mnt/usb/vm.vhdx\n"
      "An output that fails (or cannot be opened) does not stop the others; the exit status is\n"
      "then 1. A DEST the command gets wrong (a directory, a file the run reads: the source, a\n"
      "backing file, a --container-file, the --layout file, by any name) stops the run before\n"
      "anything is read. DEST.partial is locked: a second run writing the same DEST is refused.\n\n"
      "OVA (tar with the .ovf descriptor first; tar -xOf vm.ova vm.qcow2 gives the image back):\n"
      "  diskferry convert vm.qcow2 -O qcow2 --container tar --container-file vm.ovf -o vm.ova\n\n"
      "To a file, qcow2/VHDX are written in one pass and the header is rewritten at the end.\n"
      "To a pipe (or with --compress or --container), the source is read twice: once to plan,\n"
      "once to write. stdin to a pipe is impossible for qcow2/VHDX without a temporary copy, and\n"
      "is refused.\n\n"
      "To SFTP: written as NAME.partial, flushed (fsync@openssh.com), renamed into place, then\n"
      "NAME.sha256 (sha256sum -c format) beside it. Host keys are checked strictly. A dropped or\n"
      "stalled connection is resumed where every write was acknowledged (--retries); the bytes\n"
      "below that point are not sent again. NAME.lock makes the run the only writer of NAME:\n"
      "another run to the same NAME refuses, naming the holder (a lock left by a process that\n"
      "is gone from this host is taken over). Test a remote first: diskferry test-remote URL.\n\n"
      "Exit status: 0 success, 1 failure (the message names the file and the cause), 2 bad usage.");
  args->add(*c, true);
  c->add_option("-o,--output", *dests,
                "Destination: a file or block device, - for stdout, or "
                "sftp://USER@HOST[:PORT]/PATH (/~/PATH: relative to the login directory). Repeat "
                "for several outputs");
  c->add_option("--to", *tos,
                "Another output with its own options: FORMAT[,KEY=VALUE...]:DEST, e.g. "
                "vhdx,block-size=1M:vm.vhdx or qcow2,compress=zstd:9:sftp://box/vm.qcow2.zst "
                "(compress takes NAME[:LEVEL]; a DEST that looks like a leftover option, "
                "9:x or KEY=VALUE, is refused: write ./9:x) (repeat)");
  remote->add(*c);
  remote->add_device_options(*c);
  c->add_flag("--no-verify-checksum", args->no_verify_checksum,
              "Restoring from sftp://: do not check the backup against NAME.sha256 beside it. By "
              "default every byte read is hashed and a mismatch fails the restore before DEST "
              "is published (a file DEST is not left behind; a block device, already written, "
              "is reported as suspect); a backup without a sidecar is restored with a warning");
  return [c, args, remote, dests, tos]() {
    ConvertOptions o = args->options();
    auto ts = targets(*args, *dests, *tos, o.threads);
    refuse_unused_options(*c, *args, ts, dests->size());
    auto src = args->open(ts[0].spec.writer.format == ImageFormat::Asis, remote.get());
    remote->apply_transfer_options(o);
    o.on_retry = [](const std::string& m) { fmt::print(stderr, "diskferry: warning: {}\n", m); };
    // A destination the command itself gets wrong (malformed, a directory, an input of the
    // run, being written by another run: Error(Usage)) stops the run before anything is read;
    // one that cannot be opened for another reason (permissions) fails alone.
    const FileIdentities inputs = input_files(*args, *src, ts);
    std::vector<std::unique_ptr<Destination>> ds;
    std::vector<Output> outs;
    std::vector<OutputOutcome> results(ts.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      try {
        ds.push_back(remote->open(ts[i].dest, inputs, args->source));
        outs.push_back({ts[i].spec, ds.back().get()});
      } catch (const Error& e) {
        if (e.kind() == ErrorKind::Usage) throw;
        results[i].error = std::current_exception();
      }
    }
    auto done = outs.empty() ? std::vector<OutputOutcome>{} : convert_many(*src, outs, o);
    for (size_t i = 0, k = 0; i < ts.size(); ++i)
      if (!results[i].error) results[i] = std::move(done[k++]);
    int failed = 0;
    std::exception_ptr first;
    for (size_t i = 0; i < ts.size(); ++i) {
      const auto& r = results[i].result;
      const std::string& dest = ts[i].dest;
      if (results[i].error) {
        warn_if_device_suspect(dest, results[i].error);
        if (!first) first = results[i].error;
        if (ts.size() > 1) {
          try {
            std::rethrow_exception(results[i].error);
          } catch (const std::exception& e) {
            fmt::print(stderr, "diskferry: {}\n", e.what());
          }
        }
        ++failed;
        continue;
      }
      if (o.progress || ts.size() > 1)
        fmt::print(stderr, "wrote {}{} {} ({} virtual) to {}{}\n",
                   format_name(ts[i].spec.writer.format), ts[i].spec.container.tar ? " in tar" : "",
                   format_size(r.output_bytes), format_size(r.virtual_size),
                   dest == "-" ? "stdout" : dest,
                   r.sha256.empty() ? "" : fmt::format(", sha256 {}", r.sha256));
    }
    if (ts.size() == 1 && first) std::rethrow_exception(first);
    if (failed)
      fmt::print(stderr, "diskferry: {} of {} outputs failed (see above)\n", failed, ts.size());
    return failed ? 1 : 0;
  };
}

Run add_measure(CLI::App& app) {
  auto args = std::make_shared<ImageArgs>();
  auto json = std::make_shared<bool>(false);
  auto* c = app.add_subcommand("measure",
                               "Print the exact size `convert` would write with the same options");
  c->footer(
      "Reads the source once to plan the layout. With --compress the whole output is compressed\n"
      "and counted (not stored), since its size is only known that way. With --container tar\n"
      "the archive is counted (the image name inside it follows --container-name).\n\n"
      "Example: diskferry measure vm.img -O qcow2 --qcow2-compression zstd --json");
  args->add(*c, false);
  c->add_flag("--json", *json, "Print {\"size\": N, ...} as JSON");
  return [c, args, json]() {
    ConvertOptions o = args->options();
    OutputSpec s = args->spec(o);
    refuse_unused_options(*c, *args, {Target{"-", s}}, 1);
    o.writer = s.writer;
    o.compress = s.compress;
    o.container = s.container;
    auto src = args->open(s.writer.format == ImageFormat::Asis);
    auto r = measure(*src, o);
    if (*json) {
      nlohmann::json j{{"size", r.output_bytes},
                       {"image_size", r.image_bytes},
                       {"virtual_size", r.virtual_size},
                       {"format", format_name(o.writer.format)}};
      fmt::print("{}\n", j.dump());
    } else {
      fmt::print("size: {} ({})\nvirtual size: {} ({})\nformat: {}{}{}\n", r.output_bytes,
                 format_size(r.output_bytes), r.virtual_size, format_size(r.virtual_size),
                 format_name(o.writer.format), o.container.tar ? " in tar" : "",
                 o.compress.extension());
    }
    return 0;
  };
}

}  // namespace diskferry::cli
