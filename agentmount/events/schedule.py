"""Retry timing for webhook delivery: backoff schedule, jitter, give-up budget, Retry-After.

Pure logic; the delivery loop asks `RetryPolicy.next_attempt` when to try an event again
after a failure and dead-letters the event when it returns None.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime

__all__ = ["DEFAULT_SCHEDULE", "DEFAULT_EVERY", "DEFAULT_BUDGET", "MAX_RETRY_AFTER", "RetryPolicy",
           "parse_retry_after"]

# Delays in seconds before attempt 1, 2, ...: attempt 1 immediately, attempt 2 five seconds
# after the first failure, and so on.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 30, 120, 600, 1800, 7200)
# After the schedule is used up, retry this often.
DEFAULT_EVERY = 21600.0
# Give up when the next attempt would start more than this long after the event first
# became deliverable.
DEFAULT_BUDGET = 3 * 86400.0
# A receiver's Retry-After is honoured up to this many seconds.
MAX_RETRY_AFTER = 86400.0

_rng = random.Random()


def _finite_nonneg(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"retry {name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"retry {name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry: `schedule[n]` seconds after the n-th failure, then every `every` seconds,
    each delay scaled by a random factor in [1-jitter, 1+jitter]; give up after `budget`."""

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    every: float = DEFAULT_EVERY
    budget: float = DEFAULT_BUDGET
    jitter: float = 0.1

    def validate(self) -> None:
        """Raise ValueError (naming the field) if any setting is out of range."""
        if len(self.schedule) == 0:
            raise ValueError("retry schedule must not be empty")
        for i, d in enumerate(self.schedule):
            _finite_nonneg(f"schedule[{i}]", d)
        _finite_nonneg("every", self.every)
        if self.every == 0:
            raise ValueError("retry every must be > 0 seconds")
        _finite_nonneg("budget", self.budget)
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) \
                or not math.isfinite(self.jitter) or not 0 <= self.jitter <= 0.5:
            raise ValueError(f"retry jitter must be between 0 and 0.5, got {self.jitter!r}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt after `failures` (>= 1) failed attempts."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        base = float(self.schedule[failures]) if failures < len(self.schedule) else float(self.every)
        if base == 0 or self.jitter == 0:
            return base
        return base * (rng or _rng).uniform(1 - self.jitter, 1 + self.jitter)

    def next_attempt(self, first_seen: float, now: float, failures: int, retry_after: float | None = None,
                     rng: random.Random | None = None) -> float | None:
        """Absolute time of the next attempt, or None when it would fall after `first_seen + budget`.

        The wait is the scheduled delay or the receiver's Retry-After (seconds, capped at
        `MAX_RETRY_AFTER`), whichever is longer.
        """
        wait = self.delay(failures, rng)
        if retry_after is not None and not math.isnan(retry_after):
            wait = max(wait, min(max(retry_after, 0.0), MAX_RETRY_AFTER))
        at = now + wait
        if at > first_seen + self.budget:
            return None
        return at


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` the receiver asked us to wait (>= 0), from a Retry-After header
    holding either integer seconds or an HTTP-date; None if missing or unparseable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        return float(int(digits)) if len(digits) <= 15 else 1e15  # absurd values just mean "very long"
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None
