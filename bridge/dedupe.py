"""Pure: a bounded window (count and age) of recently accepted eventIds, per tenant."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RecentEvents:
    """Remembers eventIds for `window_seconds`, at most `max_events` per tenant (oldest go first).

    Only eventId decides: a later ClientLogged for the same client carries a new eventId.
    """

    def __init__(
        self,
        *,
        window_seconds: float,
        max_events: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_seconds = window_seconds
        self._max_events = max_events
        self._clock = clock
        self._seen: dict[str, OrderedDict[str, float]] = {}

    @property
    def is_enabled(self) -> bool:
        return self._max_events > 0 and self._window_seconds > 0

    def contains(self, tenant: str, event_id: str) -> bool:
        seen = self._seen.get(tenant)
        seen_at = seen.get(event_id) if seen is not None else None
        return seen_at is not None and self._clock() - seen_at < self._window_seconds

    def add(self, tenant: str, event_id: str) -> None:
        if not self.is_enabled:
            return
        now = self._clock()
        seen = self._seen.setdefault(tenant, OrderedDict())
        seen[event_id] = now
        seen.move_to_end(event_id)
        # Entries are in acceptance order, so expiry and overflow both trim from the front.
        while seen and (
            len(seen) > self._max_events or now - next(iter(seen.values())) >= self._window_seconds
        ):
            seen.popitem(last=False)

    def size(self, tenant: str) -> int:
        return len(self._seen.get(tenant, ()))
