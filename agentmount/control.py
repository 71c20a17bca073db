"""The control socket of a running peer: `<data_dir>/control.sock`, JSON lines.

The daemon answers `status`, `locks`, `sweep`, `workspace.list/create/delete`, `webhook.*`
and `events.tail` (the last two through `agentmount.events.service`, as the HTTP API does);
the CLI uses it
when a peer is running on that data dir and falls back to the store when not.
Only the socket's owner can connect (mode 0600).
"""
from __future__ import annotations

import json
import logging
import os
import socket

import trio

from agentmount.errors import FsError, NotFound

log = logging.getLogger("agentmount.control")


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, "control.sock")


def _bindable(path: str) -> tuple[str, int | None]:
    """A path short enough for sun_path (108 bytes): long ones go through /proc/self/fd."""
    if len(path.encode()) < 100:
        return path, None
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd


async def serve(path: str, vfs, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    short, dirfd = _bindable(path)
    try:
        sock.bind(short)
    finally:
        os.umask(old)
        if dirfd is not None:
            os.close(dirfd)
    sock.listen(16)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            req = json.loads(buf.split(b"\n", 1)[0])
            try:
                result = await _dispatch(vfs, req)
                resp = {"ok": True, "result": result}
            except FsError as e:
                resp = {"ok": False, "error": os.strerror(e.errno), "errno": e.errno}
            except NotFound as e:            # no such workspace or webhook
                resp = {"ok": False, "error": str(e), "errno": 2}
            except ValueError as e:          # an invalid webhook and the like: the message says what
                resp = {"ok": False, "error": str(e), "errno": 22}
            await stream.send_all(json.dumps(resp).encode() + b"\n")
        except Exception:  # noqa: BLE001 - a bad client must not hurt the daemon
            log.exception("control request failed")
        finally:
            await stream.aclose()

    task_status.started()
    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def _dispatch(vfs, req: dict):
    cmd = req.get("cmd")
    if cmd == "status":
        return vfs.status()
    if cmd == "workspace.list":
        return sorted(vfs.workspaces)
    if cmd == "workspace.create":
        await vfs.create_workspace(req["name"], req.get("uid", os.getuid()), req.get("gid", os.getgid()),
                                   req.get("mode", 0o755))
        return req["name"]
    if cmd == "sweep":
        ws = vfs.workspaces.get(req.get("workspace"))
        if ws is None:
            raise FsError(2, f"no workspace {req.get('workspace')!r}")
        return await vfs.sweep(ws)
    if cmd == "locks":
        return await vfs.lock_listing(req.get("workspace"))
    if cmd == "workspace.delete":
        await vfs.delete_workspace(req["name"], force=bool(req.get("force")))
        return req["name"]
    if cmd.startswith(("webhook.", "events.")):
        return await _events(vfs, cmd, req)
    raise FsError(22, f"unknown command {cmd!r}")


async def _events(vfs, cmd: str, req: dict):
    from agentmount.events import service
    name = req.get("workspace")
    if cmd == "webhook.list":
        return await service.list_webhooks(vfs, name)
    if cmd == "webhook.get":
        return await service.get_webhook(vfs, name, req["id"])
    if cmd == "webhook.add":
        return await service.add_webhook(vfs, name, req["url"], req.get("secret"), req.get("events"),
                                         req.get("path"), bool(req.get("allow_private")))
    if cmd == "webhook.remove":
        await service.remove_webhook(vfs, name, req["id"])
        return True
    if cmd == "webhook.test":
        return await service.test_webhook(vfs, name, req["id"])
    if cmd == "webhook.replay":
        return await service.replay_webhook(vfs, name, req["id"])
    if cmd == "events.tail":
        return await service.tail_events(vfs, name, req.get("after"), int(req.get("limit", 20)))
    raise FsError(22, f"unknown command {cmd!r}")


def request(data_dir: str, req: dict, timeout: float = 120.0) -> dict | None:
    """Send one request to the peer on `data_dir`; None when no peer is running there."""
    path = socket_path(data_dir)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    short, dirfd = _bindable(path)
    try:
        s.connect(short)
    except OSError:
        s.close()
        return None
    finally:
        if dirfd is not None:
            os.close(dirfd)
    try:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return json.loads(buf) if buf else None
