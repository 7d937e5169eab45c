#!/usr/bin/env python3
"""The systemd units and the Debian package, with the real tools.

Units: `cmake --install` into a staging root with the prefix /usr (what the .deb holds), the
system's own units copied beside them (systemd-analyze --root resolves sysinit.target & co. and
ExecStart= binaries inside the root: PID 1 is not systemd here, so nothing is loaded into a running
manager), then `systemd-analyze verify` on every unit and timer instance, which must exit 0 and
say nothing (it only warns, exit 0, about unknown keys). `systemd-analyze security --offline`
must keep diskferryd.service's exposure at or below 2.5.

Package: `cpack -G DEB` in the build directory (output to a temporary directory), `dpkg -i`,
the binaries answer --version from /usr/bin, files and conffiles are where they belong, an
enablement link made as `systemctl enable` would is removed by `dpkg --purge`, and afterwards
nothing of the package is left. Skipped when a diskferry package is installed already (this test
would purge it), or without root.

Run: test_packaging.py BUILD_DIR SOURCE_DIR
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

BUILD = SRC = None
UNITS = ["diskferryd.service", "diskferry-nightly.service", "diskferry-nightly.timer",
         "diskferry-enqueue@.service", "diskferry-enqueue@.timer", "diskferry-verify.service",
         "diskferry-verify.timer"]


def run(*cmd, **kw):
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), **kw)


def version():
    with open(os.path.join(SRC, "CMakeLists.txt")) as f:
        for line in f:
            if line.startswith("project(diskferry VERSION"):
                return line.split()[2]
    raise AssertionError("no project version in CMakeLists.txt")


class Units(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not shutil.which("systemd-analyze"):
            raise unittest.SkipTest("systemd-analyze is missing (apt-get install systemd)")
        cls.root = tempfile.mkdtemp(prefix="df-units-", dir="/var/tmp")
        p = run("cmake", "--install", BUILD, "--prefix", "/usr",
                env=dict(os.environ, DESTDIR=cls.root))
        assert p.returncode == 0, p.stdout + p.stderr
        cls.unit_dir = os.path.join(cls.root, "usr/lib/systemd/system")
        for d in ("/lib/systemd/system", "/usr/lib/systemd/system"):
            if os.path.isdir(d):
                # -n: never over our own units.
                subprocess.run(["cp", "-an", d + "/.", cls.unit_dir], check=True)
        os.makedirs(os.path.join(cls.root, "bin"), exist_ok=True)
        shutil.copy("/bin/kill", os.path.join(cls.root, "bin/kill"))  # ExecReload=

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def verify(self, *units):
        return run("systemd-analyze", "verify", f"--root={self.root}", *units, cwd=self.root)

    def test_installed_units_are_ours(self):
        for u in UNITS:
            with open(os.path.join(SRC, "systemd", u)) as a, \
                    open(os.path.join(self.unit_dir, u)) as b:
                self.assertEqual(a.read(), b.read(), f"{u} changed on install with prefix /usr")

    def test_every_unit_verifies(self):
        names = [u for u in UNITS if "@." not in u]
        names += ["diskferry-enqueue@web01.service", "diskferry-enqueue@web01.timer"]
        for name in names:
            p = self.verify(name)
            self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ""), name)

    def test_verify_can_fail(self):
        # The same check on a broken copy: a missing binary, and a misspelt key (exit 0, but
        # it says so, which the checks above refuse).
        exe = os.path.join(self.root, "usr/bin/diskferryd")
        os.rename(exe, exe + ".away")
        try:
            p = self.verify("diskferryd.service")
        finally:
            os.rename(exe + ".away", exe)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("/usr/bin/diskferryd", p.stderr)
        timer = os.path.join(self.unit_dir, "diskferry-nightly.timer")
        with open(timer) as f:
            text = f.read()
        try:
            with open(timer, "w") as f:
                f.write(text.replace("Persistent=true", "Persistant=true"))
            p = self.verify("diskferry-nightly.timer")
        finally:
            with open(timer, "w") as f:
                f.write(text)
        self.assertIn("Unknown key 'Persistant'", p.stdout + p.stderr)

    def test_watchdog_and_restart(self):
        with open(os.path.join(self.unit_dir, "diskferryd.service")) as f:
            text = f.read()
        for line in ("Type=notify", "WatchdogSec=60s", "Restart=on-failure",
                     "StateDirectory=diskferry", "ProtectSystem=strict", "ProtectHome=yes",
                     "PrivateTmp=yes", "PrivateDevices=yes", "NoNewPrivileges=yes",
                     "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                     "SystemCallFilter=@system-service"):
            self.assertIn("\n" + line + "\n", text)
        with open(os.path.join(self.unit_dir, "diskferry-nightly.timer")) as f:
            timer = f.read()
        for line in ("Persistent=true", "RandomizedDelaySec=1h"):
            self.assertIn(line, timer)

    def test_security_exposure(self):
        p = run("systemd-analyze", "security", "--offline=true", f"--root={self.root}",
                "--threshold=25", "--no-pager", "diskferryd.service", cwd=self.root)
        self.assertEqual(p.returncode, 0, p.stdout[-2000:] + p.stderr)
        self.assertRegex(p.stdout, r"Overall exposure level for diskferryd.service: [0-2]\.\d")
        print(p.stdout.strip().splitlines()[-1], file=sys.stderr)


@unittest.skipIf(os.geteuid() != 0, "needs root (dpkg -i)")
class DebPackage(unittest.TestCase):
    def setUp(self):
        if not shutil.which("dpkg-shlibdeps"):
            self.skipTest("dpkg-shlibdeps is missing (apt-get install dpkg-dev)")
        q = run("dpkg-query", "-W", "-f=${Status}", "diskferry")
        if "installed" in q.stdout and "not-installed" not in q.stdout:
            self.skipTest("a diskferry package is installed here; this test would purge it")
        self.out = tempfile.mkdtemp(prefix="df-deb-", dir="/var/tmp")

    def tearDown(self):
        q = run("dpkg-query", "-W", "-f=${Status}", "diskferry")
        if q.returncode == 0 and "not-installed" not in q.stdout:
            self.dpkg("--purge", "diskferry")
        shutil.rmtree(self.out, ignore_errors=True)

    def dpkg(self, *args):
        # Another dpkg (apt in a parallel setup) holds the lock: wait for it a little.
        for _ in range(60):
            p = run("dpkg", *args)
            if "lock" not in p.stderr:
                return p
            time.sleep(2)
        return p

    def test_build_install_purge(self):
        p = run("cpack", "-G", "DEB", "-B", self.out, cwd=BUILD)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        deb = os.path.join(self.out, f"diskferry_{version()}_amd64.deb")
        self.assertTrue(os.path.exists(deb), os.listdir(self.out))
        info = run("dpkg-deb", "-f", deb, "Package", "Depends").stdout
        self.assertIn("Package: diskferry", info)
        # dpkg-shlibdeps found the runtime libraries of both binaries.
        for lib in ("libssh-4", "libsqlite3-0", "libzstd1", "libyaml-cpp0.7", "libsystemd0",
                    "libc6"):
            self.assertIn(lib, info)

        p = self.dpkg("-i", deb)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        for exe in ("diskferry", "diskferryd"):
            v = run(f"/usr/bin/{exe}", "--version")
            self.assertEqual(v.returncode, 0, v.stderr)
            self.assertEqual(v.stdout.strip(), f"{exe} {version()}")
        listed = run("dpkg", "-L", "diskferry").stdout.split()
        want = ["/usr/bin/diskferry", "/usr/bin/diskferryd", "/etc/diskferry/diskferry.yaml",
                "/usr/share/doc/diskferry/operations.md",
                "/usr/share/doc/diskferry/examples/diskferry.yaml"]
        want += [f"/usr/lib/systemd/system/{u}" for u in UNITS]
        for path in want:
            self.assertIn(path, listed)
            self.assertTrue(os.path.isfile(path), path)
        conf = run("dpkg-query", "-W", "-f=${Conffiles}", "diskferry").stdout
        self.assertIn("/etc/diskferry/diskferry.yaml", conf)
        # The example configuration is valid as installed.
        c = run("/usr/bin/diskferry", "check-config", "--config", "/etc/diskferry/diskferry.yaml")
        self.assertEqual(c.returncode, 0, c.stderr)
        # Its commands may hold tokens: not readable by everyone, so no warning about it.
        self.assertEqual(os.stat("/etc/diskferry/diskferry.yaml").st_mode & 0o777, 0o640)
        self.assertNotIn("readable by everyone", c.stderr)
        # Installing enabled and started nothing.
        wants = "/etc/systemd/system/timers.target.wants"
        self.assertFalse(os.path.lexists(os.path.join(wants, "diskferry-nightly.timer")))
        if os.path.isdir("/etc/systemd/system"):
            self.assertFalse([n for n in os.listdir("/etc/systemd/system")
                              if n.startswith("diskferry")])
        # What `systemctl enable diskferry-nightly.timer` makes; purge takes it away with the unit.
        made_wants = not os.path.isdir(wants)
        os.makedirs(wants, exist_ok=True)
        link = os.path.join(wants, "diskferry-nightly.timer")
        os.symlink("/usr/lib/systemd/system/diskferry-nightly.timer", link)

        p = self.dpkg("--purge", "diskferry")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertFalse(os.path.lexists(link), "purge left the enablement link")
        if made_wants:
            os.rmdir(wants)
        for path in want + ["/etc/diskferry"]:
            self.assertFalse(os.path.exists(path), f"{path} is still there after purge")
        q = run("dpkg-query", "-W", "-f=${Status}", "diskferry")
        self.assertTrue(q.returncode != 0 or "not-installed" in q.stdout, q.stdout)


if __name__ == "__main__":
    BUILD = os.path.abspath(sys.argv.pop(1))
    SRC = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
