"""Webhook delivery for one workspace, run by its leader while it leads.

One `Worker` per enabled subscription reads durable events after its cursor (`Feed`), and
POSTs each wanted one, signed (Standard Webhooks), with at most `max_in_flight` requests at a
time (1, the default, keeps delivery in seq order). A failed attempt is retried on the
`RetryPolicy` schedule (Retry-After honoured); when the budget runs out the event goes to
the dead-letter list. A 410 Gone disables the subscription. The cursor (every event up to it
is delivered or dead-lettered) is saved to the stores a few times a second and when the
leadership ends, so a restarted or new leader resumes there: at least once, ids unchanged.

Nothing here is awaited by a file operation: a hanging or slow receiver only holds its own
worker, whose attempts are bounded by `timeout_s`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import trio

from agentmount import webhooks
from agentmount.config import EventsConfig, WebhookConfig
from agentmount.events.derive import events_of, overflow_event
from agentmount.events.feed import Feed, Gap
from agentmount.events.policy import UrlRefused, resolve_and_check
from agentmount.events.schedule import RetryPolicy, parse_retry_after
from agentmount.events.subscriptions import Registry, Subscription, config_id
from agentmount.meta.service import LocalNamespace
from backend.store import StoreError

log = logging.getLogger("agentmount.events")

MAX_RESPONSE = 64 << 10     # bytes of a response read (and discarded) at most
RESCAN_S = 2.0              # how often the subscription list is re-read from the stores
HOST_CHECK_S = 60.0         # how long an address check of a URL's host is trusted


def policy_of(cfg: EventsConfig) -> RetryPolicy:
    return RetryPolicy(schedule=tuple(float(x) for x in cfg.retry_schedule_s), every=float(cfg.retry_every_s),
                       budget=float(cfg.retry_budget_s))


def body_of(event: dict) -> bytes:
    return json.dumps({"type": event["type"], "timestamp": event["timestamp"], "data": event["data"]},
                      separators=(",", ":")).encode()


class Attempt:
    """Outcome of one POST."""

    __slots__ = ("ok", "status", "error", "retry_after")

    def __init__(self, ok: bool, status: int | None, error: str, retry_after: float | None = None) -> None:
        self.ok, self.status, self.error, self.retry_after = ok, status, error, retry_after


class Sender:
    """POSTs signed events to one subscription's URL (its own connection pool)."""

    def __init__(self, sub: Subscription, timeout: float) -> None:
        self.sub = sub
        self.timeout = timeout
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False,
                                        limits=httpx.Limits(max_connections=16, max_keepalive_connections=4),
                                        headers={"user-agent": "agentmount-webhooks/1"})
        self._checked = -1e9

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.client.aclose()

    async def send(self, event: dict) -> Attempt:
        if trio.current_time() - self._checked > HOST_CHECK_S:
            try:     # the host may have been re-pointed at a refused address since it was added
                await trio.to_thread.run_sync(resolve_and_check, self.sub.url, self.sub.allow_private)
            except UrlRefused as e:
                return Attempt(False, None, str(e))
            self._checked = trio.current_time()
        body = body_of(event)
        hdrs = webhooks.headers(self.sub.secret, event["id"], int(time.time()), body)
        with trio.move_on_after(self.timeout):
            try:
                async with self.client.stream("POST", self.sub.url, content=body, headers=hdrs) as resp:
                    got = 0
                    async for chunk in resp.aiter_raw():
                        got += len(chunk)
                        if got >= MAX_RESPONSE:
                            break
                    status = resp.status_code
                    ra = parse_retry_after(resp.headers.get("retry-after"), time.time())
            except httpx.HTTPError as e:
                return Attempt(False, None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            if 200 <= status < 300:
                return Attempt(True, status, "")
            return Attempt(False, status, f"HTTP {status}", ra)
        return Attempt(False, None, f"no answer within {self.timeout:g} s")


class Worker:
    """Delivers one subscription's events; see module docstring."""

    def __init__(self, sub: Subscription, feed: Feed, registry: Registry, cfg: EventsConfig, me: str) -> None:
        self.sub = sub
        self.feed = feed
        self.registry = registry
        self.cfg = cfg
        self.policy = policy_of(cfg)
        self.me = me
        self.cursor: int | None = None      # None until loaded
        self.saved = -1
        self.high = 0                       # last seq dispatched (or skipped)
        self.inflight: dict[int, int] = {}  # seq -> events of it still being delivered
        self.delivered = 0
        self.failed_attempts = 0
        self.dead = 0
        self.last_error: str | None = None
        self.gone = trio.Event()

    def _advance(self) -> None:
        self.cursor = (min(self.inflight) - 1) if self.inflight else self.high

    async def run(self) -> None:
        sender = Sender(self.sub, self.cfg.timeout_s)
        try:
            cur = await self.registry.cursor(self.sub.id)
            if cur is None:
                cur = self.sub.start_seq if self.sub.start_seq >= 0 else self.feed.durable
                await self.registry.set_cursor(self.sub.id, cur)
            self.cursor = self.high = self.saved = cur
            async with trio.open_nursery() as n:
                n.start_soon(self._saver)
                limit = trio.Semaphore(self.cfg.max_in_flight)
                n.start_soon(self._watch_gone, n.cancel_scope)
                while True:
                    await self.feed.wait_after(self.high)
                    durable = self.feed.durable
                    if durable - self.high > self.cfg.max_backlog:
                        await self._overflow(limit, sender, n, self.high + 1, durable - self.cfg.max_backlog)
                        continue
                    try:
                        recs = await self.feed.records(self.high, 1000)
                    except Gap as g:
                        await self._overflow(limit, sender, n, g.first, g.last)
                        continue
                    if not recs:
                        self.high = max(self.high, durable)
                        self._advance()
                        continue
                    for rec in recs:
                        wanted = [e for e in events_of(self.feed.ws, rec) if self.sub.wants(e)]
                        seq = rec["seq"]
                        if wanted:
                            self.inflight[seq] = len(wanted)
                        self.high = seq
                        for ev in wanted:
                            await limit.acquire()
                            n.start_soon(self._deliver, limit, sender, ev, seq)
                        self._advance()
                    if recs[-1]["seq"] < durable and len(recs) < 1000:
                        self.high = max(self.high, durable)
                        self._advance()
        finally:
            await sender.aclose()
            if self.cursor is not None and self.cursor != self.saved:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self.registry.set_cursor(self.sub.id, self.cursor)
                    except StoreError as e:
                        log.warning("event=cursor_not_saved ws=%s sub=%s error=%s", self.sub.workspace,
                                    self.sub.id, e)

    async def _watch_gone(self, scope: trio.CancelScope) -> None:
        await self.gone.wait()
        scope.cancel()

    async def _overflow(self, limit, sender, n, first: int, last: int) -> None:
        log.warning("event=events_overflow ws=%s sub=%s first=%d last=%d", self.sub.workspace, self.sub.id,
                    first, last)
        ev = overflow_event(self.feed.ws, self.feed.local.journal.epoch, last, first, last, time.time_ns())
        self.inflight[last] = 1
        self.high = last
        await limit.acquire()
        n.start_soon(self._deliver, limit, sender, ev, last)
        self._advance()

    async def _saver(self) -> None:
        while True:
            await trio.sleep(0.2)
            cur = self.cursor
            if cur is not None and cur != self.saved:
                try:
                    await self.registry.set_cursor(self.sub.id, cur)
                    self.saved = cur
                except StoreError as e:
                    log.warning("event=cursor_not_saved ws=%s sub=%s error=%s", self.sub.workspace, self.sub.id, e)

    async def _deliver(self, limit: trio.Semaphore, sender: Sender, ev: dict, seq: int) -> None:
        try:
            await self._until_done(sender, ev)
        finally:
            limit.release()
        left = self.inflight.get(seq, 1) - 1
        if left > 0:
            self.inflight[seq] = left
        else:
            self.inflight.pop(seq, None)
        self._advance()

    async def _until_done(self, sender: Sender, ev: dict) -> None:
        first = time.time()
        failures = 0
        while True:
            a = await sender.send(ev)
            if a.ok:
                self.delivered += 1
                return
            failures += 1
            self.failed_attempts += 1
            self.last_error = a.error
            if a.status == 410:
                log.warning("event=webhook_disabled ws=%s sub=%s reason=410", self.sub.workspace, self.sub.id)
                self.sub.disabled = "the endpoint answered 410 Gone"
                with trio.CancelScope(shield=True):
                    await self.registry.put(self.sub)
                self.gone.set()
                await trio.sleep_forever()
            now = time.time()
            at = self.policy.next_attempt(first, now, failures, a.retry_after)
            log.info("event=webhook_retry ws=%s sub=%s id=%s failures=%d error=%s", self.sub.workspace,
                     self.sub.id, ev["id"], failures, a.error)
            if at is None:
                self.dead += 1
                log.warning("event=webhook_dead_letter ws=%s sub=%s id=%s attempts=%d error=%s",
                            self.sub.workspace, self.sub.id, ev["id"], failures, a.error)
                await self.registry.dead_letter(self.sub.id, ev, a.error, failures)
                return
            await trio.sleep(max(0.0, at - now))

    def status(self) -> dict:
        return {"cursor": self.cursor, "delivered": self.delivered, "failed_attempts": self.failed_attempts,
                "dead_lettered": self.dead, "in_flight": len(self.inflight), "last_error": self.last_error}


class Deliverer:
    """All webhook workers of one workspace on its leader."""

    def __init__(self, local: LocalNamespace, cfg: EventsConfig, configured: list[WebhookConfig], me: str) -> None:
        self.local = local
        self.ws = local.ws
        self.cfg = cfg
        self.configured = [w for w in configured if w.workspace == local.ws]
        self.me = me
        self.feed = Feed(local)
        self.registry = Registry(local.store, local.ws)
        self.workers: dict[str, tuple[Worker, trio.CancelScope]] = {}
        self.loaded = False
        self._wake = trio.Event()
        local.event_hold = self.hold

    def hold(self) -> int | None:
        """Journal records after this seq still have events to deliver (None: nothing held)."""
        if not self.loaded:
            return 0
        curs = [w.cursor for w, _ in self.workers.values()]
        if not curs:
            return None
        low = min(c if c is not None else 0 for c in curs)
        return max(low, self.local.journal.durable_seq - self.cfg.max_backlog)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        for w in self.configured:
            sub = Subscription(id=config_id(w.workspace, w.url, w.events, w.path), workspace=w.workspace, url=w.url,
                               secret=w.secret, events=w.events, path=w.path, allow_private=w.allow_private,
                               source="config", start_seq=self.local.recent_from - 1)
            while True:
                try:
                    await self.registry.add_if_missing(sub)
                    break
                except StoreError as e:
                    log.warning("event=webhook_register_failed ws=%s error=%s", self.ws, e)
                    await trio.sleep(RESCAN_S)
        async with trio.open_nursery() as n:
            while True:
                try:
                    subs = {s.id: s for s in await self.registry.list() if not s.disabled}
                except StoreError as e:
                    log.warning("event=webhook_list_failed ws=%s error=%s", self.ws, e)
                    subs = None
                if subs is not None:
                    for sid in [s for s in self.workers if s not in subs]:
                        self.workers.pop(sid)[1].cancel()
                    for sid, sub in subs.items():
                        if sid not in self.workers:
                            w = Worker(sub, self.feed, self.registry, self.cfg, self.me)
                            scope = trio.CancelScope()
                            self.workers[sid] = (w, scope)
                            n.start_soon(self._run_worker, w, scope)
                    self.local.lock_events_wanted = any(
                        s.events is None or any(t.startswith("fs.lock.") for t in s.events) for s in subs.values())
                    self.loaded = True
                self._wake = trio.Event()
                with trio.move_on_after(RESCAN_S):
                    await self._wake.wait()

    async def _run_worker(self, w: Worker, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await w.run()
                    return
                except StoreError as e:
                    log.warning("event=webhook_worker_failed ws=%s sub=%s error=%s", self.ws, w.sub.id, e)
                    await trio.sleep(1.0)
        if self.workers.get(w.sub.id, (None,))[0] is w and w.gone.is_set():
            self.workers.pop(w.sub.id, None)

    def status(self) -> dict[str, Any]:
        return {sid: w.status() for sid, (w, _) in self.workers.items()}
