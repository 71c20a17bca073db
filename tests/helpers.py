"""Test helpers: real mounts as real processes, waiting with deadlines, running as other users."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentmount.config import render_local
from agentmount.procs import wait_exit

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def wait_for(cond, timeout: float = 30.0, interval: float = 0.02, what: str = "condition", describe=None):
    """Poll `cond()` until truthy or the deadline passes (then AssertionError, carrying
    `describe()`: the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            extra = ""
            if describe is not None:
                try:
                    extra = f"; last state: {describe()}"
                except Exception as e:  # noqa: BLE001
                    extra = f"; (describe failed: {e!r})"
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def cli(*args: str, env: dict | None = None, check: bool = False, timeout: float = 120.0,
        input: str | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("AGENTMOUNT_CONFIG", None)
    if env:
        e.update(env)
    r = subprocess.run([sys.executable, "-m", "agentmount", *args], capture_output=True, text=True, env=e,
                       timeout=timeout, input=input, cwd=str(REPO))
    if check and r.returncode != 0:
        raise AssertionError(f"agentmount {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


class Mount:
    """A real agentmount peer mounted at `mp`, configured by `conf` in its own directory."""

    def __init__(self, root: Path, workspaces=("default",), fs: dict | None = None, store: Path | None = None,
                 extra: str = "", conf_text: str | None = None) -> None:
        self.root = root
        self.mp = root / "mnt"
        self.mp.mkdir(exist_ok=True)
        self.store = store or (root / "store")
        self.data = root / "data"
        self.conf = root / "mount.conf"
        self.conf.write_text(conf_text if conf_text is not None else
                             render_local(name="test", data_dir=str(self.data), store=str(self.store),
                                          cache_dir=str(root / "cache"), workspaces=tuple(workspaces),
                                          cache={"size_mb": 256, "memory_mb": 128}, fs=fs, extra=extra))
        self.pid: int | None = None

    @property
    def ws(self) -> Path:
        return self.mp / "default"

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return cli(*args, "-c", str(self.conf), **kw) if args and args[0] not in ("umount",) else cli(*args, **kw)

    def mount(self) -> "Mount":
        r = cli("mount", str(self.mp), "-c", str(self.conf), timeout=120)
        if r.returncode != 0:
            log = self.data / "agentmount.log"
            raise AssertionError(f"mount failed ({r.returncode}): {r.stderr}\n"
                                 f"{log.read_text()[-3000:] if log.exists() else ''}")
        self.pid = int(os.getxattr(self.mp, "user.agentmount.pid"))
        return self

    def umount(self) -> None:
        if self.pid is None:
            return
        r = cli("umount", str(self.mp), timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"umount failed: {r.stderr}")
        self.pid = None
        log = self.data / "agentmount.log"
        if log.exists():
            text = log.read_text()
            assert "daemon failed" not in text and "Traceback" not in text, text[-4000:]

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill(self) -> None:
        """SIGKILL the daemon and detach the dead mount, as a crash would leave it."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        assert wait_exit(self.pid, 30), "the daemon survived SIGKILL"
        subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)
        self.pid = None

    def cleanup(self) -> None:
        if self.pid is not None:
            try:
                self.umount()
            except Exception:  # noqa: BLE001 - fall back to force
                try:
                    if self.pid is not None:   # umount may have detached it and failed later
                        os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)
                self.pid = None
        elif os.path.ismount(self.mp):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True)


def s3_conf(root: Path, servers, *, write_quorum: int | None = None, endpoints: list[str] | None = None,
            fs: dict | None = None, bucket: str = "agentmount", hedge_ms: int = 50) -> str:
    """mount.conf text for a peer over S3 stores (SeaweedFS servers), one `[[store]]` each."""
    lines = ["[node]", 'name = "test"', f'data_dir = "{root / "data"}"', ""]
    for i, srv in enumerate(servers):
        lines += ["[[store]]", f'name = "z{i}"', 'kind = "s3"',
                  f'endpoint = "{endpoints[i] if endpoints else srv.endpoint}"', f'bucket = "{bucket}"',
                  f'access_key = "{srv.access_key}"', f'secret_key = "{srv.secret_key}"', ""]
    lines += ["[replication]", f"hedge_ms = {hedge_ms}", "health_interval_s = 0.2"]
    if write_quorum is not None:
        lines.append(f"write_quorum = {write_quorum}")
    lines += ["", "[cache]", f'dir = "{root / "cache"}"', "size_mb = 256", "memory_mb = 64", "", "[fs]"]
    lines += [f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
              for k, v in (fs or {}).items()]
    lines += ["", "[[workspace]]", 'name = "default"']
    return "\n".join(lines) + "\n"


def run_as(uid: int, gid: int, fn, *args, groups: list[int] | None = None):
    """Run fn(*args) in a forked child with the given uid/gid (and supplementary `groups`); return
    its result or re-raise its OSError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups(groups or [])
            os.setgid(gid)
            os.setuid(uid)
            res = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001
            res = ("err", e if isinstance(e, OSError) else RuntimeError(repr(e)))
        with os.fdopen(w, "wb") as f:
            pickle.dump(res, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, val = pickle.loads(data)
    if kind == "err":
        raise val
    return val
