"""Webhook subscriptions of a workspace, their cursors and dead letters, kept in the stores.

Keys (JSON objects), so every peer and any future leader sees the same:
- `ws/<ws>/webhooks/subs/<id>`: the subscription (url, secret, event types, path glob, ...);
- `ws/<ws>/webhooks/cursor/<id>`: `{"seq": N}`: every event up to record N is delivered or
  dead-lettered (delivery resumes after it: at least once);
- `ws/<ws>/webhooks/dead/<id>/<seq>-<hash of event id>`: an event whose retry budget ran out, with its last
  error, until `webhook replay` delivers it.

Subscriptions from mount.conf get an id derived from their content, so every peer with the
same config writes the same one (idempotent); ones added at run time get a random id.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

import xxhash

from agentmount import webhooks
from agentmount.config import WebhookConfig
from agentmount.events.derive import EVENT_TYPES
from agentmount.events.policy import UrlRefused, check_url
from backend.store import NotFound, ObjectStore


class InvalidSubscription(ValueError):
    """A subscription's fields are invalid; the message names the field."""


@dataclass
class Subscription(WebhookConfig):
    """One webhook endpoint of one workspace: a `[[webhook]]` with its id and delivery state.
    `events` None: every type; `path`: an fnmatch glob on the event's path (or old path)
    relative to the workspace, e.g. `/reports/*`."""

    id: str = ""
    source: str = "api"
    created: float = field(default_factory=time.time)
    start_seq: int = 0             # events of records after this seq are delivered
    disabled: str | None = None    # why delivery stopped (e.g. the endpoint answered 410 Gone)

    def wants(self, event: dict) -> bool:
        if self.events is not None and event["type"] not in self.events:
            return False
        if self.path is None or event["type"] == "fs.overflow":
            return True
        d = event["data"]
        return any(p is not None and fnmatch.fnmatchcase(p, self.path) for p in (d.get("path"), d.get("old_path")))

    def public(self) -> dict:
        """What listings show: everything but the secret."""
        out = asdict(self)
        out["secret"] = self.secret[:10] + "..."
        return out

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> "Subscription":
        o = json.loads(data)
        return Subscription(**{k: o[k] for k in Subscription.__dataclass_fields__ if k in o})


def validate(workspace: str, url: str, secret: str, events: list[str] | None = None, path: str | None = None,
             allow_private: bool = False, *, where: str = "webhook") -> None:
    """Raise InvalidSubscription naming the bad field."""
    try:
        check_url(url, allow_private)
    except UrlRefused as e:
        raise InvalidSubscription(f"{where}.url: {e}") from None
    try:
        webhooks.parse_secret(secret)
    except ValueError as e:
        raise InvalidSubscription(f"{where}.secret: {e}") from None
    if events is not None:
        if not isinstance(events, list) or not events:
            raise InvalidSubscription(f"{where}.events: a non-empty list of event types (omit it for all)")
        for t in events:
            if t not in EVENT_TYPES:
                raise InvalidSubscription(f"{where}.events: unknown event type {t!r} "
                                          f"(known: {', '.join(EVENT_TYPES)})")
    if path is not None and (not isinstance(path, str) or not path.startswith("/") or len(path) > 4096):
        raise InvalidSubscription(f"{where}.path: a glob starting with '/' (relative to the workspace)")
    if not isinstance(allow_private, bool):
        raise InvalidSubscription(f"{where}.allow_private: true or false")


def config_id(workspace: str, url: str, events: list[str] | None, path: str | None) -> str:
    h = xxhash.xxh64(json.dumps([workspace, url, events, path]).encode()).hexdigest()
    return "wh_" + h[:16]


def new_id() -> str:
    return "wh_" + os.urandom(8).hex()


_ID_RE = re.compile(r"wh_[0-9a-f]{16}")


def valid_id(sid: object) -> bool:
    """Whether `sid` has the form of a subscription id (anything else names none: never a store key)."""
    return isinstance(sid, str) and _ID_RE.fullmatch(sid) is not None


def _prefix(ws: str) -> str:
    return f"ws/{ws}/webhooks/"


def sub_key(ws: str, sid: str) -> str:
    return f"{_prefix(ws)}subs/{sid}"


def cursor_key(ws: str, sid: str) -> str:
    return f"{_prefix(ws)}cursor/{sid}"


def dead_prefix(ws: str, sid: str) -> str:
    return f"{_prefix(ws)}dead/{sid}/"


class Registry:
    """Reads and writes one workspace's subscriptions, cursors and dead letters."""

    def __init__(self, store: ObjectStore, ws: str) -> None:
        self.store = store
        self.ws = ws

    async def list(self) -> list[Subscription]:
        out = []
        for key in sorted(await self.store.list_keys(_prefix(self.ws) + "subs/")):
            try:
                out.append(Subscription.from_json(await self.store.get(key)))
            except NotFound:
                continue        # removed meanwhile
            except (ValueError, TypeError, KeyError):
                continue        # unreadable: listed by nobody, like a removed one
        return out

    async def get(self, sid: str) -> Subscription | None:
        try:
            return Subscription.from_json(await self.store.get(sub_key(self.ws, sid)))
        except NotFound:
            return None

    async def put(self, sub: Subscription) -> None:
        await self.store.put(sub_key(self.ws, sub.id), sub.to_json())

    async def add_if_missing(self, sub: Subscription) -> bool:
        if await self.get(sub.id) is not None:
            return False
        await self.put(sub)
        return True

    async def remove(self, sid: str) -> bool:
        if await self.get(sid) is None:
            return False
        await self.store.delete(sub_key(self.ws, sid))
        await self.store.delete(cursor_key(self.ws, sid))
        for key in await self.store.list_keys(dead_prefix(self.ws, sid)):
            await self.store.delete(key)
        return True

    async def cursor(self, sid: str) -> int | None:
        try:
            return int(json.loads(await self.store.get(cursor_key(self.ws, sid)))["seq"])
        except NotFound:
            return None

    async def set_cursor(self, sid: str, seq: int) -> None:
        await self.store.put(cursor_key(self.ws, sid), json.dumps({"seq": seq, "at": time.time()}).encode())

    async def dead_letter(self, sid: str, event: dict, error: str, attempts: int) -> None:
        name = f"{event['data'].get('seq', 0):016d}-{xxhash.xxh64(event['id'].encode()).hexdigest()[:8]}"
        await self.store.put(dead_prefix(self.ws, sid) + name, json.dumps(
            {"event": event, "error": error, "attempts": attempts, "at": time.time()}).encode())

    async def dead_letters(self, sid: str) -> list[tuple[str, dict]]:
        out = []
        for key in sorted(await self.store.list_keys(dead_prefix(self.ws, sid))):
            try:
                out.append((key, json.loads(await self.store.get(key))))
            except NotFound:
                continue
        return out

    async def drop_dead(self, key: str) -> None:
        await self.store.delete(key)
