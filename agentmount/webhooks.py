"""Standard Webhooks signing (https://www.standardwebhooks.com): secrets, signatures, headers.

This module owns the wire-level signing scheme used for outgoing change-event webhooks and
is the public API for receivers that want to verify them: `verify(headers, body, secret)`
checks the `webhook-id` / `webhook-timestamp` / `webhook-signature` headers and returns the
decoded JSON payload, or raises `WebhookVerificationError`.

The signed content is `f"{msg_id}.{timestamp}.".encode() + body`, signed with HMAC-SHA256
under the key encoded in the `whsec_<base64>` secret; the signature header carries one or
more space-separated `v1,<base64 signature>` entries so that keys can be rotated.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any, Mapping

__all__ = ["WebhookVerificationError", "parse_secret", "generate_secret", "sign", "headers", "verify",
           "SECRET_PREFIX", "MIN_KEY_BYTES", "MAX_KEY_BYTES", "DEFAULT_TOLERANCE"]

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
DEFAULT_TOLERANCE = 300

_ID_HEADER = "webhook-id"
_TS_HEADER = "webhook-timestamp"
_SIG_HEADER = "webhook-signature"
_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}")


class WebhookVerificationError(Exception):
    """A webhook request failed verification; the message says why."""


def parse_secret(secret: str) -> bytes:
    """Return the HMAC key encoded in `secret` (`whsec_` + standard base64 of 24..64 bytes).

    Raises ValueError with a one-line message if the secret is malformed.
    """
    if not isinstance(secret, str):
        raise ValueError(f"webhook secret must be a string 'whsec_<base64>', got {type(secret).__name__}")
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("webhook secret must start with 'whsec_' followed by the base64 of "
                         f"{MIN_KEY_BYTES}..{MAX_KEY_BYTES} random bytes")
    encoded = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret after 'whsec_' is not valid standard base64 "
                         f"(expected the base64 of {MIN_KEY_BYTES}..{MAX_KEY_BYTES} random bytes)") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"webhook secret key is {len(key)} bytes; expected {MIN_KEY_BYTES}..{MAX_KEY_BYTES} "
                         "bytes (base64-encoded after 'whsec_')")
    return key


def generate_secret() -> str:
    """Return a new random secret: `whsec_` + base64 of 32 bytes from the `secrets` module."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _as_bytes(body: bytes | str) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode("utf-8") + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `webhook-signature` value `v1,<base64 HMAC-SHA256>` for this message."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError(f"webhook timestamp must be an int (seconds since the epoch), got {timestamp!r}")
    return "v1," + _signature(parse_secret(secret), msg_id, timestamp, _as_bytes(body))


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Return the HTTP headers for delivering `body` as message `msg_id` sent at `timestamp`."""
    return {
        _ID_HEADER: msg_id,
        _TS_HEADER: str(timestamp),
        _SIG_HEADER: sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def _header(hdrs: Any, name: str) -> str | None:
    """Case-insensitive lookup of `name` in a Mapping or a Message-like object with `.get`."""
    items = getattr(hdrs, "items", None)
    if items is not None:
        found = [v for k, v in items() if isinstance(k, str) and k.lower() == name]
        if len(set(found)) > 1:
            raise WebhookVerificationError(f"header {name!r} is present more than once with different values")
        value = found[0] if found else None
    else:
        value = hdrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip()


def verify(headers: Mapping[str, str], body: bytes | str, secret: str, *, tolerance: int = DEFAULT_TOLERANCE,
           now: float | None = None) -> dict[str, Any]:
    """Verify a webhook request and return its decoded JSON body (a JSON object).

    `headers` may be any Mapping (keys in any case) or a Message-like object with `.get`
    (http.client / email). The timestamp must be within `tolerance` seconds of `now`
    (default: the current time). Any `v1` entry in the signature header may match (key
    rotation); entries of other versions are ignored. Raises WebhookVerificationError on
    any failure, ValueError if `secret` itself is malformed.
    """
    key = parse_secret(secret)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 seconds, got {tolerance!r}")
    msg_id = _header(headers, _ID_HEADER)
    ts_text = _header(headers, _TS_HEADER)
    sig_text = _header(headers, _SIG_HEADER)
    missing = [n for n, v in ((_ID_HEADER, msg_id), (_TS_HEADER, ts_text), (_SIG_HEADER, sig_text)) if not v]
    if missing:
        raise WebhookVerificationError(f"missing required header(s): {', '.join(missing)}")
    assert msg_id is not None and ts_text is not None and sig_text is not None
    if not _TIMESTAMP_RE.fullmatch(ts_text):
        raise WebhookVerificationError(f"invalid {_TS_HEADER} {ts_text!r}: expected integer seconds since the epoch")
    timestamp = int(ts_text)
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError(f"{_TS_HEADER} {timestamp} is too old "
                                       f"({current - timestamp:.0f} s ago; tolerance {tolerance} s)")
    if timestamp > current + tolerance:
        raise WebhookVerificationError(f"{_TS_HEADER} {timestamp} is too far in the future "
                                       f"({timestamp - current:.0f} s ahead; tolerance {tolerance} s)")
    payload = _as_bytes(body)
    expected = _signature(key, msg_id, timestamp, payload).encode("ascii")
    candidates = []
    for entry in sig_text.split():
        version, sep, sig = entry.partition(",")
        if sep and version == "v1":
            candidates.append(sig)
    if not candidates:
        raise WebhookVerificationError(f"{_SIG_HEADER} holds no 'v1,<signature>' entry")
    matched = False
    for sig in candidates:  # compare against all, so timing does not reveal which entry matched
        matched |= hmac.compare_digest(sig.encode("utf-8", "replace"), expected)
    if not matched:
        raise WebhookVerificationError("no signature in webhook-signature matches the secret "
                                       "(wrong secret or modified body)")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WebhookVerificationError(f"signed body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise WebhookVerificationError(f"signed body is JSON {type(data).__name__}, expected an object")
    return data
