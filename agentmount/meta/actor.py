"""Who makes the change being handled: (uid, pid) of the calling process.

The FUSE layer sets it per request (from the request context); file handles set it from
their opener for close and fsync. The namespace stamps it, with the peer, on the journal
record, so change events can name their actor.
"""
from __future__ import annotations

from contextvars import ContextVar

ACTOR: ContextVar[tuple[int, int] | None] = ContextVar("agentmount_actor", default=None)


def current() -> tuple[int, int] | None:
    return ACTOR.get()


def set_actor(uid: int, pid: int) -> None:
    ACTOR.set((uid, pid))
