"""The HTTP control API of a peer (`[api] listen`): webhooks and event pulls over HTTP.

`http.py` is the HTTP/1.1 server (h11 on trio) and its limits, `routes.py` what each request
does (the same calls as the control socket, through `agentmount.events.service`),
`openapi.py` the OpenAPI document. This module owns starting it for the daemon: the bearer
token (`[api] token`, or `token_file`, created with a random token when missing) and the bind.
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import trio

from agentmount.config import Config
from agentmount.errors import MountError

log = logging.getLogger("agentmount.api")


def load_token(path: str) -> str:
    """The token in `path`; a new random one written there (mode 0600) when the file is missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
            mode = os.stat(path).st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise MountError(f"[api] token_file {path}: {getattr(e, 'strerror', None) or e}") from None
        if len(token) < 16 or any(c.isspace() for c in token):
            raise MountError(f"[api] token_file {path}: holds no token (one line of at least 16 characters, "
                             "no whitespace; delete the file to have one generated)")
        if mode & 0o077:
            log.warning("event=api_token_file_readable file=%s mode=%o (others can read the token: chmod 600 it)",
                        path, mode & 0o777)
        return token
    except OSError as e:
        raise MountError(f"[api] token_file {path}: {e.strerror}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning("event=api_token_created file=%s (the bearer token of the HTTP API)", path)
    return token


async def serve(cfg: Config, vfs: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on `[api] listen` until cancelled; MountError (before `started`) when the
    token cannot be had or the address cannot be bound."""
    from agentmount.api.http import Server
    from agentmount.api.routes import Api

    address = cfg.api.address
    assert address is not None, "[api] listen is not set"
    token = cfg.api.token if cfg.api.token is not None else load_token(cfg.api.token_file or "")
    server = Server(Api(vfs, token))
    try:
        listeners = await server.listen(*address)
    except OSError as e:
        raise MountError(f"[api] listen {cfg.api.listen}: cannot listen there: {e.strerror or e}") from None
    host, port = listeners[0].socket.getsockname()[:2]
    bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    vfs.api = {"url": f"http://{bound}/v1", "token_file": None if cfg.api.token is not None else cfg.api.token_file}
    log.warning("event=api_listening address=%s", bound)
    if not _loopback(address[0]):
        log.warning("event=api_not_loopback listen=%s (plain HTTP: the bearer token crosses the network in clear; "
                    "put TLS in front)", cfg.api.listen)
    task_status.started()
    await server.serve(listeners)


def _loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
