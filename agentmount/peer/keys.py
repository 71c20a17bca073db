"""CurveZMQ keys and peer authentication (ZAP), trio-native.

Owns: generating and validating z85 Curve keys, the text `agentmount keys
generate` prints, and the ZAP handler that decides which peers may connect.

Invariants:
- Keys are handled as z85 text (40 characters encoding 32 bytes); every
  loader either returns a normalized `str` or raises `KeyFormatError` naming
  the offending key.
- `Authenticator` answers ZAP requests for every Curve server socket of its
  zmq context (one per context: the ZAP endpoint is per context). Only
  CURVE connections whose client public key is in the allow list are
  accepted; the ZAP user id of an accepted connection is the peer's name,
  which servers read from each message ("User-Id") as the authenticated
  sender. Everything else is refused (status 400) and logged.
- libzmq accepts every Curve client when *no* ZAP handler is bound, so servers
  refuse to start unless the authenticator of their context is running
  (`Authenticator.running`), and must stop before it does (run the
  authenticator in an outer nursery). Servers additionally drop any message
  whose User-Id does not match its envelope's sender, so a missing handler
  fails closed.
"""
from __future__ import annotations

import logging
from typing import Mapping

import trio
import zmq
from zmq.utils import z85

from .zsock import LogLimiter, ZSocket

log = logging.getLogger("agentmount.peer")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DOMAIN = "agentmount"
_Z85_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


class KeyFormatError(ValueError):
    """A Curve key is malformed; the message names the key."""


def generate() -> tuple[str, str]:
    """A new Curve key pair as z85 text: (public_key, secret_key)."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CurveZMQ support")
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def keygen_text() -> str:
    """What `agentmount keys generate` prints: two TOML lines ready to paste."""
    public, secret = generate()
    return f'public_key = "{public}"\nsecret_key = "{secret}"\n'


def load_key(text: object, what: str = "key") -> str:
    """Validate one z85 Curve key (public or secret); returns it stripped."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise KeyFormatError(f"{what}: not ASCII z85 text") from None
    if not isinstance(text, str):
        raise KeyFormatError(f"{what}: expected a z85 string, got {type(text).__name__}")
    key = text.strip()
    if len(key) != 40:
        raise KeyFormatError(f"{what}: a Curve key is 40 z85 characters, got {len(key)}")
    bad = sorted(set(key) - _Z85_CHARS)
    if bad:
        raise KeyFormatError(f"{what}: invalid z85 character(s) {''.join(bad)!r}")
    try:
        raw = z85.decode(key)
    except Exception:
        raise KeyFormatError(f"{what}: not valid z85") from None
    if len(raw) != 32:
        raise KeyFormatError(f"{what}: decodes to {len(raw)} bytes, expected 32")
    return key


def public_from_secret(secret: str) -> str:
    """The public key belonging to a z85 secret key."""
    secret = load_key(secret, "secret_key")
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


def load_pair(public: object, secret: object, what: str = "node") -> tuple[str, str]:
    """Validate a (public_key, secret_key) pair and that they belong together."""
    pub = load_key(public, f"{what}.public_key")
    sec = load_key(secret, f"{what}.secret_key")
    if public_from_secret(sec) != pub:
        raise KeyFormatError(f"{what}.public_key does not match {what}.secret_key")
    return pub, sec


class AuthStats:
    __slots__ = ("accepted", "refused")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused = 0


class Authenticator:
    """Trio-native ZAP handler for one zmq context.

    `allowed` maps z85 public keys to peer names. Start `run` in a nursery
    (``await nursery.start(auth.run)``) before any server socket of the same
    context binds; the allow list can be replaced at any time with `set_allowed`
    (it applies to new connections).
    """

    def __init__(self, allowed: Mapping[str, str], *, context: zmq.Context | None = None,
                 domain: str = DOMAIN) -> None:
        self.context: zmq.Context = context if context is not None else zmq.Context.instance()
        self.domain = domain
        self.stats = AuthStats()
        self._allowed: dict[bytes, str] = {}
        self._running = False
        self._log = LogLimiter(log)  # refused peers retry every reconnect interval
        self.set_allowed(allowed)

    def set_allowed(self, allowed: Mapping[str, str]) -> None:
        table: dict[bytes, str] = {}
        for pub, name in allowed.items():
            key = load_key(pub, f"public_key of peer {name!r}")
            if not isinstance(name, str) or not name:
                raise ValueError(f"peer name for key {key} must be a non-empty str")
            table[z85.decode(key)] = name
        self._allowed = table

    @property
    def running(self) -> bool:
        return self._running

    def _answer(self, req: list[bytes]) -> list[bytes]:
        # [routing, b"", version, request_id, domain, address, identity, mechanism, *credentials]
        if len(req) < 8 or req[1] != b"":
            raise ValueError("malformed ZAP request")
        version, request_id, domain, address, _identity, mechanism = req[2:8]
        creds = req[8:]

        def reply(status: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
            return [req[0], b"", b"1.0", request_id, status, text, user, b""]

        if version != b"1.0":
            return reply(b"400", b"unsupported ZAP version")
        addr = address.decode("utf-8", "replace")
        if domain.decode("utf-8", "replace") != self.domain:
            self.stats.refused += 1
            self._log.warning("event=auth_refused reason=wrong_domain domain=%r address=%s", domain, addr)
            return reply(b"400", b"wrong domain")
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self.stats.refused += 1
            self._log.warning("event=auth_refused reason=not_curve mechanism=%r address=%s", mechanism, addr)
            return reply(b"400", b"CURVE required")
        name = self._allowed.get(creds[0])
        if name is None:
            self.stats.refused += 1
            self._log.warning("event=auth_refused reason=unknown_key key=%s address=%s",
                              z85.encode(creds[0]).decode("ascii"), addr)
            return reply(b"400", b"unknown key")
        self.stats.accepted += 1
        log.debug("event=auth_accepted peer=%s address=%s", name, addr)
        return reply(b"200", b"OK", name.encode("utf-8"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ZAP requests until cancelled."""
        raw = self.context.socket(zmq.ROUTER)
        try:
            zs = ZSocket(raw)
            raw.bind(ZAP_ENDPOINT)
        except BaseException:
            raw.close(linger=0)
            raise
        async with trio.open_nursery() as nursery:
            await nursery.start(zs.run)
            self._running = True
            try:
                task_status.started()
                while True:
                    req = await zs.recv_multipart()
                    try:
                        answer = self._answer(req)
                    except ValueError as e:
                        log.warning("event=auth_bad_request reason=%s frames=%d", e, len(req))
                        continue
                    try:
                        await zs.send_multipart(answer)
                    except zmq.ZMQError as e:  # the connection went away meanwhile
                        log.debug("event=auth_reply_failed error=%s", e)
            finally:
                self._running = False
                nursery.cancel_scope.cancel()
