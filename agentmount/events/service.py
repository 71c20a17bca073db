"""Webhook and event operations of a running peer, by workspace name.

The one implementation behind the control socket (`webhook.*`, `events.tail`) and the HTTP
API (`agentmount.api`): it resolves the workspace on this peer, runs `admin` against the
stores (where subscriptions live, so every peer and any later leader sees them) and wakes
this peer's deliverer when it leads the workspace. Unknown workspaces and webhooks raise
`errors.NotFound`; invalid subscriptions `InvalidSubscription` (both ValueErrors).
"""
from __future__ import annotations

from typing import Any

from agentmount.errors import NotFound
from agentmount.events import admin


def _workspace(vfs: Any, name: str | None) -> Any:
    ws = vfs.workspaces.get(name) if name else None
    if ws is None:
        raise NotFound(f"no workspace {name!r}")
    return ws


def _live(ws: Any) -> dict[str, dict]:
    return admin.live_status(ws.deliverer if ws is not None else None)


def _wake(ws: Any) -> None:
    if ws.deliverer is not None:
        ws.deliverer.wake()


async def list_webhooks(vfs: Any, name: str | None = None) -> list[dict]:
    """The subscriptions of workspace `name` (None: of every workspace), secrets masked."""
    if name:
        _workspace(vfs, name)
    names = [name] if name else sorted(vfs.workspaces)
    out: list[dict] = []
    for n in names:
        out += await admin.list_subs(vfs.store, n, _live(vfs.workspaces.get(n)))
    return out


async def get_webhook(vfs: Any, name: str, sid: str) -> dict:
    ws = _workspace(vfs, name)
    return await admin.get(vfs.store, name, sid, _live(ws))


async def add_webhook(vfs: Any, name: str, url: str, secret: str | None = None, events: list[str] | None = None,
                      path: str | None = None, allow_private: bool = False) -> dict:
    """Subscribe `url` to the workspace's events from now on; the subscription, secret included
    (generated when not given). `[events] allow_private` of this peer allows private addresses too."""
    ws = _workspace(vfs, name)
    allow = bool(allow_private) or vfs.cfg.events.allow_private
    d = ws.deliverer
    start = d.local.journal.last_seq if d is not None else -1
    out = await admin.add(vfs.store, name, url, secret, events, path, allow, start)
    _wake(ws)
    return out


async def remove_webhook(vfs: Any, name: str, sid: str) -> None:
    """Delete a subscription with its cursor and dead letters."""
    ws = _workspace(vfs, name)
    if not await admin.remove(vfs.store, name, sid):
        raise NotFound(f"no webhook {sid!r} in workspace {name!r}")
    _wake(ws)


async def test_webhook(vfs: Any, name: str, sid: str) -> dict:
    """One signed `webhook.test` event to the subscription now: {ok, status, error, ms}."""
    _workspace(vfs, name)
    return await admin.test(vfs.store, name, sid, vfs.cfg.events.timeout_s)


async def replay_webhook(vfs: Any, name: str, sid: str) -> dict:
    """Re-send the subscription's dead letters: {delivered, failed, errors}."""
    _workspace(vfs, name)
    return await admin.replay(vfs.store, name, sid, vfs.cfg.events.timeout_s)


async def tail_events(vfs: Any, name: str, after: int | None, limit: int) -> dict:
    """Events after journal seq `after` (None: the last `limit`): {events, next, gap}. From the
    leader's in-memory feed when this peer leads the workspace, else from the journal."""
    ws = _workspace(vfs, name)
    d = ws.deliverer
    return await admin.tail(vfs.store, name, after, limit, d.feed if d is not None else None)
