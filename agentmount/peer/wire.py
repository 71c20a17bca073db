"""Peer message envelope: msgpack encoding and strict validation.

Owns the byte format of every message peers exchange (RPC requests, replies,
errors and PUB/SUB notices). Pure: no I/O, no clocks, no logging.

Format: one msgpack map with exactly these keys::

    {"v": PROTOCOL_VERSION, "kind": str, "id": bytes, "epoch": int | None,
     "sender": str, "body": <any msgpack value>}

Invariants:
- `decode` either returns a fully validated `Envelope` or raises `BadMessage`
  (never another exception type) whatever bytes it is given, and never reads
  more than `max_size` bytes' worth of input.
- `encode` refuses (with `BadMessage`) to produce anything `decode` would reject,
  so a well-formed sender can never emit a message its peers drop.
- Kinds starting with `$` are reserved for the transport (replies, errors,
  notices); the layers above pick plain names.
- `body` is any msgpack value (nil, bool, int, float, str, bytes, list, map;
  the standard timestamp decodes as `msgpack.Timestamp`); other extension
  types are refused. Maps in a body may have str, bytes or int keys.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_MESSAGE = 16 << 20          # bytes; larger frames are refused before unpacking
MAX_KIND = 64                   # characters
MAX_ID = 64                     # bytes
MAX_SENDER = 128                # characters
MAX_EPOCH = (1 << 63) - 1

KIND_REPLY = "$reply"
KIND_ERROR = "$error"
KIND_NOTICE = "$notice"
RESERVED_KINDS = frozenset({KIND_REPLY, KIND_ERROR, KIND_NOTICE})

_KEYS = frozenset({"v", "kind", "id", "epoch", "sender", "body"})


class BadMessage(ValueError):
    """A message is malformed; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: str
    id: bytes
    epoch: int | None
    sender: str
    body: Any = None
    v: int = PROTOCOL_VERSION


def new_id() -> bytes:
    """A fresh request/notice id: 16 random bytes (unique with overwhelming probability)."""
    return os.urandom(16)


def _reject_ext(code: int, data: bytes) -> Any:
    raise BadMessage(f"msgpack extension type {code} not allowed")


def _check(v: Any, kind: Any, id_: Any, epoch: Any, sender: Any) -> None:
    if type(v) is not int:
        raise BadMessage(f"version must be an int, got {type(v).__name__}")
    if v != PROTOCOL_VERSION:
        raise BadMessage(f"unsupported protocol version {v} (this peer speaks {PROTOCOL_VERSION})")
    if type(kind) is not str:
        raise BadMessage(f"kind must be a str, got {type(kind).__name__}")
    if not 0 < len(kind) <= MAX_KIND:
        raise BadMessage(f"kind length {len(kind)} not in 1..{MAX_KIND}")
    if type(id_) is not bytes:
        raise BadMessage(f"id must be bytes, got {type(id_).__name__}")
    if not 0 < len(id_) <= MAX_ID:
        raise BadMessage(f"id length {len(id_)} not in 1..{MAX_ID}")
    if epoch is not None:
        if type(epoch) is not int:
            raise BadMessage(f"epoch must be an int or nil, got {type(epoch).__name__}")
        if not 0 <= epoch <= MAX_EPOCH:
            raise BadMessage(f"epoch {epoch} out of range")
    if type(sender) is not str:
        raise BadMessage(f"sender must be a str, got {type(sender).__name__}")
    if not 0 < len(sender) <= MAX_SENDER:
        raise BadMessage(f"sender length {len(sender)} not in 1..{MAX_SENDER}")


def encode(env: Envelope, *, max_size: int = MAX_MESSAGE) -> bytes:
    """Serialize `env`; `BadMessage` if a field is invalid, the body is not
    msgpack-encodable, or the result exceeds `max_size`."""
    _check(env.v, env.kind, env.id, env.epoch, env.sender)
    try:
        data = msgpack.packb({"v": env.v, "kind": env.kind, "id": env.id, "epoch": env.epoch,
                              "sender": env.sender, "body": env.body}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadMessage(f"body not encodable: {e}") from None
    if len(data) > max_size:
        raise BadMessage(f"message of {len(data)} bytes exceeds limit of {max_size}")
    return data


def decode(data: bytes | bytearray | memoryview, *, max_size: int = MAX_MESSAGE) -> Envelope:
    """Parse and validate one message; raises `BadMessage` for anything malformed."""
    n = len(data)
    if n > max_size:
        raise BadMessage(f"message of {n} bytes exceeds limit of {max_size}")
    if n == 0:
        raise BadMessage("empty message")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                              ext_hook=_reject_ext)
    except BadMessage:
        raise
    except msgpack.ExtraData:
        raise BadMessage("trailing bytes after the envelope") from None
    except Exception as e:  # OutOfData, FormatError, StackError, UnicodeDecodeError, TypeError, ...
        raise BadMessage(f"not valid msgpack ({type(e).__name__})") from None
    if type(obj) is not dict:
        raise BadMessage(f"envelope must be a map, got {type(obj).__name__}")
    if obj.keys() != _KEYS:
        keys = set(obj.keys())
        missing = sorted(_KEYS - keys)
        extra = sorted(repr(k) for k in keys - _KEYS)
        raise BadMessage("envelope keys wrong" + (f"; missing {missing}" if missing else "")
                         + (f"; unexpected {extra[:5]}" if extra else ""))
    _check(obj["v"], obj["kind"], obj["id"], obj["epoch"], obj["sender"])
    return Envelope(kind=obj["kind"], id=obj["id"], epoch=obj["epoch"], sender=obj["sender"],
                    body=obj["body"], v=obj["v"])
