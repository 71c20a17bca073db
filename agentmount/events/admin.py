"""Run-time management of webhooks and event pulls, against the stores of a workspace.

Used through `events.service` by a running peer (control socket, HTTP API) and by the
CLI directly when no peer runs on the data dir: subscriptions live in the stores, so a
leader anywhere picks a change up within seconds either way.
"""
from __future__ import annotations

import time
from typing import Any

import trio

from agentmount import webhooks
from agentmount.errors import NotFound
from agentmount.events.delivery import Sender
from agentmount.events.derive import events_of, iso
from agentmount.events.feed import Feed, Gap, store_records
from agentmount.events.policy import UrlRefused, resolve_and_check
from agentmount.events.subscriptions import (InvalidSubscription, Registry, Subscription, new_id, valid_id,
                                             validate)
from agentmount.meta import workspaces as wsreg
from backend.store import ObjectStore


async def _known(store: ObjectStore, ws: str) -> None:
    if ws not in await wsreg.list_workspaces(store):
        raise NotFound(f"workspace {ws!r} does not exist")


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


async def _listed(reg: Registry, sub: Subscription, live: dict[str, dict] | None) -> dict:
    """A subscription as listings show it: no secret; its cursor, dead letters, live figures."""
    item = sub.public()
    item["cursor"] = await reg.cursor(sub.id)
    item["dead_letters"] = len(await reg.dead_letters(sub.id))
    if live and sub.id in live:
        item["delivery"] = live[sub.id]
    return item


async def list_subs(store: ObjectStore, ws: str, live: dict[str, dict] | None = None) -> list[dict]:
    reg = Registry(store, ws)
    return [await _listed(reg, sub, live) for sub in await reg.list()]


async def get(store: ObjectStore, ws: str, sid: str, live: dict[str, dict] | None = None) -> dict:
    """One subscription as `list_subs` shows it; NotFound when there is none."""
    reg = Registry(store, ws)
    return await _listed(reg, await _sub(store, ws, sid), live)


async def remove(store: ObjectStore, ws: str, sid: str) -> bool:
    if not valid_id(sid):
        return False
    return await Registry(store, ws).remove(sid)


async def _sub(store: ObjectStore, ws: str, sid: str) -> Subscription:
    sub = await Registry(store, ws).get(sid) if valid_id(sid) else None
    if sub is None:
        raise NotFound(f"no webhook {sid!r} in workspace {ws!r}")
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
    """Events after seq `after` (None: the last `limit`), and the seq to ask after next.

    A page after `after` holds whole records (every event of a record or none of them; a
    record with more events than `limit` comes whole), so paging on `next` loses nothing.
    `gap`: records that are no longer in the journal (their events are lost to this pull)."""
    await _known(store, ws)
    start = after if after is not None else 0
    want = limit if after is not None else 100000     # records: each has at least one event

    async def read(a: int) -> list[dict]:
        return await (feed.records(a, want) if feed is not None else store_records(store, ws, a, want))
    try:
        recs = await read(start)
        gap = None
    except Gap as g:
        gap = {"first_seq": g.first, "last_seq": g.last}
        start = g.last
        recs = await read(start)
    nxt = start
    events: list[dict[str, Any]] = []
    if after is None:
        events = [e for r in recs for e in events_of(ws, r)][-limit:]
        nxt = recs[-1]["seq"] if recs else start
    else:
        for r in recs:
            evs = events_of(ws, r)
            if events and len(events) + len(evs) > limit:
                break
            events += evs
            nxt = r["seq"]
    return {"events": events, "next": nxt, "gap": gap}


def live_status(deliverer) -> dict[str, dict]:
    return deliverer.status() if deliverer is not None else {}

