"""Peer transport: ZeroMQ sockets from trio, CurveZMQ authentication, RPC and notices.

Layers (each only uses the ones above it):
- `wire`:  the msgpack envelope and its strict validation (`BadMessage`).
- `zsock`: `ZSocket`, a pyzmq socket usable from many trio tasks (one pump per socket).
- `keys`:  Curve key generation/validation and the trio-native ZAP `Authenticator`.
- `rpc`:   `RpcServer`/`RpcClient` (request/reply with deadlines, retries, dedup)
           and `Publisher`/`Subscriber` (change notices).
- `promises`, `lease`: durable voter state and quorum leases for workspace
           leadership (`Voter`, `LeaseManager`; the epoch is the fencing token).

Forwarding of namespace operations to the leader is built on top of this
package, not in it. Logs go to the "agentmount.peer" logger,
which is quiet unless the application configures logging.
"""
import logging

from .keys import Authenticator, KeyFormatError, generate, keygen_text, load_key, load_pair, public_from_secret
from .rpc import (Notice, PeerError, PeerUnavailable, Publisher, RemoteError, RpcClient, RpcServer,
                  Subscriber, running)
from .wire import BadMessage, Envelope
from .zsock import ZSocket, open_zsocket

logging.getLogger("agentmount.peer").addHandler(logging.NullHandler())

__all__ = [
    "Authenticator", "BadMessage", "Envelope", "KeyFormatError", "Notice", "PeerError", "PeerUnavailable",
    "Publisher", "RemoteError", "RpcClient", "RpcServer", "Subscriber", "ZSocket", "generate",
    "keygen_text", "load_key", "load_pair", "open_zsocket", "public_from_secret", "running",
]
