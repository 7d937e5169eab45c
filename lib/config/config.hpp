// The daemon's configuration file (configs/diskferry.yaml explains every key). It is validated
// completely when read, so a mistake is reported once, as "FILE:LINE: key.path: what is wrong",
// before any job starts, rather than as a failed backup at three in the morning.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "codec/cluster.hpp"
#include "codec/encode.hpp"
#include "format/writer.hpp"
#include "pipeline/rate_limit.hpp"
#include "transport/sftp/url.hpp"

namespace diskferry {

// Named RemoteConf, not Remote, to leave that name to whatever talks to a remote at run time.
struct RemoteConf {
  std::string name;
  std::string origin;  // "FILE:LINE" of its definition, for messages at run time
  sftp::Url url;
  // Absolute paths; empty: libssh's defaults (ssh-agent and ~/.ssh/id_*, ~/.ssh/known_hosts,
  // ~/.ssh/config of the daemon's user).
  std::string identity, known_hosts, ssh_config;
  RateSchedule bwlimit;  // unlimited unless set
  int streams = 4;       // SFTP channels one upload is spread over
};

enum class SnapshotMode { Reflink, None };

// 0 means the rule is not used; all 0 keeps every backup.
struct Retention {
  int keep_last = 0, keep_daily = 0, keep_weekly = 0, keep_monthly = 0;
};

struct Retries {
  int max_attempts = 5;  // including the first
  std::chrono::seconds backoff_min{30}, backoff_max{30 * 60};
};

struct Hooks {
  std::string pre_snapshot, post_snapshot;  // shell commands; empty: none
  std::chrono::seconds timeout{60};
};

// Commands run after a job ends (done, or failed for good), e.g. to send mail or call a webhook;
// they see the job's facts in DISKFERRY_* variables. Their failure never changes the job's.
struct Notify {
  std::string on_success, on_failure;  // shell commands; empty: none
  std::chrono::seconds timeout{60};
};

// A backup is compressed unless the configuration says otherwise: disk images compress well, and
// the backup is written once and rarely read.
inline const StreamCompression kDefaultCompression{StreamCodec::Zstd, 0};  // zstd:3

// One output of a source's read: what extra_outputs lists beside the source's own format.
// Unlike the source's own output, one is not compressed unless it says so: an extra output is
// usually there to be used as it is (a VHDX for Hyper-V).
struct OutputConf {
  ImageFormat format = ImageFormat::Qcow2;
  StreamCompression compress;
  ClusterCodec cluster_codec = ClusterCodec::None;
};

struct SourceConf {
  std::string name;    // [A-Za-z0-9._-]+, not starting with '.'
  std::string origin;  // "FILE:LINE" of its definition
  std::string path;    // absolute
  int path_line = 0;   // where path: is, for check_sources_on_disk's messages
  SnapshotMode snapshot = SnapshotMode::Reflink;
  int snapshot_line = 0;     // where snapshot: is, or the source's line when it is left out
  std::string snapshot_dir;  // absolute; empty with SnapshotMode::None
  ImageFormat format = ImageFormat::Qcow2;
  StreamCompression compress = kDefaultCompression;  // the whole file: .zst, .gz
  ClusterCodec cluster_codec = ClusterCodec::None;   // inside qcow2, per cluster
  std::string remote;                                // a key of Config::remotes
  std::string name_template = "{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}";
  Retention retention;
  Retries retries;
  Hooks hooks;
  Notify notify;  // the source's own keys over the global notify: (a "" there turns one off)
  // verify: after_upload: read the new backup back (diskferry verify) before retention; a
  // backup that does not verify is removed and the job fails, older backups untouched.
  bool verify_after_upload = false;
  // More outputs written from the same snapshot and read (e.g. a VHDX beside the qcow2.zst):
  // each has the source's name with its own {ext}, its own sidecar, verify and retention.
  std::vector<OutputConf> extra_outputs;

  // The source as output i sees it (0: itself; i > 0: extra_outputs[i - 1]'s format and
  // compression), for naming, retention and listing.
  SourceConf output(size_t i) const {
    SourceConf s = *this;
    s.extra_outputs.clear();
    if (i > 0) {
      s.format = extra_outputs.at(i - 1).format;
      s.compress = extra_outputs.at(i - 1).compress;
      s.cluster_codec = extra_outputs.at(i - 1).cluster_codec;
    }
    return s;
  }
  size_t output_count() const { return 1 + extra_outputs.size(); }
};

struct Config {
  std::string path;       // the file, as given
  std::string state_dir;  // absolute
  int workers = 1;        // jobs running at once
  RateSchedule bwlimit;   // shared by all jobs; unlimited unless set
  std::chrono::seconds lease{60};
  std::chrono::seconds stall_timeout{60};
  // node_exporter textfile collector directory for diskferry.prom (absolute); empty: none.
  std::string metrics_dir;
  Notify notify;  // the global one; each source has its resolved copy
  std::map<std::string, RemoteConf> remotes;
  std::map<std::string, SourceConf> sources;
  // Not fatal but worth logging at start-up, e.g. a config file others may write to.
  std::vector<std::string> warnings;
};

// Both throw Error(ErrorKind::Usage) "FILE:LINE: key.path: what is wrong" for the first problem.
Config load_config(const std::string& path);
// Relative paths in `text` resolve against base_dir; `path` only names the file in messages.
// Checks nothing on disk.
Config parse_config(const std::string& text, const std::string& path, const std::string& base_dir);

// What parse_config cannot know, checked now on this machine for `diskferry check-config`, each
// "FILE:LINE: key.path: what". Errors: two sources that are one file (the same path, or the
// same device and inode through a link); snapshot: reflink where no reflink copy can be made
// (not a regular file; a filesystem without reflinks, found by cloning between two unnamed
// temporary files in the image's directory; a snapshot_dir on another filesystem). Warnings: a
// path that does not exist now (it may later: an unmounted volume, a VM not created yet).
struct DiskCheck {
  std::vector<std::string> errors, warnings;
};
DiskCheck check_sources_on_disk(const Config& config);

// The backup's path relative to the remote's URL path, e.g.
// "web01/web01-20240102T030405Z.qcow2.zst", from the source's name template ({source},
// {time:STRFTIME} in UTC, {ext}). Throws Error(Usage) for a template parse_config would refuse.
std::string render_name(const SourceConf& source, std::chrono::system_clock::time_point when);
// The inverse, for retention: the time a remote file's name was rendered from (to the template's
// resolution), or nullopt when render_name could not have produced it for this source.
std::optional<std::chrono::system_clock::time_point> match_name(const SourceConf& source,
                                                                const std::string& relative_path);

}  // namespace diskferry
