#!/usr/bin/env python3
"""`diskferry convert -o sftp://...` against real servers on 127.0.0.1 (OpenSSH internal-sftp
chroot, ProFTPD mod_sftp), judged by qemu-img on the server-side file.

Run: test_sftp.py PATH/TO/diskferry
"""
import contextlib
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import OpenSSHServer, ProFTPDServer, RcloneServer, client_keypair  # noqa: E402

DF = None
MiB = 1024 * 1024


def make_source(path):
    r = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(0)
        f.write(b"diskferry " * 300000)
        f.seek(40 * MiB + 5)
        f.write(r.randbytes(2 * MiB))


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


@contextlib.contextmanager
def ssh_agent(directory):
    """An ssh-agent of its own listening in `directory`; yields its socket path."""
    sock = os.path.join(directory, "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        yield sock
    finally:
        agent.terminate()
        agent.wait()


class SftpUpload:
    SERVER = None

    @classmethod
    def setUpClass(cls):
        reason = cls.SERVER.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.dir = tempfile.mkdtemp(prefix="df-sftp-", dir="/var/tmp")
        cls.src = os.path.join(cls.dir, "src.img")
        make_source(cls.src)
        cls.server = cls.SERVER()
        cls.server.start()
        cls.kh = os.path.join(cls.dir, "known_hosts")
        cls.server.write_known_hosts(cls.kh)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def convert(self, remote, *args, known_hosts=None, identity=None):
        return run(DF, "convert", self.src, *args, "--identity", identity or self.server.client_key,
                   "--known-hosts", known_hosts or self.kh, "--no-progress", "-o",
                   self.server.url(remote))

    def test_formats_round_trip(self):
        for fmt, extra in (("qcow2", []), ("qcow2", ["--qcow2-compression", "zlib"]),
                           ("vhdx", []), ("raw", [])):
            with self.subTest(fmt=fmt, extra=extra):
                remote = f"backups/vm/{fmt}.img"  # parent directory created on the way
                p = self.convert(remote, "-O", fmt, *extra)
                self.assertEqual(p.returncode, 0, p.stderr)
                out = self.server.local_path("/" + remote)
                self.assertFalse(os.path.exists(out + ".partial"))
                c = run("qemu-img", "compare", "-f", "raw", "-F", fmt, self.src, out)
                self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
                # Same bytes as a local conversion: the stream is deterministic.
                local = os.path.join(self.dir, "local." + fmt)
                self.assertEqual(run(DF, "convert", self.src, "-O", fmt, *extra, "-o",
                                     local).returncode, 0)
                self.assertEqual(run("cmp", local, out).returncode, 0)

    def test_outer_compression(self):
        remote = "backups/vm.qcow2.zst"
        p = self.convert(remote, "-O", "qcow2", "--compress", "zstd")
        self.assertEqual(p.returncode, 0, p.stderr)
        local = os.path.join(self.dir, "vm.qcow2.zst")
        run(DF, "convert", self.src, "-O", "qcow2", "--compress", "zstd", "-o", local)
        self.assertEqual(run("cmp", local, self.server.local_path("/" + remote)).returncode, 0)

    def assert_refused(self, p, *words):
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
        for w in words:
            self.assertIn(w, p.stderr)

    def test_unknown_host_key_refused(self):
        empty = os.path.join(self.dir, "empty_known_hosts")
        open(empty, "w").close()
        p = self.convert("backups/never.qcow2", "-O", "qcow2", known_hosts=empty)
        self.assert_refused(p, "unknown host key", self.server.host_key_fingerprint(),
                            "--accept-new-host-key")
        self.assertFalse(os.path.exists(self.server.local_path("/backups/never.qcow2.partial")))
        # accept-new records it, then a strict run succeeds.
        p = run(DF, "convert", self.src, "-O", "raw", "--identity", self.server.client_key,
                "--known-hosts", empty, "--accept-new-host-key", "-o",
                self.server.url("backups/accepted.raw"))
        self.assertEqual(p.returncode, 0, p.stderr)
        p = self.convert("backups/accepted2.raw", "-O", "raw", known_hosts=empty)
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_changed_host_key_refused(self):
        other = os.path.join(self.dir, "other_known_hosts")
        with open(self.kh) as f:
            line = f.read().split()
        # The server's name with some other key of a type it offers: what a MITM would present.
        _, impostor_pub = client_keypair(self.dir, line[1].replace("ssh-", ""), name="impostor")
        with open(impostor_pub) as f:
            pub = f.read().split()
        with open(other, "w") as f:
            f.write(f"{line[0]} {pub[0]} {pub[1]}\n")
        p = self.convert("backups/never2.qcow2", "-O", "qcow2", known_hosts=other)
        self.assert_refused(p, "HOST KEY CHANGED")

    def test_wrong_client_key_refused(self):
        priv, _ = client_keypair(self.dir, "ed25519", name="stranger")
        p = self.convert("backups/never3.qcow2", "-O", "qcow2", identity=priv)
        self.assert_refused(p, "authentication refused")

    def test_private_key_readable_by_others_refused(self):
        loose = os.path.join(self.dir, "loose_key")
        shutil.copy(self.server.client_key, loose)
        os.chmod(loose, 0o644)
        p = self.convert("backups/never4.qcow2", "-O", "qcow2", identity=loose)
        self.assert_refused(p, "chmod 600")

    def test_permission_denied_outside_writable_dir(self):
        p = self.convert("not-writable.qcow2", "-O", "qcow2")
        self.assert_refused(p, "permission denied")


class OpenSSH(SftpUpload, unittest.TestCase):
    SERVER = OpenSSHServer


class ProFTPD(SftpUpload, unittest.TestCase):
    SERVER = ProFTPDServer


class Rclone(SftpUpload, unittest.TestCase):
    SERVER = RcloneServer

    def test_permission_denied_outside_writable_dir(self):
        # rclone opens files lazily: its refusal comes with the first use, in its own words. That
        # is the lock's, which is written before NAME.partial.
        p = self.convert("not-writable.qcow2", "-O", "qcow2")
        self.assert_refused(p, "/not-writable.qcow2.lock: cannot open", "failed",
                            "taking the lock before writing /not-writable.qcow2.partial")
        self.assertFalse(os.path.exists(self.server.local_path("/not-writable.qcow2.partial")))
        self.assertFalse(os.path.exists(self.server.local_path("/not-writable.qcow2.lock")))


class ClientSide(unittest.TestCase):
    """Client options against one OpenSSH server: ~/.ssh/config aliases, ssh-agent, --bwlimit."""

    @classmethod
    def setUpClass(cls):
        reason = OpenSSHServer.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.dir = tempfile.mkdtemp(prefix="df-sftp-client-", dir="/var/tmp")
        cls.server = OpenSSHServer()
        cls.server.start()
        cls.kh = cls.server.write_known_hosts(os.path.join(cls.dir, "kh"))
        cls.src = os.path.join(cls.dir, "rand.img")
        with open(cls.src, "wb") as f:
            f.write(random.Random(3).randbytes(8 * MiB))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def remote(self, name):
        return self.server.local_path("/backups/" + name)

    def test_ssh_config_alias(self):
        # HostName, Port, User and IdentityFile all come from the alias.
        cfg = os.path.join(self.dir, "ssh_config")
        with open(cfg, "w") as f:
            f.write(f"Host backupbox\n  HostName 127.0.0.1\n  Port {self.server.port}\n"
                    f"  User {self.server.user}\n  IdentityFile {self.server.client_key}\n")
        home = tempfile.mkdtemp(dir=self.dir)   # no default keys, no agent
        env = {"PATH": os.environ["PATH"], "HOME": home}
        p = run(DF, "convert", self.src, "-O", "raw", "--ssh-config", cfg, "--known-hosts",
                self.kh, "--no-progress", "-o", "sftp://backupbox/backups/alias.raw", env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(run("cmp", self.src, self.remote("alias.raw")).returncode, 0)
        # Without the alias the name does not resolve: the error names the host.
        p = run(DF, "convert", self.src, "-O", "raw", "--ssh-config", "/dev/null",
                "--known-hosts", self.kh, "--no-progress", "--retries", "0", "-o",
                "sftp://backupbox/backups/alias2.raw", env=env)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("backupbox", p.stderr)
        self.assertIn("cannot connect", p.stderr)

    def test_ssh_agent_when_no_identity(self):
        home = tempfile.mkdtemp(dir=self.dir)
        with ssh_agent(home) as sock:
            env = {"PATH": os.environ["PATH"], "HOME": home, "SSH_AUTH_SOCK": sock}
            args = [DF, "convert", self.src, "-O", "raw", "--known-hosts", self.kh,
                    "--ssh-config", "/dev/null", "--no-progress", "--retries", "0", "-o"]
            # Empty agent, no key files: refused, and the message says where it looked.
            p = run(*args, self.server.url("backups/agent0.raw"), env=env)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("authentication refused for ssh-agent", p.stderr)
            self.assertIn("ssh-agent (0 keys)", p.stderr)
            add = run("ssh-add", self.server.client_key, env=env)
            self.assertEqual(add.returncode, 0, add.stderr)
            p = run(*args, self.server.url("backups/agent.raw"), env=env)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(run("cmp", self.src, self.remote("agent.raw")).returncode, 0)

    def alias_config(self, path, *identities):
        with open(path, "w") as f:
            f.write(f"Host backupbox\n  HostName 127.0.0.1\n  Port {self.server.port}\n"
                    f"  User {self.server.user}\n")
            f.writelines(f"  IdentityFile {i}\n" for i in identities)
        return path

    def test_home_is_the_password_databases(self):
        # ~/.ssh/config, known_hosts and the "~" in IdentityFile all come from the password
        # database's home, as for ssh, whatever HOME says. The test mounts a throwaway directory
        # over that home (in a private mount namespace) and points HOME somewhere empty.
        if not shutil.which("unshare") or run("unshare", "--mount", "true").returncode != 0:
            self.skipTest("needs unshare --mount")
        pw_home = pwd.getpwuid(os.getuid()).pw_dir
        fake = tempfile.mkdtemp(dir=self.dir)
        os.makedirs(os.path.join(fake, ".ssh"), mode=0o700)
        shutil.copy(self.server.client_key, os.path.join(fake, ".ssh", "box_key"))
        os.chmod(os.path.join(fake, ".ssh", "box_key"), 0o600)
        shutil.copy(self.kh, os.path.join(fake, ".ssh", "known_hosts"))
        self.alias_config(os.path.join(fake, ".ssh", "config"), "~/.ssh/box_key")
        elsewhere = tempfile.mkdtemp(dir=self.dir)
        env = {"PATH": os.environ["PATH"], "HOME": elsewhere}
        p = run("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", fake, pw_home,
                DF, "convert", self.src, "-O", "raw", "--no-progress", "--retries", "0", "-o",
                "sftp://backupbox/backups/home.raw", env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(run("cmp", self.src, self.remote("home.raw")).returncode, 0)

    def test_loose_identity_file_from_ssh_config_refused(self):
        # The rule --identity has: a private key others can read is refused, naming the fix.
        loose = os.path.join(self.dir, "loose_config_key")
        shutil.copy(self.server.client_key, loose)
        os.chmod(loose, 0o644)
        cfg = self.alias_config(os.path.join(self.dir, "loose_ssh_config"), loose)
        home = tempfile.mkdtemp(dir=self.dir)
        p = run(DF, "convert", self.src, "-O", "raw", "--ssh-config", cfg, "--known-hosts",
                self.kh, "--no-progress", "--retries", "0", "-o",
                "sftp://backupbox/backups/loose.raw", env={"PATH": os.environ["PATH"],
                                                          "HOME": home})
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
        self.assertIn(f"{loose}: private key is accessible by group or others", p.stderr)
        self.assertIn(f"chmod 600 {loose}", p.stderr)
        self.assertFalse(os.path.exists(self.remote("loose.raw")))

    def test_refused_login_names_the_keys_tried(self):
        # An agent holding one key and two IdentityFiles, none authorised on the server (one
        # has a passphrase: passed over): the refusal says how many keys the agent offered and
        # which files were tried.
        home = tempfile.mkdtemp(dir=self.dir)
        agent_key, _ = client_keypair(home, "ed25519", name="agent_stranger")
        file_key, _ = client_keypair(home, "ed25519", name="file_stranger")
        locked = os.path.join(home, "locked_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", locked],
                       check=True)
        cfg = self.alias_config(os.path.join(home, "ssh_config"), locked, file_key)
        with ssh_agent(home) as sock:
            env = {"PATH": os.environ["PATH"], "HOME": home, "SSH_AUTH_SOCK": sock}
            add = run("ssh-add", agent_key, env=env)
            self.assertEqual(add.returncode, 0, add.stderr)
            p = run(DF, "convert", self.src, "-O", "raw", "--ssh-config", cfg, "--known-hosts",
                    self.kh, "--no-progress", "--retries", "0", "-o",
                    "sftp://backupbox/backups/never.raw", env=env)
            self.assertNotEqual(p.returncode, 0)
            self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
            self.assertIn(f"authentication refused for ssh-agent (1 key) and {locked} "
                          f"(unreadable: passphrase-protected keys need ssh-agent), {file_key}",
                          p.stderr)

    def test_bwlimit_holds_the_rate(self):
        # 8 MiB at 2 MiB/s: about 4 s (the first burst of 256 KiB is free); unlimited: well under.
        args = [DF, "convert", self.src, "-O", "raw", "--identity", self.server.client_key,
                "--known-hosts", self.kh, "--no-progress", "--bwlimit"]
        t = time.monotonic()
        p = run(*args, "2M", "-o", self.server.url("backups/slow.raw"))
        took = time.monotonic() - t
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(run("cmp", self.src, self.remote("slow.raw")).returncode, 0)
        self.assertGreater(took, 3.6, "--bwlimit 2M let 8 MiB through too fast")
        self.assertLess(took, 6.5, "--bwlimit 2M was much slower than 2 MiB/s")
        # A timetable whose only slot is "off" does not limit.
        t = time.monotonic()
        p = run(*args, "00:00,off", "-o", self.server.url("backups/fast.raw"))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertLess(time.monotonic() - t, 3)

    def test_bad_bwlimit_is_a_usage_error(self):
        for bad in ("fast", "25:00,1M", "08:00,1M 08:00,2M", "Mon-08:00"):
            with self.subTest(bad):
                p = run(DF, "convert", self.src, "-O", "raw", "--bwlimit", bad, "-o",
                        self.server.url("backups/never.raw"))
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
                self.assertIn(f"--bwlimit '{bad}'", p.stderr)


class FewerSessionsThanStreams(unittest.TestCase):
    """OpenSSH's MaxSessions below --streams: the upload uses the channels granted and says so."""

    def test_upload_uses_the_channels_granted(self):
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d, \
                OpenSSHServer(extra_config={"MaxSessions": 2}) as srv:
            src = os.path.join(d, "src.img")
            make_source(src)
            kh = srv.write_known_hosts(os.path.join(d, "kh"))
            p = run(DF, "convert", src, "-O", "qcow2", "--streams", "6", "--identity",
                    srv.client_key, "--known-hosts", kh, "--no-progress", "-o",
                    srv.url("backups/few.qcow2"))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(p.stderr.count("\n"), 1, p.stderr)   # warned once, not per attempt
            self.assertIn("the server allows 2 SFTP channels per connection (--streams 6); "
                          "using 2", p.stderr)
            c = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src,
                    srv.local_path("/backups/few.qcow2"))
            self.assertEqual(c.returncode, 0, c.stdout + c.stderr)


class BadUrls(unittest.TestCase):
    def test_malformed_urls(self):
        for url, why in (("sftp://host", "no path"), ("sftp://u@:22/x", "empty host"),
                         ("sftp://u@h:99999/x", "port"), ("sftp://u:pw@h/x", "passwords")):
            with self.subTest(url):
                p = run(DF, "convert", "/dev/null", "-O", "raw", "-o", url)
                self.assertNotEqual(p.returncode, 0)
                self.assertIn(why, p.stderr)
                self.assertEqual(p.stderr.count("\n"), 1, p.stderr)


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
