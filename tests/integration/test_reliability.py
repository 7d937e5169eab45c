#!/usr/bin/env python3
"""Reliability proof (issue 8): the faults a nightly backup meets, injected into the real daemon.

Real components only (as in test_daemon.py, whose helpers this reuses): VM images on a loop XFS
with reflink, OpenSSH chroot SFTP servers on 127.0.0.1 (one with a small loop filesystem as its
chroot for disk-full), the SQLite queue, `diskferry enqueue/list/show`, `diskferryd` killed and
restarted, and tests/integration/tcp_proxy.py between daemon and server for cuts, stalls,
trickles and latency. Every completed job is judged against a local `diskferry convert` of the
same source (the output is deterministic, so "equal to an uninterrupted run" is a sha256).

Fault classes (one test each, numbered to run in this order):
  1 network  >= 20 cuts at seeded random byte offsets over 3 parallel jobs (one proxy per remote,
             so every byte a proxy forwards belongs to one job), then a stall longer than
             stall_timeout, a trickle (rate cap) and added latency.
  2 process  >= 10 kill -9 of diskferryd at seeded moments (hook, upload, publish, retention,
             random), each followed by a restart.
  3 remote   disk full mid-upload, permission denied, directory removed and host key changed
             between attempts.
  4 local    source removed / truncated during a job without snapshot, the database locked by
             another process for longer than the busy timeout.
  5 load     50 jobs over 3 sources, 2 workers, a flaky proxy.

The seed is DISKFERRY_RELIABILITY_SEED (default 8), printed at the start: a failure reproduces
with the same seed. With DISKFERRY_RELIABILITY_JSON=FILE the figures of each fault class (runs,
injected faults, jobs completed, bytes lost, resend overhead) are written there (the input of
scripts/reliability_report.py, which writes docs/reliability.md).

Run: test_reliability.py PATH/TO/bin   (the directory with diskferry and diskferryd)
"""
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_daemon  # noqa: E402
import xfs_loop  # noqa: E402
from sftp_servers import OpenSSHServer  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

BIN = None
MiB = 1024 * 1024
SEED = int(os.environ.get("DISKFERRY_RELIABILITY_SEED", "8"))
FIGURES = {}
sha256_file = test_daemon.sha256_file

# What one SFTP upload can have in flight (lib/transport/sftp/sftp_sink.hpp SinkOptions): streams
# channels of lane_inflight_bytes each; a resumed attempt also re-checks the last MiB.
LANE_BUDGET = 4 * MiB
# Per connection: SSH key exchange, authentication, SFTP init (measured: ~5 KiB up).
HANDSHAKE_SLACK = 64 * 1024


def rng_for(name):
    return random.Random(f"{SEED}:{name}")


def make_dense(path, mib, seed, zero_every=8):
    """Random data in every MiB but every `zero_every`th (a hole): compresses to nothing."""
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        for i in range(mib):
            if i % zero_every != zero_every - 1:
                f.seek(i * MiB)
                f.write(r.randbytes(MiB))


def figures(cls, **kw):
    """Adds to the fault class's figures (numbers are summed, lists extended)."""
    f = FIGURES.setdefault(cls, {"runs": 0, "faults": 0, "jobs_completed": 0, "bytes_lost": 0,
                                 "tried": []})
    for k, v in kw.items():
        if isinstance(v, list):
            f.setdefault(k, []).extend(v)
        elif isinstance(v, (int, float)):
            f[k] = f.get(k, 0) + v
        else:
            f[k] = v


def write_figures():
    out = os.environ.get("DISKFERRY_RELIABILITY_JSON")
    if out:
        with open(out, "w") as f:
            json.dump({"seed": SEED, "classes": FIGURES}, f, indent=2, sort_keys=True)


@unittest.skipIf(xfs_loop.unavailable_reason("xfs"), xfs_loop.unavailable_reason("xfs") or "")
class Reliability(unittest.TestCase):
    # test_daemon.Daemon's helpers, used as they are
    source = test_daemon.Daemon.source
    cli = test_daemon.Daemon.cli
    daemon = test_daemon.Daemon.daemon
    jobs = test_daemon.Daemon.jobs
    local_sha = test_daemon.Daemon.local_sha
    remote_files = test_daemon.Daemon.remote_files
    assert_published = test_daemon.Daemon.assert_published
    assert_no_snapshots = test_daemon.Daemon.assert_no_snapshots
    wait_for_partial = test_daemon.Daemon.wait_for_partial

    @classmethod
    def setUpClass(cls):
        print(f"\nreliability seed: {SEED} (DISKFERRY_RELIABILITY_SEED={SEED} reproduces)",
              file=sys.stderr, flush=True)
        test_daemon.Daemon.setUpClass.__func__(cls)  # server, XFS loop, work dir

    @classmethod
    def tearDownClass(cls):
        write_figures()
        test_daemon.Daemon.tearDownClass.__func__(cls)

    def setUp(self):
        test_daemon.Daemon.setUp(self)
        self.proxies = []
        self.t0 = time.monotonic()

    def tearDown(self):
        test_daemon.Daemon.tearDown(self)
        for px in self.proxies:
            px.close()
        print(f"  {self._testMethodName}: {time.monotonic() - self.t0:.1f} s", file=sys.stderr)

    # -- helpers ---------------------------------------------------------------------------------
    def proxy(self, server=None, **kw):
        server = server or self.server
        px = TcpProxy(("127.0.0.1", server.port), **kw)
        px.start()
        self.proxies.append(px)
        return px

    def write_config(self, sources, remotes=None, workers=2, stall="3s", extra=""):
        """remotes: name -> dict(port=, server=, extra="    key: value\\n"); default one "box"
        straight to self.server."""
        remotes = remotes or {"box": {}}
        text = (f"state_dir: {self.state}\nworkers: {workers}\nlease: 10s\n"
                f"stall_timeout: {stall}\n{extra}remotes:\n")
        for name, r in remotes.items():
            srv = r.get("server", self.server)
            port = r.get("port", srv.port)
            kh = srv.write_known_hosts(os.path.join(self.state, f"kh-{name}"), port=port)
            text += (f"  {name}:\n    url: sftp://{srv.user}@127.0.0.1:{port}/backups/"
                     f"{self._testMethodName}\n    identity: {srv.client_key}\n"
                     f"    known_hosts: {kh}\n{r.get('extra', '')}")
        text += "sources:\n"
        for name, s in sources.items():
            text += f"  {name}:\n" + "".join(f"    {k}: {v}\n" for k, v in s.items())
        self.config = os.path.join(self.state, "diskferry.yaml")
        with open(self.config, "w") as f:
            f.write(text)
        self.config_sources = sources
        return self.config

    def dense(self, name, mib, seed, **kw):
        path = os.path.join(self.images, f"{self._testMethodName}-{name}.img")
        if not os.path.exists(path):
            make_dense(path, mib, seed)
        s = {"path": path, "remote": "box", "compress": "none",  # unless a test says otherwise
             "retries": "{max_attempts: 4, backoff: 1s..1s}"}
        s.update(kw)
        return s

    def db(self):
        return sqlite3.connect(os.path.join(self.state, "diskferry.db"), timeout=30)

    def events(self, job_id, kind=None):
        with self.db() as c:
            rows = c.execute("SELECT kind, message FROM events WHERE job_id = ? ORDER BY id",
                             (job_id,)).fetchall()
        return [r for r in rows if kind is None or r[0] == kind]

    def assert_integrity(self):
        with self.db() as c:
            self.assertEqual(c.execute("PRAGMA integrity_check").fetchone()[0], "ok")

    def wait_state(self, job_id, states, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            j = self.jobs()[job_id]
            if j["state"] in states:
                return j
            self.assertLess(time.monotonic(), deadline, f"job {job_id} never {states}: {j}")
            time.sleep(0.05)

    def lost_bytes(self, job, want_sha, remote_dir=None):
        """Size of a completed job's backup if it is missing or not what was backed up."""
        path = os.path.join(remote_dir or self.remote_dir, job["remote_path"])
        if not os.path.exists(path):
            return -1  # unknown size, but lost: reported as such
        return 0 if sha256_file(path) == want_sha else os.path.getsize(path)

    def publish_once(self, name):
        """Backs `name` up with nothing injected: the older backup a fault must not touch."""
        self.cli("enqueue", name)
        self.daemon("--once")
        job = [j for j in self.jobs().values() if j["source"] == name][-1]
        self.assertEqual(job["state"], "done", job)
        path = os.path.join(self.remote_dir, job["remote_path"])
        return path, sha256_file(path)

    # -- 1 network -------------------------------------------------------------------------------
    def test_1_network_cuts_at_random_offsets(self):
        """3 jobs at once, each through its own proxy and remote (1, 2 and 4 streams; 0, 10 and
        25 ms latency): every job's upload is cut 7 times at seeded random offsets of 64 KiB to
        6 MiB of the connection, then let through. What each proxy forwarded minus the final file
        is what was sent again; per cut it must stay below what can be in flight."""
        cuts_per_job = 7
        plans, remotes, sources = {}, {}, {}
        for k, (streams, delay) in enumerate(((1, 0), (2, 10), (4, 25))):
            r = rng_for(f"net{k}")
            offsets = [r.randrange(64 * 1024, 6 * MiB) for _ in range(cuts_per_job)]
            px = self.proxy(delay_ms=delay)
            name = f"n{k}"
            # What the server holds of the partial file as each connection opens: a cut is a
            # reset, which drops what the server had received but not read yet (under load that
            # can be all of it), and an empty partial file leaves nothing to resume.
            px.partial_seen = {}

            def cut_up(i, px=px, offs=offsets, name=name):
                d = os.path.join(self.remote_dir, name)
                px.partial_seen[i] = sum(
                    os.path.getsize(os.path.join(d, f)) for f in
                    (os.listdir(d) if os.path.isdir(d) else []) if f.endswith(".partial"))
                # One offset per connection until that many cuts happened (the short "already
                # published?" connections are far below 64 KiB and are never cut).
                done = sum(1 for c in px.connections if c.cut)
                return offs[done] if done < len(offs) else None
            px.cut_up = cut_up
            plans[name] = (px, streams, offsets)
            remotes[f"r{k}"] = {"port": px.port, "extra": f"    streams: {streams}\n"}
            sources[name] = self.dense(name, 32, 100 + k, remote=f"r{k}",
                                       retries="{max_attempts: 12, backoff: 1s..1s}")
        self.write_config(sources, remotes, workers=3)
        self.assertEqual(self.cli("enqueue", "--all").stdout.count("queued job"), 3)
        self.daemon("--once")
        by_src = {j["source"]: j for j in self.jobs().values()}
        total_cuts = total_resent = total_size = 0
        per_cut = []
        for name, (px, streams, offsets) in plans.items():
            px.wait_idle()
            job = by_src[name]
            want = self.local_sha(sources[name]["path"], "-O", "qcow2")
            figures("network", bytes_lost=self.lost_bytes(job, want))
            self.assert_published(job, ["-O", "qcow2"])
            cut = [c for c in px.connections if c.cut]
            self.assertEqual(len(cut), cuts_per_job, px.connections)
            self.assertEqual(job["attempt"], cuts_per_job + 1, job)
            size = os.path.getsize(os.path.join(self.remote_dir, job["remote_path"]))
            resent = px.bytes_up - size
            in_flight = streams * LANE_BUDGET + MiB
            bound = (sum(min(c.bytes_up, in_flight) for c in cut)
                     + len(px.connections) * HANDSHAKE_SLACK + size // 50)
            self.assertLess(resent, bound, f"{name}: {resent} bytes sent again for "
                                           f"{len(cut)} cuts ({px.connections})")
            # Every retry after a cut past the first MiB resumed instead of starting over, where
            # the server still held some of the partial file when the next connection opened.
            resumed = len(self.events(job["id"], "resumed"))
            conns = list(px.connections)
            expected = sum(1 for i, c in enumerate(conns) if c.cut and c.bytes_up > 2 * MiB
                           and px.partial_seen.get(i + 1, 0) > 0)
            self.assertGreaterEqual(expected, 1, (name, px.partial_seen))
            self.assertGreaterEqual(resumed, expected,
                                    (name, px.partial_seen, self.events(job["id"])))
            total_cuts += len(cut)
            total_resent += max(0, resent)
            total_size += size
            per_cut.append(max(0, resent) // len(cut))
        self.assertGreaterEqual(total_cuts, 20)
        figures("network", runs=3, faults=total_cuts, jobs_completed=3, resent_bytes=total_resent,
                payload_bytes=total_size, max_resent_per_cut=max(per_cut),
                tried=[f"{total_cuts} TCP resets at seeded random offsets (64 KiB..6 MiB) of the "
                       "upload connection, 3 jobs in parallel with 1, 2 and 4 streams and "
                       "0/10/25 ms latency"])
        self.assert_no_snapshots()

    def test_1_network_stall_trickle_latency(self):
        """A connection that goes silent (no byte for longer than stall_timeout: 3 s) is dropped
        and the job resumes; a trickle of 1.5 MB/s with 40 ms each way is slow but progressing
        and must not be taken for a stall."""
        stall = self.proxy(stall_up=2 * MiB, stall_seconds=None, stall_first=2)
        slow = self.proxy(rate=1_500_000, delay_ms=40)
        sources = {"st": self.dense("st", 16, 110, remote="stall"),
                   "tr": self.dense("tr", 8, 111, remote="slow")}
        self.write_config(sources, {"stall": {"port": stall.port}, "slow": {"port": slow.port}})
        self.cli("enqueue", "--all")
        t0 = time.monotonic()
        self.daemon("--once")
        took = time.monotonic() - t0
        by_src = {j["source"]: j for j in self.jobs().values()}
        for name, job in by_src.items():
            want = self.local_sha(sources[name]["path"], "-O", "qcow2")
            figures("network", bytes_lost=self.lost_bytes(job, want))
            self.assert_published(job, ["-O", "qcow2"])
        st, tr = by_src["st"], by_src["tr"]
        self.assertTrue(any(c.stalled for c in stall.connections), stall.connections)
        self.assertEqual(st["attempt"], 2, st)
        errors = " ".join(m for k, m in self.events(st["id"]) if k == "retry_wait")
        self.assertRegex(errors, r"(?i)stall|no reply|timed out|silent", errors)
        self.assertEqual(tr["attempt"], 1, tr)  # the trickle never looked like a stall
        self.assertLess(took, 60)
        slow_size = os.path.getsize(os.path.join(self.remote_dir, tr["remote_path"]))
        stall_size = os.path.getsize(os.path.join(self.remote_dir, st["remote_path"]))
        figures("network", runs=2, faults=3, jobs_completed=2,
                resent_bytes=max(0, stall.bytes_up - stall_size)
                + max(0, slow.bytes_up - slow_size),
                payload_bytes=slow_size + stall_size,
                tried=["a connection silent for ever after 2 MiB (stall_timeout 3 s): dropped, "
                       "resumed on attempt 2",
                       "a trickle of 1.5 MB/s with 40 ms latency each way: one attempt, no false "
                       "stall"])

    # -- 2 process -------------------------------------------------------------------------------
    def test_2_process_kill_9_at_random_moments(self):
        """12 runs of one source (hook 0.6 s, 6 MiB of data at 6 MB/s, keep_last: 2): each run
        queues a job, starts diskferryd, kills it with SIGKILL at a moment picked by the seeded
        plan (inside the hook, mid-upload at a random size, the instant the final name appears,
        while an old backup still waits for retention, or a random delay) and restarts it; the
        restarted daemon finishes the job. After every run: the job is done exactly once, all
        backups are byte-identical to a local conversion, the remote holds the newest two and
        their sidecars only (no .partial, nothing twice), and no snapshot is left."""
        r = rng_for("kill")
        marker = os.path.join(self.state, "hook-ran")
        hooks = f'{{pre_snapshot: "echo x >> {marker}; sleep 0.6"}}'
        sources = {"k": self.dense("k", 8, 120, hooks=hooks, retention="{keep_last: 2}")}
        self.write_config(sources, {"box": {"extra": "    bwlimit: 6M\n"}})
        want = self.local_sha(sources["k"]["path"], "-O", "qcow2")
        plan = ["hook", "upload", "random", "publish", "hook", "retention", "upload", "publish",
                "random", "retention", "upload", "random"]
        phases = {}
        src_dir = os.path.join(self.remote_dir, "k")

        def hook_runs():
            try:
                with open(marker) as f:
                    return len(f.read().split())
            except FileNotFoundError:
                return 0

        def listing():
            try:
                return os.listdir(src_dir)
            except FileNotFoundError:
                return []

        for run, mode in enumerate(plan):
            before = set(listing())
            hooks_before = hook_runs()
            if run:
                time.sleep(1.05 - (time.time() % 1))  # a new second, so a new name
            self.assertIn("queued job", self.cli("enqueue", "k").stdout)
            p = self.daemon(wait=False)
            deadline = time.monotonic() + 30
            new_final = lambda: [n for n in set(listing()) - before  # noqa: E731
                                 if n.endswith(".qcow2")]
            if mode == "hook":
                while hook_runs() == hooks_before:
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.005)
                time.sleep(r.uniform(0, 0.5))
            elif mode == "upload":
                self.wait_for_partial(r.uniform(0.5, 4.5) * MiB)
            elif mode == "publish":
                while not new_final():
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.002)
            elif mode == "retention":
                while len([n for n in listing() if n.endswith(".qcow2")]) <= 2:
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.002)
            else:
                time.sleep(r.uniform(0.2, 2.5))
            # What was going on at the moment of the kill, as seen from outside.
            now = set(listing())
            fresh = [n for n in now - before if n.endswith(".qcow2")]
            if fresh and fresh[0] + ".sha256" not in now:
                seen = "publish"  # renamed, no sidecar yet
            elif fresh and len([n for n in now if n.endswith(".qcow2")]) > 2:
                seen = "retention"  # published, an old backup still to prune
            elif fresh:
                seen = "after publish"
            elif any(n.endswith(".partial") for n in now):
                seen = "upload"
            elif hook_runs() > hooks_before:
                seen = "hook/snapshot"
            else:
                seen = "start"
            p.kill()
            p.communicate()
            j = max(self.jobs().values(), key=lambda j: j["id"])
            if j["state"] == "done":
                seen = "after done"
            phases[seen] = phases.get(seen, 0) + 1
            self.daemon("--once")
            jobs = sorted(self.jobs().values(), key=lambda j: j["id"])
            self.assertEqual(len(jobs), run + 1)
            for j in jobs:
                self.assertEqual(j["state"], "done", j)
                self.assertEqual(j["sha256"], want, j)
                self.assertEqual(len(self.events(j["id"], "done")), 1, (mode, j))
            self.assertEqual(len({j["remote_path"] for j in jobs}), len(jobs))  # nothing twice
            newest = [j["remote_path"] for j in jobs[-2:]]
            self.assertEqual(self.remote_files(),
                             sorted(newest + [n + ".sha256" for n in newest]), (run, mode))
            for n in newest:
                self.assertEqual(sha256_file(os.path.join(self.remote_dir, n)), want)
            self.assert_no_snapshots()
            self.assert_integrity()
        lost = 0
        for j in jobs[-2:]:
            lost += self.lost_bytes(j, want)
        killed_active = sum(v for k, v in phases.items() if k != "after done")
        self.assertGreaterEqual(killed_active, 10, phases)
        for must in ("hook/snapshot", "upload", "retention"):
            self.assertIn(must, phases)
        self.assertTrue({"publish", "retention", "after publish"} & set(phases), phases)
        figures("process", runs=len(plan), faults=len(plan), jobs_completed=len(jobs),
                bytes_lost=lost, phases=phases,
                tried=[f"kill -9 of diskferryd, planned moments: {', '.join(plan)}; each time "
                       "restarted, the job done once, the newest 2 backups and nothing else on "
                       "the remote, PRAGMA integrity_check ok"])

    # -- 3 remote --------------------------------------------------------------------------------
    def between_attempts(self, px_server, name, change, remote_extra=""):
        """Runs a job of `name` whose first upload is cut after 1 MiB; while it waits to retry
        (backoff 2 s), `change()` is applied. Returns the job when the daemon is done."""
        px = self.proxy(px_server, cut_up=MiB, cut_first=2)
        cfg_sources = dict(self.config_sources)
        cfg_sources[name] = dict(cfg_sources[name], remote="cut",
                                 retries="{max_attempts: 4, backoff: 2s..2s}")
        self.write_config(cfg_sources, {"box": {"server": px_server},
                                        "cut": {"server": px_server, "port": px.port,
                                                "extra": remote_extra}})
        self.cli("enqueue", name)
        p = self.daemon("--once", wait=False)
        job_id = max(self.jobs())
        self.wait_state(job_id, {"retry_wait", "failed", "done"})
        change()
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        px.close()
        return self.jobs()[job_id]

    def test_3_remote_faults(self):
        """On a server whose chroot is a 24 MiB filesystem: the disk fills mid-upload; then,
        each between a cut first attempt and its retry, the partial file and the directory are
        made unwritable, the directory is removed, the server's host key is replaced. Each: the
        right class, retried or not as it should be, and the older backups untouched."""
        srv = OpenSSHServer(chroot_quota_mb=24)
        srv.start()
        self.addCleanup(srv.stop)
        self.server = srv
        self.remote_dir = os.path.join(srv.backups, self._testMethodName)
        tried = []
        sources = {"old": self.dense("old", 4, 130),
                   "big": self.dense("big", 32, 131),
                   "fill": self.dense("fill", 12, 135),
                   "perm": self.dense("perm", 8, 132),
                   "gone": self.dense("gone", 8, 133),
                   "hk": self.dense("hk", 8, 134)}
        self.write_config(sources)
        old_path, old_sha = self.publish_once("old")

        def older_untouched():
            self.assertEqual(sha256_file(old_path), old_sha)
            c = subprocess.run(["sha256sum", "-c", os.path.basename(old_path) + ".sha256"],
                               cwd=os.path.dirname(old_path), capture_output=True, text=True)
            self.assertEqual(c.returncode, 0, c.stdout + c.stderr)

        # Not enough space to begin with (28 MiB of data, ~17 MiB free): refused before a byte.
        self.cli("enqueue", "big")
        self.daemon("--once")
        big = [j for j in self.jobs().values() if j["source"] == "big"][0]
        self.assertEqual((big["state"], big["attempt"], big["error_class"]),
                         ("failed", 1, "remote"), big)
        self.assertIn("not enough space on the server", big["error"])
        self.assertFalse([f for f in self.remote_files() if f.startswith("big/")])
        older_untouched()
        tried.append(f"not enough free space for the image: refused before uploading, class "
                     f"{big['error_class']}")

        # The disk fills up mid-upload (someone else's file takes the rest of it).
        self.write_config(sources, {"box": {"extra": "    bwlimit: 4M\n"}})
        self.cli("enqueue", "fill")
        p = self.daemon("--once", wait=False)
        self.wait_for_partial(2 * MiB)
        filler = os.path.join(srv.backups, "filler")
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "status=none"],
                       stderr=subprocess.DEVNULL, check=False)  # until ENOSPC
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        os.unlink(filler)
        fill = [j for j in self.jobs().values() if j["source"] == "fill"][0]
        self.assertEqual(fill["state"], "failed", fill)
        self.assertEqual(fill["error_class"], "remote", fill)
        self.assertEqual(fill["attempt"], 1, fill)  # a full disk stays full: no retry
        self.assertRegex(fill["error"].lower(), r"no space|full|quota|failure", fill)
        self.assertFalse([f for f in self.remote_files() if f.startswith("fill/")],
                         "the failed upload was left on the full disk")
        older_untouched()
        tried.append(f"disk full mid-upload (a filler took the free space after 2 MiB): failed "
                     f"at once, class {fill['error_class']} ({fill['error']}); partial removed")
        self.write_config(sources)

        # Permission denied between attempts: the partial read-only, its directory root's.
        perm_dir = os.path.join(self.remote_dir, "perm")

        def lock():
            for f in os.listdir(perm_dir):
                os.chmod(os.path.join(perm_dir, f), 0o444)
            os.chown(perm_dir, 0, 0)

        perm = self.between_attempts(srv, "perm", lock)
        self.assertEqual((perm["state"], perm["attempt"], perm["error_class"]),
                         ("failed", 2, "permission"), perm)
        self.assertIn("permission denied", perm["error"].lower())
        older_untouched()
        tried.append(f"permission denied between attempts: failed on attempt 2, class "
                     f"{perm['error_class']}, not retried")

        # The source's directory removed under us: the retry makes it again and starts over.
        gone_dir = os.path.join(self.remote_dir, "gone")
        gone = self.between_attempts(srv, "gone", lambda: shutil.rmtree(gone_dir))
        self.config_sources = dict(self.config_sources)
        self.assert_published(gone, ["-O", "qcow2"])
        self.assertEqual(gone["attempt"], 2, gone)
        self.assertFalse(self.events(gone["id"], "resumed"))  # nothing was there to resume
        older_untouched()
        tried.append("the target directory removed between attempts: made again, uploaded "
                     "from byte 0 on attempt 2, done")

        # Host key changed between attempts: refused for good, never retried.
        hk = self.between_attempts(srv, "hk", srv.restart_with_new_host_key)
        self.assertEqual((hk["state"], hk["attempt"], hk["error_class"]),
                         ("failed", 2, "host-key"), hk)
        self.assertIn("host key", hk["error"].lower())
        older_untouched()
        tried.append("host key replaced between attempts: failed on attempt 2, class host-key, "
                     "not retried")
        figures("remote", runs=5, faults=5, jobs_completed=2, tried=tried)

    # -- 4 local ---------------------------------------------------------------------------------
    def test_4_local_source_removed_or_truncated(self):
        """snapshot: none reads the live image. Removed between attempts: the retry fails at once
        (class source) and removes the partial; truncated mid-upload: the job fails with the
        reason, nothing is published under the final name, the older backup is untouched."""
        sources = {"rm": self.dense("rm", 8, 140, snapshot="none"),
                   "tr": self.dense("tr", 16, 141, snapshot="none")}
        self.write_config(sources)
        old_rm, old_rm_sha = self.publish_once("rm")
        time.sleep(1)
        old_tr, old_tr_sha = self.publish_once("tr")
        time.sleep(1)
        rm = self.between_attempts(self.server, "rm", lambda: os.unlink(sources["rm"]["path"]))
        self.assertEqual((rm["state"], rm["attempt"], rm["error_class"]),
                         ("failed", 2, "source"), rm)
        self.assertIn(sources["rm"]["path"], rm["error"])
        self.assertFalse([f for f in self.remote_files() if f.endswith(".partial")])
        self.assertEqual(sha256_file(old_rm), old_rm_sha)

        # Truncated while the upload runs (4 MB/s, 14 MiB of data): cut to 3 MiB after 4 MiB.
        self.write_config(sources, {"box": {"extra": "    bwlimit: 4M\n"}})
        self.cli("enqueue", "tr")
        p = self.daemon("--once", wait=False)
        self.wait_for_partial(4 * MiB)
        os.truncate(sources["tr"]["path"], 3 * MiB)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        tr = max((j for j in self.jobs().values() if j["source"] == "tr"), key=lambda j: j["id"])
        self.assertEqual(tr["state"], "failed", tr)
        self.assertEqual(tr["error_class"], "source", tr)
        self.assertIn(sources["tr"]["path"], tr["error"])
        self.assertFalse(os.path.exists(os.path.join(self.remote_dir, tr["remote_path"])))
        self.assertFalse([f for f in self.remote_files() if f.endswith(".partial")])
        self.assertEqual(sha256_file(old_tr), old_tr_sha)
        figures("local", runs=2, faults=2, jobs_completed=2,
                tried=[f"source removed between attempts (snapshot: none): attempt 2 failed, "
                       f"class source: {rm['error']}",
                       f"source truncated to 3 MiB mid-upload: failed, class "
                       f"{tr['error_class']}: {tr['error']}; nothing published"])

    def test_4_local_database_locked(self):
        """Another process holds the queue's SQLite file with BEGIN EXCLUSIVE for 9 s, longer
        than the 5 s busy timeout, while a job uploads: `diskferry enqueue` gives up with a clear
        message, the job finishes exactly once, and nothing in the queue is lost."""
        sources = {"db": self.dense("db", 32, 150), "later": self.dense("later", 8, 151)}
        self.write_config(sources, {"box": {"extra": "    bwlimit: 5M\n"}})
        self.cli("enqueue", "db")
        p = self.daemon("--once", wait=False)
        self.wait_for_partial(2 * MiB)
        locked = threading.Event()
        release = threading.Event()

        def hold():
            c = sqlite3.connect(os.path.join(self.state, "diskferry.db"), timeout=30,
                                isolation_level=None)
            c.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(9)
            c.execute("COMMIT")
            c.close()

        t = threading.Thread(target=hold)
        t.start()
        locked.wait(10)
        t0 = time.monotonic()
        e = self.cli("enqueue", "later")
        waited = time.monotonic() - t0
        t.join()
        self.assertNotEqual(e.returncode, 0, e.stdout)
        self.assertIn("locked by another process", e.stderr)
        self.assertIn("diskferry.db", e.stderr)
        self.assertGreater(waited, 4.5)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        (job,) = self.jobs().values()  # the refused enqueue left nothing behind
        want = self.local_sha(sources["db"]["path"], "-O", "qcow2")
        figures("local", bytes_lost=self.lost_bytes(job, want))
        self.assert_published(job, ["-O", "qcow2"])
        self.assertEqual(len(self.events(job["id"], "done")), 1)
        self.assertIn("queued job", self.cli("enqueue", "later").stdout)  # and it works again
        self.assert_integrity()
        figures("local", runs=1, faults=1, jobs_completed=1,
                tried=[f"the database locked (BEGIN EXCLUSIVE) for 9 s mid-upload: enqueue gave "
                       f"up after {waited:.1f} s with \"{e.stderr.strip()}\"; the job finished on "
                       f"attempt {job['attempt']}, done once"])

    # -- 5 load ----------------------------------------------------------------------------------
    def test_5_load_50_jobs_flaky_network(self):
        """50 jobs over 3 sources, 2 workers, every connection cut with probability 1/4 at a
        seeded random offset. A source has at most one active job (a database fact), so the 50
        are queued the way timers would queue them: whenever a source has no active job, its
        next one is enqueued at once (at most 17 per source), until 50 were queued. A job often
        starts within the same second as the one before it, which the default name template
        cannot tell apart: the daemon waits for a name of its own (before the fix, such a job
        was taken for the earlier one and "done" without a backup). Judged: all 50 done, each
        exactly once, 50 distinct backups byte-identical to a local conversion, and the jobs of
        each source finished in id order."""
        r = rng_for("load")
        # Drawn up front: connection i gets plan[i] whatever the order threads ask in.
        plan = [r.randrange(2048, 3 * MiB) if r.random() < 0.25 else None for _ in range(4000)]
        px = self.proxy(cut_up=lambda i: plan[i] if i < len(plan) else None)
        names = ["l0", "l1", "l2"]
        sources = {n: self.dense(n, 4, 160 + k, retries="{max_attempts: 10, backoff: 1s..1s}")
                   for k, n in enumerate(names)}
        self.write_config(sources, {"box": {"port": px.port}}, workers=2)
        want = {n: self.local_sha(s["path"], "-O", "qcow2") for n, s in sources.items()}
        # Its log to a file: 50 jobs' worth would fill a pipe nobody reads until the end.
        log = open(os.path.join(self.state, "daemon.log"), "w")
        self.addCleanup(log.close)
        p = subprocess.Popen([os.path.join(BIN, "diskferryd"), "--config", self.config],
                             stdout=subprocess.DEVNULL, stderr=log)
        self.procs.append(p)
        queued = {n: [] for n in names}
        total = 50
        deadline = time.monotonic() + 150
        while sum(map(len, queued.values())) < total:
            self.assertLess(time.monotonic(), deadline, self.jobs())
            jobs = self.jobs()
            for n in names:
                if sum(map(len, queued.values())) >= total or len(queued[n]) >= 17:
                    continue
                if queued[n] and jobs[queued[n][-1]]["state"] in ("queued", "running",
                                                                  "retry_wait"):
                    continue
                out = self.cli("enqueue", n)
                self.assertEqual(out.returncode, 0, out.stderr)
                jid = int(out.stdout.split("queued job")[1].split()[0])
                queued[n].append(jid)
            time.sleep(0.1)
        while any(j["state"] in ("queued", "running", "retry_wait")
                  for j in self.jobs().values()):
            self.assertLess(time.monotonic(), deadline, self.jobs())
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(timeout=30), 0)
        jobs = self.jobs()
        self.assertEqual(len(jobs), total)
        self.assertEqual(sorted(jobs), sorted(sum(queued.values(), [])))
        lost = 0
        with self.db() as c:
            finished = dict(c.execute("SELECT id, finished FROM jobs").fetchall())
        for j in jobs.values():
            lost += self.lost_bytes(j, want[j["source"]])
            self.assertEqual(j["state"], "done", j)
            self.assertEqual(j["sha256"], want[j["source"]], j)
            self.assertEqual(len(self.events(j["id"], "done")), 1, j)
        self.assertEqual(lost, 0)
        self.assertEqual(len({j["remote_path"] for j in jobs.values()}), total)  # none twice
        published = [f for f in self.remote_files() if f.endswith(".qcow2")]
        self.assertEqual(len(published), total, published)
        self.assertFalse([f for f in self.remote_files() if f.endswith(".partial")])
        for n in names:
            ids = sorted(queued[n])
            self.assertEqual([finished[i] for i in ids], sorted(finished[i] for i in ids), n)
        self.assert_integrity()
        self.assert_no_snapshots()
        cuts = sum(1 for c in px.connections if c.cut)
        size = sum(os.path.getsize(os.path.join(self.remote_dir, f)) for f in published)
        retries = sum(j["attempt"] - 1 for j in jobs.values())
        self.assertGreater(cuts, 0)
        figures("load", runs=1, faults=cuts, jobs_completed=total, bytes_lost=lost,
                resent_bytes=max(0, px.bytes_up - size), payload_bytes=size,
                tried=[f"{total} jobs over 3 sources, 2 workers, each connection cut with "
                       f"probability 1/4 at a random offset: {cuts} cuts, {retries} retries, "
                       f"{len(px.connections)} connections"])

    # -- 6 secrets -------------------------------------------------------------------------------
    def test_6_secrets_stay_secret(self):
        """A daemon remote whose private key is group-readable is refused (class config, no
        retry, the fix named); a config file with commands that everyone may read is warned
        about at start; and no line of the private key's base64 is in the SQLite file (with its
        WAL), the daemon's log or anything else in the state directory."""
        loose = os.path.join(self.state, "loose_key")
        shutil.copy(self.server.client_key, loose)
        os.chmod(loose, 0o640)
        sources = {"ok": self.dense("ok", 4, 170, hooks='{pre_snapshot: "true"}'),
                   "lk": self.dense("lk", 4, 171, remote="loose")}
        self.write_config(sources, {"box": {}, "loose": {}})
        with open(self.config) as f:
            text = f.read()
        # the "loose" remote with the group-readable copy of the same key
        head, tail = text.split("  loose:\n", 1)
        tail = tail.replace(self.server.client_key, loose, 1)
        with open(self.config, "w") as f:
            f.write(head + "  loose:\n" + tail)
        os.chmod(self.config, 0o644)
        self.cli("enqueue", "--all")
        err = self.daemon("--once")
        self.assertIn("readable by everyone (mode 0644) and holds hook or notify commands", err)
        by_src = {j["source"]: j for j in self.jobs().values()}
        self.assert_published(by_src["ok"], ["-O", "qcow2"])
        lk = by_src["lk"]
        self.assertEqual((lk["state"], lk["attempt"], lk["error_class"]),
                         ("failed", 1, "config"), lk)
        self.assertIn(f"{loose}: private key is accessible by group or others (mode 0640)",
                      lk["error"])
        self.assertIn("chmod 600", lk["error"])
        with open(self.server.client_key) as f:
            key_lines = [ln for ln in f.read().splitlines()[1:-1] if len(ln) >= 16]
        self.assertTrue(key_lines)
        blobs = {"daemon log": err.encode()}
        for d, _, files in os.walk(self.state):
            for n in files:
                path = os.path.join(d, n)
                if path in (loose,) or n.startswith("kh-"):
                    continue
                with open(path, "rb") as f:
                    blobs[path] = f.read()
        self.assertIn(os.path.join(self.state, "diskferry.db"), blobs)
        for where, blob in blobs.items():
            for ln in key_lines:
                self.assertNotIn(ln.encode(), blob, f"key material in {where}")
        figures("secrets", runs=1, faults=2, jobs_completed=1,
                tried=["a group-readable private key on a daemon remote: refused, class config, "
                       "not retried", "a 0644 config with hook commands: warned at start",
                       f"{len(key_lines)} base64 lines of the private key searched in the "
                       f"daemon's log and every file of the state directory ("
                       f"{', '.join(sorted(os.path.basename(w) for w in blobs if w != 'daemon log'))}"
                       f"): none found"])


if __name__ == "__main__":
    BIN = os.path.abspath(sys.argv.pop(1))
    test_daemon.BIN = BIN
    unittest.main(verbosity=2)
