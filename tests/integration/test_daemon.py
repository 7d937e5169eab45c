#!/usr/bin/env python3
"""The backup daemon end to end, with real components only: VM images on a real XFS with reflink
(loop device), an OpenSSH chroot SFTP server on 127.0.0.1, the SQLite queue file, `diskferry
enqueue/list/show/prune/status` and `diskferryd --once`. Judged by qemu-img on the server-side
files, sha256 against a local conversion of the same source (the output is deterministic),
sha256sum -c of the sidecar, and what is left on both sides.

Run: test_daemon.py PATH/TO/bin   (the directory with diskferry and diskferryd)
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xfs_loop  # noqa: E402
from sftp_servers import OpenSSHServer  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

BIN = None
MiB = 1024 * 1024


def df(*args, **kw):
    return subprocess.run([os.path.join(BIN, "diskferry"), *map(str, args)], capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), **kw)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def make_image(path, mib=64, seed=1):
    """A sparse image: random MiB runs, zero runs and holes."""
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        for i in range(0, mib, 3):
            f.seek(i * MiB)
            f.write(r.randbytes(MiB) if i % 2 == 0 else bytes(MiB))


@unittest.skipIf(xfs_loop.unavailable_reason("xfs"), xfs_loop.unavailable_reason("xfs") or "")
class Daemon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        reason = OpenSSHServer.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.server = OpenSSHServer()
        cls.server.start()
        cls.fs = xfs_loop.XfsLoop(size_mib=600)
        cls.fs.open()
        cls.images = os.path.join(cls.fs.mountpoint, "images")
        os.makedirs(cls.images)
        cls.work = tempfile.mkdtemp(prefix="df-daemon-", dir="/var/tmp")
        cls.kh = cls.server.write_known_hosts(os.path.join(cls.work, "known_hosts"))

    @classmethod
    def tearDownClass(cls):
        cls.fs.close()
        cls.server.stop()
        shutil.rmtree(cls.work, ignore_errors=True)

    def setUp(self):
        self.state = tempfile.mkdtemp(dir=self.work)
        self.remote_dir = os.path.join(self.server.backups, self._testMethodName)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # -- helpers ---------------------------------------------------------------------------------
    def write_config(self, sources, port=None, extra="", remote_extra=""):
        port = port or self.server.port
        kh = self.server.write_known_hosts(os.path.join(self.state, f"kh-{port}"), port=port)
        text = (f"state_dir: {self.state}\nworkers: 2\nlease: 10s\nstall_timeout: 5s\n{extra}"
                f"remotes:\n  box:\n"
                f"    url: sftp://{self.server.user}@127.0.0.1:{port}/backups/"
                f"{self._testMethodName}\n"
                f"    identity: {self.server.client_key}\n    known_hosts: {kh}\n{remote_extra}"
                f"sources:\n")
        for name, s in sources.items():
            text += f"  {name}:\n" + "".join(f"    {k}: {v}\n" for k, v in s.items())
        self.config = os.path.join(self.state, "diskferry.yaml")
        with open(self.config, "w") as f:
            f.write(text)
        return self.config

    def source(self, name, seed=1, mib=64, **kw):
        path = os.path.join(self.images, f"{self._testMethodName}-{name}.img")
        if not os.path.exists(path):
            make_image(path, mib, seed)
        # Uncompressed unless a test says otherwise (compress=None: the key left out, zstd).
        s = {"path": path, "remote": "box", "compress": "none",
             "retries": "{max_attempts: 4, backoff: 1s..2s}"}
        s.update(kw)
        return {k: v for k, v in s.items() if v is not None}

    def cli(self, *args, **kw):
        return df(*args, "--config", self.config, **kw)

    def daemon(self, *args, wait=True, env=None, **kw):
        cmd = [os.path.join(BIN, "diskferryd"), "--config", self.config, *args]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
        self.procs.append(p)
        if wait:
            out, err = p.communicate(timeout=kw.get("timeout", 300))
            self.assertEqual(p.returncode, 0, err)
            return err
        return p

    def jobs(self):
        p = self.cli("list", "--json", "--limit", "0")
        self.assertEqual(p.returncode, 0, p.stderr)
        return {j["id"]: j for j in json.loads(p.stdout)}

    def local_sha(self, src, *args):
        out = os.path.join(self.work, "local.out")
        subprocess.run([os.path.join(BIN, "diskferry"), "convert", src, *args, "--no-progress",
                        "-o", out], check=True)
        h = sha256_file(out)
        os.unlink(out)
        return h

    def remote_files(self):
        found = []
        for d, _, files in os.walk(self.remote_dir):
            found += [os.path.relpath(os.path.join(d, f), self.remote_dir) for f in files]
        return sorted(found)

    def assert_published(self, job, convert_args):
        self.assertEqual(job["state"], "done", job)
        path = os.path.join(self.remote_dir, job["remote_path"])
        src = self.config_sources[job["source"]]["path"]
        want = self.local_sha(src, *convert_args)
        self.assertEqual(sha256_file(path), want, f"{path} differs from a local conversion")
        self.assertEqual(job["sha256"], want)
        c = subprocess.run(["sha256sum", "-c", os.path.basename(path) + ".sha256"],
                           cwd=os.path.dirname(path), capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        self.assertFalse(os.path.exists(path + ".partial"))
        return path

    def assert_no_snapshots(self):
        snaps = os.path.join(self.images, ".diskferry-snapshots")
        left = os.listdir(snaps) if os.path.isdir(snaps) else []
        self.assertEqual(left, [], "snapshots left behind")

    # -- tests -----------------------------------------------------------------------------------
    def test_formats_end_to_end(self):
        self.config_sources = {
            "q": self.source("q", 1, compress=None,  # the default: zstd:3
                             hooks='{pre_snapshot: "echo frozen $DISKFERRY_SOURCE", '
                                   'post_snapshot: "echo thawed"}'),
            "v": self.source("v", 2, format="vhdx"),
            "r": self.source("r", 3, format="raw", compress="gzip:1"),
            "z": self.source("z", 4, compress="qcow2-zstd"),
        }
        self.write_config(self.config_sources)
        p = self.cli("enqueue", "--all")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.count("queued job"), 4, p.stdout)
        # The nightly timer firing again queues nothing new.
        p = self.cli("enqueue", "--all")
        self.assertEqual(p.stdout.count("already job"), 4, p.stdout)
        self.daemon("--once")
        jobs = self.jobs()
        self.assertEqual(len(jobs), 4)
        by_src = {j["source"]: j for j in jobs.values()}
        q = self.assert_published(by_src["q"], ["-O", "qcow2", "--compress", "zstd:3"])
        self.assertTrue(q.endswith(".qcow2.zst"), q)
        raw = os.path.join(self.work, "q.qcow2")
        subprocess.run(["zstd", "-d", "-q", "-f", q, "-o", raw], check=True)
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                            self.config_sources["q"]["path"], raw], capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        v = self.assert_published(by_src["v"], ["-O", "vhdx"])
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vhdx",
                            self.config_sources["v"]["path"], v], capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        self.assert_published(by_src["r"], ["-O", "raw", "--compress", "gzip:1"])
        z = self.assert_published(by_src["z"], ["-O", "qcow2", "--qcow2-compression", "zstd"])
        c = subprocess.run(["qemu-img", "check", z], capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        self.assert_no_snapshots()
        # The event log tells the story of a job.
        p = self.cli("show", by_src["q"]["id"])
        self.assertEqual(p.returncode, 0, p.stderr)
        for kind in ("attempt", "snapshot", "published"):
            self.assertIn(kind, p.stdout)
        self.assertIn('pre hook "echo frozen $DISKFERRY_SOURCE" ok: frozen q', p.stdout)
        self.assertIn('post hook "echo thawed" ok: thawed', p.stdout)
        p = self.cli("status")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(p.stdout.count(" OK "), 4, p.stdout)
        db = os.path.join(self.state, "diskferry.db")
        self.assertEqual(sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0], "ok")

    def test_cut_connections_are_retried_and_resumed(self):
        # Each attempt makes a short connection (is NAME already published?) and the upload;
        # only the uploads carry 10 MiB, so the first two uploads are cut and the third is not.
        proxy = TcpProxy(("127.0.0.1", self.server.port), cut_up=10 * MiB, cut_first=4)
        proxy.start()
        try:
            self.config_sources = {"a": self.source("a", 5, mib=96)}
            self.write_config(self.config_sources, port=proxy.port)
            self.cli("enqueue", "a")
            self.daemon("--once")
        finally:
            proxy.close()
        cuts = [c for c in proxy.connections if c.cut]
        self.assertEqual(len(cuts), 2, proxy.connections)
        (job,) = self.jobs().values()
        self.assert_published(job, ["-O", "qcow2"])
        self.assertEqual(job["attempt"], 3, job)
        p = self.cli("show", job["id"])
        self.assertEqual(p.stdout.count("retry_wait"), 2, p.stdout)
        # Both retries resumed the partial file instead of starting over: what the remote
        # received in all is the file plus at most the two cut-off tails (< 10 MiB each).
        self.assertEqual(p.stdout.count("upload resumed at"), 2, p.stdout)
        size = os.path.getsize(os.path.join(self.remote_dir, job["remote_path"]))
        self.assertLess(proxy.bytes_up, size + 2 * 10 * MiB + 4 * MiB)
        self.assertEqual(self.remote_files(), sorted([job["remote_path"],
                                                      job["remote_path"] + ".sha256"]))

    def test_kill_9_and_restart_completes_once(self):
        self.config_sources = {"k": self.source("k", 6, mib=192)}
        # Slow enough to be killed mid-upload: 32 MiB of random data at 8 MiB/s.
        self.write_config(self.config_sources, remote_extra="    bwlimit: 8M\n")
        self.cli("enqueue", "k")
        p = self.daemon(wait=False)
        self.wait_for_partial(12 * MiB)
        # While it runs, list shows how far it got and how fast.
        (job,) = self.jobs().values()
        self.assertEqual(job["state"], "running", job)
        self.assertGreater(job["bytes_done"], 0, job)
        self.assertGreater(job["rate"], 4 * MiB, job)
        self.assertLess(job["rate"], 12 * MiB, job)  # --bwlimit 8M holds
        self.assertRegex(self.cli("list").stdout, r"running +1 +\d+% +[\d.]+ MiB/s")
        p.kill()
        p.wait()
        (job,) = self.jobs().values()
        self.assertEqual(job["state"], "running")  # its lease runs out, then a daemon resumes it
        err = self.daemon("--once")
        (job,) = self.jobs().values()
        self.assert_published(job, ["-O", "qcow2"])
        self.assertEqual(job["attempt"], 2, err)
        self.assertEqual(self.remote_files(), sorted([job["remote_path"],
                                                      job["remote_path"] + ".sha256"]))
        show = self.cli("show", job["id"]).stdout
        self.assertIn("reused", show)   # the same snapshot, so the same bytes
        self.assertIn("upload resumed at", show)  # from the killed process's partial file
        self.assert_no_snapshots()
        db = os.path.join(self.state, "diskferry.db")
        self.assertEqual(sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0], "ok")

    def test_kill_9_in_the_hook_and_at_publish(self):
        # Two more points to die at: inside the pre-snapshot hook (no snapshot yet), and the
        # moment the final name appears on the remote (between rename, sidecar, retention and
        # the queue's record). Each time a restarted daemon finishes the job exactly once.
        marker = os.path.join(self.state, "hook-ran")
        hooks = f'{{pre_snapshot: "echo x >> {marker}; sleep 3"}}'
        self.config_sources = {"h": self.source("h", 15, mib=48, hooks=hooks,
                                                 retention="{keep_last: 1}")}
        self.write_config(self.config_sources, remote_extra="    bwlimit: 16M\n")
        self.cli("enqueue", "h")
        p = self.daemon(wait=False)
        deadline = time.monotonic() + 20
        while not os.path.exists(marker):
            self.assertLess(time.monotonic(), deadline, "the hook did not run")
            time.sleep(0.05)
        p.kill()
        p.wait()
        p = self.daemon(wait=False)  # the hook runs again (nothing was snapshotted), then uploads
        deadline = time.monotonic() + 60
        while not any(f.endswith(".qcow2") for f in self.remote_files()):
            self.assertLess(time.monotonic(), deadline, "nothing was published")
            time.sleep(0.01)
        p.kill()
        p.wait()
        self.daemon("--once")
        (job,) = self.jobs().values()
        self.assert_published(job, ["-O", "qcow2"])
        self.assertEqual(self.remote_files(), sorted([job["remote_path"],
                                                      job["remote_path"] + ".sha256"]))
        with open(marker) as f:
            self.assertEqual(len(f.read().split()), 2)  # killed once inside, once it completed
        show = self.cli("show", job["id"]).stdout
        self.assertEqual(len(re.findall(r"Z  done ", show)), 1, show)
        self.assert_no_snapshots()

    def test_full_snapshot_filesystem_fails_that_job_alone(self):
        with xfs_loop.XfsLoop(size_mib=300) as full:
            img = os.path.join(full.mountpoint, "vm.img")
            make_image(img, 32, 16)
            subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(full.mountpoint, 'fill')}",
                            "bs=1M", "status=none"], stderr=subprocess.DEVNULL,
                           check=False)  # until ENOSPC
            self.config_sources = {"full": {"path": img, "remote": "box"},
                                   "fine": self.source("fine", 17, mib=8)}
            self.write_config(self.config_sources)
            self.cli("enqueue", "--all")
            self.daemon("--once")
            by_src = {j["source"]: j for j in self.jobs().values()}
            self.assert_published(by_src["fine"], ["-O", "qcow2"])
            j = by_src["full"]
            self.assertEqual(j["state"], "failed", j)
            self.assertIn("no space left for a snapshot of " + img, j["error"])
            self.assertIn(".diskferry-snapshots", j["error"])
            snaps = os.path.join(full.mountpoint, ".diskferry-snapshots")
            self.assertEqual(os.listdir(snaps) if os.path.isdir(snaps) else [], [])
            self.assertIn("no space left", self.cli("show", j["id"]).stdout)

    def test_verify_latest_backups_through_the_config(self):
        self.config_sources = {"va": self.source("va", 50, mib=8),
                               "vb": self.source("vb", 51, mib=8, compress="zstd:1"),
                               "vnever": self.source("vnever", 52, mib=8)}
        self.write_config(self.config_sources)
        self.cli("enqueue", "va", "vb")
        self.daemon("--once")
        by_src = {j["source"]: j for j in self.jobs().values()}
        p = self.cli("verify", "--all-latest")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(p.stdout.count(": OK ("), 2, p.stdout)
        self.assertIn("vnever: no backup yet", p.stdout)
        p = self.cli("verify", "--job", by_src["vb"]["id"])
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("in a complete zstd stream", p.stdout)
        # One byte changed on the server: that source fails with the checksum code.
        path = os.path.join(self.remote_dir, by_src["va"]["remote_path"])
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 3)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x80]))
        p = self.cli("verify", "--all-latest")
        self.assertEqual(p.returncode, 4, p.stdout + p.stderr)
        self.assertIn("CHECKSUM MISMATCH", p.stderr)
        self.assertEqual(p.stdout.count(": OK ("), 1, p.stdout)
        p = self.cli("verify", "--job", 999)
        self.assertEqual(p.returncode, 2, p.stderr)

    def test_cancel_a_running_job(self):
        self.config_sources = {"c": self.source("c", 18, mib=192)}  # 32 MiB of data: 8 s
        self.write_config(self.config_sources, remote_extra="    bwlimit: 4M\n")
        self.cli("enqueue", "c")
        p = self.daemon(wait=False)
        self.wait_for_partial(4 * MiB)
        (job,) = self.jobs().values()
        r = self.cli("cancel", job["id"])
        self.assertEqual(r.returncode, 0, r.stderr)
        deadline = time.monotonic() + 4  # the worker hears of it within 2 s
        while self.jobs()[job["id"]]["state"] != "cancelled":
            self.assertLess(time.monotonic(), deadline, self.jobs())
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
        # Cancelled: the partial upload and the snapshot are gone, nothing was published.
        self.assertEqual(self.remote_files(), [])
        self.assert_no_snapshots()
        self.assertIn("cancel", self.cli("show", job["id"]).stdout)
        r = self.cli("cancel", job["id"])  # twice is harmless
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_qcow2_sources_converted_and_asis(self):
        raw = os.path.join(self.images, "qsrc.raw")
        make_image(raw, 24, 60)
        img = os.path.join(self.images, "vm-q.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img], check=True)
        self.config_sources = {
            "qc": {"path": img, "remote": "box", "format": "vhdx", "compress": "none"},
            "qa": {"path": img, "remote": "box", "format": "asis", "compress": "zstd:1"},
        }
        self.write_config(self.config_sources)
        self.cli("enqueue", "--all")
        self.daemon("--once")
        by_src = {j["source"]: j for j in self.jobs().values()}
        v = self.assert_published(by_src["qc"], ["-O", "vhdx"])
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vhdx", raw, v],
                           capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        a = by_src["qa"]
        self.assertEqual(a["state"], "done", a)
        self.assertTrue(a["remote_path"].endswith(".qcow2.zst"), a)
        out = os.path.join(self.work, "asis.qcow2")
        subprocess.run(["zstd", "-d", "-q", "-f", os.path.join(self.remote_dir, a["remote_path"]),
                        "-o", out], check=True)
        self.assertEqual(sha256_file(out), sha256_file(img))  # the file itself, byte for byte
        self.assert_no_snapshots()

    def wait_for_partial(self, at_least, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            partials = [f for f in self.remote_files() if f.endswith(".partial")]
            if partials and os.path.getsize(os.path.join(self.remote_dir, partials[0])) > at_least:
                return
            time.sleep(0.1)
        self.fail("the upload did not start")

    def test_partial_of_another_run_is_not_adopted(self):
        # A killed daemon leaves NAME.partial under its job's lock. Make both another run's: the
        # lock's token changed (say, a CLI run to the same name that crashed) and a byte in the
        # middle of the partial changed, far below the last MiB a resume compares. The restarted
        # daemon takes the stale lock over but must not resume that partial: resuming it would
        # publish the other run's byte. 64 MiB of data at 8 MiB/s, killed past 40 MiB: a resume
        # would keep the first 20 MiB or more (all but what can be in flight).
        self.config_sources = {"f": self.source("f", 16, mib=384)}
        # 128 MiB allocated on the shared 600 MiB XFS: freed for the tests after this one.
        self.addCleanup(os.unlink, self.config_sources["f"]["path"])
        self.write_config(self.config_sources, remote_extra="    bwlimit: 8M\n")
        self.cli("enqueue", "f")
        p = self.daemon(wait=False)
        self.wait_for_partial(40 * MiB)
        p.kill()
        p.wait()
        (partial,) = [f for f in self.remote_files() if f.endswith(".partial")]
        partial = os.path.join(self.remote_dir, partial)
        lock = partial[:-len(".partial")] + ".lock"
        with open(lock, "r+") as f:
            text = f.read()
            self.assertRegex(text, r"\ntoken job\S+\n")
            f.seek(0)
            f.write(re.sub(r"\ntoken \S+\n", "\ntoken cli-0123456789abcdef\n", text))
            f.truncate()
        with open(partial, "r+b") as f:
            f.seek(4 * MiB)
            b = f.read(1)
            f.seek(4 * MiB)
            f.write(bytes([b[0] ^ 0xFF]))
        err = self.daemon("--once")
        (job,) = self.jobs().values()
        self.assert_published(job, ["-O", "qcow2"])
        show = self.cli("show", job["id"]).stdout
        self.assertNotIn("upload resumed at", show)
        self.assertIn("took over the lock of an earlier run that is gone", show + err)
        self.assertEqual(self.remote_files(), sorted([job["remote_path"],
                                                      job["remote_path"] + ".sha256"]))
        self.assert_no_snapshots()

    def test_sigterm_stops_at_a_resumable_point(self):
        # 32 MiB of data at 4 MiB/s: the signal comes while the source is still being read
        # (the few MiB already queued for the remote are sent first).
        self.config_sources = {"t": self.source("t", 11, mib=192)}
        self.write_config(self.config_sources, remote_extra="    bwlimit: 4M\n")
        self.cli("enqueue", "t")
        p = self.daemon(wait=False)
        self.wait_for_partial(8 * MiB)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        stopped_in = time.monotonic() - t0
        self.assertEqual(p.returncode, 0, err)
        self.assertLess(stopped_in, 10, err)
        (job,) = self.jobs().values()
        # Not a failure and no attempt spent waiting: it runs again as soon as a daemon does.
        self.assertEqual(job["state"], "retry_wait", job)
        self.assertEqual(job["error_class"], "interrupted", job)
        self.assertTrue(any(f.endswith(".partial") for f in self.remote_files()))
        self.daemon("--once")
        (job,) = self.jobs().values()
        self.assert_published(job, ["-O", "qcow2"])
        self.assertIn("upload resumed at", self.cli("show", job["id"]).stdout)
        self.assert_no_snapshots()

    def test_sighup_reloads_the_configuration(self):
        self.config_sources = {"h1": self.source("h1", 12, mib=8)}
        self.write_config(self.config_sources)
        p = self.daemon(wait=False)
        try:
            time.sleep(1)
            self.config_sources["h2"] = self.source("h2", 13, mib=8)
            self.write_config(self.config_sources)
            p.send_signal(signal.SIGHUP)
            time.sleep(1.5)  # the daemon looks at its signals every 200 ms
            r = self.cli("enqueue", "h2")
            self.assertEqual(r.returncode, 0, r.stderr)
            deadline = time.monotonic() + 20
            while self.jobs()[1]["state"] != "done":
                if time.monotonic() > deadline:
                    self.fail(f"h2 was not backed up after SIGHUP: {self.jobs()}")
                time.sleep(0.2)
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
        self.assertIn("configuration reloaded", err)
        (job,) = self.jobs().values()
        self.assert_published(job, ["-O", "qcow2"])

    def test_two_daemons_share_the_queue(self):
        # Two daemons of two workers each on one database: every job runs once, never two at a
        # time for one source, and a source with an active job is not queued again.
        self.config_sources = {n: self.source(n, 20 + i, mib=24) for i, n in
                               enumerate(["s1", "s2", "s3"])}
        self.write_config(self.config_sources, remote_extra="    bwlimit: 40M\n")
        self.assertEqual(self.cli("enqueue", "--all").stdout.count("queued job"), 3)
        ps = [self.daemon("--once", wait=False) for _ in range(2)]
        time.sleep(0.3)
        again = self.cli("enqueue", "--all")
        for p in ps:
            _, err = p.communicate(timeout=300)
            self.assertEqual(p.returncode, 0, err)
        self.assertEqual(again.stdout.count("queued job"), 0, again.stdout)
        jobs = self.jobs()
        self.assertEqual(len(jobs), 3, jobs)
        for j in jobs.values():
            self.assert_published(j, ["-O", "qcow2"])
            self.assertEqual(j["attempt"], 1, j)
            self.assertEqual(self.cli("show", j["id"]).stdout.count("claimed"), 1)
        db = os.path.join(self.state, "diskferry.db")
        self.assertEqual(sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0], "ok")

    def test_bad_sources_fail_alone(self):
        # A vanished source and a directory where an image should be fail at once with the
        # reason; the good source beside them is backed up.
        gone = os.path.join(self.images, "gone.img")
        folder = os.path.join(self.images, "folder.img")
        os.makedirs(folder, exist_ok=True)
        self.config_sources = {"good": self.source("good", 30, mib=8),
                               "gone": {"path": gone, "remote": "box", "snapshot": "none"},
                               "dir": {"path": folder, "remote": "box", "snapshot": "none"},
                               "gonesnap": {"path": gone + "2", "remote": "box"}}
        self.write_config(self.config_sources)
        self.cli("enqueue", "--all")
        self.daemon("--once")
        by_src = {j["source"]: j for j in self.jobs().values()}
        self.assert_published(by_src["good"], ["-O", "qcow2"])
        for name, path in (("gone", gone), ("dir", folder), ("gonesnap", gone + "2")):
            j = by_src[name]
            self.assertEqual(j["state"], "failed", j)
            self.assertEqual(j["attempt"], 1, j)  # not retried: retrying cannot help
            self.assertEqual(j["error_class"], "source", j)
            self.assertIn(path, j["error"])
        self.assertEqual(self.remote_files(), sorted([by_src["good"]["remote_path"],
                                                      by_src["good"]["remote_path"] + ".sha256"]))

    def test_permanent_failures_fail_at_once(self):
        # An unknown host key, a key the server refuses, a directory we may not write: each
        # fails the job on its first attempt with its class, and nothing is left behind.
        empty_kh = os.path.join(self.state, "empty_kh")
        open(empty_kh, "w").close()
        stranger = os.path.join(self.state, "stranger")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger],
                       check=True)
        locked = os.path.join(self.server.backups, "locked")  # root's, mode 0755
        os.makedirs(locked, exist_ok=True)
        os.chmod(locked, 0o755)
        self.write_config({})
        kh = os.path.join(self.state, f"kh-{self.server.port}")
        base = f"sftp://{self.server.user}@127.0.0.1:{self.server.port}"
        remotes = {"hk": (f"{base}/backups/x", self.server.client_key, empty_kh),
                   "auth": (f"{base}/backups/x", stranger, kh),
                   "perm": (f"{base}/backups/locked/x", self.server.client_key, kh)}
        text = f"state_dir: {self.state}\nremotes:\n"
        for name, (url, key, known) in remotes.items():
            text += f"  {name}:\n    url: {url}\n    identity: {key}\n    known_hosts: {known}\n"
        text += "sources:\n"
        self.config_sources = {}
        for i, name in enumerate(remotes):
            src = self.source(name, 40 + i, mib=8)
            src["remote"] = name
            self.config_sources[name] = src
            text += f"  {name}:\n" + "".join(f"    {k}: {v}\n" for k, v in src.items())
        with open(self.config, "w") as f:
            f.write(text)
        self.cli("enqueue", "--all")
        t0 = time.monotonic()
        self.daemon("--once")
        self.assertLess(time.monotonic() - t0, 20)  # no backoff waits (1s..2s each) for these
        by_src = {j["source"]: j for j in self.jobs().values()}
        want = {"hk": ("host-key", "unknown host key"), "auth": ("auth", "refused"),
                "perm": ("permission", "permission denied")}
        for name, (cls, text) in want.items():
            j = by_src[name]
            self.assertEqual((j["state"], j["attempt"], j["error_class"]), ("failed", 1, cls), j)
            self.assertIn(text, j["error"].lower(), j)
        self.assertEqual(os.listdir(locked), [])
        self.assert_no_snapshots()
        p = self.cli("status")
        self.assertEqual(p.returncode, 2, p.stdout)
        self.assertEqual(p.stdout.count("STALE"), 3, p.stdout)

    def test_once_leaves_a_later_retry_queued(self):
        # Nothing listens on the remote's port: the job fails transiently and waits 30 s for its
        # retry. --once works what is due, says which retry it leaves, and exits; the job stays
        # in retry_wait for the next run.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        self.config_sources = {"u": self.source("u", 70, mib=8,
                                                retries="{max_attempts: 5, backoff: 30s..30m}")}
        self.write_config(self.config_sources, port=dead_port)
        self.cli("enqueue", "--all")
        t0 = time.monotonic()
        p = self.daemon("--once", wait=False)
        try:
            _, err = p.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            self.fail("diskferryd --once waited for a retry due in 30 s")
        self.assertEqual(p.returncode, 0, err)
        self.assertLess(time.monotonic() - t0, 25)
        (job,) = self.jobs().values()
        self.assertEqual((job["state"], job["attempt"]), ("retry_wait", 1), job)
        self.assertIsNotNone(job["next_run_at"], job)
        self.assertRegex(err, rf"job {job['id']} \(u\): retry due at "
                              rf"{re.escape(job['next_run_at'])} left queued; --once exits")

    def test_unresolvable_host_is_retried_as_dns(self):
        # The CLI refuses such a name at once; a daemon retries it (DNS may come back), with its
        # own class so that monitoring does not take it for a flaky network.
        self.write_config({})
        src = self.source("dns", 50, mib=4, retries="{max_attempts: 2, backoff: 1s..1s}")
        self.config_sources = {"dns": src}
        text = (f"state_dir: {self.state}\nremotes:\n  nowhere:\n"
                f"    url: sftp://{self.server.user}@nosuch.invalid/backups\n"
                f"    identity: {self.server.client_key}\n"
                f"sources:\n  dns:\n" +
                "".join(f"    {k}: {v}\n" for k, v in dict(src, remote="nowhere").items()))
        with open(self.config, "w") as f:
            f.write(text)
        self.cli("enqueue", "--all")
        self.daemon("--once")
        (j,) = self.jobs().values()
        self.assertEqual((j["state"], j["attempt"], j["error_class"]), ("failed", 2, "dns"), j)
        self.assertIn("cannot resolve host name 'nosuch.invalid'", j["error"])
        self.assertNotIn("?@", j["error"])
        self.assert_no_snapshots()

    def test_retention_keeps_foreign_files(self):
        self.config_sources = {"w": self.source("w", 8, format="raw",
                                                retention="{keep_last: 2}")}
        self.write_config(self.config_sources)
        d = os.path.join(self.remote_dir, "w")
        os.makedirs(d)
        old = ["w-20260101T000000Z.raw", "w-20260102T000000Z.raw", "w-20260103T000000Z.raw"]
        foreign = ["notes.txt", "w-manual-copy.raw", "x-20260101T000000Z.raw"]
        for n in old + foreign:
            with open(os.path.join(d, n), "w") as f:
                f.write(n)
        with open(os.path.join(d, old[0] + ".sha256"), "w") as f:
            f.write("0" * 64 + "  " + old[0] + "\n")
        # As if the SFTP user had uploaded them (the test runs as root).
        for path in [self.remote_dir, d] + [os.path.join(d, n) for n in os.listdir(d)]:
            os.chown(path, self.server.uid, self.server.gid)
        dry = self.cli("prune", "--dry-run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("would remove w/w-20260101T000000Z.raw", dry.stdout)
        self.assertEqual(len(os.listdir(d)), 7)  # nothing removed by a dry run
        self.cli("enqueue", "w")
        self.daemon("--once")
        (job,) = self.jobs().values()
        self.assertEqual(job["state"], "done", job)
        left = sorted(os.listdir(d))
        newest = os.path.basename(job["remote_path"])
        self.assertEqual(left, sorted(foreign + [old[2], newest, newest + ".sha256"]))

    def test_extra_outputs_from_one_snapshot(self):
        # One snapshot, one read, three backups: qcow2.zst, vhdx and raw.gz, each verified after
        # upload and pruned on its own. Each output's "already published?" check is a short
        # connection, then come the three uploads: the first two are cut, the raw.gz lands,
        # and the second attempt sends only what is missing.
        proxy = TcpProxy(("127.0.0.1", self.server.port), cut_up=8 * MiB, cut_first=5)
        proxy.start()
        try:
            self.config_sources = {"m": self.source(
                "m", 11, mib=96, compress="zstd", verify="after_upload",
                retention="{keep_last: 1}",
                extra_outputs="[{format: vhdx}, {format: raw, compress: 'gzip:1'}]")}
            self.write_config(self.config_sources, port=proxy.port)
            for _ in range(2):
                self.cli("enqueue", "m")
                self.daemon("--once")
                time.sleep(1.1)  # the next job gets a name of its own
        finally:
            proxy.close()
        self.assertEqual(len([c for c in proxy.connections if c.cut]), 2, proxy.connections)
        jobs = sorted(self.jobs().values(), key=lambda j: j["id"])
        p = self.cli("show", jobs[0]["id"])
        self.assertIn("raw.gz was already published by an earlier attempt", p.stdout)
        self.assertEqual([j["state"] for j in jobs], ["done", "done"], jobs)
        self.assertGreaterEqual(jobs[0]["attempt"], 2, jobs[0])
        src = self.config_sources["m"]["path"]
        newest = jobs[1]["remote_path"]
        self.assert_published(jobs[1], ["-O", "qcow2", "--compress", "zstd"])
        stem = newest[: -len(".qcow2.zst")]
        # Retention kept the newest of each output, and nothing else.
        self.assertEqual(self.remote_files(), sorted(
            n + x for n in (newest, stem + ".vhdx", stem + ".raw.gz") for x in ("", ".sha256")))
        for name, args in ((stem + ".vhdx", ["-O", "vhdx"]),
                           (stem + ".raw.gz", ["-O", "raw", "--compress", "gzip:1"])):
            path = os.path.join(self.remote_dir, name)
            self.assertEqual(sha256_file(path), self.local_sha(src, *args), name)
            c = subprocess.run(["sha256sum", "-c", os.path.basename(path) + ".sha256"],
                               cwd=os.path.dirname(path), capture_output=True, text=True)
            self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vhdx", src,
                            os.path.join(self.remote_dir, stem + ".vhdx")],
                           capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        for j in jobs:
            p = self.cli("show", j["id"])
            self.assertEqual(p.stdout.count("reflinked"), 1, p.stdout)  # one snapshot a job
            for ext in (".qcow2.zst", ".vhdx", ".raw.gz"):
                self.assertIn(ext + ": intact, read back", p.stdout)
        self.assert_no_snapshots()

    def test_reflink_on_ext4_names_the_filesystem(self):
        with xfs_loop.Ext4Loop(size_mib=128) as ext4:
            img = os.path.join(ext4.mountpoint, "vm.img")
            make_image(img, 16, 9)
            self.config_sources = {"e": {"path": img, "remote": "box"}}
            self.write_config(self.config_sources)
            self.cli("enqueue", "e")
            self.daemon("--once")
            (job,) = self.jobs().values()
            self.assertEqual(job["state"], "failed")
            self.assertIn("ext4", job["error"])
            self.assertIn("snapshot: none", job["error"])

    def test_notify_socket_sees_ready(self):
        self.config_sources = {"n": self.source("n", 10, mib=8)}
        self.write_config(self.config_sources)
        path = os.path.join(self.state, "notify.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        s.settimeout(10)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        p = self.daemon(wait=False, env=env)
        try:
            msg = s.recv(4096).decode()
            self.assertIn("READY=1", msg)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
            s.close()
        self.assertEqual(p.returncode, 0)

    def test_journal_records_carry_job_fields(self):
        # Under systemd, stderr is the journal stream (JOURNAL_STREAM=dev:ino of stderr) and the
        # daemon sends native records to /run/systemd/journal/socket. No journald runs here, so
        # the test listens on that socket itself and reads the native protocol (KEY=value lines).
        sock_path = "/run/systemd/journal/socket"
        if os.path.exists(sock_path):
            self.skipTest(f"{sock_path} exists: a real journald runs here")
        made = [d for d in ("/run/systemd", "/run/systemd/journal") if not os.path.exists(d)]
        for d in made:
            os.mkdir(d)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(sock_path)
        s.settimeout(0.5)
        try:
            self.config_sources = {"j": self.source("j", 14, mib=8)}
            self.write_config(self.config_sources)
            self.cli("enqueue", "j")
            err_path = os.path.join(self.state, "stderr")
            with open(err_path, "w") as err:
                st = os.fstat(err.fileno())
                env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
                p = subprocess.run([os.path.join(BIN, "diskferryd"), "--config", self.config,
                                    "--once"], stderr=err, env=env, timeout=120)
            self.assertEqual(p.returncode, 0)
            records = []
            while True:
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    break
                records.append(dict(line.split("=", 1) for line in data.decode().splitlines()
                                    if "=" in line))
        finally:
            s.close()
            os.unlink(sock_path)
            for d in reversed(made):
                os.rmdir(d)
        with open(err_path) as f:
            self.assertEqual(f.read(), "", "log lines went to stderr instead of the journal")
        self.assertTrue(records, "no journal records")
        self.assertTrue(all(r.get("SYSLOG_IDENTIFIER") == "diskferryd" for r in records))
        job_lines = [r for r in records if r.get("JOB_ID") == "1"]
        self.assertTrue(any("published" in r["MESSAGE"] for r in job_lines), records)
        for r in job_lines:
            self.assertEqual((r["SOURCE"], r["REMOTE"], r["PRIORITY"]), ("j", "box", "6"))
        started = [r for r in records if "started" in r["MESSAGE"]]
        self.assertTrue(started and "JOB_ID" not in started[0], records)
        # No key material in the log.
        with open(self.server.client_key) as f:
            key = f.read()
        body = "".join(r["MESSAGE"] for r in records)
        for line in key.splitlines()[1:-1]:
            self.assertNotIn(line, body)

    def test_check_config_looks_at_the_sources_on_this_machine(self):
        # snapshot: reflink on ext4 and into a snapshot_dir on another filesystem, one disk under
        # two names (a hard link): errors, exit 2. A path that does not exist (yet): a warning
        # only. An XFS with reflink passes; nothing is left behind by the reflink probe.
        if xfs_loop.unavailable_reason("ext4"):
            self.skipTest(xfs_loop.unavailable_reason("ext4"))
        with xfs_loop.Ext4Loop() as ext4:
            on_xfs = os.path.join(self.images, "cc-xfs.img")
            on_ext4 = os.path.join(ext4.mountpoint, "cc-ext4.img")
            for path in (on_xfs, on_ext4):
                make_image(path, 1, 60)
            twin = os.path.join(self.images, "cc-twin.img")
            os.link(on_xfs, twin)
            gone = os.path.join(self.images, "cc-not-yet.img")
            other_fs = os.path.join(ext4.mountpoint, "snaps")
            self.write_config({"good": {"path": on_xfs, "remote": "box"},
                               "ext": {"path": on_ext4, "remote": "box"},
                               "twin": {"path": twin, "remote": "box", "snapshot": "none"},
                               "later": {"path": gone, "remote": "box"},
                               "xdev": {"path": on_xfs, "remote": "box",
                                        "snapshot_dir": other_fs}})
            before = sorted(os.listdir(self.images)) + sorted(os.listdir(ext4.mountpoint))
            p = self.cli("check-config")
            after = sorted(os.listdir(self.images)) + sorted(os.listdir(ext4.mountpoint))
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(before, after)
        self.assertEqual(p.stdout, "")
        lines = p.stderr.splitlines()
        self.assertEqual(len(lines), 5, p.stderr)
        with open(self.config) as f:
            text = f.read().splitlines()

        def line_of(key, source):
            start = text.index(f"  {source}:")
            return start + 1 + next(i for i, t in enumerate(text[start:]) if
                                    t.strip().startswith(key + ":"))
        cfg = self.config
        self.assertIn(f"diskferry: warning: {cfg}:{line_of('path', 'later')}: sources.later.path: "
                      f"{gone} does not exist (yet?)", p.stderr)
        self.assertIn(f"diskferry: {cfg}:{text.index('  ext:') + 1}: sources.ext.snapshot: "
                      f"{on_ext4}: cannot snapshot: ext4 cannot make reflink copies", p.stderr)
        self.assertIn(f"diskferry: {cfg}:{line_of('path', 'twin')}: sources.twin.path: {twin} is "
                      f"the same file as {on_xfs}, the path of sources.good", p.stderr)
        self.assertIn(f"sources.xdev.path: {on_xfs} is also the path of sources.good", p.stderr)
        self.assertIn(f"sources.xdev.snapshot: {on_xfs}: cannot snapshot into {other_fs}: it is "
                      f"on another filesystem (ext4) than the image (xfs)", p.stderr)
        # Without the mistakes: ok, exit 0, the missing path still warned about.
        self.write_config({"good": {"path": on_xfs, "remote": "box"},
                           "later": {"path": gone, "remote": "box"}})
        p = self.cli("check-config")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("sources.later.path", p.stderr)
        self.assertIn(": ok (1 remote, 2 sources", p.stdout)

    def test_config_errors_name_file_and_line(self):
        self.config = os.path.join(self.state, "bad.yaml")
        with open(self.config, "w") as f:
            f.write(f"state_dir: {self.state}\nremotes:\n  box:\n    url: sftp://u@h/x\n"
                    "sources:\n  a:\n    path: /x.img\n    remote: bxo\n")
        p = self.cli("check-config")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertRegex(p.stderr, rf"{self.config}:8: sources\.a\.remote: .*bxo")
        p = subprocess.run([os.path.join(BIN, "diskferryd"), "--config", self.config, "--once"],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 1)
        self.assertIn(f"{self.config}:8:", p.stderr)


if __name__ == "__main__":
    BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
