#!/usr/bin/env python3
"""What an operator sees of the daemon, with real components: sd_notify READY=1 and WATCHDOG=1
on a NOTIFY_SOCKET (as systemd's Type=notify + WatchdogSec= set it up), the node_exporter
textfile metrics (read by a real prometheus-node-exporter when installed) and the on_success /
on_failure notify commands, for jobs against an OpenSSH chroot SFTP server on 127.0.0.1: one that
succeeds, one whose source is gone, one whose remote is down.

Run: test_ops.py PATH/TO/bin   (the directory with diskferry and diskferryd)
"""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import OpenSSHServer, free_port  # noqa: E402

BIN = None
MiB = 1024 * 1024


def exe(name):
    return os.path.join(BIN, name)


class Notify(unittest.TestCase):
    """sd_notify: what systemd's Type=notify and WatchdogSec= rely on."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-notify-", dir="/var/tmp")
        self.config = os.path.join(self.dir, "diskferry.yaml")
        with open(self.config, "w") as f:
            f.write(f"state_dir: {self.dir}/state\n")
        self.sock_path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)

    def tearDown(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run_daemon(self, watchdog_pid, seconds):
        """Starts diskferryd the way systemd does (WATCHDOG_PID names the service's main PID:
        the shell execs into the daemon, keeping its PID) and collects what it sends."""
        env = dict(os.environ, NOTIFY_SOCKET=self.sock_path, WATCHDOG_USEC="1000000")
        script = 'export WATCHDOG_PID=${WD_PID:-$$}; exec "$0" "$@"'
        if watchdog_pid is not None:
            env["WD_PID"] = str(watchdog_pid)
        p = subprocess.Popen(["sh", "-c", script, exe("diskferryd"), "--config", self.config],
                             env=env, stderr=subprocess.PIPE, text=True)
        msgs = []
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    msgs.append((time.monotonic(), self.sock.recv(4096).decode()))
                except socket.timeout:
                    pass
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
        self.sock.settimeout(1)
        try:
            while True:
                msgs.append((time.monotonic(), self.sock.recv(4096).decode()))
        except socket.timeout:
            pass
        self.assertEqual(p.returncode, 0, err)
        return msgs

    def test_ready_then_watchdog_pings_at_half_the_interval(self):
        msgs = self.run_daemon(None, 3.2)
        texts = [m for _, m in msgs]
        self.assertTrue(texts and "READY=1" in texts[0], texts)
        self.assertIn("STATUS=working the queue", texts[0])
        pings = [t for t, m in msgs if "WATCHDOG=1" in m.split("\n")]
        # WATCHDOG_USEC=1s: a ping every 0.5 s, so about 6 in 3.2 s; systemd would kill the
        # daemon after 1 s without one.
        self.assertGreaterEqual(len(pings), 4, texts)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        self.assertLess(max(gaps), 0.9, gaps)
        self.assertIn("STOPPING=1", texts[-1])

    def test_no_pings_when_the_watchdog_is_for_another_process(self):
        # WATCHDOG_PID of another process: the watchdog is not ours (sd_watchdog_enabled).
        msgs = self.run_daemon(1, 1.5)
        texts = [m for _, m in msgs]
        self.assertIn("READY=1", texts[0])
        self.assertFalse([m for m in texts if "WATCHDOG=1" in m], texts)


class Status(unittest.TestCase):
    """`diskferry status` as a Nagios/Icinga check: 0 OK, 2 CRITICAL, 3 UNKNOWN."""

    def test_unreadable_state_or_config_is_unknown(self):
        d = tempfile.mkdtemp(prefix="df-status-", dir="/var/tmp")
        try:
            cfg = os.path.join(d, "c.yaml")
            with open(cfg, "w") as f:
                f.write("state_dir: /proc/no-such-dir\n")
            for config in (cfg, os.path.join(d, "missing.yaml")):
                p = subprocess.run([exe("diskferry"), "status", "--config", config],
                                   capture_output=True, text=True, timeout=30)
                self.assertEqual(p.returncode, 3, p.stdout + p.stderr)
                self.assertTrue(p.stdout.startswith("UNKNOWN: "), p.stdout)
            with open(cfg, "w") as f:
                f.write(f"state_dir: {d}/state\nremotes:\n  b: {{url: 'sftp://u@h/x'}}\n"
                        "sources:\n  s: {path: /s.img, remote: b}\n")
            p = subprocess.run([exe("diskferry"), "status", "--config", cfg],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
            self.assertIn("STALE", p.stdout)
        finally:
            shutil.rmtree(d, ignore_errors=True)


class Jobs(unittest.TestCase):
    """Metrics and notify commands after jobs that end done and failed."""

    @classmethod
    def setUpClass(cls):
        reason = OpenSSHServer.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.server = OpenSSHServer()
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-ops-", dir="/var/tmp")
        self.prom = os.path.join(self.dir, "textfile")
        self.out = os.path.join(self.dir, "notified")
        os.makedirs(self.prom)
        os.makedirs(self.out)
        self.image = os.path.join(self.dir, "good.img")
        r = random.Random(3)
        with open(self.image, "wb") as f:
            f.truncate(8 * MiB)
            f.write(r.randbytes(2 * MiB))
        kh = self.server.write_known_hosts(os.path.join(self.dir, "known_hosts"))
        down = free_port()
        record = f'env | grep ^DISKFERRY_ > {self.out}/%s-$DISKFERRY_SOURCE'
        self.remote_dir = os.path.join(self.server.backups, "ops")
        self.config = os.path.join(self.dir, "diskferry.yaml")
        with open(self.config, "w") as f:
            f.write(f"""state_dir: {self.dir}/state
metrics_dir: {self.prom}
notify:
  on_failure: "{record % 'failure'}"
  on_success: "{record % 'success'}"
remotes:
  box:
    url: sftp://{self.server.user}@127.0.0.1:{self.server.port}/backups/ops
    identity: {self.server.client_key}
    known_hosts: {kh}
  down:
    url: sftp://{self.server.user}@127.0.0.1:{down}/backups/ops
    identity: {self.server.client_key}
    known_hosts: {kh}
sources:
  good:
    path: {self.image}
    snapshot: none
    remote: box
    # A notify command that fails: a warning, the job stays done.
    notify: {{on_success: "{record % 'success'}; echo mail server down; exit 3"}}
  gone:
    path: {self.dir}/gone.img
    snapshot: none
    remote: box
    notify: {{on_success: ""}}
  unreachable:
    path: {self.image}
    snapshot: none
    remote: down
    retries: {{max_attempts: 1}}
""")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.remote_dir, ignore_errors=True)

    def cli(self, *args):
        return subprocess.run([exe("diskferry"), *args, "--config", self.config],
                              capture_output=True, text=True, timeout=120)

    def run_once(self):
        p = subprocess.run([exe("diskferryd"), "--config", self.config, "--once"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        return p.stderr

    def notified(self, kind, source):
        path = os.path.join(self.out, f"{kind}-{source}")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)

    def metrics(self):
        with open(os.path.join(self.prom, "diskferry.prom")) as f:
            text = f.read()
        values = {}
        for line in text.splitlines():
            m = re.fullmatch(r'(\w+)\{(\w+)="([^"]*)"\} (\S+)', line)
            if m:
                values[(m[1], m[3])] = float(m[4])
            else:
                self.assertTrue(line.startswith("# HELP ") or line.startswith("# TYPE "), line)
        return text, values

    def test_jobs_notify_and_metrics(self):
        import json
        self.assertEqual(self.cli("enqueue", "--all").returncode, 0)
        t0 = time.time()
        log = self.run_once()
        jobs = {j["source"]: j for j in json.loads(self.cli("list", "--json").stdout)}
        self.assertEqual({s: j["state"] for s, j in jobs.items()},
                         {"good": "done", "gone": "failed", "unreachable": "failed"}, log)

        good = self.notified("success", "good")
        self.assertIsNotNone(good, os.listdir(self.out))
        remote_file = os.path.join(self.remote_dir, jobs["good"]["remote_path"])
        size = os.path.getsize(remote_file)
        self.assertEqual(good["DISKFERRY_EVENT"], "success")
        self.assertEqual(good["DISKFERRY_STATE"], "done")
        self.assertEqual(good["DISKFERRY_JOB_ID"], str(jobs["good"]["id"]))
        self.assertEqual(good["DISKFERRY_REMOTE"], "box")
        self.assertEqual(good["DISKFERRY_REMOTE_PATH"], jobs["good"]["remote_path"])
        self.assertTrue(good["DISKFERRY_URL"].endswith("/backups/ops/" +
                                                       jobs["good"]["remote_path"]))
        self.assertEqual(good["DISKFERRY_SHA256"], jobs["good"]["sha256"])
        self.assertEqual(good["DISKFERRY_BYTES"], str(size))
        self.assertEqual(good["DISKFERRY_ATTEMPTS"], "1")
        self.assertRegex(good["DISKFERRY_DURATION"], r"^\d+$")
        self.assertEqual(good.get("DISKFERRY_ERROR"), "")
        self.assertIsNone(self.notified("failure", "good"))
        # The failing notify command is in the job's events; the job is done all the same.
        show = self.cli("show", str(jobs["good"]["id"])).stdout
        self.assertIn("exited with status 3: mail server down", show)

        for src, cls in (("gone", "source"), ("unreachable", "transient")):
            f = self.notified("failure", src)
            self.assertIsNotNone(f, (src, os.listdir(self.out)))
            self.assertEqual(f["DISKFERRY_EVENT"], "failure")
            self.assertEqual(f["DISKFERRY_STATE"], "failed")
            self.assertEqual(f["DISKFERRY_ERROR"], jobs[src]["error"])
            self.assertEqual(f["DISKFERRY_ERROR_CLASS"], cls)
            self.assertEqual(f["DISKFERRY_SHA256"], "")
            self.assertIsNone(self.notified("success", src))

        text, m = self.metrics()
        self.assertAlmostEqual(m[("diskferry_source_last_success_timestamp_seconds", "good")],
                               time.time(), delta=time.time() - t0 + 5)
        self.assertEqual(m[("diskferry_source_last_success_timestamp_seconds", "gone")], 0)
        self.assertEqual(m[("diskferry_source_remote_bytes", "good")], size)
        self.assertGreater(m[("diskferry_source_last_sent_bytes", "good")], 2 * MiB)
        self.assertEqual(m[("diskferry_source_last_attempts", "good")], 1)
        self.assertEqual(m[("diskferry_source_last_ok", "good")], 1)
        self.assertEqual(m[("diskferry_source_last_ok", "gone")], 0)
        self.assertEqual(m[("diskferry_source_failures_total", "good")], 0)
        self.assertEqual(m[("diskferry_source_failures_total", "gone")], 1)
        self.assertEqual(m[("diskferry_source_failures_total", "unreachable")], 1)
        self.assertEqual(m[("diskferry_remote_up", "box")], 1)
        self.assertEqual(m[("diskferry_remote_up", "down")], 0)
        self.assertEqual(os.listdir(self.prom), ["diskferry.prom"])  # no temporary file left
        self.assertEqual(os.stat(os.path.join(self.prom, "diskferry.prom")).st_mode & 0o777,
                         0o644)

        # A later daemon carries the counters on.
        self.cli("retry", str(jobs["gone"]["id"]))
        self.run_once()
        _, m = self.metrics()
        self.assertEqual(m[("diskferry_source_failures_total", "gone")], 2)
        self.assertEqual(m[("diskferry_source_failures_total", "unreachable")], 1)
        self.assertEqual(m[("diskferry_remote_up", "down")], 0)

        self.scrape_with_node_exporter(text)

    def scrape_with_node_exporter(self, text):
        ne = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
        if not ne:
            print("prometheus-node-exporter is not installed: not scraped", file=sys.stderr)
            return
        port = free_port()
        p = subprocess.Popen([ne, "--collector.disable-defaults", "--collector.textfile",
                              f"--collector.textfile.directory={self.prom}",
                              f"--web.listen-address=127.0.0.1:{port}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            body = None
            deadline = time.monotonic() + 20
            while body is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        body = r.read().decode()
                except OSError:
                    self.assertLess(time.monotonic(), deadline, "node_exporter did not answer")
                    time.sleep(0.2)
        finally:
            p.terminate()
            p.wait(timeout=10)
        self.assertIn("node_textfile_scrape_error 0", body)
        self.assertIn('diskferry_source_failures_total{source="gone"} 2', body)
        self.assertIn('diskferry_remote_up{remote="box"} 1', body)
        self.assertIn("# TYPE diskferry_source_failures_total counter", body)


if __name__ == "__main__":
    BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
