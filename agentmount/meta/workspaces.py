"""The workspace registry in the store and opening a workspace's namespace.

`workspaces/<name>` holds a small record (owner, mode, creation time) per
workspace; everything of a workspace lives under `ws/<name>/`. Opening a
workspace recovers its state (snapshot + journal) and starts a new epoch.
"""
from __future__ import annotations

import errno
import time

from typing import TYPE_CHECKING

from agentmount.config import WORKSPACE_NAME_RE
from agentmount.errors import FsError
from agentmount.meta import journal as jr
from agentmount.meta.state import NamespaceState
from backend.store import AlreadyExists, NotFound, ObjectStore

if TYPE_CHECKING:
    from agentmount.config import Config
    from agentmount.meta.service import LocalNamespace

REGISTRY = "workspaces/"


def valid_name(name: str) -> bool:
    return bool(WORKSPACE_NAME_RE.match(name))


async def list_workspaces(store: ObjectStore) -> dict[str, dict]:
    out = {}
    for key in await store.list_keys(REGISTRY):
        name = key[len(REGISTRY):]
        try:
            out[name] = jr.unpack(await store.get(key))
        except NotFound:
            continue
    return out


async def create_workspace(store: ObjectStore, name: str, *, uid: int, gid: int, mode: int = 0o755,
                           chunk_size: int = 64 << 20) -> dict:
    if not valid_name(name):
        raise FsError(errno.EINVAL, f"invalid workspace name {name!r}")
    info = {"name": name, "uid": uid, "gid": gid, "mode": mode & 0o7777, "created": time.time_ns(),
            "chunk_size": chunk_size}
    try:
        await store.put(REGISTRY + name, jr.pack(info), create_only=True)
    except AlreadyExists:
        raise FsError(errno.EEXIST, f"workspace {name} exists") from None
    return info


async def delete_workspace(store: ObjectStore, name: str) -> int:
    """Delete every object of the workspace, then its registry entry. Returns objects removed."""
    n = 0
    for key in await store.list_keys(f"ws/{name}/"):
        await store.delete(key)
        n += 1
    await store.delete(REGISTRY + name)
    return n


def fresh_state(name: str, info: dict, chunk_size: int) -> NamespaceState:
    return NamespaceState(name, info.get("chunk_size", chunk_size), root_mode=info.get("mode", 0o755), root_uid=info.get("uid", 0),
                          root_gid=info.get("gid", 0), t=info.get("created", 0))


async def recover(store: ObjectStore, name: str, info: dict, chunk_size: int,
                  rid_seconds: float | None = None) -> jr.Loaded:
    """Load `name`'s state; `rid_seconds`: how long its request ids are remembered."""
    fresh = fresh_state(name, info, chunk_size)
    if rid_seconds is not None:
        fresh.rids.seconds = rid_seconds
    return await jr.load(store, name, fresh)


async def open_local(store: ObjectStore, name: str, info: dict, cfg: "Config") -> tuple["LocalNamespace", jr.Loaded]:
    """Recover `name` and serve it from this process, in a new epoch."""
    from agentmount.meta.service import LocalNamespace
    loaded = await recover(store, name, info, cfg.chunk_size)
    journal = jr.Journal(store, name, loaded.epoch + 1, loaded.state.seq, window=cfg.fs.commit_window_ms / 1000,
                         timeout=cfg.fs.store_timeout_s)
    meta = LocalNamespace(store, loaded.state, journal, snapshot_records=cfg.fs.snapshot_records,
                          gc_grace=cfg.fs.gc_grace_s)
    return meta, loaded


def select(known: dict, only: str | None, out) -> tuple[list[str], int]:
    """The workspaces a command works on (`only`, or all known) and how many asked for are
    missing (each reported on `out`)."""
    names = [only] if only else sorted(known)
    missing = [n for n in names if n not in known]
    for n in missing:
        print(f"{n}: no such workspace", file=out)
    return [n for n in names if n in known], len(missing)
