#!/usr/bin/env python3
"""diskferry's SFTP upload against OpenSSH `sftp` and `rclone rcat`, side by side.

    bench/sftp.py loopback rtt30 e2e      # every part (bench/run.sh sftp-loopback ... calls this)
    bench/sftp.py loopback                # only one part
    REPS=5 bench/sftp.py rtt30
    SFTP_LOOPBACK_MIB=256 SFTP_RTT_MIB=64 IDLE_WAIT=0 bench/sftp.py loopback rtt30   # smoke run

Parts (each against one dedicated OpenSSH sshd on 127.0.0.1, tests/integration/sftp_servers.py,
chroot + internal-sftp, as root):
  loopback  SFTP_LOOPBACK_MIB (1024) of random data: `sftp put`, `sftp put -f` (fsyncs like
            diskferry), `rclone rcat`, `diskferry convert -O raw`.
  rtt30     the same with SFTP_RTT_MIB (256) through tests/integration/tcp_proxy.py with
            --delay-ms SFTP_RTT_DELAY_MS (15; one-way, each direction: 30 ms round trip).
  e2e       disk8g.img (bench/run.sh builds it) to qcow2 on the server: diskferry convert -o sftp://
            against `qemu-img convert` to a temporary file && `sftp put`; plus each of diskferry's
            two stages alone (the conversion without the upload; the upload of the same qcow2
            bytes) to see whether they overlap, for plain qcow2 and (where the conversion costs
            real CPU) for --qcow2-compression zstd.
  restore   disk8g.img's backup (a .qcow2 and a .qcow2.zst, made by diskferry, not timed) back to
            a local raw file: `diskferry convert sftp://... -O raw` against `sftp get` to a
            temporary file (+ `zstd -d`) + `qemu-img convert -O raw`; outputs checked with cmp
            against disk8g.img (first run). Not in the default set (bench/run.sh restore).

Every command of a part runs REPS times (default 3), interleaved and in alternating order (run 1:
A B C, run 2: C B A, ...); the tables give the median. Before every run: outputs deleted, `sync`,
wait for idle CPUs (IDLE_WAIT / IDLE_BUDGET / IDLE_MAX_BUSY as in bench/run.sh), the source read
into the page cache. OpenSSH sftp is forced to SFTP_CIPHER (aes128-gcm@openssh.com); what every
client negotiated is read from the server's log (sshd LogLevel DEBUG1) for every run. Every
uploaded raw file is checked (size + sha256) after every run; diskferry's remote qcow2 once with
`qemu-img compare` + `qemu-img check`.

Measured per run: wall time (from fork to exit), client user+sys CPU and peak RSS (wait4 rusage,
children included: ssh under sftp), the server's CPU (its session processes, sampled), the
proxy's CPU,
and the client's /proc/PID/io write_bytes (polled while it runs, final value read from the
exited-but-unreaped process).  Speed ratio = other's median time / diskferry's median time
(>= 1.0: diskferry faster).

Environment: BENCH_DIR (/var/tmp/diskferry-bench), REPS (3), DISKFERRY (<repo>/build/bin/diskferry),
QEMU_IMG (qemu-img), OUT_DIR (<repo>/bench/out), IDLE_WAIT (60), IDLE_BUDGET (240),
IDLE_MAX_BUSY (15), SFTP_LOOPBACK_MIB (1024), SFTP_RTT_MIB (256), SFTP_RTT_DELAY_MS (15),
SFTP_CIPHER (aes128-gcm@openssh.com), SFTP_E2E_ZSTD (1; 0 leaves out the zstd-cluster overlap
rows of e2e), DISKFERRY_REV (what the binary was built from, for the report; default: the
repository's `git rev-parse --short HEAD` and whether lib/ or cli/ have uncommitted changes).
Options: --md-out FILE (append the Markdown section there instead of OUT_DIR/results-*-sftp.md),
--json FILE (every run's raw numbers).  Exit status 1 if a command failed or a check failed
(a missed goal is reported in the table, not in the exit status, as in bench/run.sh).
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from sftp_servers import OpenSSHServer, client_keypair  # noqa: E402

BENCH_DIR = os.path.abspath(os.environ.get("BENCH_DIR", "/var/tmp/diskferry-bench"))
REPS = int(os.environ.get("REPS", "3"))
DISKFERRY = os.path.abspath(os.environ.get("DISKFERRY", os.path.join(ROOT, "build/bin/diskferry")))
QEMU_IMG = shutil.which(os.environ.get("QEMU_IMG", "qemu-img")) or "qemu-img"
OUT_DIR = os.environ.get("OUT_DIR", os.path.join(HERE, "out"))
IDLE_WAIT = float(os.environ.get("IDLE_WAIT", "60"))
IDLE_BUDGET = float(os.environ.get("IDLE_BUDGET", "240"))
IDLE_MAX_BUSY = float(os.environ.get("IDLE_MAX_BUSY", "15"))
LOOPBACK_MIB = int(os.environ.get("SFTP_LOOPBACK_MIB", "1024"))
RTT_MIB = int(os.environ.get("SFTP_RTT_MIB", "256"))
RTT_DELAY_MS = float(os.environ.get("SFTP_RTT_DELAY_MS", "15"))
CIPHER = os.environ.get("SFTP_CIPHER", "aes128-gcm@openssh.com")
IMG = "disk8g.img"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SFTP_DIR = "sftp"                    # below BENCH_DIR: client key, known_hosts, batch files
KEY = f"{SFTP_DIR}/id_ed25519"
KH = f"{SFTP_DIR}/known_hosts"
COMPILERS = {"cc1plus", "cc1", "ld", "ld.bfd", "ld.gold", "lld", "clang", "clang++", "ninja",
             "make", "cmake", "ccache", "as"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# machine state

def cpu_busy(interval=0.5):
    """Percent of all CPUs busy over `interval` seconds (like bench/run.sh's cpu_busy)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 100.0 * ((t1 - t0) - (i1 - i0)) / max(1, t1 - t0)


def compilers_running():
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() in COMPILERS:
                        n += 1
            except OSError:
                pass
    return n


class Idle:
    """Before each run: wait until the CPUs are <= IDLE_MAX_BUSY % busy, at most IDLE_WAIT s per
    run and IDLE_BUDGET s in all; remembers whether the run started on a busy machine."""

    def __init__(self):
        self.waited = 0.0

    def wait(self):
        start = time.monotonic()
        said = False
        while True:
            busy = cpu_busy()
            if busy <= IDLE_MAX_BUSY:
                break
            spent = time.monotonic() - start
            if spent >= IDLE_WAIT or self.waited + spent >= IDLE_BUDGET:
                log(f"  machine still {busy:.0f}% busy: running anyway (noted in the table)")
                break
            if not said:
                log(f"  machine {busy:.0f}% busy (another process): waiting for it to go idle")
                said = True
            time.sleep(2)
        self.waited += time.monotonic() - start
        return {"busy_pct": round(busy, 1), "busy": busy > IDLE_MAX_BUSY,
                "compilers": compilers_running()}


# ----------------------------------------------------------------------------------------------
# processes

def proc_stat(pid):
    """(utime+stime, cutime+cstime) of `pid` in seconds, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    v = s[s.rfind(b")") + 2:].split()
    return ((int(v[11]) + int(v[12])) / CLK_TCK, (int(v[13]) + int(v[14])) / CLK_TCK)


def io_write_bytes(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for ln in f:
                if ln.startswith("write_bytes:"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return None


class SessionSampler(threading.Thread):
    """Follows the server's session processes (descendants of the sshd listener) during a run
    and keeps each one's last-seen user+sys CPU.  Needed because sshd does not reap every session
    process in a way that reaches the listener's cutime (the post-auth child of an OpenSSH `sftp`
    session does not show up there).  Reads the stat of each new pid once, then only its own."""

    def __init__(self, root_pid, period=0.05):
        super().__init__(daemon=True)
        self.root, self.period = root_pid, period
        self.ours, self.foreign, self.cpu, self.titles = {root_pid}, set(), {}, {}
        self.stop_ev = threading.Event()

    def scan(self):
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            if pid in self.ours or pid in self.foreign:
                continue
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    s = f.read()
            except OSError:
                continue
            ppid = int(s[s.rfind(b")") + 2:].split()[1])
            (self.ours if ppid in self.ours else self.foreign).add(pid)
        for pid in self.ours - {self.root}:
            st = proc_stat(pid)
            if st is not None:
                self.cpu[pid] = st[0]
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().split(b"\0")[0].decode(errors="replace")
                    if title:                      # empty once the process exited
                        self.titles[pid] = title
                except OSError:
                    pass

    def run(self):
        while not self.stop_ev.is_set():
            self.scan()
            self.stop_ev.wait(self.period)

    def alive(self):
        return [p for p in self.ours - {self.root} if proc_alive(p)]

    def finish(self, timeout=10):
        """Wait until the sessions are gone (or timeout), stop; CPU seconds seen."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.alive():
            time.sleep(0.05)
        self.stop_ev.set()
        self.join()
        return sum(self.cpu.values())

    def by_process(self):
        """{process title: CPU s}, e.g. 'sshd: dfuser@notty' (network, crypto) and
        'sshd: dfuser@internal-sftp' (the SFTP server writing the file)."""
        out = {}
        for pid, cpu in self.cpu.items():
            k = self.titles.get(pid, "?")
            out[k] = round(out.get(k, 0.0) + cpu, 3)
        return out


def proc_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
        return s[s.rfind(b")") + 2:].split()[0] != b"Z"
    except OSError:
        return False


class IoPoller(threading.Thread):
    """Polls /proc/PID/io write_bytes while the process runs; .last is the last value seen."""

    def __init__(self, pid, period=0.05):
        super().__init__(daemon=True)
        self.pid, self.period, self.last = pid, period, None
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            v = io_write_bytes(self.pid)
            if v is not None:
                self.last = v
            self.stop_ev.wait(self.period)

    def stop(self):
        self.stop_ev.set()
        self.join()
        v = io_write_bytes(self.pid)    # the exited, not yet reaped process still has its counters
        if v is not None:
            self.last = v
        return self.last


def run_step(argv, stdin, cwd, out_path, err_path):
    """Run argv; returns dict(rc, wall, cpu, rss_kb, write_bytes)."""
    with open(out_path, "ab") as out, open(err_path, "ab") as err, \
            (open(stdin, "rb") if stdin else open(os.devnull, "rb")) as inp:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, cwd=cwd, stdin=inp, stdout=out, stderr=err)
        poller = IoPoller(p.pid)
        poller.start()
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        t1 = time.monotonic()
        wb = poller.stop()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "wall": t1 - t0, "cpu": ru.ru_utime + ru.ru_stime,
            "user": ru.ru_utime, "sys": ru.ru_stime, "rss_kb": ru.ru_maxrss, "write_bytes": wb}


# ----------------------------------------------------------------------------------------------
# files

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def warm(path):
    """Read the file's data extents (bench/read_data.py): the source comes from the page cache."""
    subprocess.run([sys.executable, os.path.join(HERE, "read_data.py"), path],
                   stdout=subprocess.DEVNULL, check=True)


def random_file(mib):
    """BENCH_DIR/randNm.bin of `mib` MiB from /dev/urandom (cached with a .sha256 sidecar)."""
    name = f"rand{mib}m.bin"
    path = os.path.join(BENCH_DIR, name)
    side = path + ".sha256"
    if os.path.exists(path) and os.path.exists(side) and os.path.getsize(path) == mib << 20:
        with open(side) as f:
            return name, f.read().split()[0]
    log(f"creating {name} ({mib} MiB of /dev/urandom; cached for later runs)")
    while True:
        h = hashlib.sha256()
        with open("/dev/urandom", "rb") as r, open(path + ".tmp", "wb") as w:
            for _ in range(mib):
                b = r.read(1 << 20)
                h.update(b)
                w.write(b)
        with open(path + ".tmp", "rb") as f:
            head = f.read(4)
        # diskferry detects gzip/zstd sources by their magic bytes: keep random data raw
        if not head.startswith(b"\x1f\x8b") and head != b"\x28\xb5\x2f\xfd":
            break
    os.rename(path + ".tmp", path)
    digest = h.hexdigest()
    with open(side, "w") as f:
        f.write(f"{digest}  {name}\n")
    return name, digest


def fmt_bytes(n):
    return "—" if n is None else f"{n:,}"


# ----------------------------------------------------------------------------------------------
# the server and the contenders

class Server:
    """One OpenSSH sshd (LogLevel DEBUG1 so that the negotiated cipher is logged) for a part."""

    def __init__(self):
        os.makedirs(os.path.join(BENCH_DIR, SFTP_DIR), exist_ok=True)
        key, _ = client_keypair(os.path.join(BENCH_DIR, SFTP_DIR))
        self.srv = OpenSSHServer(client_key=key, extra_config={"LogLevel": "DEBUG1"}).start()
        self.log_path = os.path.join(self.srv.state_dir, "server.log")
        self.proxy = None
        self.proxy_port = None
        self.proxy_err = None
        self.write_known_hosts()

    def write_known_hosts(self):
        lines = [self.srv.known_hosts_line()]
        if self.proxy_port:
            lines.append(self.srv.known_hosts_line(port=self.proxy_port))
        with open(os.path.join(BENCH_DIR, KH), "w") as f:
            f.write("\n".join(lines) + "\n")

    def start_proxy(self, delay_ms):
        """tests/integration/tcp_proxy.py as its own process (its CPU is measured separately)."""
        self.proxy_err = open(os.path.join(BENCH_DIR, SFTP_DIR, "proxy.log"), "wb")
        self.proxy = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/integration/tcp_proxy.py"), "--listen", "0",
             "--target", f"127.0.0.1:{self.srv.port}", "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE, stderr=self.proxy_err, text=True)
        self.proxy_port = int(self.proxy.stdout.readline())
        self.write_known_hosts()
        return self.proxy_port

    def stop(self):
        if self.proxy is not None:
            self.proxy.send_signal(signal.SIGINT)
            try:
                self.proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
            self.proxy_err.close()
            self.proxy = None
        self.srv.stop()

    def remote(self, name):
        """Local file behind the SFTP path backups/NAME."""
        return self.srv.local_path(f"/backups/{name}")

    def log_size(self):
        return os.path.getsize(self.log_path)

    def session_info(self, offset):
        """What the server logged since `offset`: client banners and negotiated ciphers."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return {"clients": sorted(set(re.findall(r"remote software version (\S+)", text))),
                "cipher_cs": sorted(set(re.findall(r"kex: client->server cipher: (\S+)", text))),
                "cipher_sc": sorted(set(re.findall(r"kex: server->client cipher: (\S+)", text)))}

    def sampler(self):
        s = SessionSampler(self.srv.proc.pid)
        s.start()
        return s

    def reaped_cpu(self):
        """CPU seconds of sshd's children reaped so far (the listener's cutime + cstime)."""
        st = proc_stat(self.srv.proc.pid)
        return st[1] if st else 0.0

    def proxy_cpu(self):
        if self.proxy is None:
            return None
        st = proc_stat(self.proxy.pid)
        return st[0] if st else None


class Contender:
    """One command compared in a part.

    role: base (the OpenSSH sftp baseline), cand (diskferry), other (compared, informational),
    stage (a stage of diskferry's job alone).  steps: [(argv, stdin_path)] run as `a && b`.
    show: the command as shown in the table.  remote: SFTP output name (in backups/), or None.
    local_out: local files the command writes (deleted before each run).  payload: bytes moved
    (for MB/s).  check: callable(run_index) -> (ok, note, bytes) run after every run."""

    def __init__(self, tag, label, role, steps, show, remote=None, local_out=(), check=None,
                 payload=None):
        self.tag, self.label, self.role, self.steps, self.show = tag, label, role, steps, show
        self.remote, self.local_out = remote, list(local_out)
        self.check, self.payload = check, payload
        self.runs = []
        self.error = None
        self.check_notes = []


def sftp_argv(batch, port):
    return ["sftp", "-F", "/dev/null", "-b", batch, "-i", KEY, "-o", f"Ciphers={CIPHER}",
            "-o", f"UserKnownHostsFile={KH}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-P", str(port), "dfuser@127.0.0.1"]


def write_batch(name, line):
    path = f"{SFTP_DIR}/{name}.batch"
    with open(os.path.join(BENCH_DIR, path), "w") as f:
        f.write(line + "\n")
    return path


def rclone_argv(port, dest):
    remote = (f":sftp,host=127.0.0.1,port={port},user=dfuser,key_file={KEY},"
              f"known_hosts_file={KH},disable_hashcheck=true,shell_type=none:backups/{dest}")
    return ["rclone", "rcat", remote]


def diskferry_argv(src, fmt, port, dest):
    return ["diskferry", "convert", src, "-O", fmt,
            "-o", f"sftp://dfuser@127.0.0.1:{port}/backups/{dest}",
            "--identity", KEY, "--known-hosts", KH, "--no-progress"]


def show(steps, port, port_name="$PORT"):
    """The command as shown: argv joined, the port as $PORT, sftp's batch file inlined."""
    parts = []
    for argv, stdin in steps:
        s = shlex.join(argv).replace(f":{port}/", f":{port_name}/")
        s = s.replace(f"port={port},", f"port={port_name},")
        s = s.replace(f"-P {port} ", f"-P {port_name} ")
        if stdin:
            s += f" < {stdin}"
        parts.append(s)
    return " && ".join(parts)


def raw_check(server, name, size, digest):
    def check(_run):
        path = server.remote(name)
        if not os.path.exists(path):
            return False, f"{name}: not on the server", None
        got = os.path.getsize(path)
        if got != size:
            return False, f"{name}: {got} bytes on the server, expected {size}", got
        if sha256_file(path) != digest:
            return False, f"{name}: sha256 differs from the source", got
        return True, "", got
    return check


# ----------------------------------------------------------------------------------------------
# running a part

class Part:
    def __init__(self, name, title, server, warm_files, reps):
        self.name, self.title, self.server = name, title, server
        self.warm_files, self.reps = warm_files, reps
        self.contenders = []
        self.comparisons = []      # (label, kind, cand_tag, other_tags, goal)
        self.notes = []

    def add(self, c):
        self.contenders.append(c)
        return c

    def _clean(self, c):
        if c.remote:
            # newer diskferry builds also write NAME.sha256 (through NAME.sha256.partial)
            for ext in ("", ".partial", ".sha256", ".sha256.partial"):
                n = c.remote + ext
                try:
                    os.unlink(self.server.remote(n))
                except FileNotFoundError:
                    pass
        for f in c.local_out:
            try:
                os.unlink(os.path.join(BENCH_DIR, f))
            except FileNotFoundError:
                pass

    def run(self, idle):
        out = os.path.join(BENCH_DIR, ".sftp-stdout.out")
        err = os.path.join(BENCH_DIR, ".sftp-stderr.out")
        for r in range(self.reps):
            order = self.contenders if r % 2 == 0 else list(reversed(self.contenders))
            for c in order:
                if c.error:
                    continue
                for x in self.contenders:
                    self._clean(x)
                os.sync()
                state = idle.wait()
                for f in self.warm_files(c):
                    warm(os.path.join(BENCH_DIR, f))
                log(f"{self.name} [{r + 1}/{self.reps}] {c.show}")
                for f in (out, err):
                    open(f, "w").close()
                off = self.server.log_size()
                srv0, px0 = self.server.reaped_cpu(), self.server.proxy_cpu()
                sampler = self.server.sampler()
                t0 = time.monotonic()
                run = {"rep": r + 1, "steps": [], **state}
                rc = 0
                for argv, stdin in c.steps:
                    argv = [DISKFERRY if a == "diskferry" else QEMU_IMG if a == "qemu-img" else a
                            for a in argv]
                    s = run_step(argv, os.path.join(BENCH_DIR, stdin) if stdin else None,
                                 BENCH_DIR, out, err)
                    run["steps"].append(s)
                    rc = s["rc"]
                    if rc != 0:
                        break
                run["wall"] = time.monotonic() - t0
                sampled = sampler.finish()
                # each is a lower bound: sampling misses the last <= 50 ms of every process,
                # the listener's cutime misses processes sshd does not reap into it
                run["server_cpu"] = max(sampled, self.server.reaped_cpu() - srv0)
                run["server_cpu_by_process"] = sampler.by_process()
                px1 = self.server.proxy_cpu()
                run["proxy_cpu"] = None if px0 is None or px1 is None else px1 - px0
                run.update(self.server.session_info(off))
                run["cpu"] = sum(s["cpu"] for s in run["steps"])
                run["rss_kb"] = max(s["rss_kb"] for s in run["steps"])
                run["write_bytes"] = [s["write_bytes"] for s in run["steps"]]
                if rc != 0:
                    with open(err, errors="replace") as f:
                        tail = " ".join(f.read().strip().splitlines()[-3:])[:300]
                    c.error = f"exit {rc}: {tail}"
                    log(f"  -> FAILED {c.error}")
                    continue
                if c.check:
                    ok, note, size = c.check(r)
                    run["remote_bytes"] = size
                    if not ok:
                        c.check_notes.append(f"run {r + 1}: {note}")
                        log(f"  -> CHECK FAILED: {note}")
                    elif note:
                        c.check_notes.append(note)
                c.runs.append(run)
                log(f"  {run['wall']:.2f} s, client CPU {run['cpu']:.2f} s, server CPU "
                    f"{run['server_cpu']:.2f} s, write_bytes {run['write_bytes']}, "
                    f"cipher {','.join(run['cipher_cs']) or '?'}, "
                    f"client {','.join(run['clients'])}")
        for c in self.contenders:
            self._clean(c)

    # -- results -----------------------------------------------------------------------------
    def by_tag(self, tag):
        return next(c for c in self.contenders if c.tag == tag)

    @staticmethod
    def med(c, key="wall"):
        v = [r[key] for r in c.runs if r.get(key) is not None]
        return statistics.median(v) if v else None

    def rows(self):
        out = []
        for c in self.contenders:
            if not c.runs:
                out.append(f"| {self.name} | {c.label} | `{c.show}` | — | — | — | — | — | — | — | "
                           f"— | — | — | **ERROR** {c.error or ''} |")
                continue
            wall = self.med(c)
            runs = "/".join(f"{r['wall']:.2f}" for r in c.runs)
            mbs = f"{c.payload / wall / 1e6:.1f}" if c.payload and wall else "—"
            cpu = self.med(c, "cpu")
            srv = self.med(c, "server_cpu")
            for r in c.runs:
                bp = r.get("server_cpu_by_process", {})
                r["server_net"] = sum(v for k, v in bp.items() if "@notty" in k)
                r["server_sftp"] = sum(v for k, v in bp.items() if "internal-sftp" in k)
            split = (f" ({self.med(c, 'server_net'):.2f} + {self.med(c, 'server_sftp'):.2f})"
                     if srv else "")
            px = self.med(c, "proxy_cpu")
            cpus = statistics.median(
                (r["cpu"] + r["server_cpu"] + (r["proxy_cpu"] or 0)) / r["wall"] for r in c.runs)
            rss = max(r["rss_kb"] for r in c.runs) / 1024
            wbs = [r["write_bytes"] for r in c.runs]
            last = wbs[-1]
            wb = " + ".join(fmt_bytes(x) for x in last) if len(last) > 1 else fmt_bytes(last[0])
            if any(w != last for w in wbs):
                each = "/".join(fmt_bytes(sum(x or 0 for x in w)) for w in wbs)
                wb += f" (last run; {each})"
            ciphers = sorted({x for r in c.runs for x in r["cipher_cs"] + r["cipher_sc"]})
            clients = sorted({x for r in c.runs for x in r["clients"]})
            neg = ", ".join(ciphers) or "none logged"
            if clients:
                neg += f" ({', '.join(clients)})"
            notes = []
            busy = sum(1 for r in c.runs if r["busy"])
            if busy:
                notes.append(f"{busy} of {len(c.runs)} runs started on a busy machine")
            if c.error:
                notes.append(f"**ERROR** {c.error}")
            bad = [n for n in c.check_notes if n.startswith("run ")]
            if bad:
                notes.append("**CHECK FAILED**: " + "; ".join(bad))
            elif c.check:
                notes.append("output checked after every run")
            notes += [n for n in c.check_notes if not n.startswith("run ")]
            if any(ci != CIPHER for ci in ciphers) and ciphers:
                notes.append(f"**cipher is not {CIPHER}**")
            cmd = c.show.replace("|", "\\|")
            pxs = "—" if px is None else f"{px:.2f}"
            out.append(f"| {self.name} | {c.label} | `{cmd}` | {wall:.3f} | {runs} | {mbs} | "
                       f"{cpu:.2f} | {srv:.2f}{split} | {pxs} | {cpus:.2f} | {rss:.1f} | {wb} | "
                       f"{neg} | {'; '.join(notes) or '—'} |")
        return out

    def comparison_rows(self):
        out = []
        for label, kind, cand, others, goal in self.comparisons:
            c = self.by_tag(cand)
            os_ = [self.by_tag(t) for t in others]
            if not c.runs or any(not o.runs for o in os_):
                out.append(f"| {self.name} | {label} | — | — | {goal[0]} | "
                           f"**ERROR** (a command failed) |")
                continue
            if kind == "speed":
                o = os_[0]
                ratio = self.med(o) / self.med(c)
                n = min(len(c.runs), len(o.runs))
                per = [o.runs[i]["wall"] / c.runs[i]["wall"] for i in range(n)]
                ok = None if goal[1] is None else goal[1](ratio, per)
                each = "/".join(f"{p:.2f}" for p in per)
                out.append(f"| {self.name} | {label} | **{ratio:.2f}** | "
                           f"{each} (min {min(per):.2f}) | {goal[0]} | {verdict(ok)} |")
            elif kind == "overlap":
                stages = [self.med(o) for o in os_]
                e2e = self.med(c)
                r_max, r_sum = e2e / max(stages), e2e / sum(stages)
                # On a loopback server both stages burn CPU on the same cores (the upload: client
                # and server crypto, the server's writes), so they cannot both run at full speed:
                # the CPU they need together / the number of CPUs is a floor for the job too.
                cpu = sum(self.med(o, "cpu") + self.med(o, "server_cpu") for o in os_)
                floor = cpu / (os.cpu_count() or 1)
                ok = goal[1](r_max, None)
                each = "/".join(f"{s:.2f}" for s in stages)
                out.append(f"| {self.name} | {label} | **{r_max:.2f}** × slowest stage, "
                           f"{r_sum:.2f} × sum | stages {each} s, job {e2e:.2f} s; CPU floor "
                           f"{floor:.2f} s (the stages' client + server CPU, {cpu:.2f} s, / "
                           f"{os.cpu_count()} CPUs): job = {e2e / floor:.2f} × floor | {goal[0]} | "
                           f"{verdict(ok)} |")
            elif kind == "zero_write":
                last = [sum(x or 0 for x in r["write_bytes"]) for r in c.runs]
                ok = all(x == 0 for x in last)
                base = [sum(x or 0 for x in r["write_bytes"]) for r in os_[0].runs] if os_ else []
                mine = "/".join(fmt_bytes(x) for x in last)
                theirs = "/".join(fmt_bytes(x) for x in base)
                out.append(f"| {self.name} | {label} | {mine} bytes | baseline {theirs} bytes | "
                           f"{goal[0]} | {verdict(ok)} |")
        return out


def verdict(ok):
    return "—" if ok is None else ("met" if ok else "**not met**")


# ----------------------------------------------------------------------------------------------
# parts

def upload_contenders(p, server, name, digest, port, port_name, prefix, with_flush):
    """The random-file uploads: sftp put (+ put -f), rclone rcat, diskferry -O raw."""
    size = os.path.getsize(os.path.join(BENCH_DIR, name))

    def add(tag, label, role, steps, remote, batch=None):
        shown = show(steps, port, port_name)
        if batch:
            shown += f"  # {batch[0]}: {batch[1]}"
        p.add(Contender(tag, label, role, steps, shown, remote=remote, payload=size,
                        check=raw_check(server, remote, size, digest)))

    def sftp_put(tag, flags, remote):
        line = f"put {flags}{name} backups/{remote}"
        batch = write_batch(f"{prefix}-{tag}", line)
        return [(sftp_argv(batch, port), None)], (batch, line)

    steps, batch = sftp_put("sftp", "", f"{prefix}-sftp.raw")
    add("sftp", "OpenSSH sftp put", "base", steps, f"{prefix}-sftp.raw", batch)
    if with_flush:
        steps, batch = sftp_put("sftp-f", "-f ", f"{prefix}-sftp-f.raw")
        add("sftp-f", "OpenSSH sftp put -f (fsync, as diskferry does)", "other", steps,
            f"{prefix}-sftp-f.raw", batch)
    add("rclone", "rclone rcat", "other", [(rclone_argv(port, f"{prefix}-rclone.raw"), name)],
        f"{prefix}-rclone.raw")
    add("df", "diskferry -O raw", "cand",
        [(diskferry_argv(name, "raw", port, f"{prefix}-df.raw"), None)], f"{prefix}-df.raw")


def part_loopback(server, reps):
    name, digest = random_file(LOOPBACK_MIB)
    p = Part("sftp-loopback", f"loopback, {LOOPBACK_MIB} MiB of random data", server,
             lambda c: [name], reps)
    upload_contenders(p, server, name, digest, server.srv.port, "$PORT", "lb", with_flush=True)
    p.comparisons = [
        ("diskferry vs OpenSSH sftp put", "speed", "df", ["sftp"],
         ("≥ 1.0, no run < 0.9", lambda r, per: r >= 1.0 and min(per) >= 0.9)),
        ("diskferry vs rclone rcat", "speed", "df", ["rclone"], ("> 1.0", lambda r, per: r > 1.0)),
        ("diskferry vs OpenSSH sftp put -f (both fsync)", "speed", "df", ["sftp-f"],
         ("none", None)),
    ]
    return p


def part_rtt30(server, reps):
    name, digest = random_file(RTT_MIB)
    port = server.start_proxy(RTT_DELAY_MS)
    rtt = 2 * RTT_DELAY_MS
    p = Part("sftp-rtt30", f"{rtt:g} ms round trip, {RTT_MIB} MiB of random data", server,
             lambda c: [name], reps)
    upload_contenders(p, server, name, digest, port, "$PROXY_PORT", "rtt", with_flush=False)
    p.comparisons = [
        ("diskferry vs OpenSSH sftp put", "speed", "df", ["sftp"],
         ("≥ 2.0", lambda r, per: r >= 2.0)),
        ("diskferry vs rclone rcat", "speed", "df", ["rclone"], ("none", None)),
    ]
    p.notes.append(f"Proxy: `python3 tests/integration/tcp_proxy.py --listen 0 --target "
                   f"127.0.0.1:$PORT --delay-ms {RTT_DELAY_MS:g}` (its own process; `--delay-ms` "
                   f"is the one-way delay, applied in each direction, so the round trip is "
                   f"{rtt:g} ms plus loopback); every client connects to $PROXY_PORT.")
    return p


def qcow2_check(server, name, label):
    """Size every run; `qemu-img compare` with the source + `qemu-img check` after the first."""
    state = {"done": False}

    def check(_run):
        path = server.remote(name)
        if not os.path.exists(path):
            return False, f"{name} not on the server", None
        got = os.path.getsize(path)
        if state["done"]:
            return True, "", got
        state["done"] = True
        log(f"{label} check: qemu-img compare -f raw -F qcow2 {IMG} <server>/backups/{name}")
        r = subprocess.run([QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", IMG, path],
                           cwd=BENCH_DIR, capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"qemu-img compare: {(r.stdout + r.stderr).strip()[:200]}", got
        r = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", path], capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"qemu-img check: {(r.stdout + r.stderr).strip()[:200]}", got
        return (True, f"`qemu-img compare` with {IMG} + `qemu-img check` passed "
                      f"(first run, {got:,} bytes)", got)
    return check


def size_check(server, name, want_path):
    """The file on the server must have the size of the local file `want_path` (BENCH_DIR)."""
    def check(_run):
        path = server.remote(name)
        got = os.path.getsize(path) if os.path.exists(path) else None
        want = os.path.getsize(os.path.join(BENCH_DIR, want_path))
        if got != want:
            return False, f"{name}: {got} bytes on the server, {want_path} has {want}", got
        return True, "", got
    return check


def part_e2e(server, reps):
    if not os.path.exists(os.path.join(BENCH_DIR, IMG)):
        raise SystemExit(f"bench/sftp.py: {BENCH_DIR}/{IMG} missing "
                         f"(`bench/run.sh sftp-e2e` builds it)")
    port = server.srv.port
    ref, refz, tmp = "e2e-ref.qcow2", "e2e-refz.qcow2", "e2e-tmp.qcow2"
    zstd = os.environ.get("SFTP_E2E_ZSTD", "1") != "0"
    log(f"making {ref} (the qcow2 bytes for the upload-alone stage; not timed)")
    subprocess.run([QEMU_IMG, "convert", "-O", "qcow2", IMG, ref], cwd=BENCH_DIR, check=True)
    ref_size = os.path.getsize(os.path.join(BENCH_DIR, ref))
    warm_of = {"upload": [ref], "uploadz": [refz]}
    p = Part("sftp-e2e", f"end to end: {IMG} to qcow2 on the loopback server", server,
             lambda c: warm_of.get(c.tag, [IMG]), reps)

    def cleanup():
        for f in (ref, refz):
            try:
                os.unlink(os.path.join(BENCH_DIR, f))
            except FileNotFoundError:
                pass
    p.cleanup = cleanup

    line = f"put {tmp} backups/e2e-pipe.qcow2"
    b1 = write_batch("e2e-sftp", line)
    steps = [(["qemu-img", "convert", "-O", "qcow2", IMG, tmp], None), (sftp_argv(b1, port), None)]
    p.add(Contender("pipe", "qemu-img convert to a temporary file && OpenSSH sftp put", "base",
                    steps, show(steps, port) + f"  # {b1}: {line}", remote="e2e-pipe.qcow2",
                    local_out=[tmp], check=size_check(server, "e2e-pipe.qcow2", tmp),
                    payload=ref_size))
    steps = [(diskferry_argv(IMG, "qcow2", port, "e2e-df.qcow2"), None)]
    p.add(Contender("df", "diskferry -O qcow2 to sftp://", "cand", steps, show(steps, port),
                    remote="e2e-df.qcow2", check=qcow2_check(server, "e2e-df.qcow2", "sftp-e2e"),
                    payload=ref_size))
    # -o /dev/null reads the source twice but is still cheaper than the copy into a tmpfs file
    # (~0.9 s of system time for 1.7 GB here), and the plain conversion costs next to nothing.
    steps = [(["diskferry", "convert", IMG, "-O", "qcow2", "-o", "/dev/null", "--no-progress"],
              None)]
    p.add(Contender("convert", "stage alone: conversion to /dev/null (reads the source twice)",
                    "stage", steps, show(steps, port), payload=ref_size))
    steps = [(diskferry_argv(ref, "raw", port, "e2e-up.raw"), None)]
    p.add(Contender("upload", f"stage alone: upload of the same qcow2 bytes ({ref} sent as raw)",
                    "stage", steps, show(steps, port), remote="e2e-up.raw", payload=ref_size,
                    check=size_check(server, "e2e-up.raw", ref)))
    p.comparisons = [
        ("diskferry vs qemu-img convert && sftp put", "speed", "df", ["pipe"],
         ("> 1.0 (less time)", lambda r, per: r > 1.0)),
        ("diskferry's local write_bytes (/proc/PID/io), every run", "zero_write", "df", ["pipe"],
         ("0 bytes", None)),
        ("overlap, plain qcow2: job time / its slowest stage alone", "overlap", "df",
         ["convert", "upload"], ("≤ 1.10 × slowest stage", lambda r, per: r <= 1.10)),
    ]
    p.notes.append(f"`{ref}` ({ref_size:,} bytes) is made once per run of the part with "
                   f"`qemu-img convert -O qcow2 {IMG} {ref}` (not timed) for the upload-alone "
                   f"stage; diskferry skips all-zero blocks, so it sends the same bytes its qcow2 "
                   f"job sends.")
    if not zstd:
        return p

    log(f"making {refz} (diskferry's zstd-cluster qcow2 for its upload-alone stage; not timed)")
    subprocess.run([DISKFERRY, "convert", IMG, "-O", "qcow2", "--qcow2-compression", "zstd",
                    "-o", refz, "--no-progress"], cwd=BENCH_DIR, check=True)
    refz_size = os.path.getsize(os.path.join(BENCH_DIR, refz))
    z = ["--qcow2-compression", "zstd"]
    argv = diskferry_argv(IMG, "qcow2", port, "e2e-dfz.qcow2")
    steps = [(argv[:5] + z + argv[5:], None)]
    p.add(Contender("dfz", "diskferry -O qcow2 --qcow2-compression zstd to sftp://", "other",
                    steps, show(steps, port), remote="e2e-dfz.qcow2", payload=refz_size,
                    check=qcow2_check(server, "e2e-dfz.qcow2", "sftp-e2e zstd")))
    # Not -o /dev/null here: a stream compresses every cluster twice (once to plan, once to
    # write); a file output is one pass like the job, and on tmpfs it costs no disk writes.
    shm = "/dev/shm/diskferry-bench-e2e-conv.qcow2"
    steps = [(["diskferry", "convert", IMG, "-O", "qcow2"] + z + ["-o", shm, "--no-progress"],
              None)]
    p.add(Contender("convz", "stage alone: zstd-cluster conversion, one pass, to a file on tmpfs",
                    "stage", steps, show(steps, port), local_out=[shm, shm + ".partial"],
                    payload=refz_size))
    steps = [(diskferry_argv(refz, "raw", port, "e2e-upz.raw"), None)]
    p.add(Contender("uploadz", f"stage alone: upload of the same zstd-cluster qcow2 bytes "
                    f"({refz} sent as raw)", "stage", steps, show(steps, port),
                    remote="e2e-upz.raw", payload=refz_size,
                    check=size_check(server, "e2e-upz.raw", refz)))
    p.comparisons.append(
        ("overlap, zstd clusters (CPU-heavy conversion): job time / its slowest stage alone",
         "overlap", "dfz", ["convz", "uploadz"],
         ("≤ 1.10 × slowest stage", lambda r, per: r <= 1.10)))
    p.notes.append(f"`{refz}` ({refz_size:,} bytes) is made once per run of the part with "
                   f"`diskferry convert {IMG} -O qcow2 --qcow2-compression zstd -o {refz}` "
                   f"(not timed).")
    return p


def part_restore(server, reps):
    """Restore of disk8g.img's backup from the loopback server to a local raw file: diskferry
    convert sftp://... against `sftp get` to a temporary file (+ `zstd -d`) + `qemu-img convert`,
    for a .qcow2 and a .qcow2.zst on the server (both made by diskferry, not timed)."""
    if not os.path.exists(os.path.join(BENCH_DIR, IMG)):
        raise SystemExit(f"bench/sftp.py: {BENCH_DIR}/{IMG} missing "
                         f"(`bench/run.sh restore` builds it)")
    port = server.srv.port
    names = {"q": "restore.qcow2", "z": "restore.qcow2.zst"}
    for key, extra in (("q", []), ("z", ["--compress", "zstd"])):
        log(f"making {names[key]} on the server (not timed)")
        subprocess.run([DISKFERRY, "convert", IMG, "-O", "qcow2", *extra, "--no-progress", "-o",
                        server.remote(names[key])], cwd=BENCH_DIR, check=True)
    sizes = {k: os.path.getsize(server.remote(n)) for k, n in names.items()}
    # the decompressed qcow2 (what zstd -d leaves as the second temporary file)
    qsize = sizes["q"]
    p = Part("sftp-restore", f"restore: {IMG}'s backup from the loopback server to raw", server,
             lambda c: [], reps)

    def same_as_source(out):
        def check(run_index):
            if run_index > 0:
                return True, "", None
            c = subprocess.run(["cmp", IMG, out], cwd=BENCH_DIR, capture_output=True, text=True)
            if c.returncode != 0:
                return False, f"{out} differs from {IMG}: {c.stdout.strip()}", None
            return True, "", None
        return check

    url = lambda n: f"sftp://dfuser@127.0.0.1:{port}/backups/{n}"  # noqa: E731
    df = lambda n, out: ["diskferry", "convert", url(n), "-O", "raw", "-o", out,  # noqa: E731
                         "--identity", KEY, "--known-hosts", KH, "--no-progress"]
    b1 = write_batch("restore-get", f"get backups/{names['q']} restore-tmp.qcow2")
    steps = [(sftp_argv(b1, port), None),
             (["qemu-img", "convert", "-O", "raw", "restore-tmp.qcow2", "restore-base.img"], None)]
    p.add(Contender("get", "OpenSSH sftp get && qemu-img convert -O raw", "base", steps,
                    show(steps, port) + f"  # {b1}: get backups/{names['q']} restore-tmp.qcow2",
                    local_out=["restore-tmp.qcow2", "restore-base.img"],
                    check=same_as_source("restore-base.img"), payload=sizes["q"]))
    steps = [(df(names["q"], "restore-df.img"), None)]
    p.add(Contender("df", "diskferry convert sftp://….qcow2 -O raw", "cand", steps,
                    show(steps, port), local_out=["restore-df.img", "restore-df.img.partial"],
                    check=same_as_source("restore-df.img"), payload=sizes["q"]))
    b2 = write_batch("restore-getz", f"get backups/{names['z']} restore-tmp.qcow2.zst")
    steps = [(sftp_argv(b2, port), None),
             (["zstd", "-q", "-d", "-f", "restore-tmp.qcow2.zst", "-o", "restore-tmpz.qcow2"],
              None),
             (["qemu-img", "convert", "-O", "raw", "restore-tmpz.qcow2", "restore-basez.img"],
              None)]
    p.add(Contender("getz", "OpenSSH sftp get && zstd -d && qemu-img convert -O raw", "base",
                    steps, show(steps, port) + f"  # {b2}: get backups/{names['z']} "
                    "restore-tmp.qcow2.zst",
                    local_out=["restore-tmp.qcow2.zst", "restore-tmpz.qcow2", "restore-basez.img"],
                    check=same_as_source("restore-basez.img"), payload=sizes["z"]))
    steps = [(df(names["z"], "restore-dfz.img"), None)]
    p.add(Contender("dfz", "diskferry convert sftp://….qcow2.zst -O raw", "cand", steps,
                    show(steps, port), local_out=["restore-dfz.img", "restore-dfz.img.partial"],
                    check=same_as_source("restore-dfz.img"), payload=sizes["z"]))
    p.comparisons = [
        ("restore .qcow2: diskferry vs sftp get && qemu-img convert", "speed", "df", ["get"],
         ("≥ 1.0 (time ratio ≤ 1.0)", lambda r, per: r >= 1.0)),
        ("restore .qcow2.zst: diskferry vs sftp get && zstd -d && qemu-img convert", "speed",
         "dfz", ["getz"], ("≥ 1.0 (time ratio ≤ 1.0)", lambda r, per: r >= 1.0)),
    ]
    p.notes.append(f"Temporary bytes on disk beyond the output: sftp get + qemu-img: the "
                   f"downloaded qcow2 ({sizes['q']:,} bytes); with zstd: the .zst "
                   f"({sizes['z']:,}) + the decompressed qcow2 ({qsize:,}, peak "
                   f"{sizes['z'] + qsize:,} before rm); diskferry: 0 (it writes only "
                   f"OUT.partial, renamed to OUT). The raw outputs are sparse in every case.")
    p.notes.append("diskferry reads the .qcow2.zst twice: pass 1 (header, its L2 tables and L1 "
                   "table, which diskferry writes last) and the data pass, each a download and "
                   "a decompression from the start (zstd cannot seek).")

    def cleanup():
        for n in names.values():
            try:
                os.unlink(server.remote(n))
            except FileNotFoundError:
                pass
    p.cleanup = cleanup
    return p


PARTS = {"loopback": part_loopback, "rtt30": part_rtt30, "e2e": part_e2e,
         "restore": part_restore}


# ----------------------------------------------------------------------------------------------
# report

def tool_versions():
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {"openssh": first(["ssh", "-V"]), "rclone": first(["rclone", "version"]),
            "diskferry": first([DISKFERRY, "--version"]),
            "qemu-img": first([QEMU_IMG, "--version"])}


def commit():
    if os.environ.get("DISKFERRY_REV"):
        return os.environ["DISKFERRY_REV"]

    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True,
                              text=True).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=all", "--", "lib", "cli",
                    "CMakeLists.txt")
        return rev + (" (with uncommitted changes in lib/ or cli/)" if dirty else "")
    except OSError:
        return "unknown"


def report(parts, started, idle, load0, versions):
    n_runs = sum(len(c.runs) for p in parts for c in p.contenders)
    n_busy = sum(1 for p in parts for c in p.contenders for r in c.runs if r["busy"])
    n_cc = sum(1 for p in parts for c in p.contenders for r in c.runs if r["compilers"])
    load1 = " ".join(open("/proc/loadavg").read().split()[:3])
    now = datetime.datetime.now(datetime.timezone.utc)
    L = [
        f"## SFTP upload, {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"- diskferry: `{DISKFERRY}` ({versions['diskferry']}), commit {commit()}",
        f"- {versions['openssh']} (sshd and sftp); {versions['rclone']}; {versions['qemu-img']}",
        "- Server: OpenSSH sshd on 127.0.0.1 (tests/integration/sftp_servers.py OpenSSHServer, "
        "chroot + internal-sftp, LogLevel DEBUG1); the uploads land on the same filesystem as "
        "BENCH_DIR",
        f"- Commands run in BENCH_DIR={BENCH_DIR}; `diskferry` = {DISKFERRY}; `{KEY}`, `{KH}` "
        f"and the batch files are below BENCH_DIR/{SFTP_DIR}; $PORT = the server's port",
        f"- REPS={parts[0].reps if parts else REPS}, interleaved, order alternating per run; "
        "median wall time; CPU = median client user+sys s (wait4 rusage, incl. children such as "
        "ssh under sftp); server CPU = median CPU s of the sshd session processes (sampled every "
        "50 ms), in brackets split into the one that runs the SSH connection and its crypto "
        "(`sshd: USER@notty`) + the internal-sftp child that writes the file; CPUs used = "
        "(client + server + proxy CPU) / wall; write_bytes = the client's /proc/PID/io at exit "
        "(last run)",
        f"- OpenSSH sftp forced to `-o Ciphers={CIPHER}`; diskferry and rclone 1.60 choose their "
        "own (rclone has no cipher option); the cipher column is what the server logged for each "
        "client (client->server and server->client, all runs)",
        f"- Machine: {os.cpu_count()} CPUs; load average at the start {load0}, at the end {load1}; "
        f"{n_busy} of {n_runs} timed runs started with the CPUs > {IDLE_MAX_BUSY:g}% busy, "
        f"{n_cc} with compiler/linker processes of other sessions running (idle wait: "
        f"{idle.waited:.0f} s in all)",
        "",
        "| part | tool | command | median s | runs s | MB/s | CPU s | "
        "server CPU s (sshd + sftp-server) | proxy CPU s | CPUs used | peak RSS MiB | "
        "local write_bytes | cipher (client) | notes |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in parts:
        L += p.rows()
    L += ["",
          "Speed ratio = the other command's median wall time / diskferry's (≥ 1.0: diskferry "
          "faster); per run: run i of one over run i of the other.",
          "",
          "| part | comparison | speed ratio | per run | goal | verdict |",
          "|---|---|---:|---|---|---|"]
    for p in parts:
        L += p.comparison_rows()
    notes = [f"- {p.name}: {n}" for p in parts for n in p.notes]
    if notes:
        L += [""] + notes
    L += ["", f"Total time of bench/sftp.py: {time.monotonic() - started:.0f} s"]
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help="loopback rtt30 e2e restore (default: all but restore)")
    ap.add_argument("--md-out", help="append the Markdown section to this file")
    ap.add_argument("--json", help="write every run's numbers to this file")
    a = ap.parse_args()
    names = a.parts or [n for n in PARTS if n != "restore"]
    for n in names:
        if n not in PARTS:
            ap.error(f"unknown part {n!r} (expected: {' '.join(PARTS)})")
    if os.geteuid() != 0:
        raise SystemExit("bench/sftp.py: needs root (the OpenSSH test server chroots and setuids)")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("sftp", "ssh", "sshd", "rclone"):
        if not shutil.which(tool, path=path):
            raise SystemExit(f"bench/sftp.py: {tool} not found (scripts/setup.sh installs it)")
    if not os.access(DISKFERRY, os.X_OK):
        raise SystemExit(f"bench/sftp.py: no diskferry binary at {DISKFERRY} (set DISKFERRY=...)")
    if REPS < 1:
        raise SystemExit("REPS must be >= 1")
    os.makedirs(BENCH_DIR, exist_ok=True)
    os.makedirs(OUT_DIR, exist_ok=True)
    started = time.monotonic()
    load0 = " ".join(open("/proc/loadavg").read().split()[:3])
    versions = tool_versions()
    idle = Idle()
    parts, failures = [], []
    for n in names:
        server = Server()
        p = None
        try:
            p = PARTS[n](server, REPS)
            parts.append(p)
            p.run(idle)
        finally:
            if p is not None and hasattr(p, "cleanup"):
                p.cleanup()
            server.stop()
        for c in p.contenders:
            if c.error:
                failures.append(f"{p.name}: {c.label}: {c.error}")
            failures += [f"{p.name}: {c.label}: {x}" for x in c.check_notes
                         if x.startswith("run ")]
    text = report(parts, started, idle, load0, versions)
    if failures:
        text += "\nFAILURES:\n\n" + "".join(f"- {f}\n" for f in failures)
    if a.md_out:
        with open(a.md_out, "a") as f:
            f.write(text)
    else:
        path = os.path.join(OUT_DIR, f"results-{time.strftime('%Y-%m-%d-%H%M%S')}-sftp.md")
        with open(path, "w") as f:
            f.write(text)
        log(f"results written to {path}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({p.name: {c.tag: {"label": c.label, "command": c.show, "runs": c.runs,
                                        "error": c.error, "checks": c.check_notes}
                                for c in p.contenders} for p in parts}, f, indent=1)
    print(text)
    for f in (".sftp-stdout.out", ".sftp-stderr.out"):
        try:
            os.unlink(os.path.join(BENCH_DIR, f))
        except FileNotFoundError:
            pass
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
