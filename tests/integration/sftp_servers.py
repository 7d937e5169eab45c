#!/usr/bin/env python3
"""Real SFTP servers on 127.0.0.1 for diskferry's integration tests (Python 3.11 stdlib only).

Three servers, all with the same layout, modelled on a Hetzner Storage Box:

    SFTP path "/"          -> server.root     root-owned 0755, NOT writable by the user
    SFTP path "/backups"   -> server.backups  owned by the test user, writable

  * OpenSSHServer  a dedicated `sshd -D -e -f CONFIG` (ChrootDirectory + ForceCommand internal-sftp)
  * ProFTPDServer  `proftpd -n -c CONFIG` with mod_sftp (DefaultRoot as chroot, publickey auth)
  * RcloneServer   `rclone serve sftp ROOT` run as the test user

Every server is a context manager (or call start()/stop()); stop() kills the server and its
per-connection children, unmounts the optional quota filesystem and removes its directories,
also when the test failed.  An atexit hook stops servers a test forgot to stop, and start()
sweeps directories left behind by dead test processes (a killed test run).

    with OpenSSHServer() as srv:
        kh = os.path.join(tmp, "known_hosts"); srv.write_known_hosts(kh)
        sftp_batch(srv, ["put /etc/hostname backups/x"], known_hosts=kh)
        open(os.path.join(srv.backups, "x")).read()

Needs root for OpenSSH and ProFTPD (chroot, setuid, system user, loop mounts); RcloneServer also
works unprivileged (then without the root-owned-root semantics).  `Server.unavailable_reason()`
tells why a server cannot run here (missing binary, not root) so a test can skip.
Set DISKFERRY_TEST_KEEP=1 to keep a server's directory (config, logs) after stop() for debugging.

Observed quirks (Debian 12: OpenSSH 9.2p1, ProFTPD 1.3.8 mod_sftp/1.1.1, rclone 1.60.1):
  * OpenSSH: extensions posix-rename, statvfs, fstatvfs, hardlink, fsync, lsetstat, limits,
    expand-path, copy-data, home-directory, users-groups-by-id; limits@openssh.com says
    max packet 262144, max read/write 261120, 19995 handles.  A message over 256 KiB kills the
    session.  Channel window 2 MiB (opened at 0, then adjusted).
  * ProFTPD: extensions versions(2..6), fsync, posix-rename, statvfs, fstatvfs, hardlink,
    home-directory; no limits@openssh.com.  Accepts a 512 KiB WRITE, a 1 MiB one kills the
    session.  Channel window 4 GiB.  Banner "SSH-2.0-mod_sftp".  Host keys: rsa (PEM), ecdsa,
    ed25519 all work.  Its master process retitles itself "proftpd: (accepting connections)".
  * rclone serve sftp (VFS cache mode off, the default here): extensions hardlink, posix-rename,
    statvfs (but `df` fails); no limits.  Max message 256 KiB like OpenSSH.  Writes must be
    sequential (an out-of-order WRITE fails "Illegal seek" after --vfs-write-wait), opening an
    existing file for writing truncates it (no resume), write errors such as ENOSPC show up only
    at CLOSE, and the partial file is then deleted.  Owner shown as uid 0.  Listings are cached
    unless --dir-cache-time 0s (set here).  For random-access writes pass
    extra_config=["--vfs-cache-mode", "writes", "--vfs-write-back", "0s"] (then the file
    reaches .root asynchronously after CLOSE).
  * Disk full (chroot_quota_mb) is reported as SSH_FX_FAILURE by all three.
"""
import atexit
import base64
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

__all__ = [
    "ServerError", "ServerUnavailable", "OpenSSHServer", "ProFTPDServer", "RcloneServer",
    "ALL_SERVERS", "client_keypair", "ensure_system_user", "free_port", "pubkey_fingerprint",
    "write_known_hosts", "sftp_command", "sftp_batch", "probe_server_info", "skip_unless_available",
]

IS_ROOT = os.geteuid() == 0
DEFAULT_USER = "dfuser"
BASE_DIR = os.environ.get("DISKFERRY_TEST_SRV_DIR") or (
    "/srv/diskferry-test" if IS_ROOT
    else os.path.join(tempfile.gettempdir(), f"diskferry-test-{os.getuid()}"))
KEEP = os.environ.get("DISKFERRY_TEST_KEEP") == "1"


class ServerError(RuntimeError):
    """A server could not be prepared or did not come up (message holds its log)."""


class ServerUnavailable(ServerError):
    """The server cannot run on this machine (binary missing, not root); tests should skip."""


# ----------------------------------------------------------------------------------------------
# small helpers

def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _run(args, check=True, **kw):
    p = subprocess.run([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, **kw)
    if check and p.returncode != 0:
        raise ServerError(f"{' '.join(map(str, args))} exited {p.returncode}: "
                          f"{p.stdout.decode(errors='replace').strip()}")
    return p


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago (the servers retry on a bind race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _keygen(path, key_type, comment, pem=False):
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", path]
    if key_type == "rsa":
        args += ["-b", "3072"]
    if pem:
        args += ["-m", "PEM"]
    for p in (path, path + ".pub"):
        if os.path.lexists(p):
            os.unlink(p)
    _run(args)
    os.chmod(path, 0o600)
    return path


_KEY_LOCK = threading.Lock()


def client_keypair(directory, key_type="ed25519", name=None):
    """(private_key_path, public_key_path) of a passphrase-less client key in `directory`,
    generated once and reused afterwards (so several servers can share one key).  Mode 0600."""
    os.makedirs(directory, exist_ok=True)
    priv = os.path.join(directory, name or f"id_{key_type}")
    with _KEY_LOCK:
        if not (os.path.exists(priv) and os.path.exists(priv + ".pub")):
            _keygen(priv, key_type, "diskferry-test-client")
    os.chmod(priv, 0o600)
    return priv, priv + ".pub"


def pubkey_fingerprint(pub_line):
    """'SHA256:...' of an OpenSSH public key line, as `ssh-keygen -lf` prints it."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


_USER_LOCK = threading.Lock()


def ensure_system_user(name):
    """Create system user `name` if missing (no home, nologin shell, home '/' so a chroot login
    lands at the chroot root) and make its password field '*' (not '!', which sshd refuses
    with UsePAM no).  Idempotent; tolerates a concurrent creation.  Returns the pwd entry."""
    with _USER_LOCK:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if not IS_ROOT:
                raise ServerUnavailable(f"user {name} does not exist and we are not root")
            nologin = _which("nologin") or "/usr/sbin/nologin"
            for attempt in range(5):
                try:
                    grp.getgrnam(name)
                    group = ["--gid", name]        # a group of that name is left over
                except KeyError:
                    group = ["--user-group"]
                p = _run(["useradd", "--system", "--no-create-home", "--home-dir", "/",
                          "--shell", nologin] + group + [name], check=False)
                try:
                    pw = pwd.getpwnam(name)        # created now, or by a parallel run
                    break
                except KeyError:
                    if attempt == 4:               # e.g. 10: /etc/passwd locked: retry
                        raise ServerError(f"useradd {name} failed ({p.returncode}): "
                                          f"{p.stdout.decode(errors='replace')}") from None
                    time.sleep(0.2)
        if IS_ROOT:
            with open("/etc/shadow") as f:
                entry = next((ln.split(":") for ln in f if ln.startswith(name + ":")), None)
            if entry is None or entry[1] != "*":
                _run(["usermod", "-p", "*", name])
        return pw


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid):
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
        return s[s.rfind(b")") + 2:].split()[0] != b"Z"
    except OSError:
        return False


def _kill_all(pids, grace=3.0):
    """SIGTERM `pids`, wait up to `grace` seconds, SIGKILL the rest."""
    pids = [p for p in pids if p and p > 1]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _mounts_under(path):
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mounts") as f:
        for ln in f:
            mp = ln.split()[1].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def _umount(mp):
    if _run(["umount", mp], check=False).returncode != 0:
        time.sleep(0.3)
        if _run(["umount", mp], check=False).returncode != 0:
            _run(["umount", "-l", mp], check=False)


def _process_refers_to(pid, d):
    """True if process `pid` names directory `d` in its command line or has a file open in it
    (proftpd rewrites its command line, but keeps its logs open)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if d.encode() in f.read():
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(d + "/"):
                    return True
            except OSError:
                pass
    except OSError:
        pass
    return False


def _sweep_stale():
    """Remove directories of servers whose test process died without stop()."""
    try:
        names = os.listdir(BASE_DIR)
    except OSError:
        return
    for n in names:
        d = os.path.join(BASE_DIR, n)
        try:
            with open(os.path.join(d, "state", "owner")) as f:
                owner = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            # no owner file: a directory being created right now, or junk older than an hour
            try:
                if time.time() - os.stat(d).st_mtime < 3600:
                    continue
            except OSError:
                continue
            owner = None
        if owner is not None and _alive(owner):
            continue
        try:
            with open(os.path.join(d, "state", "server.pid")) as f:
                spid = int(f.read().split()[0])
            if _process_refers_to(spid, d):   # really ours, not a recycled pid
                _kill_all([spid] + _descendants(spid))
        except (OSError, ValueError, IndexError):
            pass
        for mp in _mounts_under(d):
            _umount(mp)
        if not _mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)


_LIVE = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers():
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def write_known_hosts(path, *entries):
    """Write a known_hosts file from servers and/or literal lines (mode 0644)."""
    lines = [e.known_hosts_line() if hasattr(e, "known_hosts_line") else str(e) for e in entries]
    with open(path, "w") as f:
        f.write("".join(ln.rstrip("\n") + "\n" for ln in lines))
    return path


def skip_unless_available(server_cls):
    """unittest decorator: skip the test/class with the reason the server can't run here."""
    import unittest
    reason = server_cls.unavailable_reason()
    return unittest.skipIf(reason is not None, reason or "")


# ----------------------------------------------------------------------------------------------
# servers

class _SftpServer:
    """Shared machinery; see the module docstring.  Subclasses fill in the server specifics."""

    kind = "sftp"
    binary = None               # name looked up on PATH + sbin dirs
    package = None              # Debian package that ships it
    needs_root = True
    default_host_key_type = "ed25519"
    host_key_types = ("ed25519", "rsa", "ecdsa")
    startup_timeout = 15.0

    def __init__(self, user=DEFAULT_USER, *, host_key_type=None, chroot_quota_mb=None,
                 client_key=None, authorized_keys=(), port=None, subdir="backups",
                 extra_config=None):
        """user: SFTP login name (a system user for OpenSSH/ProFTPD, created when missing).
        host_key_type: 'ed25519' | 'rsa' | 'ecdsa' (default per server).
        chroot_quota_mb: make `subdir` a loop-mounted ext4 of that many MiB (disk-full tests).
        client_key: path of an existing private key to authorize (its .pub must exist); default:
            a fresh ed25519 key in the server's state dir.
        authorized_keys: further public key lines (OpenSSH format) to authorize.
        port: fixed port (default: a free one).  subdir: the user-writable dir inside the root.
        extra_config: server-specific extra config (sshd: dict of options; proftpd: lines;
            rclone: extra command-line args)."""
        self.host = "127.0.0.1"
        self.user = user
        self.host_key_type = host_key_type or self.default_host_key_type
        if self.host_key_type not in self.host_key_types:
            raise ValueError(f"{self.kind}: host key type {self.host_key_type!r} not in "
                             f"{self.host_key_types}")
        self.chroot_quota_mb = chroot_quota_mb
        self._fixed_port = port
        self.port = port
        self.subdir = subdir
        self.extra_config = extra_config
        self._given_client_key = client_key
        self._extra_authorized = list(authorized_keys)
        self.base = self.state_dir = self.root = self.backups = None
        self.client_key = self.client_pub = None
        self.host_key = None
        self.proc = None
        self._log_f = None
        self._key_generation = 0

    # -- availability ----------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls):
        """None if this server can run here, else a human-readable reason (for skipTest)."""
        if cls.needs_root and not IS_ROOT:
            return f"{cls.kind}: needs root (chroot, setuid, loop mounts)"
        if not _which(cls.binary):
            return f"{cls.kind}: {cls.binary} not installed (apt-get install {cls.package})"
        for tool in ("ssh-keygen", "sftp"):
            if not _which(tool):
                return f"{tool} not installed (apt-get install openssh-client)"
        return None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        reason = self.unavailable_reason()
        if reason:
            raise ServerUnavailable(reason)
        if self.proc is not None:
            return self
        try:
            if self.base is None:
                self._prepare_dirs()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Kill the server and its session processes, unmount, remove the directories.
        Safe to call repeatedly and on a half-started server."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self._kill_server()
        if self.base:
            for mp in _mounts_under(self.base):
                _umount(mp)
            if not KEEP and not _mounts_under(self.base):
                shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        self.port = self._fixed_port

    def restart(self):
        """Stop and start the server process (same port, keys and files)."""
        self._kill_server()
        self._launch()
        return self

    def restart_with_new_host_key(self, key_type=None):
        """Restart with a freshly generated host key (optionally of another type), same port:
        a client's known_hosts entry from before is now a 'host key changed' mismatch.
        Returns the new known_hosts line."""
        if key_type:
            if key_type not in self.host_key_types:
                raise ValueError(f"{self.kind}: host key type {key_type!r} unsupported")
            self.host_key_type = key_type
        self._kill_server()
        self._key_generation += 1
        self._make_host_key()
        self._launch()
        return self.known_hosts_line()

    def kill_sessions(self):
        """Kill every per-connection process (OpenSSH/ProFTPD) but keep the listener:
        simulates the server dropping the client.  For rclone (one process) this restarts it."""
        if self.proc is None:
            return
        if self.forks_sessions:
            _kill_all(_descendants(self.proc.pid), grace=1.0)
        else:
            self.restart()

    forks_sessions = True

    # -- info for tests ----------------------------------------------------------------------
    @property
    def host_key_pub_line(self):
        with open(self.host_key + ".pub") as f:
            return f.read().strip()

    def known_hosts_line(self, host=None, port=None):
        """known_hosts line for this server's host key, '[127.0.0.1]:PORT type base64'
        (plain host for port 22).  host/port override e.g. for a proxy in front of it."""
        host = host or self.host
        port = port or self.port
        ktype, b64 = self.host_key_pub_line.split()[:2]
        name = host if port == 22 else f"[{host}]:{port}"
        return f"{name} {ktype} {b64}"

    def write_known_hosts(self, path, port=None):
        return write_known_hosts(path, self.known_hosts_line(port=port))

    def host_key_fingerprint(self):
        """'SHA256:...' of the host key, as `ssh-keygen -lf` prints it."""
        return pubkey_fingerprint(self.host_key_pub_line)

    def url(self, path=""):
        """sftp://USER@127.0.0.1:PORT/PATH (PATH is relative to the SFTP root '/')."""
        return f"sftp://{self.user}@{self.host}:{self.port}/{str(path).lstrip('/')}"

    def local_path(self, sftp_path):
        """Local file behind an absolute SFTP path, e.g. '/backups/a.qcow2'."""
        return os.path.join(self.root, str(sftp_path).lstrip("/"))

    def log_text(self):
        """Everything the server logged so far (stderr and, where separate, its own logs)."""
        out = []
        for name in self._log_files():
            try:
                with open(os.path.join(self.state_dir, name), errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()}")
            except OSError:
                pass
        return "\n".join(out)

    def _log_files(self):
        return ["server.log"]

    def __repr__(self):
        return f"<{type(self).__name__} {self.user}@{self.host}:{self.port} root={self.root}>"

    # -- preparation ---------------------------------------------------------------------------
    def _run_as(self):
        """pwd entry the files in `subdir` belong to (and rclone runs as)."""
        if IS_ROOT:
            return ensure_system_user(self.user)
        return pwd.getpwuid(os.getuid())

    def _prepare_dirs(self):
        if IS_ROOT:
            os.makedirs(BASE_DIR, exist_ok=True)
            os.chown(BASE_DIR, 0, 0)
            os.chmod(BASE_DIR, 0o755)   # chroot/StrictModes: no group/other write on the path
            parent = os.path.dirname(BASE_DIR)
            if os.stat(parent).st_mode & 0o022 or os.stat(parent).st_uid != 0:
                raise ServerError(f"{parent} must be root-owned and not group/other writable")
        else:
            os.makedirs(BASE_DIR, mode=0o700, exist_ok=True)
        _sweep_stale()
        pw = self._run_as()
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.base = tempfile.mkdtemp(prefix=f"{self.kind}-", dir=BASE_DIR)
        with _LIVE_LOCK:
            _LIVE.add(self)
        os.chmod(self.base, 0o755)
        self.state_dir = os.path.join(self.base, "state")
        self.root = os.path.join(self.base, "root")
        self.backups = os.path.join(self.root, self.subdir)
        os.mkdir(self.state_dir, 0o755)
        with open(os.path.join(self.state_dir, "owner"), "w") as f:
            f.write(f"{os.getpid()}\n")
        os.mkdir(self.root, 0o755)
        os.chmod(self.root, 0o755)
        os.mkdir(self.backups, 0o755)
        if self.chroot_quota_mb:
            self._mount_quota()
        os.chown(self.backups, self.uid, self.gid)
        os.chmod(self.backups, 0o755)
        # client key
        if self._given_client_key:
            self.client_key = os.path.abspath(self._given_client_key)
            self.client_pub = self.client_key + ".pub"
            if not os.path.exists(self.client_pub):
                raise ServerError(f"{self.client_pub} missing")
        else:
            self.client_key, self.client_pub = client_keypair(
                os.path.join(self.state_dir, "client"))
        self._make_host_key()
        self._write_authorized_keys()

    def _mount_quota(self):
        mb = int(self.chroot_quota_mb)
        if mb < 2:
            raise ValueError("chroot_quota_mb must be >= 2")
        if not IS_ROOT:
            raise ServerUnavailable("chroot_quota_mb needs root (loop mount)")
        if not _which("mkfs.ext4"):
            raise ServerUnavailable("mkfs.ext4 missing (apt-get install e2fsprogs)")
        img = os.path.join(self.state_dir, "quota.img")
        with open(img, "wb") as f:
            f.truncate(mb * 1024 * 1024)
        # -m 0 (no reserved blocks) and no journal: the user gets nearly all of it
        # (4 MiB -> ~3.7 MB free)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
              "-E", f"root_owner={self.uid}:{self.gid}", "-L", "dftestquota", img])
        _run(["mount", "-o", "loop,nosuid,nodev", img, self.backups])
        lf = os.path.join(self.backups, "lost+found")
        if os.path.isdir(lf):
            os.rmdir(lf)

    def _host_key_path(self):
        return os.path.join(self.state_dir, f"host_{self.host_key_type}_key.{self._key_generation}")

    def _make_host_key(self):
        path = self._host_key_path()
        _keygen(path, self.host_key_type, f"diskferry-test-{self.kind}-host",
                pem=(self.host_key_type == "rsa"))
        self.host_key = path

    def _authorized_lines(self):
        with open(self.client_pub) as f:
            lines = [f.read().strip()]
        return lines + [k.strip() for k in self._extra_authorized]

    def _write_authorized_keys(self):
        raise NotImplementedError

    # -- process -----------------------------------------------------------------------------
    def _command(self):
        raise NotImplementedError

    def _popen_kw(self):
        return {}

    def _launch(self):
        last = None
        for attempt in range(4):
            if self._fixed_port is None and (self.port is None or attempt > 0):
                self.port = free_port(self.host)   # a restart keeps its port
            self._write_config()
            self._log_f = open(os.path.join(self.state_dir, "server.log"), "ab")
            self._log_f.write(f"=== start {time.ctime()} port {self.port}\n".encode())
            self._log_f.flush()
            self.proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=self._log_f,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                **self._popen_kw())
            with open(os.path.join(self.state_dir, "server.pid"), "w") as f:
                f.write(f"{self.proc.pid}\n")
            try:
                self._wait_ready()
                return
            except ServerError as e:
                last = e
                text = self.log_text()
                self._kill_server()
                if self._fixed_port is None and re.search(
                        r"address already in use|bind.*failed|Cannot bind", text, re.I):
                    continue  # lost a port race; try another port
                raise
        raise last

    def _write_config(self):
        pass

    def _wait_ready(self):
        """Until the port answers with an SSH banner; ServerError with the log otherwise."""
        deadline = time.monotonic() + self.startup_timeout
        err = "no attempt"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"{self.kind} exited with {rc} while starting:\n"
                                  f"{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    s.settimeout(3.0)
                    banner = s.recv(256)
                    if banner.startswith(b"SSH-"):
                        self.banner = banner.split(b"\r\n")[0].decode(errors="replace")
                        return
                    err = f"unexpected banner {banner!r}"
            except OSError as e:
                err = repr(e)
            time.sleep(0.1)
        raise ServerError(f"{self.kind} did not accept connections on {self.host}:{self.port} "
                          f"within {self.startup_timeout}s ({err}):\n{self.log_text()}")

    def _kill_server(self):
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                _kill_all([p.pid] + _descendants(p.pid))
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._log_f is not None:
            self._log_f.close()
            self._log_f = None


class OpenSSHServer(_SftpServer):
    """Dedicated sshd: internal-sftp only, chroot like a Hetzner Storage Box.

    extra_config: dict of sshd_config options for the global section, e.g.
    {"MaxSessions": 4, "ClientAliveInterval": 5}.
    subsystem: command line of an external sftp server (e.g. the hostile test server) to run
    instead, as the user, without chroot or ForceCommand; sshd starts it through the user's
    login shell, so that user needs a real one (not nologin)."""

    kind = "openssh"
    binary = "sshd"
    package = "openssh-server"

    def __init__(self, *args, subsystem=None, **kw):
        super().__init__(*args, **kw)
        self.subsystem = subsystem

    def _write_authorized_keys(self):
        d = os.path.join(self.state_dir, "authorized_keys")
        os.makedirs(d, 0o755, exist_ok=True)
        path = os.path.join(d, self.user)
        with open(path, "w") as f:
            f.write("\n".join(self._authorized_lines()) + "\n")
        os.chmod(path, 0o644)   # sshd reads it as the user; root-owned passes StrictModes
        self.authorized_keys_file = path

    def _write_config(self):
        os.makedirs("/run/sshd", 0o755, exist_ok=True)   # privilege separation dir (Debian)
        opts = {
            "ListenAddress": self.host, "Port": self.port, "HostKey": self.host_key,
            "PidFile": os.path.join(self.state_dir, "sshd.pid"),
            "AuthorizedKeysFile": os.path.join(self.state_dir, "authorized_keys", "%u"),
            "UsePAM": "no", "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
            "PubkeyAuthentication": "yes", "PermitRootLogin": "no", "AllowUsers": self.user,
            "StrictModes": "yes", "UseDNS": "no", "LogLevel": "VERBOSE",
            "MaxStartups": "100:30:200",
            "Subsystem": f"sftp {self.subsystem or 'internal-sftp'}",
        }
        opts.update(self.extra_config or {})
        lines = [f"{k} {v}" for k, v in opts.items()]
        lines += [f"Match User {self.user}"]
        if not self.subsystem:
            lines += [f"  ChrootDirectory {self.root}", "  ForceCommand internal-sftp"]
        lines += ["  AllowTcpForwarding no", "  AllowAgentForwarding no",
                  "  X11Forwarding no", "  PermitTunnel no", "  PermitTTY no"]
        self.config = os.path.join(self.state_dir, "sshd_config")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        p = _run([_which("sshd"), "-t", "-f", self.config], check=False)
        if p.returncode != 0:
            raise ServerError(f"sshd -t rejected {self.config}: {p.stdout.decode().strip()}")

    def _command(self):
        return [_which("sshd"), "-D", "-e", "-f", self.config]


class ProFTPDServer(_SftpServer):
    """ProFTPD mod_sftp standalone; DefaultRoot is the chroot, publickey auth only.

    extra_config: list of extra proftpd.conf lines (global context)."""

    kind = "proftpd"
    binary = "proftpd"
    package = "proftpd-core proftpd-mod-crypto"
    default_host_key_type = "rsa"

    @classmethod
    def unavailable_reason(cls):
        r = super().unavailable_reason()
        if r is None and not os.path.exists("/usr/lib/proftpd/mod_sftp.so"):
            r = "proftpd: mod_sftp.so missing (apt-get install proftpd-mod-crypto)"
        return r

    def _write_authorized_keys(self):
        # mod_sftp wants RFC4716 ("---- BEGIN SSH2 PUBLIC KEY ----") blocks
        blocks = []
        tmp = os.path.join(self.state_dir, "tmp.pub")
        for ln in self._authorized_lines():
            with open(tmp, "w") as f:
                f.write(ln + "\n")
            blocks.append(_run(["ssh-keygen", "-e", "-f", tmp]).stdout.decode())
        os.unlink(tmp)
        path = os.path.join(self.state_dir, "authorized_keys.rfc4716")
        with open(path, "w") as f:
            f.write("".join(blocks))
        os.chmod(path, 0o644)
        self.authorized_keys_file = path

    def _log_files(self):
        return ["server.log", "proftpd.log", "sftp.log"]

    def _write_config(self):
        s = self.state_dir
        lines = [
            'ServerName "diskferry-test"', "ServerType standalone",
            "UseIPv6 off", f"DefaultAddress {self.host}", "SocketBindTight on",
            f"Port {self.port}", "User nobody", "Group nogroup", "Umask 022 022",
            f"PidFile {s}/proftpd.pid", f"ScoreboardFile {s}/proftpd.scoreboard",
            "DelayTable none", "WtmpLog off", "TransferLog none", "UseReverseDNS off",
            f"SystemLog {s}/proftpd.log", "AuthPAM off", "AuthOrder mod_auth_unix.c",
            "RequireValidShell off", f"DefaultRoot {self.root}", "AllowOverwrite on",
            "MaxInstances 100", "MaxLoginAttempts 3", "TimeoutIdle 600",
            "TimeoutNoTransfer 600", "TimeoutStalled 600",
            "ModulePath /usr/lib/proftpd", "LoadModule mod_sftp.c",
            "<IfModule mod_sftp.c>",
            "  SFTPEngine on", f"  SFTPLog {s}/sftp.log", f"  SFTPHostKey {self.host_key}",
            "  SFTPAuthMethods publickey",
            f"  SFTPAuthorizedUserKeys file:{self.authorized_keys_file}",
            "  SFTPCompression off",
            "</IfModule>",
        ] + list(self.extra_config or [])
        self.config = os.path.join(s, "proftpd.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _command(self):
        return [_which("proftpd"), "-n", "-q", "-c", self.config]


class RcloneServer(_SftpServer):
    """`rclone serve sftp ROOT`, run as the test user when we are root (so the root-owned
    top directory is read-only for it, like the chroots above).

    extra_config: list of extra rclone arguments, e.g. ["--vfs-cache-mode", "writes"]."""

    kind = "rclone"
    binary = "rclone"
    package = "rclone"
    needs_root = False
    forks_sessions = False

    def _write_authorized_keys(self):
        path = os.path.join(self.state_dir, "authorized_keys")
        with open(path, "w") as f:
            f.write("\n".join(self._authorized_lines()) + "\n")
        os.chmod(path, 0o644)
        self.authorized_keys_file = path

    def _make_host_key(self):
        super()._make_host_key()
        if IS_ROOT:
            os.chown(self.host_key, self.uid, self.gid)   # rclone runs as the user

    def _write_config(self):
        for d in ("rclone-home", "rclone-home/cache"):
            p = os.path.join(self.state_dir, d)
            os.makedirs(p, 0o700, exist_ok=True)
            if IS_ROOT:
                os.chown(p, self.uid, self.gid)
        conf = os.path.join(self.state_dir, "rclone.conf")
        open(conf, "a").close()
        if IS_ROOT:
            os.chown(conf, self.uid, self.gid)

    def _popen_kw(self):
        home = os.path.join(self.state_dir, "rclone-home")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "RCLONE_CONFIG": os.path.join(self.state_dir, "rclone.conf"),
               "XDG_CACHE_HOME": os.path.join(home, "cache")}
        kw = {"env": env, "cwd": home}
        if IS_ROOT:
            kw.update(user=self.uid, group=self.gid, extra_groups=[])
        return kw

    def _command(self):
        return [_which("rclone"), "serve", "sftp", self.root,
                "--addr", f"{self.host}:{self.port}", "--key", self.host_key,
                "--authorized-keys", self.authorized_keys_file, "--user", self.user,
                "--log-level", "INFO",
                # without this rclone's VFS caches listings for 5 min and files a test puts
                # into .root behind its back stay invisible
                "--dir-cache-time", "0s"] + list(self.extra_config or [])


ALL_SERVERS = (OpenSSHServer, ProFTPDServer, RcloneServer)


# ----------------------------------------------------------------------------------------------
# OpenSSH sftp client helpers

def sftp_command(server, *, known_hosts, port=None, host=None, identity=None, batch="-",
                 strict=True, extra_opts=(), verbose=0, connect_timeout=10):
    """argv of OpenSSH `sftp -b BATCH` logging in to `server` (port/host override e.g. for a
    proxy; then known_hosts must hold the line for that port: server.known_hosts_line(port=P))."""
    args = ["sftp", "-F", "/dev/null", "-b", batch, "-P", str(port or server.port),
            "-i", identity or server.client_key,
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"StrictHostKeyChecking={'yes' if strict else 'no'}",
            "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3"]
    for o in extra_opts:
        args += ["-o", o]
    if verbose:
        args.append("-" + "v" * verbose)
    args.append(f"{server.user}@{host or server.host}")
    return args


def sftp_batch(server, commands, *, known_hosts=None, port=None, host=None, identity=None,
               strict=True, extra_opts=(), verbose=0, timeout=60, check=False):
    """Run OpenSSH `sftp -b -` with `commands` (list of lines) against `server`.  Without
    known_hosts, a file with the server's key (for the given port) is written to its state dir.
    Returns CompletedProcess (stdout/stderr as str); check=True raises on a non-zero exit."""
    if known_hosts is None:
        known_hosts = os.path.join(server.state_dir, f"known_hosts.{port or server.port}")
        write_known_hosts(known_hosts, server.known_hosts_line(host=host, port=port))
    args = sftp_command(server, known_hosts=known_hosts, port=port, host=host, identity=identity,
                        strict=strict, extra_opts=extra_opts, verbose=verbose)
    p = subprocess.run(args, input="\n".join(commands) + "\n", capture_output=True, text=True,
                       timeout=timeout, errors="replace")
    if check and p.returncode != 0:
        raise AssertionError(f"sftp to {server!r} exited {p.returncode}:\n{p.stderr}\n{p.stdout}")
    return p


def _ssh_string(b, off):
    n = struct.unpack_from(">I", b, off)[0]
    return b[off + 4:off + 4 + n], off + 4 + n


def probe_server_info(server, *, port=None, timeout=20):
    """Speak SFTP v3 directly over `ssh -s ... sftp` and return what the server announces:
    {'version': int, 'extensions': {name: data_str}, 'limits': {...} (limits@openssh.com
    reply, if offered), 'banner': 'SSH-2.0-...', 'window': initial channel window,
    'max_packet': channel max packet}."""
    kh = os.path.join(server.state_dir, f"known_hosts.probe.{port or server.port}")
    write_known_hosts(kh, server.known_hosts_line(port=port))
    args = sftp_command(server, known_hosts=kh, port=port)
    # same options, but `ssh -p PORT -s user@host sftp` instead of `sftp -b - -P PORT user@host`
    opts = args[args.index("-i"):-1]
    cmd = ["ssh", "-F", "/dev/null", "-vv", "-p", str(port or server.port)] + opts + [
        "-s", f"{server.user}@{server.host}", "sftp"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    info = {"version": None, "extensions": {}, "limits": {}}

    def read_packet():
        hdr = p.stdout.read(4)
        if len(hdr) < 4:
            raise ServerError(f"{server.kind}: sftp subsystem closed: "
                              f"{p.stderr.read().decode(errors='replace')[-2000:]}")
        n = struct.unpack(">I", hdr)[0]
        return p.stdout.read(n)

    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        p.stdin.write(struct.pack(">IBI", 5, 1, 3))   # SSH_FXP_INIT v3
        p.stdin.flush()
        pkt = read_packet()
        if pkt[0] != 2:
            raise ServerError(f"{server.kind}: expected SSH_FXP_VERSION, got type {pkt[0]}")
        info["version"] = struct.unpack_from(">I", pkt, 1)[0]
        off = 5
        while off < len(pkt):
            name, off = _ssh_string(pkt, off)
            data, off = _ssh_string(pkt, off)
            info["extensions"][name.decode(errors="replace")] = data.decode(errors="replace")
        if "limits@openssh.com" in info["extensions"]:
            name = b"limits@openssh.com"
            body = struct.pack(">BI", 200, 1) + struct.pack(">I", len(name)) + name
            p.stdin.write(struct.pack(">I", len(body)) + body)
            p.stdin.flush()
            rep = read_packet()
            if rep[0] == 201:
                vals = struct.unpack_from(">QQQQ", rep, 5)
                info["limits"] = dict(zip(("max_packet_length", "max_read_length",
                                           "max_write_length", "max_open_handles"), vals))
        p.stdin.close()
        p.wait(timeout=timeout)
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read().decode(errors="replace")
    p.stdout.close()
    p.stderr.close()
    m = re.search(r"remote software version (\S+)", err)
    info["banner"] = m.group(1) if m else None
    m = re.search(r"open confirm rwindow (\d+) rmax (\d+)", err)
    if m:
        info["window"], info["max_packet"] = int(m.group(1)), int(m.group(2))
    return info


if __name__ == "__main__":  # manual smoke test: python3 sftp_servers.py [openssh|proftpd|rclone]
    import sys
    want = sys.argv[1:] or [c.kind for c in ALL_SERVERS]
    for cls in ALL_SERVERS:
        if cls.kind not in want:
            continue
        if cls.unavailable_reason():
            print(f"{cls.kind}: SKIP {cls.unavailable_reason()}")
            continue
        with cls() as srv:
            info = probe_server_info(srv)
            print(f"{cls.kind}: {srv!r} banner={info['banner']} fp={srv.host_key_fingerprint()}")
            print(f"  sftp version {info['version']}, channel window {info.get('window')}, "
                  f"channel max packet {info.get('max_packet')}")
            for k, v in info["extensions"].items():
                print(f"  extension {k!r}: {v!r}")
            if info["limits"]:
                print(f"  limits@openssh.com: {info['limits']}")
