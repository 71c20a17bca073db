"""A minimal HTTP/1.1 server on trio (h11): connections, framing and limits; no routing.

Owns accepting TCP connections, parsing requests with h11, keep-alive, writing responses,
and the limits that keep a misbehaving client (slow, half-open, garbage, huge) from
hurting the daemon: a deadline to receive each whole request and to send each answer,
a cap on concurrent connections (beyond it: 503 and close), on header size (431) and on
body size (413). What a request means is the `App`'s business (`routes.Api`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs

import h11
import trio

log = logging.getLogger("agentmount.api")

MAX_BODY = 1 << 20            # bytes of a request body (413 beyond)
MAX_HEADERS = 16 << 10        # bytes of a request line and headers (431 beyond)
READ_TIMEOUT = 30.0           # to receive one whole request, or the next one on a kept-alive connection
WRITE_TIMEOUT = 30.0          # to hand one answer to a client that does not read
MAX_CONNECTIONS = 64          # open at once; more are answered 503 and closed


@dataclass
class Request:
    method: str
    path: str                                  # as sent (not percent-decoded), without the query
    query: dict[str, list[str]]
    headers: dict[str, str]                    # lower-case names; a repeated header's values joined by ", "
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @staticmethod
    def json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> "Response":
        return Response(status, json.dumps(obj, indent=None, separators=(",", ":")).encode() + b"\n",
                        [("content-type", "application/json"), *(headers or [])])

    @staticmethod
    def error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> "Response":
        return Response.json(status, {"error": message}, headers)


class App(Protocol):
    def early(self, method: str, path: str, headers: dict[str, str]) -> Response | None:
        """An answer decided from the request head alone (authentication, unknown route), or
        None to read the body and call `handle`."""

    async def handle(self, request: Request) -> Response:
        """The answer to a complete request."""


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Closed(Exception):
    """The client went away (or broke the protocol): end the connection (lingering: see
    `Server._linger`)."""

    def __init__(self, linger: bool = False) -> None:
        super().__init__()
        self.linger = linger


class Server:
    """Serves `app` on TCP listeners with the limits above (overridable for tests)."""

    def __init__(self, app: App, *, max_connections: int = MAX_CONNECTIONS, read_timeout: float = READ_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, max_body: int = MAX_BODY,
                 max_headers: int = MAX_HEADERS) -> None:
        self.app = app
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_body = max_body
        self.max_headers = max_headers
        self.open = 0

    async def listen(self, host: str, port: int) -> list[trio.SocketListener]:
        """Bind (OSError when it cannot)."""
        return await trio.open_tcp_listeners(port, host=host, backlog=128)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self.open >= self.max_connections:
            with trio.move_on_after(1):
                try:
                    await stream.send_all(_raw(503, "too many connections", [("retry-after", "1")]))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        linger = False
        try:
            linger = await self._serve_connection(stream)
        except _Closed as e:
            linger = e.linger
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - one bad connection must not hurt the daemon
            log.exception("event=api_connection_failed")
        finally:
            try:
                if linger:
                    await self._linger(stream)
            finally:
                self.open -= 1
                await trio.aclose_forcefully(stream)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Closing with request bytes unread makes the kernel reset the connection, which can
        destroy the answer before the client reads it: half-close, then read and drop what
        still comes, for a moment."""
        with trio.move_on_after(2):
            try:
                await stream.send_eof()
                dropped = 0
                while dropped < 4 * self.max_body:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    dropped += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def _serve_connection(self, stream: trio.SocketStream) -> bool:
        """Serve requests until the connection ends; whether to linger before closing it."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_headers)
        while True:
            got_any = [False]
            with trio.move_on_after(self.read_timeout) as cs:
                req = await self._read_request(stream, conn, got_any)
            if cs.cancelled_caught:
                if got_any[0]:      # a request started but did not finish in time
                    with trio.move_on_after(1):
                        await stream.send_all(_raw(408, "request not received in time"))
                return False        # else: an idle kept-alive connection
            if req is None:
                return False
            if isinstance(req, Response):     # refused from its head, or its body is too big
                unread = conn.their_state is not h11.DONE
                await self._send(stream, conn, req, close=unread)
                if unread or conn.our_state is h11.MUST_CLOSE:
                    return unread
            else:
                t0 = trio.current_time()
                try:
                    resp = await self.app.handle(req)
                except Exception:  # noqa: BLE001
                    log.exception("event=api_request_failed method=%s path=%s", req.method, req.path)
                    resp = Response.error(500, "internal error (see the daemon log)")
                log.info("event=api_request method=%s path=%s status=%d ms=%.1f", req.method, req.path,
                         resp.status, (trio.current_time() - t0) * 1000)
                await self._send(stream, conn, resp)
                if conn.our_state is h11.MUST_CLOSE:
                    return False
            conn.start_next_cycle()

    async def _next_event(self, stream: trio.SocketStream, conn: h11.Connection, got_any: list[bool]) -> Any:
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint in (400, 431) else 400
                msg = "request headers too large" if status == 431 else f"bad request: {e}"
                with trio.move_on_after(1):
                    await stream.send_all(_raw(status, msg))
                raise _Closed(linger=True) from None
            if ev is not h11.NEED_DATA:
                return ev
            data = await stream.receive_some(65536)
            if data:
                got_any[0] = True
            conn.receive_data(data)

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection,
                            got_any: list[bool]) -> Request | Response | None:
        ev = await self._next_event(stream, conn, got_any)
        if isinstance(ev, h11.ConnectionClosed):
            return None
        if not isinstance(ev, h11.Request):
            raise _Closed()
        # h11 bounds only a head still incomplete; one that arrived whole is measured here.
        if len(ev.target) + sum(len(k) + len(v) + 4 for k, v in ev.headers) > self.max_headers:
            with trio.move_on_after(1):
                await stream.send_all(_raw(431, "request headers too large"))
            raise _Closed(linger=True)
        headers: dict[str, str] = {}
        for name, value in ev.headers:
            k = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        method = ev.method.decode("ascii", "replace")
        target = ev.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        early = self.app.early(method, path, headers)
        length = headers.get("content-length")
        if early is not None:
            if length in (None, "0") and "transfer-encoding" not in headers:
                await self._next_event(stream, conn, got_any)   # the (empty) end of the request
            return early
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return Response.error(413, f"request body over {self.max_body} bytes")
        if conn.they_are_waiting_for_100_continue:
            await self._send_event(stream, conn, h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        body = bytearray()
        while True:
            ev = await self._next_event(stream, conn, got_any)
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > self.max_body:
                    return Response.error(413, f"request body over {self.max_body} bytes")
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:                       # ConnectionClosed half way
                return None
        return Request(method, path, parse_qs(query, keep_blank_values=True), headers, bytes(body))

    async def _send_event(self, stream: trio.SocketStream, conn: h11.Connection, ev: Any) -> None:
        with trio.move_on_after(self.write_timeout) as cs:
            await stream.send_all(conn.send(ev) or b"")
        if cs.cancelled_caught:
            raise _Closed()

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, resp: Response, close: bool = False) -> None:
        headers = [("server", "agentmount"), *resp.headers]
        if resp.status not in (204, 304) and resp.status >= 200:
            headers.append(("content-length", str(len(resp.body))))
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status)))
        if resp.body and resp.status not in (204, 304):
            out += conn.send(h11.Data(data=resp.body))
        out += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.write_timeout) as cs:
            await stream.send_all(out)
        if cs.cancelled_caught:
            raise _Closed()


def _raw(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    """An error answer written without h11 (the connection is closed right after)."""
    body = json.dumps({"error": message}).encode() + b"\n"
    lines = [f"HTTP/1.1 {status} {_reason(status).decode()}", "server: agentmount",
             "content-type: application/json", f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in headers or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

