#!/usr/bin/env python3
"""Uploads that meet real trouble: connections cut or stalled by tests/integration/tcp_proxy.py,
a partial file tampered with between attempts, a pipe source that cannot be read again, a full
or read-only remote directory. Judged by the sha256 of the file on the server against a local
conversion of the same source (the output is deterministic), the .sha256 sidecar, and what is
left in the directory.

Run: test_sftp_resume.py PATH/TO/diskferry
"""
import hashlib
import json
import os
import pwd
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import OpenSSHServer, ProFTPDServer, RcloneServer  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

DF = None
MiB = 1024 * 1024
TMP = None
SRC = None  # 48 MiB image: random MiB runs and zero MiB runs (holes in qcow2, zeros in raw)


def setUpModule():
    global TMP, SRC
    TMP = tempfile.mkdtemp(prefix="df-resume-", dir="/var/tmp")
    SRC = os.path.join(TMP, "src.img")
    r = random.Random(11)
    with open(SRC, "wb") as f:
        for i in range(48):
            f.write(r.randbytes(MiB) if i % 4 else bytes(MiB))


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


_local = {}


def local_sha(*args):
    """sha256 of `diskferry convert SRC ARGS -o FILE`: what every upload must reproduce."""
    if args not in _local:
        out = os.path.join(TMP, "local.out")
        subprocess.run([DF, "convert", SRC, *args, "--no-progress", "-o", out], check=True)
        _local[args] = sha256_file(out)
        os.unlink(out)
    return _local[args]


class Upload:
    """One server (and optionally a proxy in front of it) per test class."""
    SERVER = OpenSSHServer
    SERVER_ARGS = {}

    @classmethod
    def setUpClass(cls):
        reason = cls.SERVER.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.server = cls.SERVER(**cls.SERVER_ARGS)
        cls.server.start()
        cls.dir = tempfile.mkdtemp(prefix="df-resume-kh-", dir=TMP)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.proxy = None
        for name in os.listdir(self.server.backups):
            p = os.path.join(self.server.backups, name)
            if os.path.isfile(p):
                os.unlink(p)

    def tearDown(self):
        if self.proxy:
            self.proxy.close()

    def through_proxy(self, **kw):
        self.proxy = TcpProxy(("127.0.0.1", self.server.port), **kw)
        self.proxy.start()
        return self.proxy.port

    def cmd(self, name, *args, port=None, source=None):
        port = port or self.server.port
        kh = os.path.join(self.dir, f"kh-{port}")
        self.server.write_known_hosts(kh, port=port)
        url = f"sftp://{self.server.user}@127.0.0.1:{port}/backups/{name}"
        return [DF, "convert", source or SRC, *args, "--identity", self.server.client_key,
                "--known-hosts", kh, "--no-progress", "--retry-delay", "0.2", "-o", url]

    def run_df(self, *a, input=None, **kw):
        return subprocess.run(self.cmd(*a, **kw), capture_output=True, text=True, timeout=240,
                              stdin=input)

    def listing(self):
        return sorted(os.listdir(self.server.backups))

    def assert_published(self, name, fmt_args, p):
        self.assertEqual(p.returncode, 0, p.stderr)
        path = os.path.join(self.server.backups, name)
        want = local_sha(*fmt_args)
        self.assertEqual(sha256_file(path), want, "remote file differs from a local conversion")
        with open(path + ".sha256") as f:
            self.assertEqual(f.read(), f"{want}  {name}\n")
        # sha256sum -c works in that directory, as a user would run it there.
        c = subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=self.server.backups,
                           capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        self.assertEqual(self.listing(), [name, name + ".sha256"])


class CutsOpenSSH(Upload, unittest.TestCase):
    def cut_and_resume(self, name, fmt_args, cut_bytes, cuts=2):
        port = self.through_proxy(cut_up=cut_bytes, cut_first=cuts)
        p = self.run_df(name, *fmt_args, port=port)
        self.assert_published(name, fmt_args, p)
        retries = [l for l in p.stderr.splitlines() if "retrying in" in l]
        self.assertEqual(len(retries), cuts, p.stderr)
        for line in retries:
            self.assertIn("resuming at", line)
        self.assertEqual(len(self.proxy.connections), cuts + 1)
        return p

    def test_qcow2_cut_twice(self):
        self.cut_and_resume("a.qcow2", ("-O", "qcow2"), 12 * MiB)

    def test_vhdx_cut_early_and_late(self):
        # The first cut lands during the first MiBs (headers), later ones deep in the data.
        for i, cut in enumerate((300_000, 30 * MiB)):
            with self.subTest(cut=cut):
                if self.proxy:
                    self.proxy.close()
                self.setUp()
                self.cut_and_resume(f"b{i}.vhdx", ("-O", "vhdx"), cut, cuts=1)

    def test_raw_zstd_random_cuts(self):
        r = random.Random(5)
        for cut in sorted(r.randrange(1 * MiB, 20 * MiB) for _ in range(3)):
            with self.subTest(cut=cut):
                if self.proxy:
                    self.proxy.close()
                self.setUp()
                self.cut_and_resume("c.raw.zst", ("-O", "raw", "--compress", "zstd"), cut,
                                    cuts=1)

    def test_resend_is_bounded_by_what_was_in_flight(self):
        # 4 streams x 4 MiB in flight: a cut costs at most that (plus one request) again.
        port = self.through_proxy(cut_up=24 * MiB, cut_first=1)
        p = self.run_df("d.qcow2", "-O", "qcow2", port=port)
        self.assert_published("d.qcow2", ("-O", "qcow2"), p)
        up = [c.bytes_up for c in self.proxy.connections]
        image = os.path.getsize(os.path.join(self.server.backups, "d.qcow2"))
        resent = sum(up) - image
        self.assertLess(resent, 17 * MiB + 2 * MiB, f"bytes up per connection {up}")

    def test_stall_counts_as_a_drop(self):
        port = self.through_proxy(stall_up=10 * MiB, stall_seconds=30, stall_first=1)
        t = time.monotonic()
        p = self.run_df("e.qcow2", "-O", "qcow2", "--stall-timeout", "2", port=port)
        self.assert_published("e.qcow2", ("-O", "qcow2"), p)
        self.assertIn("stalled", p.stderr)
        self.assertLess(time.monotonic() - t, 25, "the stall was waited out, not detected")

    def test_tampered_partial_is_detected_and_upload_starts_over(self):
        port = self.through_proxy(cut_up=20 * MiB, cut_first=1)
        cmd = self.cmd("f.qcow2", "-O", "qcow2", port=port)
        cmd[cmd.index("--retry-delay") + 1] = "2"
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        err = []
        line = proc.stderr.readline()
        err.append(line)
        self.assertIn("retrying in", line)
        # While diskferry waits to reconnect, somebody rewrites the partial file's bytes.
        partial = os.path.join(self.server.backups, "f.qcow2.partial")
        size = os.path.getsize(partial)
        with open(partial, "r+b") as f:
            f.write(b"\xff" * size)
        err.append(proc.stderr.read())
        proc.wait(timeout=120)
        p = subprocess.CompletedProcess(cmd, proc.returncode, "", "".join(err))
        self.assert_published("f.qcow2", ("-O", "qcow2"), p)
        self.assertIn("differs from the regenerated data", p.stderr)

    def test_pipe_source_cannot_resume(self):
        port = self.through_proxy(cut_up=6 * MiB, cut_first=1)
        with open(SRC, "rb") as f:
            p = self.run_df("g.qcow2", "-O", "qcow2", port=port, source="-", input=f)
        self.assertEqual(p.returncode, 1, p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("cannot resume", lines[0])
        self.assertIn("stdin", lines[0])
        self.assertNotIn("g.qcow2", self.listing())

    def test_gives_up_after_retries_and_cleans_up(self):
        port = self.through_proxy(cut_up=8 * MiB)  # every connection is cut
        p = self.run_df("h.qcow2", "-O", "qcow2", "--retries", "2", port=port)
        self.assertEqual(p.returncode, 1, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        self.assertIn("gave up after 3 attempts", last)
        self.assertTrue(last.startswith("diskferry: "))
        # The cleanup connection gets through before its 8 MiB are used up.
        self.assertEqual(self.listing(), [])

    def test_unreachable_is_retried_then_reported(self):
        port = self.through_proxy()
        self.proxy.refuse = True
        t = time.monotonic()
        p = self.run_df("i.qcow2", "-O", "qcow2", "--retries", "2", port=port)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("gave up after 3 attempts", p.stderr)
        self.assertEqual(p.stderr.count("retrying in"), 2, p.stderr)
        self.assertLess(time.monotonic() - t, 30)


class HostName(Upload, unittest.TestCase):
    def test_unresolvable_host_is_refused_at_once(self):
        cmd = self.cmd("j.qcow2", "-O", "qcow2", "--retries", "5")
        cmd[-1] = "sftp://nosuch.invalid/backups/j.qcow2"  # no user: the local one
        t = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("cannot resolve host name 'nosuch.invalid'", lines[0])
        me = pwd.getpwuid(os.getuid()).pw_name
        self.assertTrue(lines[0].startswith(f"diskferry: {me}@nosuch.invalid:22: "), lines[0])
        self.assertLess(time.monotonic() - t, 5)


class CutsProFTPD(Upload, unittest.TestCase):
    SERVER = ProFTPDServer

    def test_qcow2_cut_twice(self):
        port = self.through_proxy(cut_up=12 * MiB, cut_first=2)
        p = self.run_df("a.qcow2", "-O", "qcow2", port=port)
        self.assert_published("a.qcow2", ("-O", "qcow2"), p)
        self.assertEqual(p.stderr.count("resuming at"), 2)


class CutsRclone(Upload, unittest.TestCase):
    """rclone cannot reopen a partial file without truncating it: a cut restarts from byte 0."""
    SERVER = RcloneServer

    def test_qcow2_cut_restarts_and_completes(self):
        port = self.through_proxy(cut_up=12 * MiB, cut_first=1)
        p = self.run_df("a.qcow2", "-O", "qcow2", port=port)
        self.assert_published("a.qcow2", ("-O", "qcow2"), p)

    def test_vhdx_zstd_uncut(self):
        p = self.run_df("b.vhdx.zst", "-O", "vhdx", "--compress", "zstd")
        self.assert_published("b.vhdx.zst", ("-O", "vhdx", "--compress", "zstd"), p)


def dead_pid():
    """A pid that ran on this machine and is gone."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def lock_text(host, machine, pid, token="0123456789abcdef", since=None):
    since = int(time.time()) - 3600 if since is None else since
    return (f"diskferry upload lock\nhost {host}\nmachine {machine}\npid {pid}\nstart 1\n"
            f"since {since}\ntoken {token}\n")


def machine_id():
    with open("/etc/machine-id") as f:
        return f.read().strip()


class TwoRuns(Upload):
    """Two runs aimed at one NAME: the second refuses while the first holds NAME.lock, and what
    is published is the first one's, sidecar included."""

    def put(self, name, data):
        """A file in the upload directory as the server's user wrote it."""
        path = os.path.join(self.server.backups, name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chown(path, self.server.uid, self.server.gid)
        return path

    EXCLUSIVE_CREATE = True

    def test_exclusive_create_of_an_existing_file(self):
        # What NAME.lock rests on: OPEN with CREAT|EXCL fails when the file is there (where it
        # does not, diskferry writes the lock, waits and reads it back).
        self.put("x.lock", "held")
        kh = os.path.join(self.dir, "kh-probe")
        self.server.write_known_hosts(kh)
        p = subprocess.Popen(
            ["ssh", "-F", "/dev/null", "-p", str(self.server.port), "-i", self.server.client_key,
             "-o", f"UserKnownHostsFile={kh}", "-o", "BatchMode=yes", "-s",
             f"{self.server.user}@127.0.0.1", "sftp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def packet(body):
            p.stdin.write(struct.pack(">I", len(body)) + body)
            p.stdin.flush()
            n = struct.unpack(">I", p.stdout.read(4))[0]
            return p.stdout.read(n)

        try:
            self.assertEqual(packet(struct.pack(">BI", 1, 3))[0], 2)  # INIT -> VERSION
            results = {}
            for name in ("x.lock", "new.lock"):
                path = f"/backups/{name}".encode()
                # OPEN id 7, WRITE|CREAT|EXCL, no attributes
                reply = packet(struct.pack(">BII", 3, 7, len(path)) + path +
                               struct.pack(">II", 0x02 | 0x08 | 0x20, 0))
                results[name] = reply[0]
        finally:
            p.stdin.close()
            p.wait(timeout=20)
            p.stdout.close()
            p.stderr.close()
        # STATUS (refused) or HANDLE
        self.assertEqual(results, {"x.lock": 101 if self.EXCLUSIVE_CREATE else 102,
                                   "new.lock": 102})
        with open(os.path.join(self.server.backups, "x.lock")) as f:
            self.assertEqual(f.read(), "held" if self.EXCLUSIVE_CREATE else "")

    def test_concurrent_runs_one_refuses_and_the_published_file_is_the_winners(self):
        other = os.path.join(TMP, "other.img")
        with open(other, "wb") as f:
            f.write(random.Random(12).randbytes(20 * MiB))
        name = "lc.raw"
        first = subprocess.Popen(self.cmd(name, "-O", "raw", "--bwlimit", "16M"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        partial = os.path.join(self.server.backups, name + ".partial")
        deadline = time.monotonic() + 30
        while not os.path.exists(partial) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = self.run_df(name, "-O", "raw", source=other)
        out, err = first.communicate(timeout=120)
        codes = sorted([first.returncode, second.returncode])
        self.assertEqual(codes, [0, 1], f"first: {err}\nsecond: {second.stderr}")
        self.assertEqual(first.returncode, 0, err)
        lines = second.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, second.stderr)
        self.assertIn("another diskferry run is writing it", lines[0])
        self.assertIn(f"pid {first.pid} on this host", lines[0])
        self.assertIn(f"/backups/{name}.lock", lines[0])
        self.assert_published(name, ("-O", "raw"), subprocess.CompletedProcess([], 0, out, err))

    def test_runs_started_together_one_refuses(self):
        other = os.path.join(TMP, "other.img")
        with open(other, "wb") as f:
            f.write(random.Random(12).randbytes(20 * MiB))
        name = "tg.raw"
        runs = [subprocess.Popen(self.cmd(name, "-O", "raw", "--bwlimit", "16M", source=src),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for src in (SRC, other)]
        outs = [r.communicate(timeout=120) for r in runs]
        codes = [r.returncode for r in runs]
        self.assertEqual(sorted(codes), [0, 1], outs)
        winner = codes.index(0)
        self.assertIn("another diskferry run is writing it", outs[1 - winner][1])
        published = os.path.join(self.server.backups, name)
        with open(published, "rb") as f:
            data = f.read()
        with open((SRC, other)[winner], "rb") as f:
            self.assertTrue(data == f.read(), "the published file is not the exit-0 run's")
        c = subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=self.server.backups,
                           capture_output=True, text=True)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        self.assertEqual(self.listing(), [name, name + ".sha256"])

    def test_stale_lock_of_a_dead_process_here_is_taken_over(self):
        name = "st.qcow2"
        self.put(name + ".lock", lock_text(socket.gethostname(), machine_id(), dead_pid()))
        self.put(name + ".partial", b"\xee" * MiB)  # the dead run's bytes: never published
        p = self.run_df(name, "-O", "qcow2")
        self.assert_published(name, ("-O", "qcow2"), p)
        self.assertIn("took over the lock of an earlier run that is gone", p.stderr)

    def test_lock_of_another_host_is_refused_with_how_to_clear_it(self):
        name = "oh.qcow2"
        text = lock_text("otherbox", "f" * 32, 4242)
        lock = self.put(name + ".lock", text)
        p = self.run_df(name, "-O", "qcow2")
        self.assertEqual(p.returncode, 1, p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("pid 4242 on host otherbox, for 60 min", lines[0])
        self.assertIn(f"if that run is gone, remove /backups/{name}.lock on the server",
                      lines[0])
        self.assertEqual(self.listing(), [name + ".lock"])
        with open(lock) as f:
            self.assertEqual(f.read(), text)


class TwoRunsOpenSSH(TwoRuns, unittest.TestCase):
    pass


class TwoRunsProFTPD(TwoRuns, unittest.TestCase):
    SERVER = ProFTPDServer


class TwoRunsRclone(TwoRuns, unittest.TestCase):
    SERVER = RcloneServer
    EXCLUSIVE_CREATE = False  # rclone 1.60 opens the existing file, and truncates it


class FullRemote(Upload, unittest.TestCase):
    """A 24 MiB filesystem as the upload directory; the image needs ~36 MiB."""
    SERVER_ARGS = {"chroot_quota_mb": 24}

    def test_known_size_is_refused_before_uploading(self):
        p = self.run_df("a.qcow2", "-O", "qcow2")
        self.assertEqual(p.returncode, 1, p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("not enough space on the server", lines[0])
        m = subprocess.run([DF, "measure", SRC, "-O", "qcow2", "--json"], capture_output=True,
                           text=True, check=True)
        need = json.loads(m.stdout)["size"]
        self.assertIn(f"the image needs {need / MiB:.1f} MiB more", lines[0])
        self.assertEqual(self.listing(), [])

    def test_raw_and_asis_of_known_size_are_refused_before_uploading(self):
        for args in (("-O", "raw"), ("-O", "asis")):
            with self.subTest(args=args):
                port = self.through_proxy()
                p = self.run_df("r.img", *args, port=port)
                sent = sum(c.bytes_up for c in self.proxy.connections)
                self.proxy.close()
                self.proxy = None
                self.assertEqual(p.returncode, 1, p.stderr)
                lines = p.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, p.stderr)
                self.assertIn("not enough space on the server: the image needs 48.0 MiB more",
                              lines[0])
                self.assertLess(sent, MiB)
                self.assertEqual([n for n in self.listing() if n != "lost+found"], [])

    FULL_SAYS_FREE = True  # statvfs@openssh.com answers

    def test_unknown_size_fails_when_full_and_leaves_nothing(self):
        # Outer compression hides the size, so the server's "failure" is what tells. The
        # uncompressed size is a bound: above the free space, a warning before sending.
        p = self.run_df("b.raw.gz", "-O", "raw", "--compress", "gzip:1")
        self.assertEqual(p.returncode, 1, p.stderr)
        warnings = [l for l in p.stderr.splitlines() if l.startswith("diskferry: warning: ")]
        lines = [l for l in p.stderr.strip().splitlines() if l not in warnings]
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("b.raw.gz.partial", lines[0])
        self.assertIn("failure", lines[0])
        self.assertRegex(lines[0], r"the remote is probably full \([\d.]+ [KM]?i?B free there\)$"
                         if self.FULL_SAYS_FREE else r"the remote is probably full$")
        if self.FULL_SAYS_FREE:
            self.assertEqual(len(warnings), 1, p.stderr)
            self.assertIn("the server may not hold it", warnings[0])
            self.assertIn("the image is 48.0 MiB before compression", warnings[0])
        self.assertEqual([n for n in self.listing() if n != "lost+found"], [])


class FullRemoteProFTPD(FullRemote):
    SERVER = ProFTPDServer


class FullRemoteRclone(Upload, unittest.TestCase):
    # No statvfs answer: neither a preflight nor the free space, but the same words.
    SERVER = RcloneServer
    SERVER_ARGS = {"chroot_quota_mb": 24}
    FULL_SAYS_FREE = False
    test_unknown_size_fails_when_full_and_leaves_nothing = \
        FullRemote.test_unknown_size_fails_when_full_and_leaves_nothing


class DestinationIsADirectory(Upload, unittest.TestCase):
    def test_refused_before_sending(self):
        d = os.path.join(self.server.backups, "d.qcow2")
        os.mkdir(d)
        os.chown(d, self.server.uid, self.server.gid)
        try:
            port = self.through_proxy()
            p = self.run_df("d.qcow2", "-O", "qcow2", port=port)
            self.assertEqual(p.returncode, 2, p.stderr)
            lines = p.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, p.stderr)
            self.assertIn("/backups/d.qcow2: is a directory on the server; name a file", lines[0])
            self.assertLess(sum(c.bytes_up for c in self.proxy.connections), MiB)
            self.assertEqual(self.listing(), ["d.qcow2"])
            self.assertEqual(os.listdir(d), [])
        finally:
            shutil.rmtree(d)


class ReadOnlyDirectory(Upload, unittest.TestCase):
    def test_permission_denied_names_the_file(self):
        ro = os.path.join(self.server.root, "readonly")
        os.makedirs(ro, exist_ok=True)
        os.chmod(ro, 0o755)  # root-owned: the SFTP user cannot create files in it
        kh = os.path.join(self.dir, "kh-ro")
        self.server.write_known_hosts(kh)
        p = subprocess.run([DF, "convert", SRC, "-O", "qcow2", "--identity",
                            self.server.client_key, "--known-hosts", kh, "--no-progress",
                            "-o", self.server.url("readonly/x.qcow2")],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("/readonly/x.qcow2.partial", lines[0])
        self.assertIn("permission denied", lines[0])
        self.assertEqual(os.listdir(ro), [])


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
