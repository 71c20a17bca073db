"""`ReplicatedStore`: one ObjectStore over N replicas with a write quorum.

Writes go to every replica believed up and return once `write_quorum` of
them succeeded; the others finish in the background, and any replica that
failed or was down gets the key in the persistent `RepairQueue` (hinted
handoff), replayed from another replica once it is back. Reads go to the
replica with the lowest latency moving average, hedge to the next one after
a threshold, run the caller's check (checksum) and fall over on error,
timeout, absence or corruption; a replica found missing or corrupt is
rewritten from the good copy. A replica that fails is taken out of the hot
path (circuit open) until the health checker sees it answer again.

Invariants: an acknowledged put is on at least `write_quorum` replicas; a
get returns only bytes that passed the check when one is given; every
replica call is bounded by `timeout`.
"""
from __future__ import annotations

import heapq
import logging
import random
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence, TypeVar

import trio

from backend.repair import DELETE, PUT, RepairQueue
from backend.store import (AlreadyExists, CorruptObject, NotFound, ObjectInfo, ObjectStore, StoreError,
                           StoreUnavailable)

log = logging.getLogger("agentmount.replication")
T = TypeVar("T")

_EWMA = 0.2
_STALE = 10.0   # seconds after which a latency average no longer ranks a replica
_HEDGE_FACTOR = 2.0   # hedge once a read takes this many times the replica's recent reads


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else (1 - _EWMA) * average + _EWMA * sample


@dataclass
class Replica:
    store: ObjectStore
    up: bool = True
    latency: float | None = None      # moving average of successful call latency, seconds
    measured: float = 0.0             # trio time of the last latency sample
    failures: int = 0                 # consecutive
    last_error: str | None = None
    read_latency: float | None = None   # moving average of successful reads alone
    read_measured: float = 0.0
    hedged: int = 0                     # reads that also went to another replica while this one ran
    wake: trio.Event = field(default_factory=trio.Event)   # set when it came back / got repairs

    @property
    def name(self) -> str:
        return self.store.name

    def ok(self, seconds: float) -> None:
        self.latency = _ewma(self.latency, seconds)
        self.measured = trio.current_time()
        self.failures = 0

    def expected(self, now: float) -> float:
        """Latency to rank by; a replica not measured lately ranks as fast, so it gets measured
        again (one slow first call must not exile a replica forever)."""
        if self.latency is None or now - self.measured > _STALE:
            return 0.0
        return self.latency

    def read_ok(self, seconds: float) -> None:
        self.read_latency = _ewma(self.read_latency, seconds)
        self.read_measured = trio.current_time()

    def slow(self, seconds: float) -> None:
        """A call that lost a hedge race: count its time so far, so the average learns it is slow."""
        if self.latency is None or seconds > self.latency:
            self.ok(seconds)


class ReplicatedStore(ObjectStore):
    """N replicas behind the ObjectStore interface; see module docstring."""

    def __init__(self, stores: Sequence[ObjectStore], write_quorum: int, *, repair_dir: str | None = None,
                 timeout: float = 30.0, hedge_after: float = 0.05, health_interval: float = 1.0,
                 name: str = "replicated", repair_on_read: bool = True) -> None:
        if not 1 <= write_quorum <= len(stores):
            raise ValueError("write_quorum must be between 1 and the number of stores")
        self.name = name
        self.replicas = [Replica(s) for s in stores]
        self.write_quorum = write_quorum
        self.timeout = timeout
        self.hedge_after = hedge_after
        self.health_interval = health_interval
        self.queue = RepairQueue(repair_dir)
        for r in self.replicas:
            self.queue.load(r.name)
        self.is_local = all(s.is_local for s in stores)
        self._bg: trio.Nursery | None = None
        self.repaired = 0
        self.repair_on_read = repair_on_read

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work (slow replicas' writes, repairs, health checks); runs until cancelled."""
        async with trio.open_nursery() as n:
            self._bg = n
            for r in self.replicas:
                n.start_soon(self._drain, r)
            n.start_soon(self._health)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._bg = None
                self.queue.flush()

    def _spawn(self, fn, *args) -> bool:
        if self._bg is None:
            return False
        self._bg.start_soon(fn, *args)
        return True

    def _up(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]

    def _order(self) -> list[Replica]:
        """Up replicas fastest first (unknown latency counts as fast, so it gets measured)."""
        up = self._up()
        random.shuffle(up)
        now = trio.current_time()
        return sorted(up, key=lambda r: r.expected(now))

    def _failed(self, r: Replica, e: BaseException) -> None:
        """Record a failed call; only a transient one (unreachable, timeout, 5xx) takes the
        replica out of the hot path. A permanent error (a bad key, a refused request) is the
        request's fault, not the replica's."""
        r.last_error = str(e) or type(e).__name__
        if not isinstance(e, StoreUnavailable):
            return
        r.failures += 1
        if r.up:
            log.warning("store %s marked down: %s", r.name, r.last_error)
        r.up = False

    def _hedge_delay(self, r: Replica) -> float:
        """How long a read waits for `r` before also asking the next replica: `hedge_after`, or
        twice what reads from `r` took lately when that is longer (at most ten times
        `hedge_after`). A store answering 4 MiB blocks in 60 ms under a sequential read is not
        slow, and hedging every such read would double the download work that loads it."""
        rl = r.read_latency
        if rl is None or trio.current_time() - r.read_measured > _STALE:
            return self.hedge_after
        return min(max(self.hedge_after, _HEDGE_FACTOR * rl), 10 * self.hedge_after)

    async def _call(self, r: Replica, fn, *args, **kw):
        start = trio.current_time()
        try:
            with trio.fail_after(self.timeout):
                res = await fn(*args, **kw)
        except trio.TooSlowError:
            raise StoreUnavailable(f"store {r.name}: timed out after {self.timeout:g}s") from None
        r.ok(trio.current_time() - start)
        return res

    # -- writes ------------------------------------------------------------------
    async def put(self, key: str, data, *, create_only: bool = False, sync: bool = True) -> None:
        targets = self._up()
        for r in self.replicas:
            if not r.up:
                self.queue.add(r.name, key, PUT)
        if len(targets) < self.write_quorum:
            raise StoreUnavailable(f"{key}: only {len(targets)} of {len(self.replicas)} stores are up "
                                   f"(write quorum {self.write_quorum})")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = list(data)
        res = _Tally(len(targets), self.write_quorum)
        running = {r.name for r in targets}
        queued: set[str] = set()

        async def one(r: Replica) -> None:
            try:
                await self._call(r, r.store.put, key, data, create_only=create_only, sync=sync)
                if r.name in queued:
                    self.queue.done(r.name, key, PUT)   # the straggler landed after all
                res.success()
            except AlreadyExists:
                res.exists()
            except StoreError as e:
                self._failed(r, e)
                if isinstance(e, StoreUnavailable):
                    self.queue.add(r.name, key, PUT)
                res.failure(e)
            except BaseException as e:  # cancelled: nobody knows whether it landed
                self.queue.add(r.name, key, PUT)
                res.failure(e)
                raise
            finally:
                running.discard(r.name)

        await self._fan_out(targets, one, res)
        # Replicas still writing when the quorum answered are recorded before the put is
        # acknowledged, so a crash of this peer cannot forget that they may lack the object.
        for name in running:
            queued.add(name)
            self.queue.add(name, key, PUT)
        if res.n_exists:
            raise AlreadyExists(key)
        if res.n_ok < self.write_quorum:
            raise _quorum_error(res, f"{key}: written to {res.n_ok} of {len(self.replicas)} stores, "
                                     f"write quorum {self.write_quorum} not reached: {res.first_error}")

    async def _fan_out(self, targets: list[Replica], one, res: "_Tally") -> None:
        """Run `one(r)` for every target; return once the tally is decided. Stragglers go on in
        the background nursery when there is one."""
        if self._bg is None:
            async with trio.open_nursery() as n:
                for r in targets:
                    n.start_soon(one, r)
            return
        for r in targets:
            self._bg.start_soon(one, r)
        await res.decided.wait()

    async def delete(self, key: str) -> None:
        targets = self._up()
        for r in self.replicas:
            if not r.up:
                self.queue.add(r.name, key, DELETE)
        res = _Tally(len(targets), min(self.write_quorum, len(targets)))
        running = {r.name for r in targets}
        queued: set[str] = set()

        async def one(r: Replica) -> None:
            try:
                await self._call(r, r.store.delete, key)
                if r.name in queued:
                    self.queue.done(r.name, key, DELETE)
                res.success()
            except StoreError as e:
                self._failed(r, e)
                if isinstance(e, StoreUnavailable):
                    self.queue.add(r.name, key, DELETE)
                res.failure(e)
            finally:
                running.discard(r.name)

        if targets:
            await self._fan_out(targets, one, res)
        for name in running:   # still deleting: recorded, like the stragglers of a put
            queued.add(name)
            self.queue.add(name, key, DELETE)

    async def _everywhere(self, what: str, fn: Callable[[Replica], object]) -> None:
        targets = self._up()
        if len(targets) < self.write_quorum:
            raise StoreUnavailable(f"{what}: only {len(targets)} stores are up (write quorum {self.write_quorum})")
        res = _Tally(len(targets), self.write_quorum)

        async def one(r: Replica) -> None:
            try:
                await self._call(r, fn, r)
                res.success()
            except StoreError as e:
                self._failed(r, e)
                res.failure(e)

        async with trio.open_nursery() as n:
            for r in targets:
                n.start_soon(one, r)
        if res.n_ok < self.write_quorum:
            raise _quorum_error(res, f"{what}: {res.first_error}")

    async def sync(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        await self._everywhere("sync", lambda r: r.store.sync(keys))

    async def barrier(self) -> None:
        await self._everywhere("barrier", lambda r: r.store.barrier())

    # -- reads -------------------------------------------------------------------
    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if start is None and end is None:
            data, _ = await self.get_checked(key, None)
            return data
        data, _ = await self._read(key, lambda r: r.store.get(key, start, end), None, repair=False)
        return data

    async def get_checked(self, key: str, check: Callable[[bytes], T] | None, *,
                          buffer: bool = False) -> tuple[bytes, T | None]:
        """Whole object, checked; replicas that miss it or hold a bad copy are repaired."""
        return await self._read(key, lambda r: r.store.get(key), check, repair=True)

    async def _read(self, key: str, fetch, check, repair: bool):
        order = self._order()
        if not order:
            raise StoreUnavailable(f"{key}: no store is up")
        missing: list[Replica] = []
        corrupt: list[Replica] = []
        errors: list[BaseException] = []
        result: list = []
        done = trio.Event()
        pending = 0
        launched_all = False
        started_at: dict[str, float] = {}
        finished: set[str] = set()

        async def attempt(r: Replica, next_ready: trio.Event) -> None:
            nonlocal pending
            started_at[r.name] = trio.current_time()
            try:
                data = await self._call(r, fetch, r)
                r.read_ok(trio.current_time() - started_at[r.name])
                value = None
                if check is not None:
                    try:
                        value = await trio.to_thread.run_sync(check, data)
                    except CorruptObject:
                        raise
                    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad copy
                        raise CorruptObject(f"{type(e).__name__}: {e}") from None
                result.append((data, value))
                done.set()
            except NotFound:
                missing.append(r)
            except CorruptObject as e:
                log.error("store %s holds a corrupt copy of %s: %s", r.name, key, e)
                corrupt.append(r)
            except StoreError as e:
                self._failed(r, e)
                errors.append(e)
            finally:
                pending -= 1
                finished.add(r.name)
                next_ready.set()   # a failure starts the next replica at once
                if pending == 0 and launched_all and not result:
                    done.set()

        async with trio.open_nursery() as n:
            for i, r in enumerate(order):
                ready = trio.Event()
                pending += 1
                launched_all = i + 1 == len(order)
                n.start_soon(attempt, r, ready)
                if launched_all:
                    break
                with trio.move_on_after(self._hedge_delay(r)):
                    while not done.is_set() and not ready.is_set():
                        await _first(done, ready)
                if done.is_set():
                    break
                if not ready.is_set():
                    r.hedged += 1   # still running: the next replica is asked as well
            if not done.is_set() and pending == 0:
                done.set()   # every launched attempt failed before the last one could start
            await done.wait()
            now = trio.current_time()
            for r in order:
                if r.name in started_at and r.name not in finished:
                    r.slow(now - started_at[r.name])   # lost the race: it is at least this slow
            n.cancel_scope.cancel()
        if not result:
            if missing and not corrupt and not errors and len(missing) == len(order):
                raise NotFound(key)
            if corrupt and not errors:
                raise CorruptObject(f"{key}: every reachable copy is corrupt")
            if missing and not errors:
                raise NotFound(key)
            raise StoreUnavailable(f"{key}: no store answered: {errors[0] if errors else 'unknown'}")
        data, value = result[0]
        if repair and self.repair_on_read and (missing or corrupt):
            for r in missing + corrupt:
                if not self._spawn(self._rewrite, r, key, data):
                    await self._rewrite(r, key, data)
        return data, value

    async def _rewrite(self, r: Replica, key: str, data: bytes) -> None:
        try:
            await self._call(r, r.store.put, key, data)
            self.repaired += 1
            log.warning("store %s: repaired %s", r.name, key)
        except StoreError as e:
            self._failed(r, e)
            self.queue.add(r.name, key, PUT)

    async def head(self, key: str) -> ObjectInfo | None:
        errors = []
        for r in self._order():
            try:
                info = await self._call(r, r.store.head, key)
            except StoreError as e:
                self._failed(r, e)
                errors.append(e)
                continue
            if info is not None:
                return info
        if errors and len(errors) == len(self.replicas):
            raise StoreUnavailable(f"{key}: {errors[0]}")
        return None

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        """The union of the replicas' listings (a key on any replica is listed once)."""
        lists: list[list[ObjectInfo]] = []
        errors: list[BaseException] = []

        async def one(r: Replica) -> None:
            try:
                lists.append(await self._call(r, _collect, r.store.list(prefix)))
            except StoreError as e:
                self._failed(r, e)
                errors.append(e)

        async with trio.open_nursery() as n:
            for r in self._up():
                n.start_soon(one, r)
        if not lists:
            raise StoreUnavailable(f"list {prefix}: {errors[0] if errors else 'no store is up'}")
        last = None
        for info in heapq.merge(*lists, key=lambda i: i.key):
            if info.key != last:
                last = info.key
                yield info

    async def check(self) -> None:
        """Every replica answers; at least the write quorum must, and a replica that is
        misconfigured (credentials, bucket) is an error even when the others answer."""
        problems: list[str] = []
        fatal: list[str] = []

        async def one(r: Replica) -> None:
            try:
                await self._call(r, r.store.check)
            except StoreUnavailable as e:
                self._failed(r, e)
                problems.append(_named(r, e))
            except StoreError as e:
                self._failed(r, e)
                fatal.append(_named(r, e))

        async with trio.open_nursery() as n:
            for r in self.replicas:
                n.start_soon(one, r)
        if fatal:
            raise StoreError("; ".join(sorted(fatal)))
        up = len(self._up())
        if up < self.write_quorum:
            raise StoreUnavailable(f"only {up} of {len(self.replicas)} stores reachable, write quorum "
                                   f"{self.write_quorum}: " + "; ".join(sorted(problems)))
        for p in problems:
            log.warning("%s (running without it; it is repaired when it is back)", p)

    async def aclose(self) -> None:
        self.queue.close()
        for r in self.replicas:
            await r.store.aclose()

    # -- background --------------------------------------------------------------
    async def _health(self) -> None:
        while True:
            await trio.sleep(self.health_interval)
            for r in self.replicas:
                if r.up:
                    continue
                try:
                    await self._call(r, r.store.check)
                except StoreError as e:
                    r.last_error = str(e)
                    continue
                log.warning("store %s is back", r.name)
                r.up = True
                r.failures = 0
                r.wake.set()
            await trio.to_thread.run_sync(self.queue.flush)
            for r in self.replicas:
                if self.queue.needs_compaction(r.name):
                    await self.queue.compact(r.name)

    async def _drain(self, r: Replica) -> None:
        """Replay `r`'s repair queue whenever it is up and has entries."""
        while True:
            if not r.up or not self.queue.length(r.name):
                r.wake = trio.Event()
                with trio.move_on_after(self.health_interval):
                    await r.wake.wait()
                continue
            batch = self.queue.peek(r.name, 16)
            progress = []

            async def one(key: str, op: str) -> None:
                progress.append(await self._repair_one(r, key, op))

            async with trio.open_nursery() as n:
                for key, op in batch:
                    n.start_soon(one, key, op)
            if not any(progress):
                await trio.sleep(self.health_interval)

    async def _repair_one(self, r: Replica, key: str, op: str) -> bool:
        data = None
        if op == PUT:
            try:
                data = await self._copy_source(r, key)
            except StoreError:
                return False   # no other replica can give it right now: retried later
        try:
            if op == DELETE:
                await self._call(r, r.store.delete, key)
            elif data is not None:
                await self._call(r, r.store.put, key, data)
                self.repaired += 1
        except StoreError as e:
            self._failed(r, e)
            return False
        self.queue.done(r.name, key, op)
        return True

    async def _copy_source(self, target: Replica, key: str) -> bytes | None:
        """The object from another up replica; None when no replica has it (it was deleted)."""
        absent = 0
        others = [o for o in self._order() if o is not target]
        for o in others:
            try:
                return await self._call(o, o.store.get, key)
            except NotFound:
                absent += 1
            except StoreError as e:
                self._failed(o, e)
        if others and absent == len(others):
            return None
        raise StoreUnavailable(f"{key}: no other store can provide it now")

    def health(self) -> list[dict]:
        return [{"name": r.name, "up": r.up, "latency_ms": None if r.latency is None else round(r.latency * 1e3, 2),
                 "repair_queue": self.queue.length(r.name), "last_error": r.last_error,
                 "hedged_reads": r.hedged} for r in self.replicas]


class _Tally:
    """Counts replica outcomes; `decided` is set once the quorum is reached or out of reach."""

    def __init__(self, n: int, need: int) -> None:
        self.n = n
        self.need = need
        self.n_ok = 0
        self.n_exists = 0
        self.n_failed = 0
        self.first_error: BaseException | None = None
        self.decided = trio.Event()

    def _update(self) -> None:
        answered = self.n_ok + self.n_exists + self.n_failed
        if self.n_ok >= self.need or self.n_exists or self.n_ok + (self.n - answered) < self.need or answered == self.n:
            self.decided.set()

    def success(self) -> None:
        self.n_ok += 1
        self._update()

    def exists(self) -> None:
        self.n_exists += 1
        self._update()

    def failure(self, e: BaseException) -> None:
        self.n_failed += 1
        if self.first_error is None:
            self.first_error = e
        self._update()


def _quorum_error(res: "_Tally", msg: str) -> StoreError:
    """StoreUnavailable when the quorum was missed for transient reasons, else a permanent StoreError."""
    permanent = isinstance(res.first_error, StoreError) and not isinstance(res.first_error, StoreUnavailable)
    return StoreError(msg) if permanent else StoreUnavailable(msg)


def _named(r: Replica, e: BaseException) -> str:
    msg = str(e)
    return msg if msg.startswith(f"store {r.name}") else f"store {r.name}: {msg}"


async def _collect(it: AsyncIterator[ObjectInfo]) -> list[ObjectInfo]:
    return [i async for i in it]


async def _first(a: trio.Event, b: trio.Event) -> None:
    """Wait until either event is set."""
    async with trio.open_nursery() as n:
        async def w(ev: trio.Event) -> None:
            await ev.wait()
            n.cancel_scope.cancel()
        n.start_soon(w, a)
        n.start_soon(w, b)
