// Hooks run anywhere. Reflink snapshots need a filesystem that can make them:
// tests/integration/test_snapshot.py loop-mounts an XFS (reflink=1) and an ext4 and runs these
// with DISKFERRY_XFS_DIR / DISKFERRY_EXT4_DIR set; without them those cases only say so.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <set>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "snapshot/hook.hpp"
#include "snapshot/snapshot.hpp"
#include "util/error.hpp"
#include "util/fd.hpp"

using namespace diskferry;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

class TempDir {
 public:
  explicit TempDir(const fs::path& base = fs::temp_directory_path()) {
    std::string tmpl = (base / "df-snap-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << data;
  REQUIRE(f.good());
}

std::string random_bytes(size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

// A zombie counts as dead: it has already been reparented and waits only for init to reap it.
bool running(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return false;
  auto paren = line.rfind(')');
  return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z';
}

std::vector<pid_t> pids_in(const std::string& file) {
  std::vector<pid_t> pids;
  std::istringstream in(slurp(file));
  for (long p; in >> p;) pids.push_back(static_cast<pid_t>(p));
  return pids;
}

bool all_gone_within(const std::vector<pid_t>& pids, std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    bool any = false;
    for (pid_t p : pids) any = any || running(p);
    if (!any) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(20ms);
  }
}

template <class Fn>
std::chrono::milliseconds time_of(Fn&& fn) {
  auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               t0);
}

template <class Fn>
Error error_from(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  FAIL("no diskferry::Error thrown");
  return Error(ErrorKind::Internal, "unreachable");
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// Every extent of the file is marked shared (FIEMAP_EXTENT_SHARED), i.e. no data was copied.
bool all_extents_shared(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd.get() >= 0);
  constexpr unsigned kMax = 1024;
  std::vector<uint64_t> buf((sizeof(fiemap) + kMax * sizeof(fiemap_extent)) / 8 + 1);
  auto* fm = reinterpret_cast<fiemap*>(buf.data());
  fm->fm_start = 0;
  fm->fm_length = FIEMAP_MAX_OFFSET;
  fm->fm_flags = FIEMAP_FLAG_SYNC;
  fm->fm_extent_count = kMax;
  REQUIRE(::ioctl(fd.get(), FS_IOC_FIEMAP, fm) == 0);
  if (fm->fm_mapped_extents == 0) return false;
  for (unsigned i = 0; i < fm->fm_mapped_extents; ++i)
    if (!(fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_SHARED)) return false;
  return true;
}

const char* env_dir(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

const std::string kNoReflinkAdvice =
    "cannot make reflink copies; use snapshot: none, or keep images on XFS (mkfs.xfs -m "
    "reflink=1) or btrfs";

}  // namespace

TEST_SUITE("snapshot") {
  TEST_CASE("run_hook: a successful hook, stdout and stderr captured in order") {
    HookResult r = run_hook("echo out; echo err >&2; echo out2", 10s, {});
    CHECK(r.ok());
    CHECK(r.end == HookResult::End::Exited);
    CHECK(r.output == "out\nerr\nout2\n");
    CHECK_FALSE(r.truncated);
  }

  TEST_CASE("run_hook: non-zero exit, with the output in the message") {
    HookResult r = run_hook("echo 'error: guest agent is not responding' >&2; exit 3", 10s, {});
    CHECK_FALSE(r.ok());
    CHECK(r.end == HookResult::End::Exited);
    CHECK(r.exit_code == 3);
    std::string msg = describe_hook_failure("pre", "virsh domfsfreeze web01", 10s, r);
    CHECK(msg ==
          "pre hook \"virsh domfsfreeze web01\" exited with status 3: error: guest agent is not "
          "responding");
    CHECK(describe_hook_failure("post", "true", 10s, run_hook("exit 1", 10s, {})) ==
          "post hook \"true\" exited with status 1 (no output)");
  }

  TEST_CASE("run_hook: killed by a signal") {
    HookResult r = run_hook("echo bye; kill -USR1 $$", 10s, {});
    CHECK(r.end == HookResult::End::Signaled);
    CHECK(r.signal == SIGUSR1);
    CHECK(contains(describe_hook_failure("pre", "x", 10s, r), "was killed by SIGUSR1: bye"));
  }

  TEST_CASE("run_hook: a timeout kills the whole process group") {
    TempDir tmp;
    std::string pids = tmp / "pids";
    HookResult r;
    auto took = time_of([&] {
      r = run_hook("sleep 100 & echo $! > " + pids + "; (sleep 100; echo never) & echo $! >> " +
                       pids + "; echo started; sleep 100",
                   1s, {});
    });
    CHECK(r.end == HookResult::End::TimedOut);
    CHECK(r.output == "started\n");
    CHECK(took >= 1000ms);
    CHECK(took < 2500ms);  // SIGTERM was enough, no wait for the SIGKILL grace
    auto children = pids_in(pids);
    CHECK(children.size() == 2);
    CHECK(all_gone_within(children, 2s));
    CHECK(describe_hook_failure("pre", "x", 1s, r) ==
          "pre hook \"x\" did not finish within 1 s and was killed: started");
  }

  TEST_CASE("run_hook: a hook that ignores SIGTERM gets SIGKILL") {
    TempDir tmp;
    std::string pids = tmp / "pids";
    HookResult r;
    auto took = time_of(
        [&] { r = run_hook("trap '' TERM; sleep 100 & echo $! > " + pids + "; wait", 1s, {}); });
    CHECK(r.end == HookResult::End::TimedOut);
    CHECK(took >= 2900ms);  // 1 s timeout + 2 s grace
    CHECK(took < 6s);
    CHECK(all_gone_within(pids_in(pids), 2s));
  }

  TEST_CASE("run_hook: what a successful hook leaves running is ended too") {
    TempDir tmp;
    std::string pids = tmp / "pids";
    HookResult r;
    auto took = time_of([&] {
      r = run_hook("sleep 100 & echo $! > " + pids + "; sleep 100 >/dev/null 2>&1 & echo $! >> " +
                       pids + "; echo done",
                   10s, {});
    });
    CHECK(r.ok());
    CHECK(r.output == "done\n");
    CHECK(took < 1500ms);  // the child holding the output pipe did not keep us waiting
    auto children = pids_in(pids);
    CHECK(children.size() == 2);
    CHECK(all_gone_within(children, 2s));
  }

  TEST_CASE("run_hook: environment passed as data, overriding the inherited one") {
    HookResult r =
        run_hook("printf '%s|%s|%s' \"$DF_TEST_VAR\" \"$HOME\" \"$(command -v sh)\"", 10s,
                 {{"DF_TEST_VAR", "a b; $(echo injected) `id`"}, {"HOME", "/nonexistent-home"}});
    CHECK(r.ok());
    CHECK(r.output.starts_with("a b; $(echo injected) `id`|/nonexistent-home|/"));
    CHECK(r.output.ends_with("/sh"));  // PATH was inherited
    CHECK(error_from([] { run_hook("true", 10s, {{"A=B", "x"}}); }).kind() == ErrorKind::Usage);
    CHECK(error_from([] { run_hook("true", 10s, {{"", "x"}}); }).kind() == ErrorKind::Usage);
    CHECK(error_from([] { run_hook("true", 0s, {}); }).kind() == ErrorKind::Usage);
  }

  TEST_CASE("run_hook: stdin is empty and no descriptors leak into the hook") {
    UniqueFd leaky(::open("/dev/null", O_RDONLY));  // deliberately without O_CLOEXEC
    REQUIRE(leaky.get() >= 0);
    HookResult r = run_hook("if read x; then echo got; else echo eof; fi; ls /proc/$$/fd", 10s, {});
    CHECK(r.ok());
    std::istringstream lines(r.output);
    std::string first;
    std::getline(lines, first);
    CHECK(first == "eof");
    std::set<std::string> fds;
    for (std::string l; std::getline(lines, l);) fds.insert(l);
    CHECK(fds.count("0"));
    CHECK(fds.count(std::to_string(leaky.get())) == 0);
  }

  TEST_CASE("run_hook: output is bounded to its last 4 KiB") {
    HookResult r = run_hook(
        "i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done; echo failing >&2; "
        "exit 1",
        10s, {});
    CHECK(r.output.size() == kHookOutputMax);
    CHECK(r.truncated);
    CHECK(r.output.ends_with("line 2999\nfailing\n"));
    std::string msg = describe_hook_failure("pre", "x", 10s, r);
    CHECK(msg.size() < 1500);
    CHECK(msg.ends_with("line 2998 | line 2999 | failing"));
    CHECK(contains(msg, "status 1: ..."));
  }

  TEST_CASE("with_hooks: pre, then the snapshot, then post; the result is passed through") {
    TempDir tmp;
    std::string log = tmp / "log";
    int got = with_hooks("echo \"pre $DISKFERRY_HOOK $DF_JOB\" >> " + log,
                         "echo \"post $DISKFERRY_HOOK $DISKFERRY_SNAPSHOT\" >> " + log, 10s,
                         [&] {
                           spit(log, slurp(log) + "snapshot\n");
                           return 42;
                         },
                         {{"DF_JOB", "web01"}});
    CHECK(got == 42);
    CHECK(slurp(log) == "pre pre web01\nsnapshot\npost post ok\n");
    with_hooks("", "", 10s, [] {});  // no hooks at all
  }

  TEST_CASE("with_hooks: a failing pre hook stops the snapshot, and post still runs") {
    TempDir tmp;
    std::string log = tmp / "log";
    bool ran = false;
    Error e = error_from([&] {
      with_hooks("echo 'fsfreeze: cannot freeze'; exit 2",
                 "echo \"post $DISKFERRY_SNAPSHOT\" >> " + log, 10s, [&] { ran = true; });
    });
    CHECK_FALSE(ran);
    CHECK(e.kind() == ErrorKind::Input);
    CHECK(std::string(e.what()) ==
          "pre hook \"echo 'fsfreeze: cannot freeze'; exit 2\" exited with status 2: fsfreeze: "
          "cannot freeze");
    CHECK(slurp(log) == "post skipped\n");
  }

  TEST_CASE("with_hooks: post runs when the snapshot fails") {
    TempDir tmp;
    std::string log = tmp / "log";
    std::string image = tmp / "missing.img";
    Error e = error_from([&] {
      with_hooks("true", "echo \"post $DISKFERRY_SNAPSHOT\" >> " + log, 10s,
                 [&] { return take_snapshot(image, "", "job1"); });
    });
    CHECK(e.kind() == ErrorKind::Input);
    CHECK(std::string(e.what()) ==
          image + ": cannot open the image to snapshot: No such file or directory");
    CHECK(slurp(log) == "post failed\n");

    // Both failing: the snapshot's error first, the post hook's appended, the kind kept.
    Error both = error_from([&] {
      with_hooks("", "echo thaw failed >&2; exit 4", 10s,
                 [] { throw Error(ErrorKind::Output, "disk full"); });
    });
    CHECK(both.kind() == ErrorKind::Output);
    CHECK(std::string(both.what()) ==
          "disk full; and the post hook \"echo thaw failed >&2; exit 4\" exited with status 4: "
          "thaw failed");

    // Other exceptions pass through untouched when post succeeds.
    CHECK_THROWS_AS(with_hooks("", "true", 10s, [] { throw std::logic_error("x"); }),
                    std::logic_error);
  }

  TEST_CASE("with_hooks: a failing post hook is reported after a good snapshot") {
    bool ran = false;
    Error e = error_from([&] {
      with_hooks("true", "echo 'domfsthaw: guest not frozen'; exit 1", 10s, [&] { ran = true; });
    });
    CHECK(ran);
    CHECK(e.kind() == ErrorKind::Input);
    CHECK(contains(e.what(),
                   "post hook \"echo 'domfsthaw: guest not frozen'; exit 1\" exited "
                   "with status 1: domfsthaw: guest not frozen"));
  }

  TEST_CASE("snapshot_path: NAME.TAG.snap in the given or the default directory") {
    CHECK(snapshot_path("/x/y/vm.img", "/snaps", "job-7") == "/snaps/vm.img.job-7.snap");
    CHECK(snapshot_path("/x/y/vm.img", "/snaps/", "t") == "/snaps/vm.img.t.snap");
    CHECK(snapshot_path("vm.img", "/", "t") == "/vm.img.t.snap");

    TempDir tmp;
    fs::create_directory(tmp.path() / "real");
    spit(tmp / "real/vm.img", "x");
    fs::create_symlink(tmp.path() / "real/vm.img", tmp.path() / "link.img");
    std::string real = fs::canonical(tmp.path()).string();
    CHECK(snapshot_path(tmp / "real/vm.img", "", "2026-12-01T18:00:00Z") ==
          real + "/real/.diskferry-snapshots/vm.img.2026-12-01T18:00:00Z.snap");
    // Beside the file the link points to: a reflink cannot leave its filesystem.
    CHECK(snapshot_path(tmp / "link.img", "", "t") ==
          real + "/real/.diskferry-snapshots/link.img.t.snap");

    for (const char* bad : {"", ".hidden", "a/b", "../x", "a b", "new\nline", "x*"}) {
      CAPTURE(bad);
      CHECK(error_from([&] { snapshot_path("/x/vm.img", "/s", bad); }).kind() == ErrorKind::Usage);
    }
  }

  TEST_CASE("take_snapshot: what cannot be snapshotted is named") {
    Error missing = error_from([] { take_snapshot("/nonexistent/vm.img", "", "t"); });
    CHECK(missing.kind() == ErrorKind::Input);
    CHECK(std::string(missing.what()) ==
          "/nonexistent/vm.img: cannot open the image to snapshot: No such file or directory");

    TempDir tmp;
    Error dev = error_from([&] { take_snapshot("/dev/null", tmp / "s", "t"); });
    CHECK(contains(dev.what(), "/dev/null: not a regular file"));

    spit(tmp / "vm.img", "data");
    Error nodir = error_from([&] { take_snapshot(tmp / "vm.img", tmp / "no/such/dir", "t"); });
    CHECK(contains(nodir.what(), tmp / "no/such/dir" + ": cannot create the snapshot directory"));
  }

  TEST_CASE("take_snapshot on tmpfs names tmpfs and the ways out") {
    struct statfs st {};
    if (::statfs("/dev/shm", &st) != 0 || static_cast<uint32_t>(st.f_type) != 0x01021994) {
      MESSAGE("/dev/shm is not a tmpfs here: skipped");
      return;
    }
    TempDir tmp("/dev/shm");
    spit(tmp / "vm.img", random_bytes(65536, 1));
    Error e = error_from([&] { take_snapshot(tmp / "vm.img", "", "t"); });
    CHECK(e.kind() == ErrorKind::Input);
    CHECK(std::string(e.what()) == tmp / "vm.img" + ": cannot snapshot: tmpfs " + kNoReflinkAdvice);
    CHECK(entries(tmp.path() / ".diskferry-snapshots").empty());  // no temporary left behind
  }

  TEST_CASE("remove_snapshot refuses what is not a snapshot and tolerates what is gone") {
    TempDir tmp;
    spit(tmp / "vm.img", "precious");
    CHECK(error_from([&] { remove_snapshot(tmp / "vm.img"); }).kind() == ErrorKind::Internal);
    fs::create_directory(tmp.path() / "dir.snap");
    CHECK(error_from([&] { remove_snapshot(tmp / "dir.snap"); }).kind() == ErrorKind::Internal);
    CHECK(fs::exists(tmp.path() / "vm.img"));
    remove_snapshot(tmp / "gone.t.snap");
  }

  TEST_CASE("reflink snapshot on XFS: same bytes, shared blocks, a point in time, reused") {
    const char* xfs = env_dir("DISKFERRY_XFS_DIR");
    if (!xfs) {
      MESSAGE("DISKFERRY_XFS_DIR not set: reflink tests skipped (test_snapshot.py sets it)");
      return;
    }
    TempDir tmp(xfs);
    std::string image = tmp / "vm.img";
    std::string original = random_bytes(4 << 20, 7);
    spit(image, original);

    Snapshot s = take_snapshot(image, "", "job1");
    fs::path dir = fs::canonical(tmp.path()) / ".diskferry-snapshots";
    CHECK(s.path == (dir / "vm.img.job1.snap").string());
    CHECK_FALSE(s.reused);
    CHECK(slurp(s.path) == original);
    CHECK(all_extents_shared(s.path));
    CHECK(entries(dir) == std::set<std::string>{"vm.img.job1.snap"});
    struct stat st {};
    REQUIRE(::stat(dir.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0700);
    REQUIRE(::stat(s.path.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
    ino_t inode = st.st_ino;

    // The VM writes on: the snapshot keeps the old bytes.
    {
      UniqueFd fd(::open(image.c_str(), O_WRONLY | O_CLOEXEC));
      std::string fresh = random_bytes(65536, 8);
      pwrite_all(fd.get(), std::as_bytes(std::span(fresh)), 4096, image);
    }
    CHECK(slurp(s.path) == original);
    CHECK(slurp(image) != original);

    // A retry reuses the snapshot instead of cloning the image as it is now.
    Snapshot again = take_snapshot(image, "", "job1");
    CHECK(again.reused);
    CHECK(again.path == s.path);
    REQUIRE(::stat(again.path.c_str(), &st) == 0);
    CHECK(st.st_ino == inode);
    CHECK(slurp(again.path) == original);

    // A crash's leftover temporary is replaced, and the new tag sees the current image.
    spit((dir / ".vm.img.job2.snap.tmp").string(), "half");
    Snapshot s2 = take_snapshot(image, "", "job2");
    CHECK_FALSE(s2.reused);
    CHECK(slurp(s2.path) == slurp(image));
    CHECK(entries(dir) == std::set<std::string>{"vm.img.job1.snap", "vm.img.job2.snap"});

    // An explicit directory is created 0700 too.
    Snapshot s3 = take_snapshot(image, tmp / "snaps", "x");
    CHECK(s3.path == tmp / "snaps/vm.img.x.snap");
    REQUIRE(::stat((tmp / "snaps").c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0700);

    remove_snapshot(s.path);
    CHECK_FALSE(fs::exists(s.path));
    remove_snapshot(s.path);  // again: already gone is fine
  }

  TEST_CASE("reflink snapshot on ext4 fails naming ext4 and the ways out") {
    const char* ext4 = env_dir("DISKFERRY_EXT4_DIR");
    if (!ext4) {
      MESSAGE("DISKFERRY_EXT4_DIR not set: ext4 test skipped (test_snapshot.py sets it)");
      return;
    }
    TempDir tmp(ext4);
    spit(tmp / "vm.img", random_bytes(1 << 20, 9));
    Error e = error_from([&] { take_snapshot(tmp / "vm.img", "", "t"); });
    CHECK(e.kind() == ErrorKind::Input);
    CHECK(std::string(e.what()) == tmp / "vm.img" + ": cannot snapshot: ext4 " + kNoReflinkAdvice);
    CHECK(entries(fs::canonical(tmp.path()) / ".diskferry-snapshots").empty());

    if (const char* xfs = env_dir("DISKFERRY_XFS_DIR")) {
      TempDir on_xfs(xfs);
      spit(on_xfs / "vm.img", "data");
      Error cross = error_from([&] { take_snapshot(on_xfs / "vm.img", tmp / "snaps", "t"); });
      CHECK(contains(cross.what(), "it is on another filesystem (ext4) than the image (xfs)"));
      CHECK(entries(tmp.path() / "snaps").empty());
    }
  }

  // Not a test: lets tests/integration/test_snapshot.py take snapshots of images it prepared and
  // judge them from outside (cmp, filefrag, df).
  TEST_CASE("snapshot driver for tests/integration/test_snapshot.py") {
    const char* image = env_dir("DISKFERRY_SNAPSHOT_IMAGE");
    if (!image) return;
    const char* dir = env_dir("DISKFERRY_SNAPSHOT_DIR");
    const char* tag = env_dir("DISKFERRY_SNAPSHOT_TAG");
    try {
      Snapshot s = take_snapshot(image, dir ? dir : "", tag ? tag : "driver");
      std::cout << "SNAPSHOT_PATH=" << s.path << "\nSNAPSHOT_REUSED=" << s.reused << "\n";
    } catch (const Error& e) {
      std::cout << "SNAPSHOT_ERROR=" << e.what() << "\n";
    }
  }
}
