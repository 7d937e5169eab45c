#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>

#include "config/config.hpp"
#include "util/error.hpp"

using namespace diskferry;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

const std::string kFile = "/etc/diskferry/diskferry.yaml";

Config parse(const std::string& text) {
  return parse_config(text, kFile, "/etc/diskferry");
}

std::string error_of(const std::string& text) {
  try {
    parse(text);
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::Usage);
    return e.what();
  }
  return "accepted";
}

// A remote and the start of one source, so each test adds only the lines it is about. The
// source's keys start on line 6.
const std::string kHead = R"(remotes:
  storagebox:
    url: sftp://u1@box.example:23/~/backups
sources:
  web01:
)";

std::string source(const std::string& lines) {
  return kHead + "    path: /img/web01.img\n    remote: storagebox\n" + lines;
}

std::chrono::system_clock::time_point utc(int y, int mo, int d, int h, int mi, int s) {
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = s;
  return std::chrono::system_clock::from_time_t(timegm(&tm));
}

// A directory under /tmp removed with everything in it when the test ends.
struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/df-config-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    fs::path p = path / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
};

SourceConf named(const std::string& name_template, ImageFormat format = ImageFormat::Qcow2,
                 const std::string& compress = "none") {
  SourceConf s;
  s.name = "web01";
  s.name_template = name_template;
  s.format = format;
  s.compress = StreamCompression::parse(compress);
  return s;
}

}  // namespace

TEST_CASE("config: every key of a full file is read, relative paths against its directory") {
  TempDir dir;
  std::string path = dir.write("etc/diskferry.yaml", R"(
state_dir: state          # relative: below the config's directory
workers: 3
bwlimit: "08:00,10M 23:00,off"
lease: 5m
stall_timeout: 90
remotes:
  storagebox:
    url: sftp://u123456@u123456.your-storagebox.de:23/~/backups
    identity: keys/id_ed25519
    known_hosts: /etc/diskferry/known_hosts
    ssh_config: ../ssh/config
    bwlimit: 50M
    streams: 8
  nas:
    url: sftp://nas.lan/srv/backup
sources:
  web01:
    path: images/web01.qcow2
    snapshot: reflink
    snapshot_dir: /srv/snap
    format: qcow2
    compress: zstd:3
    remote: storagebox
    name: "{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}"
    retention: {keep_last: 7, keep_daily: 7, keep_weekly: 4, keep_monthly: 6}
    retries: {max_attempts: 4, backoff: "10s..2h"}
    hooks: {pre_snapshot: "virsh domfsfreeze web01", post_snapshot: "virsh domfsthaw web01", timeout: 2m}
  db01:
    path: /var/lib/libvirt/images/db01.img
    snapshot: none
    format: vhdx
    compress: gzip:9
    remote: nas
  app:
    path: app.img
    compress: qcow2-zstd
    remote: nas
)");
  std::string base = (dir.path / "etc").string();
  REQUIRE(chmod(path.c_str(), 0640) == 0);  // it has hooks: not for everyone to read
  Config c = load_config(path);
  CHECK(c.path == path);
  CHECK(c.state_dir == base + "/state");
  CHECK(c.workers == 3);
  CHECK(c.bwlimit.to_string() == "08:00,10M 23:00,off");
  CHECK(c.lease == 300s);
  CHECK(c.stall_timeout == 90s);
  CHECK(c.warnings.empty());

  REQUIRE(c.remotes.size() == 2);
  const RemoteConf& r = c.remotes.at("storagebox");
  CHECK(r.name == "storagebox");
  CHECK(r.origin == path + ":8");
  CHECK(r.url.str() == "sftp://u123456@u123456.your-storagebox.de:23/~/backups");
  CHECK(r.url.home_relative);
  CHECK(r.identity == base + "/keys/id_ed25519");
  CHECK(r.known_hosts == "/etc/diskferry/known_hosts");
  CHECK(r.ssh_config == (dir.path / "ssh/config").string());
  CHECK(r.bwlimit.to_string() == "50M");
  CHECK(r.streams == 8);
  const RemoteConf& nas = c.remotes.at("nas");
  CHECK(nas.url.remote_path() == "/srv/backup");
  CHECK(nas.identity.empty());
  CHECK(nas.known_hosts.empty());
  CHECK(nas.streams == 4);
  CHECK(nas.bwlimit.to_string() == "off");

  REQUIRE(c.sources.size() == 3);
  CHECK(c.sources.begin()->first == "app");  // ordered by name
  const SourceConf& w = c.sources.at("web01");
  CHECK(w.name == "web01");
  CHECK(w.origin == path + ":18");
  CHECK(w.path == base + "/images/web01.qcow2");
  CHECK(w.snapshot == SnapshotMode::Reflink);
  CHECK(w.snapshot_dir == "/srv/snap");
  CHECK(w.format == ImageFormat::Qcow2);
  CHECK(w.compress.codec == StreamCodec::Zstd);
  CHECK(w.compress.level == 3);
  CHECK(w.cluster_codec == ClusterCodec::None);
  CHECK(w.remote == "storagebox");
  CHECK(w.retention.keep_last == 7);
  CHECK(w.retention.keep_daily == 7);
  CHECK(w.retention.keep_weekly == 4);
  CHECK(w.retention.keep_monthly == 6);
  CHECK(w.retries.max_attempts == 4);
  CHECK(w.retries.backoff_min == 10s);
  CHECK(w.retries.backoff_max == 2h);
  CHECK(w.hooks.pre_snapshot == "virsh domfsfreeze web01");
  CHECK(w.hooks.post_snapshot == "virsh domfsthaw web01");
  CHECK(w.hooks.timeout == 120s);

  const SourceConf& db = c.sources.at("db01");
  CHECK(db.snapshot == SnapshotMode::None);
  CHECK(db.snapshot_dir.empty());
  CHECK(db.format == ImageFormat::Vhdx);
  CHECK(db.compress.codec == StreamCodec::Gzip);
  CHECK(db.compress.level == 9);
  CHECK(db.retention.keep_last == 0);
  CHECK(db.retries.max_attempts == 5);
  CHECK(db.retries.backoff_min == 30s);
  CHECK(db.retries.backoff_max == 30min);
  CHECK(db.hooks.pre_snapshot.empty());
  CHECK(db.hooks.timeout == 60s);

  const SourceConf& app = c.sources.at("app");
  CHECK(app.path == base + "/app.img");
  CHECK(app.snapshot == SnapshotMode::Reflink);
  CHECK(app.snapshot_dir == base + "/.diskferry-snapshots");  // beside the image
  CHECK(app.cluster_codec == ClusterCodec::Zstd);
  CHECK(app.compress.codec == StreamCodec::None);
  CHECK(app.name_template == "{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}");
  CHECK(render_name(app, utc(2024, 1, 2, 3, 4, 5)) == "app/app-20240102T030405Z.qcow2");
}

TEST_CASE("config: defaults of an empty file, and the shipped example is valid") {
  Config c = parse("");
  CHECK(c.state_dir == "/var/lib/diskferry");
  CHECK(c.workers == 1);
  CHECK(c.lease == 60s);
  CHECK(c.stall_timeout == 60s);
  CHECK(c.bwlimit.to_string() == "off");
  CHECK(c.remotes.empty());
  CHECK(c.sources.empty());
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0] == kFile + ": no sources are configured: nothing will be backed up");

  fs::path example = fs::path(__FILE__).parent_path() / "../../configs/diskferry.yaml";
  REQUIRE(fs::exists(example));
  Config e = load_config(example.string());
  CHECK(e.workers == 2);
  CHECK(e.sources.size() == 2);
  CHECK(e.sources.at("web01").hooks.pre_snapshot == "virsh domfsfreeze web01");
  CHECK(e.sources.at("db01").retention.keep_daily == 14);
  CHECK(e.remotes.at("storagebox").streams == 4);
  CHECK(e.metrics_dir == "/var/lib/prometheus/node-exporter");
  CHECK(!e.notify.on_failure.empty());
  CHECK(e.sources.at("db01").notify.on_failure == e.notify.on_failure);
  CHECK(!e.sources.at("db01").notify.on_success.empty());
  // A source that leaves format and compress out is backed up as .qcow2.zst (zstd level 3).
  const SourceConf& db01 = e.sources.at("db01");
  CHECK(db01.compress.codec == StreamCodec::Zstd);
  CHECK(db01.compress.level == 0);
  CHECK(render_name(db01, utc(2024, 1, 2, 3, 4, 5)) == "db01/db01-20240102T030405Z.qcow2.zst");
  CHECK(parse(source("    compress: none\n")).sources.at("web01").compress.codec ==
        StreamCodec::None);
  CHECK(parse(source("    compress: qcow2-zlib\n")).sources.at("web01").compress.codec ==
        StreamCodec::None);
}

TEST_CASE("config: a reference to an unknown remote names the ones defined") {
  CHECK(error_of(kHead + "    path: /img/web01.img\n    remote: storagebx\n") ==
        kFile + ":7: sources.web01.remote: no remote named \"storagebx\" (defined: storagebox)");
  CHECK(error_of("sources:\n  web01:\n    path: /x.img\n    remote: box\n") ==
        kFile + ":4: sources.web01.remote: no remote named \"box\" (no remotes are defined)");
}

TEST_CASE("config: unknown keys are refused, with the likely key when one is close") {
  CHECK(error_of(source("    snapshoot: none\n")) ==
        kFile + ":8: sources.web01.snapshoot: unknown key (did you mean snapshot?)");
  CHECK(error_of(source("    retention: {keep_lats: 3}\n")) ==
        kFile + ":8: sources.web01.retention.keep_lats: unknown key (did you mean keep_last?)");
  CHECK(error_of("remote:\n  x: {}\n") ==
        kFile + ":1: remote: unknown key (did you mean remotes?)");
  CHECK(error_of("workers: 1\nKnown-Hosts: /x\n") ==
        kFile +
            ":2: Known-Hosts: unknown key (expected one of: state_dir, workers, bwlimit, lease, "
            "stall_timeout, metrics_dir, notify, remotes, sources)");
  CHECK(error_of(source("    hooks:\n      timeout: 5s\n      pre: x\n")) ==
        kFile +
            ":10: sources.web01.hooks.pre: unknown key (expected one of: pre_snapshot, "
            "post_snapshot, timeout)");
  CHECK(error_of(source("    <<: {format: raw}\n")) ==
        kFile +
            ":8: sources.web01.<<: YAML merge keys are not supported (repeat the keys, or alias a "
            "whole value with *)");
}

TEST_CASE("config: missing required keys") {
  CHECK(error_of(kHead + "    remote: storagebox\n") ==
        kFile + ":5: sources.web01: missing path: the disk image to back up");
  CHECK(error_of(kHead + "    path: /img/web01.img\n") ==
        kFile + ":5: sources.web01: missing remote: the name of a remote under remotes:");
  CHECK(error_of("remotes:\n  box:\n    identity: /k\n") ==
        kFile + ":2: remotes.box: missing url: sftp://USER@HOST[:PORT]/PATH");
  CHECK(error_of("remotes:\n  box:\n") ==
        kFile + ":2: remotes.box: missing url: sftp://USER@HOST[:PORT]/PATH");
}

TEST_CASE("config: wrong types") {
  CHECK(error_of("workers: many\n") ==
        kFile + ":1: workers: expected a whole number from 1 to 64, got \"many\"");
  CHECK(error_of("workers: 0\n") ==
        kFile + ":1: workers: expected a whole number from 1 to 64, got \"0\"");
  CHECK(error_of("workers: 2.5\n") ==
        kFile + ":1: workers: expected a whole number from 1 to 64, got \"2.5\"");
  CHECK(error_of("state_dir: [a, b]\n") == kFile + ":1: state_dir: expected a path, got a list");
  CHECK(error_of("state_dir:\nworkers: 2\n") ==
        kFile + ":1: state_dir: expected a path, got nothing (give a value or remove the key)");
  CHECK(error_of("state_dir: \"\"\n") ==
        kFile + ":1: state_dir: empty (remove the key for the default)");
  CHECK(error_of("sources:\n  - web01\n") ==
        kFile + ":2: sources: expected a mapping of source names to their settings, got a list");
  CHECK(error_of(source("    retention: 7\n")) ==
        kFile +
            ":8: sources.web01.retention: expected a mapping such as {keep_last: 7, keep_daily: "
            "7}, got \"7\"");
  CHECK(error_of("- a\n- b\n") ==
        kFile +
            ":1: expected a mapping of settings (state_dir, remotes, sources, ...), got a list");
  CHECK(error_of(source("    path: {a: b}\n")) ==
        kFile + ":8: sources.web01.path: given twice (first at line 6)");
  CHECK(error_of("workers: 1\nworkers: 2\n") ==
        kFile + ":2: workers: given twice (first at line 1)");
  CHECK(error_of("[a]: 1\n") == kFile + ":1: keys must be plain names, not a list");
}

TEST_CASE("config: bad values name what is allowed") {
  CHECK(error_of(source("    snapshot: lvm\n")) ==
        kFile + ":8: sources.web01.snapshot: expected reflink or none, got \"lvm\"");
  CHECK(error_of(source("    format: vmdk\n")) ==
        kFile + ":8: sources.web01.format: expected qcow2, vhdx, raw or asis, got \"vmdk\"");
  CHECK(error_of(source("    verify: sometimes\n")) ==
        kFile + ":8: sources.web01.verify: expected after_upload or none, got \"sometimes\"");
  CHECK(parse(source("    verify: after_upload\n")).sources.at("web01").verify_after_upload);
  CHECK(!parse(source("    verify: none\n")).sources.at("web01").verify_after_upload);
  CHECK(!parse(source("")).sources.at("web01").verify_after_upload);
  CHECK(error_of(source("    compress: xz\n")) ==
        kFile +
            ":8: sources.web01.compress: expected none, zstd[:LEVEL], gzip[:LEVEL], qcow2-zstd or "
            "qcow2-zlib, got \"xz\"");
  CHECK(error_of(source("    compress: zstd:99\n")) ==
        kFile + ":8: sources.web01.compress: level must be a number from 1 to 22");
  CHECK(error_of(source("    format: vhdx\n    compress: qcow2-zlib\n")) ==
        kFile +
            ":9: sources.web01.compress: qcow2-zlib compresses clusters inside a qcow2 image, but "
            "format is vhdx");
  CHECK(error_of(source("    snapshot: none\n    snapshot_dir: /s\n")) ==
        kFile + ":9: sources.web01.snapshot_dir: only used with snapshot: reflink");
  CHECK(error_of("lease: 5x\n") ==
        kFile + ":1: lease: expected a duration such as 60, 30s, 5m, 2h or 1d, got \"5x\"");
  CHECK(error_of("lease: 2s\n") == kFile + ":1: lease: 2s is out of range (10s to 1d)");
  CHECK(error_of(source("    retries: {backoff: \"30m..30s\"}\n")) ==
        kFile + ":8: sources.web01.retries.backoff: the minimum 30m is above the maximum 30s");
  CHECK(error_of(source("    retries: {backoff: \"30s-30m\"}\n")) ==
        kFile +
            ":8: sources.web01.retries.backoff: expected MIN..MAX, e.g. \"30s..30m\" (or one "
            "duration such as 60, 30s, 5m, 2h or 1d), got \"30s-30m\"");
  CHECK(error_of(source("    retries: {max_attempts: 0}\n")) ==
        kFile +
            ":8: sources.web01.retries.max_attempts: expected a whole number from 1 to 100, got "
            "\"0\"");
  CHECK(error_of("bwlimit: 10Q\n") ==
        kFile + ":1: bwlimit: bad rate '10Q' (examples: 512K, 20M, 1.5G, off)");
  CHECK(error_of("remotes:\n  box:\n    url: ftp://h/x\n") ==
        kFile +
            ":3: remotes.box.url: 'ftp://h/x': not an sftp:// URL (expected "
            "sftp://USER@HOST[:PORT]/PATH, or /~/PATH for a path in the login directory)");
  CHECK(error_of("remotes:\n  box:\n    url: sftp://h/x\n    streams: 17\n") ==
        kFile + ":4: remotes.box.streams: expected a whole number from 1 to 16, got \"17\"");
  CHECK(error_of("state_dir: ~/diskferry\n") ==
        kFile + ":1: state_dir: \"~/diskferry\": ~ is not expanded here; give the full path");
  CHECK(error_of("sources:\n  .hidden: {}\n") ==
        kFile +
            ":2: sources..hidden: source names are letters, digits, '.', '_' and '-' (not "
            "starting with '.', at most 100), got \".hidden\"");
  CHECK(error_of("remotes:\n  \"my box\": {url: \"sftp://h/x\"}\n") ==
        kFile +
            ":2: remotes.my box: remote names are letters, digits, '.', '_' and '-' (not "
            "starting with '.', at most 100), got \"my box\"");
  // Whatever the file holds, the message stays on one line.
  CHECK(error_of(source("    format: \"a\\nb\"\n")) ==
        kFile + ":8: sources.web01.format: expected qcow2, vhdx, raw or asis, got \"a\\x0ab\"");
}

TEST_CASE("config: YAML syntax errors carry yaml-cpp's line") {
  CHECK(error_of("workers: 1\nsources:\n  web01: [\n") ==
        kFile + ":4: invalid YAML: end of sequence flow not found");
  CHECK(error_of("workers: 1\n  bad: indent\n") == kFile + ":2: invalid YAML: illegal map value");
  CHECK(error_of("workers: 1\n---\nworkers: 2\n") ==
        kFile + ":2: a second YAML document (after ---); the configuration is one document");
  // yaml-cpp's LoadAll never returns on these (fuzz_config; the input is in its corpus).
  CHECK(error_of(",\n") == kFile + ":1: invalid YAML: a token outside any mapping or list");
  CHECK(error_of(",remotes:\n  box: {url\xff\xff; \"sftp://b@nas remote: box}\n") ==
        kFile + ":1: invalid YAML: a token outside any mapping or list");
  CHECK(error_of("a: *nothing\n") ==
        kFile + ":1: invalid YAML: the referenced anchor is not defined");
}

TEST_CASE("config: aliases share a value between sources") {
  Config c = parse(kHead + R"(    path: /img/web01.img
    remote: storagebox
    retention: &keep {keep_last: 3, keep_monthly: 12}
  web02:
    path: /img/web02.img
    remote: storagebox
    retention: *keep
)");
  CHECK(c.sources.at("web02").retention.keep_last == 3);
  CHECK(c.sources.at("web02").retention.keep_monthly == 12);
}

TEST_CASE("config: templates that could lose or misplace backups are refused") {
  auto name_error = [](const std::string& t) { return error_of(source("    name: " + t + "\n")); };
  const std::string at = kFile + ":8: sources.web01.name: ";
  CHECK(name_error("\"{source}.{ext}\"") ==
        at + "has no {time:...}: every backup needs a name of its own (the default is "
             "\"{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}\")");
  CHECK(name_error("\"{source}-{time:%m%d}\"") ==
        at + "{time:...} must give at least the date: year, month and day (e.g. %Y%m%d, %F or %s)");
  CHECK(name_error("\"../{source}-{time}\"") ==
        at + "has a '.' or '..' component; backups must stay below the remote's URL (renders as "
             "\"../web01-20240102T030405Z\")");
  CHECK(name_error("\"{source}/./{time}\"") ==
        at + "has a '.' or '..' component; backups must stay below the remote's URL (renders as "
             "\"web01/./20240102T030405Z\")");
  CHECK(name_error("\"/abs/{time}\"") ==
        at + "is an absolute path; names are relative to the remote's URL (renders as "
             "\"/abs/20240102T030405Z\")");
  CHECK(name_error("\"{source}//{time}\"") ==
        at + "has an empty path component (renders as \"web01//20240102T030405Z\")");
  CHECK(name_error("\"{time}/\"") ==
        at + "has an empty path component (renders as \"20240102T030405Z/\")");
  CHECK(name_error("\"{source}\\t{time}\"") == at + "contains a control character");
  CHECK(name_error("\"{host}/{time}\"") ==
        at + "unknown placeholder {host} (known: {source}, {time:FORMAT}, {ext}; literal braces "
             "are not allowed)");
  CHECK(name_error("\"{time:%b %d}\"") ==
        at + "%b is not supported in {time:...} (supported: %Y %m %d %H %M %S %j %s %F %T %%)");
  CHECK(name_error("\"{time:%Y%}\"") ==
        at + "'%' at the end of {time:...} (write %% for a literal %)");
  CHECK(name_error("\"{time:}\"") == at + "{time:} needs a format, e.g. {time:%Y%m%dT%H%M%SZ}");
  CHECK(name_error("\"{source}-{time\"") == at + "'{' without a matching '}'");
  CHECK(name_error("\"{source}}-{time}\"") == at + "'}' without a matching '{'");
  CHECK(name_error("\"{time}.partial\"") ==
        at + "ends in .partial, which diskferry uses for its own files (renders as "
             "\"20240102T030405Z.partial\")");
  CHECK(name_error("\"{time:%s}1\"") ==
        at + "names it renders cannot be read back for retention (digits right after %s?) "
             "(renders as \"17041646451\")");
}

TEST_CASE("config: two sources whose backups could not be told apart are refused") {
  std::string text = kHead + R"(    path: /img/web01.img
    remote: storagebox
    name: "backup-{time}.{ext}"
  web02:
    path: /img/web02.img
    remote: storagebox
    name: "backup-{time}.{ext}"
)";
  CHECK(error_of(text) ==
        kFile +
            ":12: sources.web02.name: its backups could not be told apart from those of "
            "sources.web01 on the same remote (put {source} in the name)");
  // Different formats give different extensions, so the names can be told apart.
  std::string vhdx = text + "    format: vhdx\n";
  CHECK(parse(vhdx).sources.size() == 2);
}

TEST_CASE("config: coarse templates are accepted with a warning") {
  Config c = parse(source("    name: \"{source}/{time:%F}.{ext}\"\n"));
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0] ==
        kFile +
            ":8: sources.web01.name: backups less than a day apart get the same name, and the "
            "later replaces the earlier (add %H%M to {time:...})");
}

TEST_CASE("config: render_name and match_name are inverses, {ext} from format and compression") {
  auto when = utc(2024, 3, 9, 23, 5, 7);
  struct Case {
    SourceConf s;
    std::string name;
  } cases[] = {
      {named("{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}", ImageFormat::Qcow2, "zstd:3"),
       "web01/web01-20240309T230507Z.qcow2.zst"},
      {named("{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}", ImageFormat::Vhdx),
       "web01/web01-20240309T230507Z.vhdx"},
      {named("{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}", ImageFormat::Raw, "gzip"),
       "web01/web01-20240309T230507Z.raw.gz"},
      {named("{time:%Y}/{source}_{time:%F_%T}.{ext}"), "2024/web01_2024-03-09_23:05:07.qcow2"},
      {named("{source}-{time:%s}.{ext}"), "web01-1710025507.qcow2"},
      {named("{source}-{time:%Y-%j-%H%M%S}.{ext}"), "web01-2024-069-230507.qcow2"},
      {named("{source}-{time:%Y%m%dT%H%M%SZ-100%%}.{ext}"), "web01-20240309T230507Z-100%.qcow2"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.s.name_template);
    CHECK(render_name(c.s, when) == c.name);
    auto back = match_name(c.s, c.name);
    REQUIRE(back);
    CHECK(*back == when);
  }

  // A coarser template gives back the start of its period.
  SourceConf daily = named("{source}-{time:%Y%m%d}.{ext}");
  CHECK(render_name(daily, when) == "web01-20240309.qcow2");
  CHECK(match_name(daily, "web01-20240309.qcow2") == utc(2024, 3, 9, 0, 0, 0));

  // Sub-second parts are not in the name.
  CHECK(render_name(cases[0].s, when + 999ms) == cases[0].name);

  // asis keeps the image file's extension ("img" when it has none).
  SourceConf asis = named("{source}-{time:%Y%m%d}.{ext}", ImageFormat::Asis, "zstd:1");
  asis.path = "/var/lib/libvirt/images/web01.qcow2";
  CHECK(render_name(asis, when) == "web01-20240309.qcow2.zst");
  CHECK(match_name(asis, "web01-20240309.qcow2.zst") == utc(2024, 3, 9, 0, 0, 0));
  asis.path = "/dev/vg0/web01";
  CHECK(render_name(asis, when) == "web01-20240309.img.zst");
}

TEST_CASE("config: match_name ignores what the template could not have produced") {
  SourceConf s = named("{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}", ImageFormat::Qcow2, "zstd");
  CHECK(match_name(s, "web01/web01-20240309T230507Z.qcow2.zst"));
  for (const char* other : {
           "web01/web01-20240309T230507Z.qcow2.zst.partial",  // an upload in progress
           "web01/web01-20240309T230507Z.qcow2.zst.sha256",   // its checksum
           "web01/web01-20240309T230507Z.qcow2.zst.lock",     // the lock of its upload
           "web01/web01-20240309T230507Z.qcow2.zst.lock.42",  // a lock being taken over
           "web01/web01-20240309T230507Z.qcow2",              // another compression
           "web02/web02-20240309T230507Z.qcow2.zst",          // another source
           "web01/web01-20240230T230507Z.qcow2.zst",          // 30 February
           "web01/web01-20241309T230507Z.qcow2.zst",          // month 13
           "web01/web01-20240309T250507Z.qcow2.zst",          // hour 25
           "web01/web01-2024030T9230507Z.qcow2.zst",          // digits in the wrong places
           "web01/web01-20240309T230507Z.qcow2.zstx",
           "web01/web01-+0240309T230507Z.qcow2.zst",
           "web01-20240309T230507Z.qcow2.zst",
           "",
       }) {
    CAPTURE(other);
    CHECK_FALSE(match_name(s, other));
  }
  // %j and %d must agree when both are given.
  SourceConf both = named("{time:%Y%m%d-%j}");
  CHECK(match_name(both, "20240309-069"));
  CHECK_FALSE(match_name(both, "20240309-070"));
}

TEST_CASE("config: load_config reports unreadable files and warns about writable ones") {
  TempDir dir;
  try {
    load_config((dir.path / "missing.yaml").string());
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::Usage);
    CHECK(std::string(e.what()) ==
          (dir.path / "missing.yaml").string() + ": cannot open: No such file or directory");
  }
  try {
    load_config(dir.path.string());
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == dir.path.string() + ": not a regular file");
  }

  std::string path = dir.write("d.yaml", "workers: [\n");
  try {
    load_config(path);
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == path + ":2: invalid YAML: end of sequence flow not found");
  }

  path = dir.write("w.yaml", source(""));
  REQUIRE(chmod(path.c_str(), 0666) == 0);
  Config c = load_config(path);
  bool warned = false;
  for (const auto& w : c.warnings)
    warned |= w == path +
                       ": writable by everyone (mode 0666): anyone can change the hooks, which run "
                       "as commands; chmod o-w";
  CHECK(warned);
}

TEST_CASE("config: a file with commands (tokens) that everyone may read warns") {
  TempDir dir;
  const std::string secret =
      "readable by everyone (mode 0644) and holds hook or notify "
      "commands, which often carry tokens or passwords; chmod o-r";
  auto warned = [&](const Config& c, const std::string& path) {
    for (const auto& w : c.warnings)
      if (w == path + ": " + secret) return true;
    return false;
  };
  std::string path =
      dir.write("n.yaml", "notify: {on_failure: \"curl -fsS https://hc.example/ping/SECRET\"}\n" +
                              source(""));
  REQUIRE(chmod(path.c_str(), 0644) == 0);
  CHECK(warned(load_config(path), path));
  REQUIRE(chmod(path.c_str(), 0640) == 0);
  CHECK_FALSE(warned(load_config(path), path));
  path = dir.write("h.yaml", source("    hooks: {pre_snapshot: \"virsh domfsfreeze web01\"}\n"));
  REQUIRE(chmod(path.c_str(), 0644) == 0);
  CHECK(warned(load_config(path), path));
  path = dir.write("plain.yaml", source(""));  // nothing secret in it: no warning
  REQUIRE(chmod(path.c_str(), 0644) == 0);
  CHECK_FALSE(warned(load_config(path), path));
}

TEST_CASE("config: notify commands, global and per source (the source's keys win)") {
  Config c = parse(R"(notify:
  on_failure: "mail -s failed root"
  on_success: "curl -fsS https://hc.example/ping"
  timeout: 30s
remotes:
  box:
    url: sftp://u@h/x
sources:
  a:
    path: /a.img
    remote: box
  b:
    path: /b.img
    remote: box
    notify: {on_success: "", on_failure: "ntfy publish ops \"$DISKFERRY_SOURCE\""}
  c:
    path: /c.img
    remote: box
    notify:
      timeout: 5s
)");
  CHECK(c.notify.on_failure == "mail -s failed root");
  CHECK(c.notify.timeout == 30s);
  const Notify& a = c.sources.at("a").notify;
  CHECK(a.on_failure == "mail -s failed root");
  CHECK(a.on_success == "curl -fsS https://hc.example/ping");
  CHECK(a.timeout == 30s);
  const Notify& b = c.sources.at("b").notify;
  CHECK(b.on_success.empty());  // "" turns the global one off for this source
  CHECK(b.on_failure == "ntfy publish ops \"$DISKFERRY_SOURCE\"");
  CHECK(b.timeout == 30s);
  const Notify& n = c.sources.at("c").notify;
  CHECK(n.on_failure == "mail -s failed root");
  CHECK(n.timeout == 5s);
  // None anywhere: nothing runs.
  Config none = parse(source(""));
  CHECK(none.sources.at("web01").notify.on_failure.empty());
  CHECK(none.sources.at("web01").notify.on_success.empty());
  CHECK(none.metrics_dir.empty());
}

TEST_CASE("config: notify and metrics_dir mistakes name the line and key") {
  CHECK(error_of(source("    notify: {on_failur: x}\n")) ==
        kFile + ":8: sources.web01.notify.on_failur: unknown key (did you mean on_failure?)");
  CHECK(error_of("notify:\n  on_success: [a, b]\n") ==
        kFile + ":2: notify.on_success: expected a shell command (\"\" for none), got a list");
  CHECK(error_of("notify: {timeout: 2h}\n") ==
        kFile + ":1: notify.timeout: 2h is out of range (1s to 1h)");
  CHECK(error_of("notify: mail\n") ==
        kFile +
            ":1: notify: expected a mapping such as {on_failure: \"...\", on_success: \"...\"}, "
            "got \"mail\"");
  CHECK(error_of("metrics_dir: ~/prom\n") ==
        kFile + ":1: metrics_dir: \"~/prom\": ~ is not expanded here; give the full path");
  // Relative to the configuration's directory, like every path.
  CHECK(parse("metrics_dir: prom/\n").metrics_dir == "/etc/diskferry/prom");
}

TEST_CASE("config: extra_outputs of one read, each named with its own {ext}") {
  Config c = parse(source(
      "    compress: zstd\n    extra_outputs: [{format: vhdx}, {format: raw, compress: gzip}]\n"));
  const SourceConf& s = c.sources.at("web01");
  REQUIRE(s.output_count() == 3);
  auto t = utc(2024, 1, 2, 3, 4, 5);
  CHECK(render_name(s.output(0), t) == "web01/web01-20240102T030405Z.qcow2.zst");
  CHECK(render_name(s.output(1), t) == "web01/web01-20240102T030405Z.vhdx");
  CHECK(render_name(s.output(2), t) == "web01/web01-20240102T030405Z.raw.gz");
  // Each output's retention sees only its own files.
  CHECK(match_name(s.output(1), "web01/web01-20240102T030405Z.vhdx"));
  CHECK(!match_name(s.output(1), "web01/web01-20240102T030405Z.qcow2.zst"));
  CHECK(parse(source("    extra_outputs:\n      - format: qcow2\n        compress: qcow2-zstd\n"
                     "    format: vhdx\n"))
            .sources.at("web01")
            .output(1)
            .cluster_codec == ClusterCodec::Zstd);

  CHECK(error_of(source("    extra_outputs: [{format: qcow2, compress: qcow2-zstd}]\n"
                        "    compress: none\n")) ==
        kFile +
            ":8: sources.web01.extra_outputs: two outputs would both be named .qcow2 (give each "
            "its own format or compression)");
  CHECK(error_of(source("    extra_outputs: [{compress: zstd}]\n")) ==
        kFile + ":8: sources.web01.extra_outputs[0]: missing format: qcow2, vhdx or raw");
  CHECK(error_of(source("    extra_outputs: [{format: asis}]\n")) ==
        kFile +
            ":8: sources.web01.extra_outputs[0]: format asis (the file's own bytes) cannot share "
            "a read with other outputs");
  CHECK(error_of(source("    extra_outputs: [{format: vhdx, level: 3}]\n"))
            .find("extra_outputs[0].level: unknown key") != std::string::npos);
  CHECK(error_of(source("    extra_outputs: vhdx\n")).find("expected a list of outputs") !=
        std::string::npos);
  CHECK(error_of(source("    name: \"{source}-{time:%Y%m%dT%H%M%S}.img\"\n"
                        "    extra_outputs: [{format: vhdx}]\n"))
            .find("has no {ext}") != std::string::npos);
}

TEST_CASE("config: check_sources_on_disk names one file under two names and a missing path") {
  fs::path dir = fs::temp_directory_path() / ("df-disk-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream((dir / "a.img").string()) << "disk";
  fs::create_hard_link(dir / "a.img", dir / "hard.img");
  fs::create_symlink(dir / "a.img", dir / "link.img");
  auto src = [&](const std::string& name, const std::string& path) {
    return "  " + name + ":\n    path: " + path + "\n    remote: r\n    snapshot: none\n";
  };
  std::string text = "remotes:\n  r:\n    url: sftp://u@h/x\nsources:\n" +  // sources on 5, 9, ...
                     src("a", (dir / "a.img").string()) + src("b", (dir / "hard.img").string()) +
                     src("c", (dir / "link.img").string()) +
                     src("d", (dir / "." / "a.img").string()) +
                     src("e", (dir / "gone.img").string());
  DiskCheck r = check_sources_on_disk(parse(text));
  REQUIRE(r.errors.size() == 3);
  CHECK(r.errors[0] == kFile + ":10: sources.b.path: " + (dir / "hard.img").string() +
                           " is the same file as " + (dir / "a.img").string() +
                           ", the path of sources.a (line 6): one disk, backed up twice under "
                           "two names");
  CHECK(r.errors[1].starts_with(kFile + ":14: sources.c.path: " + (dir / "link.img").string() +
                                " is the same file as " + (dir / "a.img").string()));
  CHECK(r.errors[2].starts_with(kFile + ":18: sources.d.path: " + (dir / "a.img").string() +
                                " is also the path of sources.a (line 6)"));
  REQUIRE(r.warnings.size() == 1);
  CHECK(r.warnings[0] == kFile + ":22: sources.e.path: " + (dir / "gone.img").string() +
                             " does not exist (yet?); its backups fail until it does");
  fs::remove_all(dir);
}
