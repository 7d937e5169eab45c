#!/usr/bin/env python3
"""`diskferry convert -o sftp://...` against a hostile SFTP server (hostile_sftp.py run by sshd as
the sftp subsystem): a server without extensions, one that closes the channel mid-transfer,
oversized, out-of-order or garbage replies, a reply for an unknown request id, a failing WRITE,
a server that goes silent.

Legal behaviour (no extensions, out-of-order replies) must upload byte-identical files.  Every
failure must end with exit code 1 and exactly one stderr line "diskferry: ..." naming what
happened, and nothing may appear under the final name (nor NAME.sha256).  NAME.partial may stay
behind only after a lost connection (a resume may still use it; with --retries 0 give_up() removes
it over a fresh connection, so here none stays); after a protocol error or a refused write it must
be gone.

Run: test_sftp_hostile.py PATH/TO/diskferry
"""
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import (IS_ROOT, OpenSSHServer, ServerError, _run,  # noqa: E402
                          ensure_system_user)
import pwd  # noqa: E402

DF = None
MiB = 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
HOSTILE_USER = "dfhostile"     # needs a login shell: sshd runs external subsystems through it
# The server runs as that user, who cannot read a python under /root (pyenv): use the system one.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def make_source(path):
    """8 MiB sparse: some text, 2.5 MiB random, a hole, a little more text."""
    r = random.Random(11)
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"diskferry hostile " * 20000)
        f.seek(2 * MiB + 17)
        f.write(r.randbytes(2 * MiB + MiB // 2))
        f.seek(7 * MiB)
        f.write(b"tail " * 1000)


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          errors="replace", **kw)


def ensure_shell_user(name):
    """A system user with /bin/sh as its shell (created if missing), home '/'."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh",
              "--user-group", name])
        pw = pwd.getpwnam(name)
    if pw.pw_shell != "/bin/sh":
        _run(["usermod", "--shell", "/bin/sh", name])
    return ensure_system_user(name)   # password field '*' so sshd lets it in


class HostileServer(OpenSSHServer):
    """sshd whose sftp subsystem is hostile_sftp.py reading `self.config_file`."""

    kind = "hostile"

    @classmethod
    def unavailable_reason(cls):
        r = super().unavailable_reason()
        if r is None and not os.access(SYSTEM_PYTHON, os.X_OK):
            r = "hostile server: no python3 in /usr/bin"
        if r is None and not IS_ROOT:
            r = "hostile server: needs root (system user, sshd)"
        return r

    def __init__(self):
        super().__init__(user=HOSTILE_USER)

    def _run_as(self):
        return ensure_shell_user(self.user)

    def _prepare_dirs(self):
        super()._prepare_dirs()
        self.hostile_dir = os.path.join(self.state_dir, "hostile")
        os.mkdir(self.hostile_dir, 0o755)
        os.chown(self.hostile_dir, self.uid, self.gid)
        script = os.path.join(self.state_dir, "hostile_sftp.py")
        shutil.copy(os.path.join(HERE, "hostile_sftp.py"), script)
        os.chmod(script, 0o644)
        self.config_file = os.path.join(self.state_dir, "hostile.json")
        self.subsystem = f"{SYSTEM_PYTHON} {script} {self.config_file}"
        self.set_mode("normal")

    generation = 0

    def set_mode(self, mode, **kw):
        """Mode for the next sessions (options: see hostile_sftp.py); forgets the stats and
        markers of earlier ones."""
        self.generation += 1
        for f in os.listdir(self.hostile_dir):
            try:
                os.unlink(os.path.join(self.hostile_dir, f))
            except FileNotFoundError:
                pass                   # a late session of an earlier mode renamed it
        cfg = {"root": self.root, "state": self.hostile_dir, "mode": mode, "extensions": None,
               "after_bytes": 256 * 1024, "once": True, "seed": 1,
               "generation": self.generation}
        cfg.update(kw)
        with open(self.config_file + ".tmp", "w") as f:
            json.dump(cfg, f)
        os.chmod(self.config_file + ".tmp", 0o644)
        os.replace(self.config_file + ".tmp", self.config_file)

    def stats(self):
        out = []
        for p in glob.glob(os.path.join(self.hostile_dir, f"stats-{self.generation}-*.json")):
            with open(p) as f:
                out.append(json.load(f))
        return out

    def errors(self):
        text = ""
        for p in glob.glob(os.path.join(self.hostile_dir, f"errors-{self.generation}-*.log")):
            with open(p) as f:
                text += f.read()
        return text


class Hostile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        reason = HostileServer.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.dir = tempfile.mkdtemp(prefix="df-hostile-", dir="/var/tmp")
        cls.src = os.path.join(cls.dir, "src.img")
        make_source(cls.src)
        cls.local = {}
        for fmt in ("qcow2", "vhdx"):
            cls.local[fmt] = os.path.join(cls.dir, "local." + fmt)
            p = run(DF, "convert", cls.src, "-O", fmt, "--no-progress", "-o", cls.local[fmt])
            if p.returncode != 0:
                raise RuntimeError(f"local convert to {fmt} failed: {p.stderr}")
        cls.server = HostileServer()
        try:
            cls.server.start()
        except ServerError:
            shutil.rmtree(cls.dir, ignore_errors=True)
            raise
        cls.kh = os.path.join(cls.dir, "known_hosts")
        cls.server.write_known_hosts(cls.kh)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------
    def upload(self, name, *extra, fmt="qcow2", timeout=40):
        """Upload the source to /backups/NAME; returns (CompletedProcess, seconds)."""
        t = time.monotonic()
        try:
            p = run(DF, "convert", self.src, "-O", fmt, "--identity", self.server.client_key,
                    "--known-hosts", self.kh, "--no-progress", *extra,
                    "-o", self.server.url("backups/" + name), timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"diskferry hung for {timeout} s uploading {name}:\n"
                      f"{self.server.errors()}")
        return p, time.monotonic() - t

    def remote(self, name):
        return os.path.join(self.server.backups, name)

    def assert_uploaded(self, p, name, fmt="qcow2"):
        self.assertEqual(p.returncode, 0, f"exit {p.returncode} (a negative one is a signal):\n"
                                          f"{p.stderr}{self.server.errors()}")
        self.assertEqual(p.stderr, "")
        self.assertEqual(run("cmp", self.local[fmt], self.remote(name)).returncode, 0,
                         f"{name} differs from a local conversion")
        self.assertFalse(os.path.exists(self.remote(name + ".partial")))
        self.assertEqual(self.server.errors(), "")

    def assert_failed(self, p, name, pattern, partial_may_stay=False):
        """Exit 1, one 'diskferry: ' line matching `pattern`, nothing under the final name.
        Returns that line."""
        self.assertEqual(p.returncode, 1, f"exit {p.returncode} (a negative one is a signal):\n"
                                          f"{p.stderr}")
        lines = p.stderr.splitlines()
        self.assertEqual(len(lines), 1, f"want exactly one stderr line, got:\n{p.stderr}")
        self.assertTrue(p.stderr.endswith("\n"))
        self.assertTrue(lines[0].startswith("diskferry: "), lines[0])
        self.assertRegex(lines[0], re.compile(pattern, re.I))
        for bad in ("Sanitizer", "runtime error", "terminate called", "Assertion"):
            self.assertNotIn(bad, p.stderr)
        for n in (name, name + ".sha256", name + ".sha256.partial"):
            self.assertFalse(os.path.exists(self.remote(n)), f"{n} exists after a failure")
        if not partial_may_stay:
            self.assertFalse(os.path.exists(self.remote(name + ".partial")),
                             f"{name}.partial left behind after a non-connection failure")
        self.assertEqual(self.server.errors(), "")
        print(f"\n    {self._testMethodName}: {lines[0]}"
              f"{' [NAME.partial left]' if os.path.exists(self.remote(name + '.partial')) else ''}",
              file=sys.stderr)
        return lines[0]

    def misbehaved(self):
        return [s["misbehaved"] for s in self.server.stats() if s["misbehaved"]]

    FAIL = ("--retries", "0", "--stall-timeout", "3")
    LEGAL = ("--retries", "0", "--stall-timeout", "10")   # no retry hides a problem

    # -- legal behaviour ---------------------------------------------------------------------
    def test_normal(self):
        self.server.set_mode("normal")
        for fmt in ("qcow2", "vhdx"):
            with self.subTest(fmt=fmt):
                p, _ = self.upload(f"normal.{fmt}", *self.LEGAL, fmt=fmt)
                self.assert_uploaded(p, f"normal.{fmt}", fmt)
                self.assertTrue(os.path.exists(self.remote(f"normal.{fmt}.sha256")))
        st = self.server.stats()
        self.assertGreater(max(s["max_write"] for s in st), 32 * 1024)   # limits@openssh.com
        self.assertTrue(any(s["extended"].get("posix-rename@openssh.com") for s in st))

    def test_no_extensions(self):
        self.server.set_mode("no-extensions")
        p, _ = self.upload("noext.qcow2", *self.LEGAL)
        self.assert_uploaded(p, "noext.qcow2")
        st = self.server.stats()
        self.assertLessEqual(max(s["max_write"] for s in st), 32 * 1024)
        self.assertEqual([s["extended"] for s in st if s["extended"]], [])
        self.assertGreaterEqual(sum(s["ops"].get("rename", 0) for s in st), 1)

    def test_out_of_order_replies(self):
        self.server.set_mode("out-of-order")
        for fmt in ("qcow2", "vhdx"):
            with self.subTest(fmt=fmt):
                p, _ = self.upload(f"ooo.{fmt}", *self.LEGAL, fmt=fmt)
                self.assert_uploaded(p, f"ooo.{fmt}", fmt)
        st = self.server.stats()
        self.assertGreater(sum(s.get("reordered", 0) for s in st), 0)

    # -- failures ------------------------------------------------------------------------------
    # Connection loss (the channel closed, the server silent) is transient: with --retries 0 the
    # upload gives up at once, and give_up() removes NAME.partial over a fresh connection (the
    # hostile server answers that one).  A protocol error or a refused write is not retried; its
    # NAME.partial must be removed as the upload fails.

    def test_close_mid_transfer(self):
        self.server.set_mode("close-mid-transfer")
        p, _ = self.upload("closed.qcow2", *self.FAIL)
        self.assert_failed(p, "closed.qcow2", r": the server closed the SFTP channel \(gave up "
                           r"after 1 attempt\)$", partial_may_stay=True)
        self.assertEqual(len(self.misbehaved()), 1)

    def test_close_mid_transfer_then_resume(self):
        # The same drop with a retry: the next attempt resumes on NAME.partial (read back through
        # the hostile server's READ) and the result is still byte-identical.
        self.server.set_mode("close-mid-transfer", after_bytes=600 * 1024)
        p, _ = self.upload("resumed.qcow2", "--retries", "1", "--retry-delay", "0",
                           "--stall-timeout", "3")
        self.assertEqual(p.returncode, 0, p.stderr + self.server.errors())
        self.assertRegex(p.stderr, r"^diskferry: warning: .*the server closed the SFTP channel; "
                                   r"retrying in 0 s \(attempt 2 of 2\), resuming at ")
        self.assertEqual(run("cmp", self.local["qcow2"], self.remote("resumed.qcow2")).returncode,
                         0)
        self.assertFalse(os.path.exists(self.remote("resumed.qcow2.partial")))

    def test_oversized_reply(self):
        self.server.set_mode("oversized-reply")
        p, _ = self.upload("oversized.qcow2", *self.FAIL)
        self.assert_failed(p, "oversized.qcow2", r"^diskferry: dfhostile@127\.0\.0\.1:\d+: "
                           r"malformed SFTP reply: packet length 104857600 is too large")
        self.assertEqual(len(self.misbehaved()), 1)

    def test_unknown_request_id(self):
        for i, (on, bogus) in enumerate((
                ("write", None),    # an id above any sent
                ("write", 1),       # an id sent and answered already (the limits request)
                ("open", 1),        # the same where diskferry waits for one reply: was a 60 s
                ("fsetstat", 0),    # "stall", retried as a lost connection
                ("close", 2))):
            with self.subTest(on=on, bogus_id=bogus):
                self.server.set_mode("unknown-id", on=on, bogus_id=bogus)
                name = f"unknown{i}.qcow2"
                p, secs = self.upload(name, "--retries", "0", "--stall-timeout", "20")
                self.assert_failed(p, name, r": reply for unknown request id \d+$")
                self.assertEqual(len(self.misbehaved()), 1)
                self.assertLess(secs, 10)          # at once, not after the stall timeout

    def test_garbage_after_version(self):
        self.server.set_mode("garbage", after_bytes=0)
        p, _ = self.upload("garbage0.qcow2", *self.FAIL)
        self.assert_failed(p, "garbage0.qcow2", r": malformed SFTP reply: ")
        self.assertTrue(self.misbehaved())

    def test_garbage_mid_transfer(self):
        for once in (True, False):        # one channel's reply stream ruined, or every one's
            with self.subTest(once=once):
                self.server.set_mode("garbage", once=once)
                name = f"garbage-{'once' if once else 'all'}.qcow2"
                p, _ = self.upload(name, *self.FAIL)
                self.assert_failed(p, name, r": malformed SFTP reply: ")
                self.assertTrue(self.misbehaved())

    def test_write_fails_once(self):
        self.server.set_mode("write-fails-once")
        p, _ = self.upload("failonce.qcow2", *self.FAIL)
        self.assert_failed(p, "failonce.qcow2", r"/backups/failonce\.qcow2\.partial: write of \d+ "
                           r"bytes at offset \d+ failed: failure \(injected failure\)$")
        self.assertEqual(len(self.misbehaved()), 1)

    def test_slow_then_silent(self):
        self.server.set_mode("slow-then-silent")
        p, secs = self.upload("silent.qcow2", *self.FAIL)
        self.assert_failed(p, "silent.qcow2", r": no reply for 3 s \(stalled connection\) "
                           r"\(gave up after 1 attempt\)$", partial_may_stay=True)
        self.assertEqual(len(self.misbehaved()), 1)
        self.assertLess(secs, 15)


    def daemon_job(self, name, mode):
        """One diskferryd job (snapshot: none, verify: after_upload) against the server in
        `mode`; returns the job as `diskferry list --json` shows it, and its event log."""
        self.server.set_mode(mode)
        state = os.path.join(self.dir, "state-" + name)
        os.makedirs(state, exist_ok=True)
        config = os.path.join(state, "diskferry.yaml")
        with open(config, "w") as f:
            f.write(f"state_dir: {state}\nremotes:\n  h:\n"
                    f"    url: {self.server.url('backups/' + name)}\n"
                    f"    identity: {self.server.client_key}\n    known_hosts: {self.kh}\n"
                    f"sources:\n  s:\n    path: {self.src}\n    snapshot: none\n"
                    f"    compress: none\n"  # a plain qcow2: the flipped byte meets only sha256
                    f"    remote: h\n    verify: after_upload\n"
                    f"    retries: {{max_attempts: 2, backoff: 1s..1s}}\n")
        bindir = os.path.dirname(DF)
        p = run(DF, "enqueue", "s", "--config", config)
        self.assertEqual(p.returncode, 0, p.stderr)
        p = run(os.path.join(bindir, "diskferryd"), "--once", "--config", config, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        (job,) = json.loads(run(DF, "list", "--json", "--config", config).stdout)
        show = run(DF, "show", str(job["id"]), "--config", config).stdout
        return job, show

    def test_verify_after_upload(self):
        job, show = self.daemon_job("verified", "normal")
        self.assertEqual(job["state"], "done", show)
        self.assertIn("intact, read back", show)
        # A server that stores one byte wrong and says OK: the backup is caught, removed, and
        # the job fails for good (uploading again to the same disk would not help).
        job, show = self.daemon_job("flipped", "flip-written-byte")
        self.assertEqual((job["state"], job["error_class"], job["attempt"]),
                         ("failed", "verify", 1), show)
        self.assertRegex(job["error"], r"sha256 [0-9a-f]{64} does not match", show)
        self.assertIn("the new backup was removed", job["error"])
        self.assertEqual(len(self.misbehaved()), 1)
        d = os.path.join(self.server.backups, "flipped")
        left = [f for _, _, files in os.walk(d) for f in files]
        self.assertEqual(left, [], "a backup that did not verify was left on the remote")


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
