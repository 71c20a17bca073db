"""Drive a `tests.webhook_receiver` process from tests: start it, switch modes, read its log.

    rx = Receiver(tmp_path / "rx").start()
    try:
        ...  # point the code under test at rx.url
        rx.wait_for(lambda reqs: len(reqs) >= 1, timeout=5, what="first delivery")
    finally:
        rx.stop()
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import IO, Callable

from tests.helpers import wait_for

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_POLL = 0.02


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Receiver:
    """One webhook receiver process whose state lives in `state_dir`."""

    port: int
    url: str

    def __init__(self, state_dir: pathlib.Path, mode: str = "ok") -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._mode = mode
        self.port = 0
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.set_mode(mode)

    @property
    def stderr_path(self) -> pathlib.Path:
        return self.state_dir / "stderr.log"

    def _stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 10) -> "Receiver":
        """Spawn the receiver and wait until it has a port (and, unless refusing, accepts)."""
        if self._proc is not None:
            raise RuntimeError("receiver already started")
        (self.state_dir / "port").unlink(missing_ok=True)
        self.port, self.url = 0, ""
        self._stderr = open(self.stderr_path, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.webhook_receiver", "--state-dir", str(self.state_dir)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        proc = self._proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"webhook receiver exited with {proc.returncode}:\n{self._stderr_text()}")
            return self._ready()
        try:
            wait_for(up, timeout, _POLL, "the webhook receiver to listen", describe=self._stderr_text)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if not self.port:
            try:
                text = (self.state_dir / "port").read_text().strip()
            except FileNotFoundError:
                return False
            if not text:
                return False
            self.port = int(text)
            self.url = f"http://127.0.0.1:{self.port}/hook"
        if self._mode == "refuse":
            return True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def set_mode(self, mode: str) -> None:
        """Switch how the receiver answers (it reads the mode file at each request)."""
        _write_atomic(self.state_dir / "mode", f"{mode}\n")
        self._mode = mode

    def requests(self) -> list[dict]:
        """Every logged POST, oldest first (a torn, still-being-written last line is skipped)."""
        try:
            data = (self.state_dir / "requests.jsonl").read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:
                    break  # torn last line
                raise
        return out

    def deliveries(self) -> list[dict]:
        """The requests answered 2xx, each with "payload" = its JSON-decoded body."""
        return [
            {**r, "payload": json.loads(r["body"])}
            for r in self.requests()
            if r.get("status") is not None and 200 <= r["status"] < 300
        ]

    def wait_for(
        self, pred: Callable[[list[dict]], bool], timeout: float, what: str = ""
    ) -> list[dict]:
        """Poll requests() until pred(requests) holds; return them. AssertionError on timeout."""
        seen: list[list[dict]] = [[]]

        def holds() -> bool:
            seen[0] = self.requests()
            return pred(seen[0])

        def describe() -> str:
            return (f"{len(seen[0])} requests arrived "
                    f"(statuses {[r.get('status') for r in seen[0]][-20:]})")
        wait_for(holds, timeout, _POLL, what or "predicate", describe=describe)
        return seen[0]

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "Receiver":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
