"""`agentmount scrub`: verify every object of every workspace on every store, and repair.

For each workspace (recovered through all replicas), the objects that must
exist are: its registry entry, its journal segments and snapshots (as listed
by any replica) and every block its namespace references. Each one is read
from every store and checked (block format and xxh3 checksum); a copy that
is missing or corrupt is reported per store, and with `--repair` rewritten
from a good copy. Blocks committed inline in the journal and not stored yet
anywhere are written from the journal's bytes. Progress goes to stderr;
the exit status is 0 when every copy is (now) present and valid.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import msgpack
import trio

from agentmount.chunks import block
from agentmount.chunks.layout import slice_block_keys
from agentmount.meta import journal as jr
from agentmount.meta import workspaces as wsreg
from backend.store import NotFound, ObjectStore, StoreError


@dataclass
class Report:
    checked: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)        # no good copy anywhere
    repaired: int = 0
    unrepaired: int = 0
    pending: int = 0   # committed inline in the journal, block object not written yet


def _check(key: str, data: bytes) -> None:
    if key.startswith(wsreg.REGISTRY):
        msgpack.unpackb(data, raw=False)
    elif key.endswith(jr.LOG_SUFFIX):
        jr.decode_log(data)    # a torn last append is no damage: it was never acknowledged
    else:
        block.decode(data)


class Scrubber:
    """Checks keys on every store; see module docstring."""

    def __init__(self, stores: list[ObjectStore], repair: bool, err: TextIO = sys.stderr,
                 concurrency: int = 16) -> None:
        self.stores = stores
        self.repair = repair
        self.err = err
        self.report = Report()
        self.limit = trio.CapacityLimiter(concurrency)
        self.total = 0
        self._last = time.monotonic()

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 1.0:
            self._last = now
            print(f"scrub: {self.report.checked}/{self.total} objects checked", file=self.err, flush=True)

    async def _one_copy(self, store: ObjectStore, key: str) -> tuple[str, bytes | None]:
        try:
            data = await store.get(key)
        except NotFound:
            return "missing", None
        except StoreError:
            return "unreadable", None
        try:
            await trio.to_thread.run_sync(_check, key, data)
        except Exception:  # noqa: BLE001 - any parse failure is a bad copy
            return "corrupt", None
        return "ok", data

    async def check_key(self, key: str, fallback: bytes | None = None) -> None:
        async with self.limit:
            results: list[tuple[str, bytes | None]] = [("", None)] * len(self.stores)

            async def one(i: int, s: ObjectStore) -> None:
                results[i] = await self._one_copy(s, key)

            async with trio.open_nursery() as n:
                for i, s in enumerate(self.stores):
                    n.start_soon(one, i, s)
            good = next((d for st, d in results if st == "ok"), None)
            if good is None and fallback is not None:
                good = fallback
            for s, (st, _) in zip(self.stores, results):
                if st == "ok":
                    continue
                if st == "missing" and fallback is not None and not self.repair:
                    self.report.pending += 1   # the peer stores it from the journal shortly
                    continue
                bucket = {"missing": self.report.missing, "corrupt": self.report.corrupt,
                          "unreadable": self.report.unreadable}[st]
                bucket[s.name] = bucket.get(s.name, 0) + 1
                if st != "unreadable" and fallback is None:
                    print(f"{s.name}: {st} {key}", file=self.err)
                if self.repair and good is not None and st != "unreadable":
                    try:
                        await s.put(key, good)
                        self.report.repaired += 1
                    except StoreError as e:
                        print(f"{s.name}: cannot repair {key}: {e}", file=self.err)
                        self.report.unrepaired += 1
                elif st != "unreadable" or good is None:
                    self.report.unrepaired += 1
            if good is None:
                self.report.lost.append(key)
            self.report.checked += 1
            self._progress()

    async def workspace(self, reader: ObjectStore, name: str, info: dict, chunk_size: int) -> None:
        loaded = await wsreg.recover(reader, name, info, chunk_size)
        keys: dict[str, bytes | None] = {wsreg.REGISTRY + name: None}
        for prefix in (jr.journal_prefix(name), jr.snapshot_prefix(name)):
            for k in await reader.list_keys(prefix):
                keys[k] = None
        for node in loaded.state.inodes.values():
            for slices in node.chunks.values():
                for s in slices:
                    for k in slice_block_keys(name, s):
                        keys.setdefault(k, None)
        for k, data in loaded.inline.items():
            if k in keys:
                keys[k] = block.encode(data)   # committed inline: the journal has the bytes
        self.total += len(keys)
        async with trio.open_nursery() as n:
            for k, fb in keys.items():
                n.start_soon(self.check_key, k, fb)


async def run(reader: ObjectStore, stores: list[ObjectStore], chunk_size: int, only: str | None, repair: bool,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Scrub; `reader` reads through all replicas (to recover namespaces), `stores` are the replicas."""
    known = await wsreg.list_workspaces(reader)
    names, bad = wsreg.select(known, only, out)
    sc = Scrubber(stores, repair, err)
    for name in names:
        try:
            await sc.workspace(reader, name, known[name], chunk_size)
        except jr.RecoveryError as e:
            print(f"{name}: RECOVERY FAILED: {e}", file=out)
            bad += 1
    sc._progress(force=True)
    r = sc.report
    for s in stores:
        m, c, u = r.missing.get(s.name, 0), r.corrupt.get(s.name, 0), r.unreadable.get(s.name, 0)
        state = "clean" if not (m or c or u) else f"{m} missing, {c} corrupt, {u} unreadable"
        print(f"store {s.name}: {state}", file=out)
    if r.pending:
        print(f"{r.pending} block copies are still only in the journal (inline commits the peer stores "
              "shortly; --repair writes them now)", file=out)
    for k in r.lost:
        print(f"LOST (no valid copy on any store): {k}", file=out)
    divergent = sum(r.missing.values()) + sum(r.corrupt.values()) + sum(r.unreadable.values())
    print(f"scrub: {r.checked} objects on {len(stores)} store(s), {divergent} bad copies"
          + (f", {r.repaired} repaired" if repair else ""), file=out)
    clean = not r.lost and not bad and (divergent == 0 or (repair and r.unrepaired == 0
                                                           and not sum(r.unreadable.values())))
    return 0 if clean else 1
