"""The received-at header's timestamp: the same text datetime would give, cached or not."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from bridge.publisher import rfc3339


def by_datetime(unix_seconds: float) -> str:
    return (
        datetime.fromtimestamp(unix_seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_matches_datetime_for_any_time_up_to_2100(unix_seconds: float) -> None:
    assert rfc3339(unix_seconds) == by_datetime(unix_seconds)


def test_rounding_up_to_the_next_second_carries_into_the_seconds() -> None:
    assert rfc3339(1_700_000_000.9999996) == "2023-11-14T22:13:21.000Z"
    assert rfc3339(1_700_000_000.9999996) == by_datetime(1_700_000_000.9999996)
