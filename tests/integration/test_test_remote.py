#!/usr/bin/env python3
"""`diskferry test-remote sftp://...` against real servers on 127.0.0.1 (OpenSSH internal-sftp
chroot, ProFTPD mod_sftp, rclone serve sftp): the step lines and verdict of a good setup, the
exact complaint for each bad one (unknown/changed host key, wrong client key, read-only
directory, unreachable port, full disk), --json, and never a probe file left on the server
(also after a dropped connection and Ctrl-C).

Run: test_test_remote.py PATH/TO/diskferry
"""
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import (OpenSSHServer, ProFTPDServer, RcloneServer,  # noqa: E402
                          client_keypair, free_port)

DF = None
TIMEOUT = 120


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT,
                          **kw)


def probes_under(root):
    """Paths of probe files anywhere under `root` (there must never be any after a run)."""
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.startswith(".diskferry-probe")]
    return out


class TestRemote:
    SERVER = None
    QUOTA = None

    @classmethod
    def setUpClass(cls):
        reason = cls.SERVER.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.dir = tempfile.mkdtemp(prefix="df-testremote-", dir="/var/tmp")
        cls.server = cls.SERVER()
        cls.server.start()
        cls.kh = os.path.join(cls.dir, "known_hosts")
        cls.server.write_known_hosts(cls.kh)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def tearDown(self):
        self.assertEqual(probes_under(self.server.root), [], "a probe file was left behind")

    def args(self, path, *extra, known_hosts=None, identity=None, url=None):
        return [DF, "test-remote", "--identity", identity or self.server.client_key,
                "--known-hosts", known_hosts or self.kh, *extra, url or self.server.url(path)]

    def tr(self, path="backups", *extra, **kw):
        return run(*self.args(path, *extra, **kw))

    def assert_failed(self, p, step, *words):
        out = p.stdout + p.stderr
        self.assertEqual(p.returncode, 1, out)
        self.assertRegex(p.stdout, rf"(?m)^{re.escape(step)}\b.* \.\.\. FAILED: ", out)
        self.assertRegex(p.stdout, rf"(?m)^verdict: FAILED at {re.escape(step)}", out)
        for w in words:
            self.assertIn(w, out)

    # -- success ---------------------------------------------------------------------------------
    def test_success_reports_every_step(self):
        p = self.tr("backups", "--probe-size", "8M")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(p.stderr, "")
        lines = p.stdout.splitlines()
        steps = [ln.split(" ... ")[0].split()[0] for ln in lines[:-1]]
        self.assertEqual(steps, ["connect", "host", "auth", "sftp", "limits", "channels",
                                 "directory", "write", "fsync", "close", "rename", "remove"],
                         p.stdout)
        out = p.stdout
        self.assertIn(f"connect 127.0.0.1:{self.server.port} ... ok", out)
        self.assertIn(self.server.host_key_fingerprint(), out)
        self.assertIn(f"known_hosts: {self.kh}", out)
        self.assertRegex(out, r"(?m)^auth publickey \.\.\. ok")
        self.assertRegex(out, r"(?m)^sftp subsystem \.\.\. ok \(version 3, extensions: .*"
                              r"posix-rename@openssh\.com")
        self.assertRegex(out, r"(?m)^directory /backups \.\.\. exists")
        self.assertRegex(out, r"(?m)^write probe \.diskferry-probe-\S+\.partial \(8\.0 MiB, "
                              r"pipelined\) \.\.\. ok \([0-9.]+ MB/s")
        self.assertRegex(out, r"(?m)^rename to \.diskferry-probe-\S+ \.\.\. ok \("
                              r"posix-rename@openssh\.com.*8388608 bytes")
        self.assertRegex(out, r"(?m)^remove \.diskferry-probe-\S+ \.\.\. ok$")
        self.assertRegex(lines[-1], r"^verdict: OK")
        self.assertIn(self.server.url("backups"), lines[-1])
        self.check_server_specifics(out)

    def check_server_specifics(self, out):
        pass

    def test_creates_missing_directories_and_says_so(self):
        p = self.tr("backups/a/b", "--probe-size", "1M")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("directory /backups/a/b ... created (created /backups/a, /backups/a/b", p.stdout)
        self.assertTrue(os.path.isdir(self.server.local_path("/backups/a/b")))
        p = self.tr("backups/a/b", "--probe-size", "0")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("directory /backups/a/b ... exists", p.stdout)
        self.assertIn("(empty: --probe-size 0) ... ok (created; throughput not measured)", p.stdout)

    def test_json(self):
        p = self.tr("backups", "--json", "--probe-size", "2M")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        j = json.loads(p.stdout)
        self.assertIs(j["ok"], True)
        self.assertTrue(j["verdict"].startswith("OK"))
        self.assertEqual(j["host_key"]["fingerprint"], self.server.host_key_fingerprint())
        self.assertIs(j["host_key"]["added"], False)
        self.assertEqual(j["sftp"]["version"], 3)
        self.assertIn("posix-rename@openssh.com", j["sftp"]["extensions"])
        self.assertEqual(j["directory"]["path"], "/backups")
        self.assertEqual(j["directory"]["created"], [])
        self.assertEqual(j["probe"]["bytes"], 2 * 1024 * 1024)
        self.assertGreater(j["probe"]["mb_per_s"], 0)
        self.assertIs(j["probe"]["removed"], True)
        self.assertEqual([s["status"] for s in j["steps"] if s["status"] == "failed"], [])
        self.assertEqual(j["channels"], 4)

    # -- host keys -------------------------------------------------------------------------------
    def test_unknown_host_key(self):
        empty = os.path.join(self.dir, "empty_known_hosts")
        open(empty, "w").close()
        p = self.tr("backups", known_hosts=empty)
        self.assert_failed(p, "host key", "unknown host key", self.server.host_key_fingerprint(),
                           "--accept-new-host-key")
        self.assertIn(f"connect 127.0.0.1:{self.server.port} ... ok", p.stdout)
        self.assertNotIn("auth", p.stdout)
        self.assertEqual(os.path.getsize(empty), 0)
        # accepted once, then known
        p = self.tr("backups", "--accept-new-host-key", "--probe-size", "0",
                             known_hosts=empty)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("now added to known_hosts", p.stdout)
        p = self.tr("backups", "--probe-size", "0", known_hosts=empty)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn(f"in known_hosts: {empty}", p.stdout)

    def test_changed_host_key(self):
        with open(self.kh) as f:
            name, ktype, _ = f.read().split()[:3]
        _, impostor = client_keypair(self.dir, ktype.replace("ssh-", ""), name="impostor")
        with open(impostor) as f:
            pub = f.read().split()
        other = os.path.join(self.dir, "changed_known_hosts")
        with open(other, "w") as f:
            f.write(f"{name} {pub[0]} {pub[1]}\n")
        p = self.tr("backups", known_hosts=other)
        self.assert_failed(p, "host key", "HOST KEY CHANGED", self.server.host_key_fingerprint())

    # -- auth ------------------------------------------------------------------------------------
    def test_wrong_client_key(self):
        priv, _ = client_keypair(self.dir, "ed25519", name="stranger")
        p = self.tr("backups", identity=priv)
        self.assert_failed(p, "auth", "authentication refused", priv, "authorized keys")

    def test_loose_private_key_is_a_usage_error(self):
        loose = os.path.join(self.dir, "loose_key")
        shutil.copy(self.server.client_key, loose)
        os.chmod(loose, 0o644)
        p = self.tr("backups", identity=loose)
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn("chmod 600", p.stderr)
        self.assertEqual(p.stdout, "")

    # -- the directory ---------------------------------------------------------------------------
    def test_read_only_directory(self):
        ro = self.server.local_path("/backups/readonly")
        os.makedirs(ro, exist_ok=True)
        os.chown(ro, 0, 0)
        os.chmod(ro, 0o755)
        p = self.tr("backups/readonly")
        self.assert_failed(p, "write", "permission denied", "/backups/readonly/",
                           "may not write in /backups/readonly")
        self.assertIn("directory /backups/readonly ... exists", p.stdout)
        self.assertEqual(os.listdir(ro), [])

    def test_read_only_parent_cannot_create(self):
        p = self.tr("newdir")   # in the root-owned chroot top directory
        self.assert_failed(p, "directory", "permission denied", "/newdir")
        self.assertFalse(os.path.exists(self.server.local_path("/newdir")))

    def test_home_relative_path(self):
        url = f"sftp://{self.server.user}@127.0.0.1:{self.server.port}/~/backups"
        p = self.tr(None, "--probe-size", "1M", url=url)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("directory backups ... exists (is /backups, ", p.stdout)

    def test_upload_url_instead_of_directory(self):
        p = self.tr("backups/vm.qcow2")
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn("looks like an image file name", p.stdout)
        self.assertFalse(os.path.exists(self.server.local_path("/backups/vm.qcow2")))

    def test_not_a_directory(self):
        with open(self.server.local_path("/backups/plainfile"), "w") as f:
            f.write("x")
        p = self.tr("backups/plainfile")
        self.assert_failed(p, "directory", "/backups/plainfile: exists and is not a directory")

    # -- the network -----------------------------------------------------------------------------
    def test_unreachable_port(self):
        port = free_port()
        url = f"sftp://{self.server.user}@127.0.0.1:{port}/backups"
        p = self.tr(url=url)
        self.assert_failed(p, "connect", f"127.0.0.1:{port}", "cannot connect",
                           "check the host name and port")
        p = self.tr("backups", "--json", url=url)
        self.assertEqual(p.returncode, 1)
        j = json.loads(p.stdout)
        self.assertIs(j["ok"], False)
        self.assertEqual(j["failed_step"], "connect")
        self.assertIn(f"127.0.0.1:{port}", j["error"])
        self.assertIn(f"127.0.0.1:{port}", p.stderr)

    def test_usage_errors(self):
        for extra, url, why in (([], "/tmp/x", "sftp://"), ([], "sftp://host", "no path"),
                                (["--probe-size", "lots"], None, "--probe-size"),
                                (["--streams", "0"], None, "--streams")):
            with self.subTest(extra=extra, url=url):
                p = self.tr("backups", *extra, url=url)
                self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
                self.assertIn(why, p.stderr)
                self.assertEqual(p.stdout, "")

    # -- cleanup after failures in the middle of the probe -----------------------------------------
    def start_slow_probe(self, *extra):
        """A test-remote writing a large probe; returns (process, output so far) once the
        write step has begun."""
        p = subprocess.Popen([str(a) for a in self.args("backups", "--probe-size", "8G", *extra)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = b""
        deadline = time.monotonic() + 30
        while b"write probe" not in out and time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 1)
            if r:
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        self.assertIn(b"write probe", out, out)
        time.sleep(0.5)   # some data on the way
        return p, out

    def finish(self, p, out):
        rest, err = p.communicate(timeout=TIMEOUT)
        return (out + rest).decode(errors="replace"), err.decode(errors="replace")

    def test_interrupt_removes_probe(self):
        p, out = self.start_slow_probe()
        p.send_signal(signal.SIGINT)
        out, err = self.finish(p, out)
        self.assertEqual(p.returncode, 130, out + err)
        self.assertRegex(out, r"(?m)^write probe .* FAILED: interrupted by signal 2")
        self.assertRegex(out, r"(?m)^cleanup \.\.\. ok \(removed /backups/\.diskferry-probe-")

    def test_dropped_connection_removes_probe(self):
        p, out = self.start_slow_probe("--stall-timeout", "5")
        self.server.kill_sessions()
        out, err = self.finish(p, out)
        self.assertEqual(p.returncode, 1, out + err)
        self.assertRegex(out, r"(?m)^write probe .* FAILED: ")
        self.assertRegex(out, r"(?m)^cleanup \.\.\. ok")
        self.assertRegex(out, r"(?m)^verdict: FAILED at write: the connection dropped")


class OpenSSH(TestRemote, unittest.TestCase):
    SERVER = OpenSSHServer

    def check_server_specifics(self, out):
        self.assertRegex(out, r"\(dfuser@127\.0\.0\.1:\d+, OpenSSH_\S+")
        self.assertIn("limits ... ok (max write 261120", out)
        self.assertRegex(out, r"directory /backups \.\.\. exists \(free space [0-9.]+ \S+ "
                              r"\(statvfs\)\)")
        self.assertIn("fsync ... ok (fsync@openssh.com", out)
        self.assertNotIn("warning", out)


    def test_too_few_sessions_for_streams(self):
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d, \
                OpenSSHServer(extra_config={"MaxSessions": 2}) as srv:
            kh = srv.write_known_hosts(os.path.join(d, "kh"))
            args = [DF, "test-remote", "--identity", srv.client_key, "--known-hosts", kh]
            p = run(*args, "--probe-size", "1M", srv.url("backups"))
            # Uploads use the channels the server grants: a warning, not a failure.
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertRegex(p.stdout, r"(?m)^channels \.\.\. ok \(2 SFTP channels")
            self.assertIn("the server allows only 2 SFTP channels per connection (OpenSSH: "
                          "MaxSessions); uploads use 2 instead of --streams 4", p.stdout)
            p = run(*args, "--streams", "2", "--probe-size", "1M", srv.url("backups"))
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertEqual(probes_under(srv.root), [])


class ProFTPD(TestRemote, unittest.TestCase):
    SERVER = ProFTPDServer

    def check_server_specifics(self, out):
        self.assertIn("mod_sftp", out)
        self.assertIn("limits ... not offered (no limits@openssh.com; writes of 32.0 KiB", out)
        self.assertIn("fsync ... ok (fsync@openssh.com", out)


class Rclone(TestRemote, unittest.TestCase):
    SERVER = RcloneServer

    def check_server_specifics(self, out):
        self.assertIn("uploads to rclone use 1", out)
        self.assertIn("statvfs@openssh.com offered but failing", out)
        self.assertIn("fsync ... not offered", out)
        self.assertRegex(out, r"(?m)^verdict: OK with 2 warnings")


class FullDisk:
    """A 4 MiB quota: the 32 MiB probe cannot fit. Where statvfs works that is said before
    anything is written; rclone finds out while writing (or at close) and the partial probe is
    removed."""
    SERVER = None

    def test_full_disk(self):
        reason = self.SERVER.unavailable_reason()
        if reason:
            self.skipTest(reason)
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d, \
                self.SERVER(chroot_quota_mb=4) as srv:
            kh = srv.write_known_hosts(os.path.join(d, "kh"))
            p = run(DF, "test-remote", "--identity", srv.client_key, "--known-hosts", kh,
                    srv.url("backups"))
            out = p.stdout + p.stderr
            self.assertEqual(p.returncode, 1, out)
            self.assertRegex(p.stdout, r"(?m)^write probe .* FAILED: |^close \.\.\. FAILED: ", out)
            if self.SERVER is RcloneServer:
                self.assertIn("full disk or quota", out)
            else:
                self.assertIn("not fit", out)
            self.assertEqual(probes_under(srv.root), [], out)


class FullDiskOpenSSH(FullDisk, unittest.TestCase):
    SERVER = OpenSSHServer


class FullDiskProFTPD(FullDisk, unittest.TestCase):
    SERVER = ProFTPDServer


class FullDiskRclone(FullDisk, unittest.TestCase):
    SERVER = RcloneServer


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
