#!/usr/bin/env python3
"""Tests of the test infrastructure itself: the SFTP servers in sftp_servers.py (OpenSSH,
ProFTPD mod_sftp, rclone) and the fault-injecting proxy in tcp_proxy.py, driven with OpenSSH's
`sftp -b` client.  Each server's tests skip with the reason when it cannot run here.

Run: python3 tests/integration/test_test_servers.py [-v]     (as root for OpenSSH/ProFTPD)
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sftp_servers as S  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

KiB, MiB = 1024, 1024 * 1024


def _tmpdir(testcase_cls):
    d = tempfile.mkdtemp(prefix="df-srvtest-")
    testcase_cls.addClassCleanup(shutil.rmtree, d, True)
    return d


class _ServerTests:
    """Shared checks; subclasses set server_cls."""

    server_cls = None

    @classmethod
    def setUpClass(cls):
        reason = cls.server_cls.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.tmp = _tmpdir(cls)
        cls.srv = cls.server_cls()
        cls.addClassCleanup(cls.srv.stop)
        cls.srv.start()
        cls.kh = cls.srv.write_known_hosts(os.path.join(cls.tmp, "known_hosts"))

    def sftp(self, commands, **kw):
        kw.setdefault("known_hosts", self.kh)
        return S.sftp_batch(self.srv, commands, **kw)

    def test_attributes(self):
        s = self.srv
        self.assertEqual(s.host, "127.0.0.1")
        self.assertEqual(s.url("backups/a.qcow2"),
                         f"sftp://{s.user}@127.0.0.1:{s.port}/backups/a.qcow2")
        self.assertEqual(s.known_hosts_line().split()[0], f"[127.0.0.1]:{s.port}")
        self.assertEqual(os.stat(s.client_key).st_mode & 0o777, 0o600)
        self.assertTrue(os.path.isdir(os.path.join(s.root, "backups")))
        fp = subprocess.run(["ssh-keygen", "-lf", s.host_key + ".pub"], capture_output=True,
                            text=True, check=True).stdout.split()[1]
        self.assertEqual(s.host_key_fingerprint(), fp)

    def test_upload_and_read_back(self):
        data = os.urandom(300 * KiB + 7)
        src = os.path.join(self.tmp, f"up-{self.srv.kind}.bin")
        with open(src, "wb") as f:
            f.write(data)
        self.sftp([f"put {src} backups/up.bin", "ls -l backups"], check=True)
        local = self.srv.local_path("/backups/up.bin")
        with open(local, "rb") as f:
            self.assertEqual(f.read(), data)
        if S.IS_ROOT:
            self.assertEqual(os.stat(local).st_uid, S.pwd.getpwnam(self.srv.user).pw_uid)
        # and the other way: a file placed locally is downloadable
        with open(os.path.join(self.srv.backups, "local.bin"), "wb") as f:
            f.write(data[:1000])
        dst = os.path.join(self.tmp, f"down-{self.srv.kind}.bin")
        self.sftp([f"get backups/local.bin {dst}"], check=True)
        with open(dst, "rb") as f:
            self.assertEqual(f.read(), data[:1000])

    @unittest.skipUnless(S.IS_ROOT, "root-owned chroot root needs root")
    def test_chroot_root_not_writable(self):
        src = os.path.join(self.tmp, "small")
        with open(src, "wb") as f:
            f.write(b"x" * 100)
        p = self.sftp([f"put {src} /outside.bin"])
        self.assertNotEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.srv.root, "outside.bin")))
        # rclone (VFS cache mode off) opens lazily: the error shows at close, as "failure"
        self.assertRegex((p.stdout + p.stderr).lower(),
                         "failure" if self.srv.kind == "rclone" else "denied")

    def test_unknown_host_key_refused(self):
        empty = os.path.join(self.tmp, "empty_known_hosts")
        open(empty, "w").close()
        p = self.sftp(["pwd"], known_hosts=empty)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Host key verification failed", p.stderr)

    def test_sftp_version_and_extensions(self):
        info = S.probe_server_info(self.srv)
        self.assertEqual(info["version"], 3)
        self.assertIn("posix-rename@openssh.com", info["extensions"])


class OpenSSHTests(_ServerTests, unittest.TestCase):
    server_cls = S.OpenSSHServer

    def test_chroot_listing(self):
        p = self.sftp(["ls -1 /"], check=True)
        self.assertEqual([ln.strip() for ln in p.stdout.splitlines()[1:]], ["/backups"])

    def test_limits(self):
        info = S.probe_server_info(self.srv)
        self.assertEqual(info["limits"]["max_write_length"], 261120)

    def test_host_key_changed(self):
        with S.OpenSSHServer(client_key=self.srv.client_key) as srv:
            old = srv.write_known_hosts(os.path.join(self.tmp, "kh_old"))
            S.sftp_batch(srv, ["pwd"], known_hosts=old, check=True)
            old_fp, port = srv.host_key_fingerprint(), srv.port
            line = srv.restart_with_new_host_key()
            self.assertEqual(srv.port, port)
            self.assertNotEqual(srv.host_key_fingerprint(), old_fp)
            p = S.sftp_batch(srv, ["pwd"], known_hosts=old)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("REMOTE HOST IDENTIFICATION HAS CHANGED", p.stderr)
            new = S.write_known_hosts(os.path.join(self.tmp, "kh_new"), line)
            S.sftp_batch(srv, ["pwd"], known_hosts=new, check=True)
            srv.restart_with_new_host_key("rsa")
            self.assertTrue(srv.known_hosts_line().split()[1] == "ssh-rsa")
            S.sftp_batch(srv, ["pwd"], check=True)

    @unittest.skipUnless(S.IS_ROOT and shutil.which("mkfs.ext4"), "needs root and e2fsprogs")
    def test_disk_full(self):
        with S.OpenSSHServer(chroot_quota_mb=4, client_key=self.srv.client_key) as srv:
            self.assertTrue(os.path.ismount(srv.backups))
            big = os.path.join(self.tmp, "big")
            with open(big, "wb") as f:
                f.write(os.urandom(6 * MiB))
            p = S.sftp_batch(srv, [f"put {big} backups/big"])
            self.assertNotEqual(p.returncode, 0)
            self.assertRegex(p.stdout + p.stderr, r"(?i)failure|no space|quota")
            st = os.statvfs(srv.backups)
            self.assertLess(st.f_bavail * st.f_frsize, 64 * KiB)
            mount = srv.backups
        self.assertFalse(os.path.ismount(mount))
        self.assertFalse(os.path.exists(mount))

    def test_kill_sessions(self):
        # a running session is killed, the listener survives
        p = subprocess.Popen(S.sftp_command(self.srv, known_hosts=self.kh), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            p.stdin.write("pwd\n")
            p.stdin.flush()
            self.assertIn("Remote working directory", p.stdout.readline() + p.stdout.readline())
            self.srv.kill_sessions()
            p.stdin.write("ls backups\n")   # (pwd would answer from the client's cache)
            p.stdin.flush()
            p.stdin.close()
            self.assertNotEqual(p.wait(timeout=20), 0)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        self.sftp(["pwd"], check=True)


class ProFTPDTests(_ServerTests, unittest.TestCase):
    server_cls = S.ProFTPDServer


class RcloneTests(_ServerTests, unittest.TestCase):
    server_cls = S.RcloneServer


class _EchoServer:
    """Tiny TCP server: echoes what it gets (for proxy tests without SSH)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.echo, args=(c,), daemon=True).start()

    @staticmethod
    def echo(c):
        with c:
            c.settimeout(30)
            try:
                while d := c.recv(65536):
                    c.sendall(d)
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def _roundtrip(port, payload=b"ping"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(65536)
        return time.monotonic() - t, got


class ProxyRawTests(unittest.TestCase):
    """The proxy against a plain echo server (fast, no SSH)."""

    @classmethod
    def setUpClass(cls):
        cls.echo = _EchoServer()
        cls.addClassCleanup(cls.echo.close)

    def test_delay_is_rtt(self):
        with TcpProxy(("127.0.0.1", self.echo.port), delay_ms=15) as px:
            rtts = sorted(_roundtrip(px.port)[0] for _ in range(3))
            self.assertGreaterEqual(rtts[0], 0.029)
            self.assertLess(rtts[0], 0.2)
            px.delay_up_ms = 50     # live change
            self.assertGreaterEqual(_roundtrip(px.port)[0], 0.064)
            self.assertTrue(px.wait_idle())
            self.assertEqual(px.connections[0].bytes_up, 4)
            self.assertEqual(px.connections[0].bytes_down, 4)

    def test_delay_keeps_throughput(self):
        # 8 MiB echoed through 2 x 15 ms: a sleep-per-chunk proxy would need 128 chunks x 30 ms
        n = 8 * MiB
        with TcpProxy(("127.0.0.1", self.echo.port), delay_ms=15) as px:
            with socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
                t = time.monotonic()
                threading.Thread(target=s.sendall, args=(b"z" * n,), daemon=True).start()
                got = 0
                while got < n:
                    got += len(s.recv(1 << 20))
                took = time.monotonic() - t
        self.assertLess(took, 2.5, "delay must not throttle a window's worth of data")

    def test_cut_first_connection_only(self):
        with TcpProxy(("127.0.0.1", self.echo.port), cut_up=1000, cut_first=1) as px:
            with socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
                s.sendall(b"a" * 5000)
                # reset by the proxy (an RST also discards what the client had not read yet)
                with self.assertRaises(ConnectionResetError):
                    while s.recv(65536):
                        pass
            self.assertEqual(_roundtrip(px.port, b"b" * 5000)[1], b"b" * 5000)
            self.assertTrue(px.wait_idle())
            c0, c1 = px.connections
            self.assertEqual((c0.cut, c0.bytes_up), ("up", 1000))
            self.assertEqual((c1.cut, c1.bytes_up, c1.bytes_down), (None, 5000, 5000))

    def test_stall(self):
        with TcpProxy(("127.0.0.1", self.echo.port), stall_up=10, stall_seconds=0.6) as px:
            took, got = _roundtrip(px.port, b"x" * 20)
            self.assertEqual(got, b"x" * 20)
            self.assertGreaterEqual(took, 0.55)
            self.assertTrue(px.connections[0].stalled)

    def test_cli(self):
        p = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                           "tcp_proxy.py"),
                              "--listen", "0", "--target", f"127.0.0.1:{self.echo.port}",
                              "--delay-ms", "5"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            port = int(p.stdout.readline())
            took, got = _roundtrip(port, b"hello")
            self.assertEqual(got, b"hello")
            self.assertGreaterEqual(took, 0.009)
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=15)
        self.assertEqual(p.returncode, 0, err)
        stats = json.loads(err.splitlines()[-1])
        self.assertEqual((stats["bytes_up"], stats["bytes_down"]), (5, 5))


@unittest.skipIf(S.OpenSSHServer.unavailable_reason(), S.OpenSSHServer.unavailable_reason())
class ProxySftpTests(unittest.TestCase):
    """The proxy in front of the OpenSSH server, with `sftp` uploads."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = _tmpdir(cls)
        cls.srv = S.OpenSSHServer()
        cls.addClassCleanup(cls.srv.stop)
        cls.srv.start()
        cls.file_1m = os.path.join(cls.tmp, "1m")
        with open(cls.file_1m, "wb") as f:
            f.write(os.urandom(MiB))
        cls.file_2m = os.path.join(cls.tmp, "2m")
        with open(cls.file_2m, "wb") as f:
            f.write(os.urandom(2 * MiB))

    def put(self, src, name, port=None):
        t = time.monotonic()
        p = S.sftp_batch(self.srv, [f"put {src} backups/{name}"], port=port)
        return p, time.monotonic() - t

    def test_delay_slows_transfer(self):
        p, direct = self.put(self.file_1m, "direct")
        self.assertEqual(p.returncode, 0, p.stderr)
        with TcpProxy(("127.0.0.1", self.srv.port), delay_ms=15) as px:
            p, delayed = self.put(self.file_1m, "delayed", port=px.port)
        self.assertEqual(p.returncode, 0, p.stderr)
        # the SSH handshake alone is several round trips of 30 ms
        self.assertGreater(delayed, direct + 0.1, (direct, delayed))
        self.assertGreater(px.connections[0].bytes_up, MiB)
        with open(self.srv.local_path("backups/delayed"), "rb") as f, open(self.file_1m, "rb") as g:
            self.assertEqual(f.read(), g.read())

    def test_cut_makes_sftp_fail(self):
        with TcpProxy(("127.0.0.1", self.srv.port), cut_up=300 * KiB, cut_first=1) as px:
            p, _ = self.put(self.file_1m, "cut", port=px.port)
            self.assertNotEqual(p.returncode, 0)
            p2, _ = self.put(self.file_1m, "cut2", port=px.port)   # 2nd connection: not cut
            self.assertEqual(p2.returncode, 0, p2.stderr)
            self.assertTrue(px.wait_idle())
        c0 = px.connections[0]
        self.assertEqual((c0.cut, c0.bytes_up), ("up", 300 * KiB))
        self.assertIsNone(px.connections[1].cut)

    def test_rate_cap(self):
        with TcpProxy(("127.0.0.1", self.srv.port), rate=MiB) as px:
            p, took = self.put(self.file_2m, "capped", port=px.port)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertGreater(took, 1.6)
        self.assertLess(took, 4.0)

    def test_stall_then_continue(self):
        with TcpProxy(("127.0.0.1", self.srv.port), stall_up=200 * KiB, stall_seconds=1.0) as px:
            p, took = self.put(self.file_1m, "stalled", port=px.port)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertGreater(took, 1.0)
        self.assertTrue(px.connections[0].stalled)


if __name__ == "__main__":
    unittest.main()
