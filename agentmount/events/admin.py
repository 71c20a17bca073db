"""Run-time management of webhooks and event pulls, against the stores of a workspace.

Used by the control socket of a running peer (which also wakes its deliverer) and by the
CLI directly when no peer runs on the data dir: subscriptions live in the stores, so a
leader anywhere picks a change up within seconds either way.
"""
from __future__ import annotations

import time
from typing import Any

import trio

from agentmount import webhooks
from agentmount.events.delivery import Sender
from agentmount.events.derive import events_of, iso
from agentmount.events.feed import Feed, Gap, store_records
from agentmount.events.policy import UrlRefused, resolve_and_check
from agentmount.events.subscriptions import InvalidSubscription, Registry, Subscription, new_id, validate
from agentmount.meta import workspaces as wsreg
from backend.store import ObjectStore


async def _known(store: ObjectStore, ws: str) -> None:
    if ws not in await wsreg.list_workspaces(store):
        raise InvalidSubscription(f"workspace {ws!r} does not exist")


async def add(store: ObjectStore, ws: str, url: str, secret: str | None = None, events: list[str] | None = None,
              path: str | None = None, allow_private: bool = False, start_seq: int = -1) -> dict:
    """Register a subscription (its secret generated if not given); returns it, secret included."""
    secret = secret or webhooks.generate_secret()
    validate(ws, url, secret, events, path, allow_private)
    try:
        await trio.to_thread.run_sync(resolve_and_check, url, allow_private)
    except UrlRefused as e:
        raise InvalidSubscription(f"webhook.url: {e}") from None
    await _known(store, ws)
    sub = Subscription(id=new_id(), workspace=ws, url=url, secret=secret, events=events, path=path,
                       allow_private=allow_private, start_seq=start_seq)
    await Registry(store, ws).put(sub)
    out = sub.public()
    out["secret"] = secret
    return out


async def list_subs(store: ObjectStore, ws: str, live: dict[str, dict] | None = None) -> list[dict]:
    reg = Registry(store, ws)
    out = []
    for sub in await reg.list():
        item = sub.public()
        item["cursor"] = await reg.cursor(sub.id)
        item["dead_letters"] = len(await reg.dead_letters(sub.id))
        if live and sub.id in live:
            item["delivery"] = live[sub.id]
        out.append(item)
    return out


async def remove(store: ObjectStore, ws: str, sid: str) -> bool:
    return await Registry(store, ws).remove(sid)


async def _sub(store: ObjectStore, ws: str, sid: str) -> Subscription:
    sub = await Registry(store, ws).get(sid)
    if sub is None:
        raise InvalidSubscription(f"no webhook {sid!r} in workspace {ws!r}")
    return sub


async def test(store: ObjectStore, ws: str, sid: str, timeout: float = 15.0) -> dict:
    """One signed `webhook.test` event to the subscription, now; no retries."""
    sub = await _sub(store, ws, sid)
    ev = {"id": f"evt_{ws}_test_{int(time.time() * 1000)}", "type": "webhook.test", "timestamp": iso(time.time_ns()),
          "data": {"workspace": ws, "webhook": sid}}
    sender = Sender(sub, timeout)
    t0 = time.monotonic()
    try:
        a = await sender.send(ev)
    finally:
        await sender.aclose()
    return {"ok": a.ok, "status": a.status, "error": a.error or None, "ms": round((time.monotonic() - t0) * 1000, 1)}


async def replay(store: ObjectStore, ws: str, sid: str, timeout: float = 15.0) -> dict:
    """Send every dead-lettered event of the subscription once more, oldest first; the ones
    delivered leave the list."""
    sub = await _sub(store, ws, sid)
    reg = Registry(store, ws)
    sender = Sender(sub, timeout)
    sent = failed = 0
    errors: list[str] = []
    try:
        for key, item in await reg.dead_letters(sid):
            a = await sender.send(item["event"])
            if a.ok:
                await reg.drop_dead(key)
                sent += 1
            else:
                failed += 1
                errors.append(f"{item['event']['id']}: {a.error}")
    finally:
        await sender.aclose()
    return {"delivered": sent, "failed": failed, "errors": errors[:10]}


async def tail(store: ObjectStore, ws: str, after: int | None, limit: int, feed: Feed | None = None) -> dict:
    """Events after seq `after` (None: the last `limit`), and the seq to ask after next."""
    await _known(store, ws)
    start = after if after is not None else 0
    try:
        recs = await (feed.records(start, 100000) if feed is not None else store_records(store, ws, start, 100000))
        gap = None
    except Gap as g:
        gap = {"first_seq": g.first, "last_seq": g.last}
        recs = await (feed.records(g.last, 100000) if feed is not None else store_records(store, ws, g.last, 100000))
    events: list[dict[str, Any]] = [e for r in recs for e in events_of(ws, r)]
    if after is None:
        events = events[-limit:]
    else:
        events = events[:limit]
    nxt = events[-1]["data"]["seq"] if events else (recs[-1]["seq"] if recs and after is None else start)
    return {"events": events, "next": nxt, "gap": gap}


def live_status(deliverer) -> dict[str, dict]:
    return deliverer.status() if deliverer is not None else {}

