"""Unit tests for the callback sender's pure parts: bodies, percentiles, report, flags."""

from __future__ import annotations

import argparse
import base64
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from bridge import sender
from bridge.sender import SendOptions, SendReport

CASES = Path(__file__).resolve().parent.parent / "cases"
PLANTED_PASSWORD = "planted-s3cret-Pa55word"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"

EXPECTED_FIELDS = {
    "CartOpened": ["type", "tenantKey", "cartId", "clientId", "eventId", "timestamp"],
    "ClientLogged": ["type", "tenantKey", "clientId", "eventId", "timestamp"],
    "OfferOpened": ["type", "tenantKey", "offerId", "clientId", "eventId", "timestamp"],
}


def parse_send_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sender.add_arguments(parser)
    return parser.parse_args(list(argv))


# --- bodies --------------------------------------------------------------------------------------


def test_documented_example_body_is_reproduced_byte_for_byte() -> None:
    """The platform's documented CartOpened example comes out exactly, 267 bytes, no newline."""
    expected = (CASES / "documented-example-cartopened.body.json").read_bytes()
    body = sender.callback_body(
        "CartOpened",
        tenant_key="example",
        event_id="13200948-cf44-4853-9eee-88eb9284ea23",
        timestamp="2023-02-22T04:32:51.014160Z",
        ids={
            "cartId": "00000000-0000-0000-0000-000000000000",
            "clientId": "org:00000000-0000-0000-0000-000000000000",
        },
    )
    assert body == expected
    assert len(body) == 267


@pytest.mark.parametrize("event_type", sorted(EXPECTED_FIELDS))
def test_new_body_has_the_type_fields_in_wire_order(event_type: str) -> None:
    """Each known type parses as JSON with its field set, in order, with fresh uuid4 ids."""
    body = sender.new_callback_body(event_type, tenant_key="klient")
    payload = json.loads(body)
    assert list(payload) == EXPECTED_FIELDS[event_type]
    assert payload["type"] == event_type
    assert payload["tenantKey"] == "klient"
    assert re.fullmatch(UUID, payload["eventId"])
    assert re.fullmatch(f"org:{UUID}", payload["clientId"])
    for name in ("cartId", "offerId"):
        if name in payload:
            assert re.fullmatch(UUID, payload[name])
    assert re.fullmatch(TIMESTAMP, payload["timestamp"])


def test_new_body_is_pretty_printed_like_the_platform() -> None:
    """Two-space indent and `" : "` separators, like the documented example."""
    lines = sender.new_callback_body("ClientLogged", tenant_key="klient").decode().split("\n")
    assert lines[0] == "{"
    assert lines[-1] == "}"
    assert all(re.fullmatch(r'  "\w+" : "[^"]*",?', line) for line in lines[1:-1])


def test_unknown_type_gets_a_body_with_a_client_id() -> None:
    """An unknown type name is sent as is, with the common fields."""
    payload = json.loads(sender.new_callback_body("FutureThing", tenant_key="klient"))
    assert list(payload) == ["type", "tenantKey", "clientId", "eventId", "timestamp"]
    assert payload["type"] == "FutureThing"


def test_fresh_bodies_have_unique_event_ids() -> None:
    """Every new body carries a new eventId."""
    ids = {
        json.loads(sender.new_callback_body("CartOpened", tenant_key="k"))["eventId"]
        for _ in range(100)
    }
    assert len(ids) == 100


def test_ids_may_not_override_reserved_fields() -> None:
    """An id named like a common field is refused rather than silently overwritten."""
    with pytest.raises(ValueError, match="reserved"):
        sender.callback_body("X", tenant_key="k", event_id="e", timestamp="t", ids={"type": "Y"})


def test_timestamp_uses_utc_microseconds_and_z() -> None:
    """Any aware moment is rendered in UTC with six fraction digits and `Z`."""
    moment = datetime(2023, 2, 22, 6, 32, 51, 14160, tzinfo=timezone(timedelta(hours=2)))
    assert sender.format_timestamp(moment) == "2023-02-22T04:32:51.014160Z"
    assert sender.format_timestamp(datetime(2024, 1, 1, tzinfo=UTC)) == (
        "2024-01-01T00:00:00.000000Z"
    )
    with pytest.raises(ValueError):
        sender.format_timestamp(datetime(2024, 1, 1))  # naive on purpose


def test_headers_are_the_platforms_with_basic_auth() -> None:
    """Accept, Authorization (Basic), one-tenant and Content-Type, as the platform sends them."""
    options = SendOptions(tenant="klient", user="one", password="dev-password")
    assert sender.request_headers(options) == {
        "Accept": "application/json, application/cbor, application/*+json",
        "Authorization": "Basic b25lOmRldi1wYXNzd29yZA==",  # from the documented request
        "one-tenant": "klient",
        "Content-Type": "application/json",
    }


def test_no_password_means_no_authorization_header() -> None:
    """Without a password the request carries no Authorization header."""
    assert "Authorization" not in sender.request_headers(SendOptions(user="one"))


def test_events_url_joins_base_and_tenant() -> None:
    """The request goes to `{url}/one/{tenant}/events`, whatever the trailing slash."""
    assert SendOptions(url="http://h:1/", tenant="klient").events_url == (
        "http://h:1/one/klient/events"
    )
    assert SendOptions(url="http://h:1/base").events_url == "http://h:1/base/one/klient/events"


def test_options_repr_hides_the_password() -> None:
    """The dataclass repr leaves the password out."""
    assert PLANTED_PASSWORD not in repr(SendOptions(user="u", password=PLANTED_PASSWORD))


# --- percentiles and report ----------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    """Nearest rank: ceil(p/100 * n)-th smallest value."""
    values = [float(v) for v in range(1, 101)]
    assert sender.percentile(values, 50) == 50.0
    assert sender.percentile(values, 90) == 90.0
    assert sender.percentile(values, 99) == 99.0
    assert sender.percentile(values, 100) == 100.0
    assert sender.percentile(values, 0) == 1.0
    assert sender.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert sender.percentile([5.0], 99) == 5.0
    assert sender.percentile([], 50) is None
    with pytest.raises(ValueError):
        sender.percentile(values, 101)


def make_report() -> SendReport:
    report = SendReport()
    for latency in (0.001, 0.002, 0.003, 0.004):
        report.record("200", is_accepted=True, latency_seconds=latency)
    report.record("503", is_accepted=False, latency_seconds=0.010)
    report.record("connection_refused", is_accepted=False, latency_seconds=None)
    report.elapsed_seconds = 0.5
    return report


def test_report_counts_rates_and_latencies() -> None:
    """Counts per outcome, the accepted rate (failures are not throughput), percentiles in ms."""
    report = make_report()
    assert (report.accepted, report.failed, report.requests) == (4, 2, 6)
    assert report.by_status == {"200": 4, "503": 1, "connection_refused": 1}
    assert report.rate_per_second == pytest.approx(8.0)
    assert report.p50_ms == pytest.approx(3.0)
    assert report.p90_ms == pytest.approx(10.0)
    assert report.max_ms == pytest.approx(10.0)
    assert SendReport().p99_ms is None
    assert SendReport().rate_per_second == 0.0


def test_render_json_is_one_object_with_the_summary() -> None:
    """`--json` output is a single JSON object with counts, statuses and latencies."""
    data = json.loads(sender.render_report(make_report(), as_json=True))
    assert data["accepted"] == 4
    assert data["failed"] == 2
    assert data["by_status"] == {"200": 4, "503": 1, "connection_refused": 1}
    assert data["latency_ms"]["p50"] == pytest.approx(3.0)
    assert data["elapsed_seconds"] == pytest.approx(0.5)


def test_render_table_lists_counts_and_statuses() -> None:
    """The human table names accepted, failed and every status."""
    text = sender.render_report(make_report(), as_json=False)
    assert re.search(r"^accepted\s+4$", text, re.MULTILINE)
    assert re.search(r"^failed\s+2$", text, re.MULTILINE)
    assert re.search(r"^status 503\s+1$", text, re.MULTILINE)
    assert re.search(r"^status connection_refused\s+1$", text, re.MULTILINE)
    assert "latency p50" in text


@pytest.mark.parametrize("as_json", [False, True])
def test_rendered_report_never_contains_the_password(as_json: bool) -> None:
    """Neither the planted password nor any Basic form of it reaches the output."""
    options = SendOptions(user="one", password=PLANTED_PASSWORD)
    header = sender.request_headers(options)["Authorization"]
    text = sender.render_report(make_report(), as_json=as_json)
    forbidden = [
        PLANTED_PASSWORD,
        header,
        header.removeprefix("Basic "),
        base64.b64encode(PLANTED_PASSWORD.encode()).decode(),
        "Authorization",
    ]
    assert not [secret for secret in forbidden if secret in text]


def test_exit_code_is_zero_only_when_everything_was_accepted() -> None:
    """Any failure, or nothing sent at all, makes the exit code 1."""
    ok = SendReport(accepted=3, by_status={"200": 3})
    assert sender.exit_code(ok) == 0
    assert sender.exit_code(make_report()) == 1
    assert sender.exit_code(SendReport()) == 1


# --- flags ---------------------------------------------------------------------------------------


def test_defaults_from_flags() -> None:
    """No flags: local receiver, tenant klient, 10 callbacks of all three types, no auth."""
    options = sender.options_from_args(parse_send_args())
    assert options == SendOptions()
    assert options.types == ("CartOpened", "ClientLogged", "OfferOpened")
    assert options.password is None


def test_all_flags_are_read() -> None:
    """Every flag lands in its option."""
    args = parse_send_args(
        "--url", "http://10.0.0.1:9000", "--tenant", "acme", "--user", "one",
        "--password", "pw", "--count", "7", "--rate", "2.5", "--concurrency", "3",
        "--types", "CartOpened, Custom", "--timeout", "1.5", "--json",
    )  # fmt: skip
    options = sender.options_from_args(args)
    assert options == SendOptions(
        url="http://10.0.0.1:9000", tenant="acme", user="one", password="pw", count=7,
        rate=2.5, concurrency=3, types=("CartOpened", "Custom"), timeout_seconds=1.5,
    )  # fmt: skip
    assert args.json is True


def test_password_file_loses_exactly_one_trailing_newline(tmp_path: Path) -> None:
    """A password file's final newline is dropped; other whitespace is kept."""
    secret = tmp_path / "password"
    secret.write_text(" pw \n\n")
    options = sender.options_from_args(
        parse_send_args("--user", "one", "--password-file", str(secret))
    )
    assert options.password == " pw \n"
    secret.write_bytes(b"pw\r\n")
    options = sender.options_from_args(
        parse_send_args("--user", "one", "--password-file", str(secret))
    )
    assert options.password == "pw"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--count", "0"], "--count"),
        (["--concurrency", "0"], "--concurrency"),
        (["--rate", "0"], "--rate"),
        (["--rate", "-1"], "--rate"),
        (["--timeout", "0"], "--timeout"),
        (["--types", "CartOpened,,OfferOpened"], "--types"),
        (["--types", ""], "--types"),
        (["--url", "ftp://h"], "--url"),
        (["--url", "http://[::1"], "--url"),
        (["--url", f"http://one:{PLANTED_PASSWORD}@h:1"], "--url"),
        (["--user", "one"], "--password"),
        (["--password", PLANTED_PASSWORD], "--user"),
    ],
)
def test_bad_flags_raise_value_error_naming_the_flag(argv: list[str], flag: str) -> None:
    """Each invalid value is refused with a message naming its flag, never the password."""
    with pytest.raises(ValueError, match=re.escape(flag)) as caught:
        sender.options_from_args(parse_send_args(*argv))
    assert PLANTED_PASSWORD not in str(caught.value)


def test_password_and_password_file_are_exclusive(tmp_path: Path) -> None:
    """Both at once is an error that names both flags and does not echo the password."""
    secret = tmp_path / "password"
    secret.write_text(PLANTED_PASSWORD)
    args = parse_send_args(
        "--user", "one", "--password", PLANTED_PASSWORD, "--password-file", str(secret)
    )
    with pytest.raises(ValueError, match="--password and --password-file") as caught:
        sender.options_from_args(args)
    assert PLANTED_PASSWORD not in str(caught.value)


@pytest.mark.parametrize("content", [None, b"", b"\n", b"\xff\xfe" + PLANTED_PASSWORD.encode()])
def test_unusable_password_file_is_an_error(tmp_path: Path, content: bytes | None) -> None:
    """A missing, empty or undecodable file is refused, naming the flag and no content."""
    secret = tmp_path / "password"
    if content is not None:
        secret.write_bytes(content)
    args = parse_send_args("--user", "one", "--password-file", str(secret))
    with pytest.raises(ValueError, match="--password-file") as caught:
        sender.options_from_args(args)
    assert PLANTED_PASSWORD not in str(caught.value)
    # No chained exception either: a UnicodeDecodeError would carry the file's bytes.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_send_options_validate_themselves() -> None:
    """Built directly, SendOptions refuses impossible values too."""
    for bad in ({"count": 0}, {"concurrency": 0}, {"rate": 0.0}, {"types": ()},
                {"types": ("",)}, {"timeout_seconds": 0.0}):  # fmt: skip
        with pytest.raises(ValueError):
            SendOptions(**bad)  # type: ignore[arg-type]
