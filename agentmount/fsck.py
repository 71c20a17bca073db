"""`agentmount fsck`: verify a workspace's namespace and blocks from the store.

Loads each workspace as recovery would (snapshot + journal), then checks:
every entry points at an existing inode (dangling entries), nlink counts,
unreachable inodes, every block of every slice is present and (unless
--quick) decodes with the right checksum. Reports each problem with the
path it affects; exit status 0 when clean, 1 when not. Unreferenced block
objects are reported as reclaimable space, not as errors.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import trio

from agentmount.chunks import block
from agentmount.chunks.layout import slice_block_keys
from agentmount.config import Config
from agentmount.meta import journal as jr
from agentmount.meta import workspaces as wsreg
from agentmount.meta.state import ROOT_INO, NamespaceState
from backend.store import NotFound, ObjectStore


def paths(state: NamespaceState) -> dict[int, str]:
    out = {ROOT_INO: "/"}
    stack = [ROOT_INO]
    while stack:
        d = stack.pop()
        for name, ino in state.dirs.get(d, {}).items():
            p = out[d].rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
            if ino not in out:
                out[ino] = p
                if ino in state.dirs:
                    stack.append(ino)
    return out


def check_namespace(state: NamespaceState) -> list[str]:
    problems = []
    where = paths(state)
    refs: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for d, ents in state.dirs.items():
        if d not in state.inodes:
            problems.append(f"directory table for missing inode {d}")
            continue
        for name, ino in ents.items():
            p = where.get(d, f"<inode {d}>").rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
            node = state.inodes.get(ino)
            if node is None:
                problems.append(f"dangling entry {p} -> missing inode {ino}")
                continue
            refs[ino] = refs.get(ino, 0) + 1
            if node.is_dir:
                subdirs[d] = subdirs.get(d, 0) + 1
    for ino, node in state.inodes.items():
        p = where.get(ino, f"<inode {ino}>")
        if node.is_dir:
            want = 2 + subdirs.get(ino, 0)
        else:
            want = refs.get(ino, 0)
        if node.nlink == 0:
            continue  # unlinked while in use: freed on last close, or by recovery at the next mount
        if node.nlink != want:
            problems.append(f"{p}: nlink {node.nlink}, expected {want}")
        if ino != ROOT_INO and ino not in where:
            problems.append(f"inode {ino} is not reachable from the root")
    return problems


async def check_blocks(store: ObjectStore, state: NamespaceState, verify_data: bool, out: TextIO,
                       inline: dict[str, bytes] | None = None) -> tuple[list[str], set[str]]:
    problems: list[str] = []
    restorable: list[str] = []
    where = paths(state)
    jobs = []
    for ino, node in state.inodes.items():
        for idx, slices in node.chunks.items():
            for s in slices:
                for key in slice_block_keys(state.ws, s):
                    jobs.append((where.get(ino, f"<inode {ino}>"), key))
    referenced = {k for _, k in jobs}
    total = len(jobs)
    done = 0
    last = time.monotonic()
    limiter = trio.CapacityLimiter(8)

    async def one(path: str, key: str) -> None:
        nonlocal done, last
        async with limiter:
            try:
                if verify_data:
                    data = await store.get(key)
                    await trio.to_thread.run_sync(block.decode, data)
                elif await store.head(key) is None:
                    raise NotFound(key)
            except (NotFound, block.CorruptBlock) as e:
                if inline and key in inline:
                    restorable.append(key)  # committed inline in the journal: the next mount stores it
                elif isinstance(e, NotFound):
                    problems.append(f"{path}: missing block {key}")
                else:
                    problems.append(f"{path}: corrupt block {key} ({e})")
            done += 1
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                print(f"fsck {state.ws}: {done}/{total} blocks checked", file=sys.stderr)

    async with trio.open_nursery() as n:
        for path, key in jobs:
            n.start_soon(one, path, key)
    if restorable:
        print(f"{state.ws}: {len(restorable)} block(s) damaged or missing will be restored from the journal "
              "at the next mount", file=out)
    return problems, referenced


async def run(store: ObjectStore, cfg: Config, only: str | None, *, verify_data: bool = True,
              out: TextIO = sys.stdout) -> int:
    known = await wsreg.list_workspaces(store)
    names, bad = wsreg.select(known, only, out)
    for name in names:
        try:
            loaded = await wsreg.recover(store, name, known[name], cfg.chunk_size)
        except jr.RecoveryError as e:
            print(f"{name}: RECOVERY FAILED: {e}", file=out)
            bad += 1
            continue
        state = loaded.state
        problems = check_namespace(state)
        bproblems, referenced = await check_blocks(store, state, verify_data, out, loaded.inline)
        problems += bproblems
        stored = [k for k in await store.list_keys(f"ws/{name}/blocks/")]
        unreferenced = [k for k in stored if k not in referenced]
        for p in problems:
            print(f"{name}: {p}", file=out)
        status = "clean" if not problems else f"{len(problems)} problem(s)"
        print(f"{name}: {status}: {len(state.inodes)} inodes, {len(referenced)} blocks, seq {state.seq}"
              + (f", {len(unreferenced)} unreferenced block(s) reclaimable" if unreferenced else ""), file=out)
        bad += bool(problems)
    return 0 if bad == 0 else 1
