"""Change events of journal records: what each record did, in inotify terms.

On the leader, `Annotator` runs around every record's apply (synchronously, so the record
it annotates is still only in memory) and stores the record's events in it as `rec["ev"]`:
paths are resolved then, while the names still exist. Events thus ride in the journal,
which is the outbox: what is durable there is deliverable, and nothing that did not commit
ever yields an event. `events_of` turns a durable record into webhook payloads.

Mapping: mknod/mkdir/symlink/link -> fs.entry.created; unlink/rmdir -> fs.entry.deleted;
rename -> fs.entry.moved (two for an exchange); setattr (not a truncate done by an O_TRUNC
open), setxattr, removexattr -> fs.entry.attrib; a write committed by close or fsync, or a
`written` record -> fs.file.written; lock records -> fs.lock.*. compact, free and epoch
records change nothing a user sees and yield none.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any

from agentmount.events.paths import PathIndex
from agentmount.meta.state import Inode, NamespaceState

EVENT_TYPES = ("fs.entry.created", "fs.file.written", "fs.entry.attrib", "fs.entry.deleted", "fs.entry.moved",
               "fs.lock.acquired", "fs.lock.released", "fs.lock.revoked", "fs.overflow")

# rec["ev"] items: [type, path, old_path, ino, is_dir, size, mode, mtime_ns, version, extra]
_ATTRIB_OPS = ("setxattr", "rmxattr")


def _item(kind: str, path: str, old: str | None, node: Inode, extra: dict | None = None) -> list:
    return [kind, path, old, node.ino, node.is_dir, node.size, node.mode, node.mtime, node.version, extra]


class Annotator:
    """Adds `ev` (and keeps the path index current) to each record the leader applies."""

    def __init__(self, state: NamespaceState) -> None:
        self.state = state
        self.paths = PathIndex(state)

    def before(self, rec: dict) -> Any:
        """What only the state before `rec` knows (names about to go)."""
        op = rec["op"]
        st = self.state
        p = self.paths
        if op in ("mknod", "link"):
            return p.child_path(rec["parent"], rec["name"])
        if op == "unlink":
            return p.child_path(rec["parent"], rec["name"]), st.inodes.get(rec["ino"])
        if op == "rename":
            victim = None if rec.get("exchange") else st.dirs[rec["dp"]].get(rec["dn"])
            return (p.child_path(rec["sp"], rec["sn"]), p.child_path(rec["dp"], rec["dn"]),
                    st.dirs[rec["dp"]].get(rec["dn"]), victim)
        return None

    def after(self, rec: dict, pre: Any) -> None:
        op = rec["op"]
        st = self.state
        p = self.paths
        ev: list[list] = []
        if op in ("mknod", "link"):
            node = st.inodes[rec["ino"]]
            p.added(node.ino, rec["parent"], rec["name"])
            ev.append(_item("fs.entry.created", pre, None, node))
        elif op == "unlink":
            path, node = pre
            if node is not None:
                p.dropped(node.ino, rec["parent"], rec["name"])
                ev.append(_item("fs.entry.deleted", path, None, node))
        elif op == "rename":
            old, new, dst_ino, victim = pre
            src = st.inodes[rec["ino"]]
            if victim is not None:
                p.dropped(victim, rec["dp"], rec["dn"])
            p.moved(src.ino, rec["dp"], rec["dn"])
            ev.append(_item("fs.entry.moved", new, old, src, {"cookie": rec["seq"]}))
            if rec.get("exchange") and dst_ino is not None:
                dst = st.inodes[dst_ino]
                p.moved(dst.ino, rec["sp"], rec["sn"])
                ev.append(_item("fs.entry.moved", old, new, dst, {"cookie": rec["seq"]}))
        elif op == "setattr" and not rec.get("quiet") or op in _ATTRIB_OPS:
            node = st.inodes.get(rec["ino"])
            if node is not None and node.nlink > 0:
                ev.append(_item("fs.entry.attrib", p.path(node.ino), None, node))
        elif op == "write" and rec.get("cw") or op == "written":
            node = st.inodes.get(rec["ino"])
            if node is not None and node.nlink > 0:
                ev.append(_item("fs.file.written", p.path(node.ino), None, node))
        elif op == "lock":
            node = st.inodes.get(rec["ino"])
            path = p.path(rec["ino"]) if node is not None else ""
            extra = {k: rec[k] for k in ("lock", "token") if k in rec}
            if node is not None:
                ev.append(_item(rec["kind"], path, None, node, extra))
            else:
                ev.append([rec["kind"], path, None, rec["ino"], False, 0, 0, 0, 0, extra])
        if ev:
            rec["ev"] = ev


def iso(t_ns: int) -> str:
    return _dt.datetime.fromtimestamp(t_ns / 1e9, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_id(ws: str, epoch: int, seq: int, n: int = 0) -> str:
    return f"evt_{ws}_{epoch}_{seq}" + (f"_{n}" if n else "")


def events_of(ws: str, rec: dict) -> list[dict]:
    """The webhook payloads of one durable record (with its `ev`), ids stable across retries."""
    out = []
    act = rec.get("act") or [None, None, None]
    for n, item in enumerate(rec.get("ev") or ()):
        kind, path, old, ino, is_dir, size, mode, mtime, version, extra = item
        data: dict[str, Any] = {"workspace": ws, "path": path}
        if old is not None:
            data["old_path"] = old
        data.update({"inode": ino, "is_dir": bool(is_dir), "size": size, "mode": mode,
                     "mtime": mtime / 1e9, "version": version,
                     "actor": {"peer": act[0], "uid": act[1], "pid": act[2]},
                     "epoch": rec["epoch"], "seq": rec["seq"]})
        if extra:
            data.update(extra)
        out.append({"id": event_id(ws, rec["epoch"], rec["seq"], n), "type": kind,
                    "timestamp": iso(rec.get("t", 0)), "data": data})
    return out


def overflow_event(ws: str, epoch: int, seq: int, first: int, last: int, t_ns: int) -> dict:
    """Sent in place of events a subscriber's backlog lost (seqs first..last)."""
    return {"id": event_id(ws, epoch, seq) + "_overflow", "type": "fs.overflow", "timestamp": iso(t_ns),
            "data": {"workspace": ws, "first_seq": first, "last_seq": last, "epoch": epoch, "seq": seq}}
