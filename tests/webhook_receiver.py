"""A real HTTP webhook receiver that tests run as a separate process.

Run from the repo root: `python -m tests.webhook_receiver --state-dir DIR [--port N]`.

It listens on 127.0.0.1 (port 0 unless `--port` is given) and writes the chosen port to
`DIR/port` (atomically) once listening. Every POST is logged as one JSON line appended to
`DIR/requests.jsonl`: `{"t", "path", "headers", "body", "status"}` where `status` is what it
answered (logged just before the answer goes out, so a client holding its answer finds
the request logged), or null when it hung or refused. A request whose body is cut short
(its client died mid-send) is neither answered nor logged. How it answers is read from `DIR/mode` at each
request (missing file means "ok"):

    ok        200 "ok"
    500       500
    410       410 Gone
    429:N     429 with `Retry-After: N`
    slow:S    sleep S seconds, then 200
    hang      never answer; the connection stays open until this server stops
    huge      200 with a 64 MiB body, streamed in chunks (Content-Length set)
    refuse    the listening socket is closed, so clients get ECONNREFUSED; open connections
              are shut down too. Any other mode listens again on the same port.

A supervisor loop in the main thread polls the mode file every 50 ms to stop/start the server.
SIGTERM/SIGINT make it exit cleanly.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUGE_SIZE = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
_POLL = 0.05


def read_mode(state_dir: pathlib.Path) -> str:
    """The current mode; "ok" when the mode file is missing or empty."""
    try:
        mode = (state_dir / "mode").read_text().strip()
    except FileNotFoundError:
        return "ok"
    return mode or "ok"


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RequestLog:
    """Appends one JSON line per request to requests.jsonl, flushed after each line."""

    def __init__(self, path: pathlib.Path) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file.closed:
                return  # a handler finishing while the process exits
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Handler(BaseHTTPRequestHandler):
    """Answers POSTs according to the current mode and logs each of them."""

    protocol_version = "HTTP/1.1"
    # Answers go out as written (status line + headers, then the body): without this, Nagle's
    # algorithm holds the body until the client's delayed ACK, 40 ms per keep-alive request.
    disable_nagle_algorithm = True
    server: "ReceiverServer"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # keep stderr for real errors

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:
            # The client died mid-request (a SIGKILLed sender): nothing to answer.
            raise ConnectionResetError(f"request body cut short: {len(body)} of {length} bytes")
        return body

    def _log(self, status: int | None) -> None:
        """Log the current request once, before its answer goes out: a client that has its
        answer always finds the request in the log."""
        entry, self._entry = getattr(self, "_entry", None), None
        if entry is not None:
            entry["status"] = status
            self.server.log.append(entry)

    def _respond(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self._log(status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _answer(self, mode: str, entry: dict) -> int | None:
        """Answer per `mode`; return the status sent, or None if it sent nothing."""
        if mode == "ok":
            self._respond(200, b"ok")
            return 200
        if mode == "500":
            self._respond(500, b"internal error")
            return 500
        if mode == "410":
            self._respond(410, b"gone")
            return 410
        if mode.startswith("429:"):
            self._respond(429, b"too many requests", {"Retry-After": mode[4:].strip()})
            return 429
        if mode.startswith("slow:"):
            if self.server.closing.wait(float(mode[5:])):
                self.close_connection = True
                return None
            self._respond(200, b"ok")
            return 200
        if mode == "hang":
            self._log(None)  # log now: this request is never answered
            self.server.closing.wait()
            self.close_connection = True
            return None
        if mode == "huge":
            self._log(200)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(HUGE_SIZE))
            self.end_headers()
            chunk = b"x" * _CHUNK
            for _ in range(HUGE_SIZE // _CHUNK):
                self.wfile.write(chunk)
            self.wfile.flush()
            return 200
        if mode == "refuse":  # raced with the supervisor closing the listener
            self.close_connection = True
            return None
        self._respond(500, f"unknown receiver mode {mode!r}".encode())
        return 500

    def do_POST(self) -> None:
        arrived = time.time()
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True    # cut short or garbled: never answered, never logged
            return
        mode = read_mode(self.server.state_dir)
        entry = {
            "t": arrived,
            "path": self.path,
            "headers": _headers(self),
            "body": body.decode("utf-8", errors="replace"),
            "status": None,
        }
        self._entry = entry
        try:
            self._answer(mode, entry)
        except OSError:
            self.close_connection = True  # the client went away mid-answer
        finally:
            self._log(None)               # not answered (stopped, refused): logged with no status


def _headers(handler: BaseHTTPRequestHandler) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in handler.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


class ReceiverServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that tracks its open connections so it can drop them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, state_dir: pathlib.Path, log: RequestLog) -> None:
        self.state_dir = state_dir
        self.log = log
        self.closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's getfqdn() (a reverse DNS lookup).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        if isinstance(sys.exc_info()[1], OSError):
            return  # client disconnects and dropped connections are expected
        super().handle_error(request, client_address)

    def stop(self, serving: bool) -> None:
        """Stop listening, release hung handlers and shut down open connections."""
        self.closing.set()
        if serving:
            self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _bind(port: int, state_dir: pathlib.Path, log: RequestLog, deadline_s: float = 5.0) -> ReceiverServer:
    """Bind (retrying briefly while the port is still in use when re-listening)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return ReceiverServer(port, state_dir, log)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or port == 0 or time.monotonic() > deadline:
                raise
            time.sleep(_POLL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, type=pathlib.Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    state_dir: pathlib.Path = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log = RequestLog(state_dir / "requests.jsonl")
    server: ReceiverServer | None = _bind(args.port, state_dir, log)
    port = server.server_address[1]
    write_atomic(state_dir / "port", f"{port}\n")
    thread: threading.Thread | None = None

    try:
        while not stop.is_set():
            listen = read_mode(state_dir) != "refuse"
            if listen and thread is None:
                if server is None:
                    server = _bind(port, state_dir, log)
                thread = threading.Thread(
                    target=server.serve_forever, kwargs={"poll_interval": _POLL}, daemon=True
                )
                thread.start()
            elif not listen and server is not None:
                server.stop(serving=thread is not None)
                server, thread = None, None
            stop.wait(_POLL)
    finally:
        if server is not None:
            server.stop(serving=thread is not None)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
