// `diskferry verify` and `diskferry ls`: what is on the remote, and whether it is intact.
#include <fmt/chrono.h>
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "commands.hpp"
#include "config/config.hpp"
#include "job/job.hpp"
#include "queue/queue.hpp"
#include "remote_args.hpp"
#include "transport/sftp/channel.hpp"
#include "util/size.hpp"
#include "verify/verify.hpp"

namespace diskferry::cli {
namespace {

using Json = nlohmann::json;

// The ssh options of the commands that only read from a remote.
struct ReadArgs {
  SshArgs ssh;
  int streams = 4, stall_timeout = 60;
  void add(CLI::App& c) {
    ssh.add(c);
    c.add_option("--streams", streams, "SFTP channels to read over (default 4, 1-16)");
    c.add_option("--stall-timeout", stall_timeout,
                 "Seconds without progress before the connection counts as dropped (default 60)");
  }
  sftp::ReadOptions options() const {
    sftp::ReadOptions o;
    ssh.apply(o.ssh);
    if (streams < 1 || streams > 16) throw Error(ErrorKind::Usage, "--streams: expected 1 to 16");
    if (stall_timeout < 1) throw Error(ErrorKind::Usage, "--stall-timeout: at least 1 second");
    o.streams = streams;
    o.stall_timeout = std::chrono::seconds(stall_timeout);
    return o;
  }
};

std::string config_path(const std::string& file) {
  if (!file.empty()) return file;
  if (const char* e = std::getenv("DISKFERRY_CONFIG"); e && *e) return e;
  return "/etc/diskferry/diskferry.yaml";
}

int print_report(const std::string& what, const VerifyReport& r, bool json) {
  if (json) {
    Json o{{"url", what},
           {"status", r.status == VerifyStatus::Ok                 ? "ok"
                      : r.status == VerifyStatus::ChecksumMismatch ? "checksum"
                      : r.status == VerifyStatus::StructureInvalid ? "structure"
                      : r.status == VerifyStatus::Missing          ? "missing"
                                                                   : "unreachable"},
           {"exit_code", static_cast<int>(r.status)},
           {"problem", r.problem},
           {"size", r.size},
           {"sha256", r.sha256},
           {"sidecar_sha256", r.sidecar_sha256},
           {"outer_compression", r.outer},
           {"format", r.format},
           {"notes", r.notes}};
    o["virtual_size"] = r.virtual_size ? Json(*r.virtual_size) : Json();
    fmt::print("{}\n", o.dump(2));
  } else if (r.status == VerifyStatus::Ok) {
    std::string inner = r.format;
    if (r.virtual_size) inner += fmt::format(" of {}", format_size(*r.virtual_size));
    fmt::print("{}: OK ({}, {}{}, sha256 {} matches)\n", what, format_size(r.size), inner,
               r.outer == "none" ? "" : fmt::format(" in a complete {} stream", r.outer), r.sha256);
    for (auto& n : r.notes) fmt::print("  note: {}\n", n);
  } else {
    const char* kind = r.status == VerifyStatus::ChecksumMismatch   ? "CHECKSUM MISMATCH"
                       : r.status == VerifyStatus::StructureInvalid ? "STRUCTURE INVALID"
                       : r.status == VerifyStatus::Missing          ? "MISSING"
                                                                    : "UNREACHABLE";
    fmt::print(stderr, "diskferry: verify: {}: {}\n", kind, r.problem);
  }
  return static_cast<int>(r.status);
}

}  // namespace

Run add_verify(CLI::App& app) {
  auto* c =
      app.add_subcommand("verify", "Check a backup on the remote without downloading it to disk");
  auto url = std::make_shared<std::string>();
  auto job = std::make_shared<int64_t>(0);
  auto cfg = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto all_latest = std::make_shared<bool>(false);
  auto args = std::make_shared<ReadArgs>();
  c->add_option("URL", *url, "sftp://USER@HOST[:PORT]/PATH/NAME of a backup");
  c->add_flag("--all-latest", *all_latest,
              "The newest backup of every source of the configuration (what a weekly timer runs)");
  c->add_option("--job", *job,
                "The backup of this job (from `diskferry list`), through the config");
  c->add_option("--config", *cfg,
                "Configuration file for --job (default: $DISKFERRY_CONFIG, else "
                "/etc/diskferry/diskferry.yaml)");
  c->add_flag("--json", *json, "The report as JSON");
  args->add(*c);
  c->footer(
      "Streams the file once: its SHA-256 against NAME.sha256 (and, with --job, the queue's "
      "record),\nan outer zstd/gzip stream decoded to its end, and a qcow2 inside checked: every "
      "L1/L2\nentry in range, refcounts equal to the references, every compressed cluster "
      "inflating to one\ncluster. Nothing is written to disk.\n\nExit status: 0 intact, 4 "
      "checksum mismatch (or no sidecar), 5 structure invalid (truncated,\nbad tables or "
      "clusters), 6 unreachable (connection, login, host key), 7 missing (the\n"
      "server answered: no such file), 2 usage errors, 1 other errors.\n\nExamples:\n  diskferry "
      "verify "
      "--identity /etc/diskferry/id_ed25519 "
      "sftp://u123456@u123456.your-storagebox.de:23/~/backups/web01/"
      "web01-20261201T021500Z.qcow2.zst\n"
      "  diskferry verify --job 42\n  diskferry verify --all-latest      # exit status: the "
      "highest of "
      "any source");
  return [=]() {
    sftp::ReadOptions ro = args->options();
    if (*all_latest) {
      if (!url->empty() || *job)
        throw Error(ErrorKind::Usage, "--all-latest checks every source: no URL or --job");
      Config conf = load_config(config_path(*cfg));
      Queue q(default_db_path(conf.state_dir));
      int worst = 0;
      for (auto& [name, src] : conf.sources) {
        auto last = q.last_success(name);
        if (!last) {
          fmt::print("{}: no backup yet, nothing to verify\n", name);
          continue;
        }
        const RemoteConf& rem = conf.remotes.at(src.remote);
        ro.ssh = sink_options(conf, rem).ssh;
        sftp::Url u = backup_url(rem, last->remote_path);
        worst = std::max(worst, print_report(u.str(), verify_remote(u, ro, last->sha256), *json));
      }
      return worst;
    }
    if (*job) {
      if (!url->empty()) throw Error(ErrorKind::Usage, "give a URL or --job, not both");
      Config conf = load_config(config_path(*cfg));
      Queue q(default_db_path(conf.state_dir));
      auto j = q.get(*job);
      if (!j) throw Error(ErrorKind::Usage, fmt::format("there is no job {}", *job));
      if (j->state != JobState::Done)
        throw Error(ErrorKind::Usage,
                    fmt::format("job {} is {}: only a done job has a backup to verify", *job,
                                to_string(j->state)));
      auto src = conf.sources.find(j->source);
      if (src == conf.sources.end())
        throw Error(ErrorKind::Usage, fmt::format("job {}'s source {} is no longer in {}", *job,
                                                  j->source, conf.path));
      const RemoteConf& rem = conf.remotes.at(src->second.remote);
      sftp::SinkOptions so = sink_options(conf, rem);
      ro.ssh = so.ssh;
      sftp::Url u = backup_url(rem, j->remote_path);
      return print_report(u.str(), verify_remote(u, ro, j->sha256), *json);
    }
    if (url->empty()) throw Error(ErrorKind::Usage, "verify: give an sftp:// URL or --job ID");
    sftp::Url u = sftp::parse_url(*url);
    return print_report(u.str(), verify_remote(u, ro), *json);
  };
}

Run add_ls(CLI::App& app) {
  auto* c = app.add_subcommand("ls", "List the backups in a remote directory, or of a source");
  auto url = std::make_shared<std::string>();
  auto cfg = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto args = std::make_shared<ReadArgs>();
  c->add_option("URL|SOURCE", *url,
                "sftp://USER@HOST[:PORT]/DIR, or the name of a source of the configuration")
      ->required();
  c->add_option("--config", *cfg,
                "Configuration file for SOURCE (default: $DISKFERRY_CONFIG, else "
                "/etc/diskferry/diskferry.yaml)");
  c->add_flag("--json", *json, "As JSON");
  args->add(*c);
  c->footer(
      "One line per file: size, modification time (UTC), and whether its NAME.sha256 sidecar is "
      "there\n(a .partial is an upload in progress or one that will be resumed; a .lock names the "
      "run "
      "writing it). `diskferry "
      "verify` checks a\nfile's content. With SOURCE: the files its name template produced in "
      "its remote's directory\n(what retention counts as its backups), with the remote's login "
      "from the configuration.");
  return [=]() {
    sftp::ReadOptions ro = args->options();
    sftp::Url u;
    std::string rel_dir;  // SOURCE: where its backups are, relative to the remote's URL
    const SourceConf* src = nullptr;
    Config conf;
    if (sftp::is_sftp_url(*url)) {
      if (!cfg->empty()) throw Error(ErrorKind::Usage, "--config applies to ls SOURCE, not a URL");
      u = sftp::parse_url(*url);
    } else {
      conf = load_config(config_path(*cfg));
      auto it = conf.sources.find(*url);
      if (it == conf.sources.end())
        throw Error(ErrorKind::Usage, fmt::format("'{}' is neither an sftp:// URL nor a source "
                                                  "of {}",
                                                  *url, conf.path));
      src = &it->second;
      const RemoteConf& rem = conf.remotes.at(src->remote);
      ro.ssh = sink_options(conf, rem).ssh;
      // Backups live in the directory the template renders to (its directories carry no time).
      std::string sample = render_name(*src, std::chrono::system_clock::now());
      auto slash = sample.rfind('/');
      rel_dir = slash == std::string::npos ? "" : sample.substr(0, slash);
      u = rel_dir.empty() ? rem.url : backup_url(rem, rel_dir);
    }
    sftp::SshSession session(u, ro.ssh);
    sftp::Channel ch(session, ro.stall_timeout);
    std::string dir = u.remote_path();
    auto entries = ch.list_dir(dir.empty() ? std::string_view(".") : std::string_view(dir));
    if (!entries && src) entries.emplace();  // no backup yet
    if (!entries)
      throw Error(ErrorKind::Input, fmt::format("{}: {}: no such directory", session.where(), dir));
    if (src) {
      // Only what the source's template produced (and its sidecars, partial uploads and their
      // locks).
      std::erase_if(*entries, [&](const auto& e) {
        std::string n = e.first;
        for (const char* suffix : {".sha256", ".partial", ".lock"})
          if (n.ends_with(suffix)) n.resize(n.size() - std::strlen(suffix));
        return !match_name(*src, rel_dir.empty() ? n : rel_dir + "/" + n);
      });
    }
    std::sort(entries->begin(), entries->end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    std::set<std::string> names;
    for (auto& [n, a] : *entries) names.insert(n);
    Json out = Json::array();
    for (auto& [n, a] : *entries) {
      bool is_dir = a.permissions && (*a.permissions & 0170000) == 0040000;
      if (n.size() > 7 && n.ends_with(".sha256") && names.count(n.substr(0, n.size() - 7)))
        continue;  // shown with its file
      std::string check = is_dir                       ? "dir"
                          : n.ends_with(".partial")    ? "partial"
                          : n.ends_with(".lock")       ? "lock"
                          : names.count(n + ".sha256") ? "sha256"
                                                       : "no sha256";
      std::string when = a.mtime
                             ? fmt::format("{:%Y-%m-%d %H:%M:%S}Z",
                                           std::chrono::sys_seconds(std::chrono::seconds(*a.mtime)))
                             : "";
      if (*json) {
        Json e{{"name", n},
               {"size", a.size.value_or(0)},
               {"mtime", when},
               {"type", is_dir ? "dir" : "file"},
               {"sidecar", check == "sha256"}};
        if (src)
          e["url"] =
              backup_url(conf.remotes.at(src->remote), rel_dir.empty() ? n : rel_dir + "/" + n)
                  .str();
        out.push_back(std::move(e));
        continue;
      }
      fmt::print("{:>10}  {:<20}  {:<9}  {}{}\n", is_dir ? "-" : format_size(a.size.value_or(0)),
                 when, check, n, is_dir ? "/" : "");
    }
    if (*json) fmt::print("{}\n", out.dump(2));
    return 0;
  };
}

}  // namespace diskferry::cli
