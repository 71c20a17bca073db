"""The durable records of one workspace that carry events, for delivery and pulls.

Recent records are kept in memory by the leader's namespace (`LocalNamespace.recent`,
complete from `recent_from` on); anything older is read back from the journal in the
stores, which keeps segments with undelivered events (see `hold`). Only records up to the
journal's durable seq are ever returned: an event never precedes its change's commit.
"""
from __future__ import annotations

import bisect

from agentmount.meta import journal as jr
from agentmount.meta.service import LocalNamespace



class Gap(Exception):
    """Records after `after` are gone from the journal (pruned): seqs first..last are lost."""

    def __init__(self, first: int, last: int) -> None:
        super().__init__(f"events of records {first}..{last} are no longer in the journal")
        self.first, self.last = first, last


class Feed:
    """Reads events of `local`'s workspace after a seq; waits for new durable ones."""

    def __init__(self, local: LocalNamespace) -> None:
        self.local = local
        self.ws = local.ws
        self.store = local.store

    @property
    def durable(self) -> int:
        return self.local.journal.durable_seq

    async def wait_after(self, seq: int) -> None:
        """Until some record after `seq` is durable."""
        await self.local.journal.wait_past(seq)

    async def records(self, after: int, limit: int = 1000) -> list[dict]:
        """Durable records with events after seq `after` (oldest first, at most `limit`);
        Gap if some of them are no longer in the journal."""
        local = self.local
        durable = self.durable
        if after + 1 >= local.recent_from:
            recent = local.recent
            i = bisect.bisect_right(recent, after, key=lambda r: r["seq"])
            out = []
            for r in recent[i:i + limit]:
                if r["seq"] > durable:
                    break
                out.append(r)
            return out
        found, _ = await jr.read_records(self.store, self.ws, after)
        seqs = sorted(s for s in found if s < local.recent_from)
        first = seqs[0] if seqs else local.recent_from
        if first > after + 1:
            raise Gap(after + 1, first - 1)
        out = [found[s] for s in seqs if found[s].get("ev")][:limit]
        if len(out) < limit and (not out or out[-1]["seq"] < local.recent_from):
            rest = await self.records(max(local.recent_from - 1, after), limit - len(out))
            out.extend(rest)
        return out


async def store_records(store, ws: str, after: int, limit: int) -> list[dict]:
    """Records with events after `after` straight from the journal (a peer that does not lead)."""
    found, _ = await jr.read_records(store, ws, after)
    seqs = sorted(found)
    if seqs and seqs[0] > after + 1:
        raise Gap(after + 1, seqs[0] - 1)
    return [found[s] for s in seqs if found[s].get("ev")][:limit]
