"""OneClient against the sandbox platform, and against a tiny scripted server for fault cases.

The contract cases run on `bridge.sandbox`; retries, timeouts and error bodies use a scripted
server that answers exact statuses (and can hang), which gives exact control over each attempt.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from bridge.control.client import API_PREFIX, OneClient
from bridge.control.models import CallbackAuth, Webhook, WebhookType
from bridge.errors import PlatformAuthError, PlatformError
from bridge.sandbox import SANDBOX_STATE, Faults, SandboxState, build_sandbox_app

ServerFactory = Callable[..., Awaitable[TestServer]]

TENANT = "klient"
PLANTED_KEY = "planted-ApiKey-7f3c9e21"
PLANTED_PASSWORD = "planted-secret"
CART_OPENED = WebhookType("CartOpened", "p-u-o-m-e-c-cartopened-klient")


def make_webhook(name: str = "one-bridge klient CartOpened", **changes: Any) -> Webhook:
    values: dict[str, Any] = {
        "id": None,
        "name": name,
        "status": "ACTIVE",
        "webhook_type": CART_OPENED,
        "callback_url": "https://bridge.example/one/klient/events",
        "callback_auth": CallbackAuth.basic("one", PLANTED_PASSWORD),
    }
    values.update(changes)
    return Webhook(**values)


class RecordingSleep:
    """Stands in for asyncio.sleep: records each backoff delay, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # case-insensitive, as received
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer (the test's `release` event is never set)


@dataclass
class ScriptedPlatform:
    """Records every request; answers `script(n, request)` for the n-th request (0-based)."""

    script: Callable[[int, web.Request], Reply] = lambda n, request: Reply()
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        index = len(self.seen)
        self.seen.append(
            Seen(
                request.method,
                request.path_qs.split("?")[0],
                dict(request.query),
                request.headers.copy(),
                body,
            )
        )
        async with self._arrived:
            self._arrived.notify_all()
        reply = self.script(index, request)
        if reply.hang:
            await self.release.wait()
        payload = reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
        return web.Response(
            status=reply.status,
            body=b"" if reply.body is None else payload,
            headers={"Content-Type": "application/json", **reply.headers},
        )

    async def wait_for_requests(self, count: int) -> None:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.seen) >= count), 5)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@dataclass
class Harness:
    """A scripted platform, a client pointed at it, and what the client reported."""

    platform: ScriptedPlatform
    client: OneClient
    sleep: RecordingSleep
    requests: list[tuple[str, str, float]]


@pytest.fixture
def scripted(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, sleep: RecordingSleep
) -> Iterator[Callable[..., Awaitable[Harness]]]:
    started: list[ScriptedPlatform] = []

    async def start(script: Callable[[int, web.Request], Reply], **client_options: Any) -> Harness:
        platform = ScriptedPlatform(script)
        started.append(platform)
        server = await aiohttp_server(platform.app())
        requests: list[tuple[str, str, float]] = []
        options: dict[str, Any] = {
            "sleep": sleep,
            "on_request": lambda *args: requests.append(args),
            **client_options,
        }
        client = OneClient(session, str(server.make_url("")), TENANT, PLANTED_KEY, **options)
        return Harness(platform, client, sleep, requests)

    yield start
    for platform in started:  # let hanging handlers finish so the servers can close
        platform.release.set()


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused, no race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def always(reply: Reply) -> Callable[[int, web.Request], Reply]:
    return lambda n, request: reply


def then(*replies: Reply) -> Callable[[int, web.Request], Reply]:
    """The given replies in order, the last one repeated."""
    return lambda n, request: replies[min(n, len(replies) - 1)]


OK_PAGE = {
    "items": [],
    "totalItems": 0,
    "pageNumber": 1,
    "totalPages": 0,
    "pageSize": 50,
    "nextPage": None,
}


# --- what goes on the wire ------------------------------------------------------------------


async def test_every_call_carries_tenant_key_and_accept_headers(scripted):
    """one-tenant, ApiAuth and accept: */* on every call; JSON bodies say so and are valid."""
    h = await scripted(
        lambda n, request: Reply(body={"id": "new-id"} if request.method == "POST" else None)
    )
    await h.client.create(make_webhook())
    await h.client.update(make_webhook(id="abc"))
    await h.client.delete("abc")

    assert [(s.method, s.path) for s in h.platform.seen] == [
        ("POST", f"{API_PREFIX}/webhooks"),
        ("PUT", f"{API_PREFIX}/webhooks"),
        ("DELETE", f"{API_PREFIX}/webhooks/abc"),
    ]
    for seen in h.platform.seen:
        assert seen.headers["one-tenant"] == TENANT
        assert seen.headers["ApiAuth"] == PLANTED_KEY
        assert seen.headers["accept"] == "*/*"
    post, put, delete = h.platform.seen
    assert post.headers["Content-Type"] == "application/json"
    assert put.headers["Content-Type"] == "application/json"
    assert "id" not in orjson.loads(post.body)
    assert orjson.loads(put.body)["id"] == "abc"
    assert orjson.loads(put.body) == make_webhook(id="abc").to_json()
    assert delete.body == b""


async def test_webhook_ids_are_quoted_into_one_path_segment(scripted):
    """An id cannot climb out of /webhooks/{id}; an empty id is refused before any request."""
    h = await scripted(always(Reply(body=make_webhook(id="x").to_json())))
    await h.client.get("../types?x=1")
    assert h.platform.seen[0].path == f"{API_PREFIX}/webhooks/..%2Ftypes%3Fx=1"
    with pytest.raises(ValueError, match="webhook_id"):
        await h.client.get("")
    with pytest.raises(ValueError, match="webhook_id"):
        await h.client.delete("")
    with pytest.raises(ValueError, match="id"):
        await h.client.update(make_webhook(id=None))
    assert len(h.platform.seen) == 1


async def test_base_url_may_carry_a_path_prefix_and_trailing_slash(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
):
    """The API prefix is appended to whatever base URL is configured."""
    platform = ScriptedPlatform(always(Reply(body=OK_PAGE)))
    server = await aiohttp_server(platform.app())
    client = OneClient(session, str(server.make_url("/gateway/")), TENANT, PLANTED_KEY)
    await client.list_page()
    assert platform.seen[0].path == f"/gateway{API_PREFIX}/webhooks"


@pytest.mark.parametrize("search", ["", "a", "ab"])
async def test_search_shorter_than_three_characters_is_refused_before_any_request(
    scripted, search: str
):
    """search filters need 3 characters: ValueError, and the platform sees nothing."""
    h = await scripted(always(Reply(body=OK_PAGE)))
    with pytest.raises(ValueError, match="at least 3"):
        await h.client.list_page(search=search)
    with pytest.raises(ValueError, match="at least 3"):
        await h.client.list_webhooks(search=search)
    assert h.platform.seen == []


async def test_page_arguments_are_checked(scripted):
    """Pages start at 1 and hold at least one item."""
    h = await scripted(always(Reply(body=OK_PAGE)))
    with pytest.raises(ValueError, match="page_number"):
        await h.client.list_page(page_number=0)
    with pytest.raises(ValueError, match="page_size"):
        await h.client.list_page(page_size=0)
    assert h.platform.seen == []


# --- retries --------------------------------------------------------------------------------


async def test_500_is_retried_up_to_max_attempts_with_jittered_exponential_backoff(scripted):
    """4 attempts on a platform that keeps failing; delays stay under base * 2^n, capped."""
    h = await scripted(
        always(Reply(500, {"error": "boom"})),
        max_attempts=4,
        backoff_base_seconds=1,
        backoff_max_seconds=3,
    )
    with pytest.raises(PlatformError) as caught:
        await h.client.list_page()

    assert len(h.platform.seen) == 4
    assert caught.value.status == 500
    assert caught.value.operation == "list"
    assert type(caught.value) is PlatformError
    assert len(h.sleep.delays) == 3
    for delay, ceiling in zip(h.sleep.delays, [1, 2, 3], strict=True):
        assert 0 <= delay <= ceiling
    assert [r[:2] for r in h.requests] == [("list", "5xx")] * 4


async def test_a_retry_that_succeeds_returns_the_answer(scripted):
    """500, 502, then 200: the caller sees only the page."""
    h = await scripted(then(Reply(500), Reply(502), Reply(200, OK_PAGE)))
    page = await h.client.list_page()
    assert page.items == ()
    assert len(h.platform.seen) == 3
    assert [r[1] for r in h.requests] == ["5xx", "5xx", "2xx"]
    assert all(r[2] >= 0 for r in h.requests)


async def test_429_honours_retry_after_seconds(scripted):
    """Retry-After: 2 is slept exactly, every time; the final 429 is raised."""
    h = await scripted(always(Reply(429, {"error": "slow down"}, {"Retry-After": "2"})))
    with pytest.raises(PlatformError) as caught:
        await h.client.types()
    assert caught.value.status == 429
    assert len(h.platform.seen) == 4
    assert h.sleep.delays == [2.0, 2.0, 2.0]


async def test_retry_after_is_capped_by_backoff_max(scripted):
    """A Retry-After of two minutes is cut to backoff_max_seconds."""
    h = await scripted(
        then(Reply(503, headers={"Retry-After": "120"}), Reply(200, OK_PAGE)),
        backoff_max_seconds=10,
    )
    await h.client.list_page()
    assert h.sleep.delays == [10.0]


async def test_retry_after_as_a_date_falls_back_to_backoff(scripted):
    """The HTTP-date form is not parsed: plain jittered backoff applies."""
    h = await scripted(
        then(
            Reply(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
            Reply(200, OK_PAGE),
        ),
        backoff_base_seconds=0.5,
    )
    await h.client.list_page()
    assert len(h.sleep.delays) == 1
    assert 0 <= h.sleep.delays[0] <= 0.5


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, PlatformError),
        (401, PlatformAuthError),
        (403, PlatformAuthError),
        (404, PlatformError),
        (409, PlatformError),
        (422, PlatformError),
    ],
)
async def test_other_4xx_are_not_retried(scripted, status: int, error_class: type):
    """A 4xx other than 429 is final: exactly one call, and 401/403 are PlatformAuthError."""
    h = await scripted(always(Reply(status, {"message": "no"})))
    with pytest.raises(PlatformError) as caught:
        await h.client.get("abc")
    assert type(caught.value) is error_class
    assert caught.value.status == status
    assert caught.value.operation == "get"
    assert len(h.platform.seen) == 1
    assert h.sleep.delays == []
    assert h.requests[0][:2] == ("get", "4xx")


async def test_redirects_are_not_followed(scripted):
    """A 3xx would carry the ApiAuth header elsewhere: it is a failure, seen once."""
    h = await scripted(always(Reply(302, headers={"Location": "http://127.0.0.1:9/steal"})))
    with pytest.raises(PlatformError) as caught:
        await h.client.list_page()
    assert caught.value.status == 302
    assert len(h.platform.seen) == 1
    assert h.requests[0][1] == "error"


async def test_create_is_not_repeated_after_an_answer_it_may_have_acted_on(scripted):
    """A 500 on create may have registered the webhook: one call, the caller re-lists."""
    h = await scripted(always(Reply(500)))
    with pytest.raises(PlatformError) as caught:
        await h.client.create(make_webhook())
    assert caught.value.status == 500
    assert len(h.platform.seen) == 1


async def test_create_is_retried_on_429(scripted):
    """429 means the platform did not act: create is repeated and returns the id."""
    h = await scripted(then(Reply(429, headers={"Retry-After": "1"}), Reply(201, {"id": "new-id"})))
    assert await h.client.create(make_webhook()) == "new-id"
    assert len(h.platform.seen) == 2
    assert h.sleep.delays == [1.0]


async def test_create_that_times_out_is_not_repeated(scripted):
    """No answer in time on create: one attempt, PlatformError without status."""
    h = await scripted(always(Reply(hang=True)), timeout_seconds=0.2)
    with pytest.raises(PlatformError) as caught:
        await h.client.create(make_webhook())
    assert caught.value.status is None
    await h.platform.wait_for_requests(1)
    assert len(h.platform.seen) == 1
    assert h.sleep.delays == []


# --- timeouts and network failures ----------------------------------------------------------


async def test_a_platform_that_never_answers_times_out_on_every_attempt(scripted):
    """Each attempt is cut at timeout_seconds; after the last, PlatformError with status None."""
    h = await scripted(always(Reply(hang=True)), timeout_seconds=0.2, max_attempts=2)
    with pytest.raises(PlatformError) as caught:
        await h.client.list_page()
    assert caught.value.status is None
    assert caught.value.operation == "list"
    assert "TimeoutError" in str(caught.value)
    await h.platform.wait_for_requests(2)
    assert len(h.platform.seen) == 2
    assert len(h.sleep.delays) == 1
    assert [r[:2] for r in h.requests] == [("list", "error")] * 2
    assert all(r[2] >= 0.2 for r in h.requests)


async def test_a_timeout_then_an_answer_succeeds(scripted):
    """One hung attempt, then a prompt answer."""
    h = await scripted(then(Reply(hang=True), Reply(200, OK_PAGE)), timeout_seconds=0.2)
    page = await h.client.list_page()
    assert page.next_page is None
    assert len(h.platform.seen) == 2


async def test_connection_refused_is_retried_then_raised_without_status(
    session: aiohttp.ClientSession, refusing_url: str, sleep: RecordingSleep
):
    """Network errors are retried; after the last attempt PlatformError(status=None)."""
    requests: list[tuple[str, str, float]] = []
    client = OneClient(
        session,
        refusing_url,
        TENANT,
        PLANTED_KEY,
        max_attempts=3,
        sleep=sleep,
        on_request=lambda *args: requests.append(args),
    )
    with pytest.raises(PlatformError) as caught:
        await client.delete("abc")
    assert caught.value.status is None
    assert caught.value.operation == "delete"
    assert "ClientConnectorError" in str(caught.value)
    assert caught.value.__cause__ is None
    assert len(sleep.delays) == 2
    assert [r[:2] for r in requests] == [("delete", "error")] * 3


async def test_create_is_retried_when_the_connection_was_never_made(
    session: aiohttp.ClientSession, refusing_url: str, sleep: RecordingSleep
):
    """Connection refused means the request never left: repeating create is safe."""
    client = OneClient(session, refusing_url, TENANT, PLANTED_KEY, max_attempts=2, sleep=sleep)
    with pytest.raises(PlatformError):
        await client.create(make_webhook())
    assert len(sleep.delays) == 1


async def test_retries_are_logged_once_each_and_the_failure_once(scripted):
    """platform.request_retrying (debug) per retry with operation, status, attempt and delay;
    one platform.request_failed warning at the end."""
    h = await scripted(always(Reply(503, headers={"Retry-After": "1"})), max_attempts=3)
    with capture_logs() as logs, pytest.raises(PlatformError):
        await h.client.list_page()
    retrying = [e for e in logs if e["event"] == "platform.request_retrying"]
    assert [(e["operation"], e["status"], e["attempt"], e["delay_seconds"]) for e in retrying] == [
        ("list", 503, 1, 1.0),
        ("list", 503, 2, 1.0),
    ]
    assert all(e["log_level"] == "debug" for e in retrying)
    failed = [e for e in logs if e["event"] == "platform.request_failed"]
    assert len(failed) == 1
    assert (failed[0]["operation"], failed[0]["status"], failed[0]["attempts"]) == ("list", 503, 3)


async def test_auth_failures_are_logged_as_errors(scripted):
    """A refused key needs a human: platform.request_failed at error level."""
    h = await scripted(always(Reply(401, {"message": "bad key"})))
    with capture_logs() as logs, pytest.raises(PlatformAuthError):
        await h.client.types()
    assert [(e["event"], e["log_level"]) for e in logs] == [("platform.request_failed", "error")]


# --- errors carry safe, bounded detail ------------------------------------------------------


def echo_with_secrets(n: int, request: web.Request) -> Reply:
    """A 400 whose body echoes the request: headers, the sent password, the key in free text."""
    return Reply(
        400,
        {
            "message": f"invalid request for key {request.headers['ApiAuth']} (tenant klient)",
            "headers": {
                "ApiAuth": request.headers["ApiAuth"],
                "Authorization": "Basic b25lOnBsYW50ZWQtc2VjcmV0",
            },
            "echo": {"callbackAuthentication": {"username": "one", "password": PLANTED_PASSWORD}},
            "hint": f"credential {PLANTED_PASSWORD} is too weak",
        },
    )


async def test_platform_error_carries_operation_status_and_a_redacted_excerpt(scripted):
    """The key and the password appear nowhere: not in str, repr, args, excerpt nor logs."""
    h = await scripted(echo_with_secrets)
    with capture_logs() as logs, pytest.raises(PlatformError) as caught:
        await h.client.create(make_webhook())
    error = caught.value
    assert (error.operation, error.status) == ("create", 400)
    assert "invalid request for key" in error.body_excerpt
    assert "(tenant klient)" in error.body_excerpt
    assert "too weak" in error.body_excerpt
    shown = [str(error), repr(error), repr(error.args), error.body_excerpt, error.detail]
    shown += [repr(event) for event in logs]
    for text in shown:
        assert PLANTED_KEY not in text
        assert PLANTED_PASSWORD not in text
        assert "b25lOnBsYW50ZWQtc2VjcmV0" not in text
    assert "HTTP 400" in str(error)


async def test_update_error_never_shows_the_password_it_sent(scripted):
    """Passwords in the request body are scrubbed from the error, whatever shape they echo in."""
    h = await scripted(
        always(Reply(422, f"rejected {PLANTED_PASSWORD}; key={PLANTED_KEY}".encode()))
    )
    with pytest.raises(PlatformError) as caught:
        await h.client.update(make_webhook(id="abc"))
    assert caught.value.body_excerpt == "rejected ***; key=***"


async def test_excerpt_is_bounded_and_on_one_line(scripted):
    """A huge error body yields an excerpt of about 300 characters without line breaks."""
    h = await scripted(always(Reply(400, ("line\n" * 20000).encode())))
    with pytest.raises(PlatformError) as caught:
        await h.client.list_page()
    assert len(caught.value.body_excerpt) <= 303
    assert "\n" not in caught.value.body_excerpt
    assert len(str(caught.value)) < 400


async def test_a_malformed_success_answer_is_a_platform_error_naming_the_field(scripted):
    """A 200 that breaks the contract raises PlatformError, with passwords still masked."""
    broken = {"items": [{**make_webhook(id="x").to_json(), "status": "PAUSED"}]}
    h = await scripted(always(Reply(200, broken)))
    with pytest.raises(PlatformError) as caught:
        await h.client.list_page()
    assert caught.value.status == 200
    assert "items[0].status" in str(caught.value)
    assert PLANTED_PASSWORD not in str(caught.value)


async def test_a_success_answer_that_is_not_json_is_a_platform_error(scripted):
    """A 200 with an HTML body (a proxy's page, say) raises PlatformError."""
    h = await scripted(always(Reply(200, b"<html>maintenance</html>")))
    with pytest.raises(PlatformError, match="not valid JSON") as caught:
        await h.client.get("abc")
    assert caught.value.body_excerpt == "<html>maintenance</html>"


# --- paging guards and the types fallback ---------------------------------------------------


def endless_pages(n: int, request: web.Request) -> Reply:
    number = int(request.query["pageNumber"])
    item = make_webhook(id=f"id-{number}").to_json()
    return Reply(
        body={
            "items": [item],
            "totalItems": 10**9,
            "pageNumber": number,
            "totalPages": 10**9,
            "pageSize": 1,
            "nextPage": number + 1,
        }
    )


async def test_a_platform_that_never_stops_paging_is_cut_off(scripted):
    """nextPage forever: PlatformError after max_pages pages."""
    h = await scripted(endless_pages)
    with pytest.raises(PlatformError, match="after 5 pages") as caught:
        await h.client.list_webhooks(page_size=1, max_pages=5)
    assert caught.value.operation == "list"
    assert len(h.platform.seen) == 5


async def test_a_next_page_that_does_not_move_forward_is_refused(scripted):
    """nextPage pointing back would loop: PlatformError at once."""
    page = {**OK_PAGE, "items": [], "pageNumber": 1, "nextPage": 1}
    h = await scripted(always(Reply(body=page)))
    with pytest.raises(PlatformError, match="nextPage 1 after page 1"):
        await h.client.list_webhooks()
    assert len(h.platform.seen) == 1


async def test_a_webhook_seen_on_two_pages_is_listed_once(scripted):
    """Pages that shift under us repeat an item: list_webhooks keeps it once."""
    a, b, c = (make_webhook(id=i).to_json() for i in ("a", "b", "c"))
    pages = [
        {**OK_PAGE, "items": [a, b], "pageNumber": 1, "nextPage": 2},
        {**OK_PAGE, "items": [b, c], "pageNumber": 2, "nextPage": None},
    ]
    h = await scripted(lambda n, request: Reply(body=pages[n]))
    webhooks = await h.client.list_webhooks(page_size=2)
    assert [w.id for w in webhooks] == ["a", "b", "c"]


async def test_types_fall_back_to_the_singular_path_on_404(scripted):
    """/webhooks/types answers 404: /webhooks/type is asked, quietly."""
    types = [{"name": "CartOpened", "exchangeName": "p-u-o-m-e-c-cartopened-klient"}]
    h = await scripted(
        lambda n, request: Reply(404) if request.path.endswith("/types") else Reply(body=types)
    )
    with capture_logs() as logs:
        assert await h.client.types() == [CART_OPENED]
    assert [s.path for s in h.platform.seen] == [
        f"{API_PREFIX}/webhooks/types",
        f"{API_PREFIX}/webhooks/type",
    ]
    assert not [e for e in logs if e["event"] == "platform.request_failed"]
    assert [r[:2] for r in h.requests] == [("types", "4xx"), ("types", "2xx")]


async def test_types_do_not_fall_back_on_other_errors(scripted):
    """Only 404 means "wrong path": a 401 on /types is raised as is."""
    h = await scripted(always(Reply(401)))
    with pytest.raises(PlatformAuthError):
        await h.client.types()
    assert len(h.platform.seen) == 1


async def test_types_fallback_that_also_fails_raises_its_own_status(scripted):
    """Both paths 404: the error is the fallback's."""
    h = await scripted(always(Reply(404, {"message": "nope"})))
    with pytest.raises(PlatformError) as caught:
        await h.client.types()
    assert caught.value.status == 404
    assert len(h.platform.seen) == 2


async def test_client_repr_shows_no_key(session: aiohttp.ClientSession):
    """The client's repr names base URL and tenant only."""
    client = OneClient(session, "http://platform.example", TENANT, PLANTED_KEY)
    assert PLANTED_KEY not in repr(client)
    assert TENANT in repr(client)


# --- the contract, against the sandbox platform ---------------------------------------------


@dataclass
class Sandbox:
    state: SandboxState
    client: OneClient
    sleep: RecordingSleep
    url: str

    def calls(self, method: str, path: str) -> int:
        return self.state.count_calls(method=method, path=API_PREFIX + path, tenant=TENANT)


@pytest.fixture
async def sandbox(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, sleep: RecordingSleep
) -> Sandbox:
    app = build_sandbox_app(api_keys={TENANT: PLANTED_KEY}, default_api_key=None)
    server = await aiohttp_server(app)
    url = str(server.make_url(""))
    client = OneClient(session, url, TENANT, PLANTED_KEY, sleep=sleep)
    return Sandbox(app[SANDBOX_STATE], client, sleep, url)


def plant(state: SandboxState, webhook: Webhook) -> None:
    """Store a webhook straight into the sandbox, as if made elsewhere."""
    state.put_webhook(TENANT, orjson.loads(orjson.dumps(webhook.to_json())))


@dataclass
class CallbackReceiver:
    """Where the sandbox sends example callbacks: records them, answers 200."""

    received: list[tuple[Mapping[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.headers.copy(), await request.read()))
        return web.json_response({"outcome": "published"})


async def test_create_get_update_delete_round_trip(sandbox: Sandbox):
    """create returns an id; get, update (id in the body) and delete behave as documented."""
    webhook = make_webhook()
    webhook_id = await sandbox.client.create(webhook)
    assert webhook_id

    stored = await sandbox.client.get(webhook_id)
    assert stored == dataclasses.replace(webhook, id=webhook_id)
    assert stored.callback_auth.password == PLANTED_PASSWORD  # returned in clear, as documented

    changed = dataclasses.replace(stored, status="INACTIVE", name="one-bridge klient CartOpened v2")
    await sandbox.client.update(changed)
    assert await sandbox.client.get(webhook_id) == changed

    await sandbox.client.delete(webhook_id)  # the sandbox answers 204: any 2xx is success
    with pytest.raises(PlatformError) as caught:
        await sandbox.client.get(webhook_id)
    assert caught.value.status == 404
    assert sandbox.calls("PUT", "/webhooks") == 1
    assert sandbox.calls("DELETE", f"/webhooks/{webhook_id}") == 1


async def test_none_auth_is_created_without_credentials(sandbox: Sandbox):
    """A NONE webhook reads back as NONE with no username or password."""
    webhook_id = await sandbox.client.create(make_webhook(callback_auth=CallbackAuth.none()))
    assert (await sandbox.client.get(webhook_id)).callback_auth == CallbackAuth.none()
    stored = sandbox.state.webhook(TENANT, webhook_id)
    assert stored is not None
    assert stored["callbackAuthentication"] == {"type": "NONE"}


async def test_pagination_follows_next_page_across_several_pages(sandbox: Sandbox):
    """23 webhooks, pages of 10: three list calls, every webhook once, in platform order."""
    created = [await sandbox.client.create(make_webhook(f"hook {n:02}")) for n in range(23)]

    first = await sandbox.client.list_page(1, 10)
    assert (first.total_items, first.total_pages, first.page_size, first.next_page) == (
        23,
        3,
        10,
        2,
    )
    last = await sandbox.client.list_page(3, 10)
    assert (len(last.items), last.next_page) == (3, None)

    listed = await sandbox.client.list_webhooks(page_size=10)
    assert [w.id for w in listed] == created
    assert [w.name for w in listed] == [f"hook {n:02}" for n in range(23)]
    assert sandbox.calls("GET", "/webhooks") == 2 + 3


async def test_iter_webhooks_yields_lazily_page_by_page(sandbox: Sandbox):
    """Stopping after the first item asks for one page only."""
    for n in range(15):
        plant(sandbox.state, make_webhook(f"hook {n}"))
    async for webhook in sandbox.client.iter_webhooks(page_size=10):
        assert webhook.name == "hook 0"
        break
    assert sandbox.calls("GET", "/webhooks") == 1


async def test_search_filters_by_name_across_pages(sandbox: Sandbox):
    """search is passed through; matching webhooks come back from every page."""
    for n in range(12):
        name = f"one-bridge hook {n}" if n % 2 else f"someone else's {n}"
        plant(sandbox.state, make_webhook(name))
    found = await sandbox.client.list_webhooks(page_size=2, search="one-bridge")
    assert [w.name for w in found] == [f"one-bridge hook {n}" for n in range(1, 12, 2)]
    page = await sandbox.client.list_page(search="nothing like this")
    assert (page.items, page.total_items, page.next_page) == ((), 0, None)


async def test_types_lists_the_tenants_types_including_new_ones(sandbox: Sandbox):
    """The documented three for tenant klient, plus a type the platform added later."""
    sandbox.state.add_type(TENANT, "SomethingNew", "p-x-somethingnew-klient")
    types = await sandbox.client.types()
    assert types == [
        CART_OPENED,
        WebhookType("ClientLogged", "p-u-o-m-e-c-clientlogged-klient"),
        WebhookType("OfferOpened", "p-u-o-m-e-o-offeropened-klient"),
        WebhookType("SomethingNew", "p-x-somethingnew-klient"),
    ]
    assert sandbox.calls("GET", "/webhooks/types") == 1
    assert sandbox.calls("GET", "/webhooks/type") == 0


async def test_types_fall_back_to_the_singular_path_on_the_sandbox(sandbox: Sandbox):
    """With /types answering 404, the client asks /type and gets the same table."""
    sandbox.state.faults = Faults(types_path_404=True)
    types = await sandbox.client.types()
    assert [t.name for t in types] == ["CartOpened", "ClientLogged", "OfferOpened"]
    assert sandbox.calls("GET", "/webhooks/types") == 1
    assert sandbox.calls("GET", "/webhooks/type") == 1


async def test_example_makes_the_platform_call_back_and_returns_what_it_sent(
    sandbox: Sandbox, aiohttp_server: ServerFactory
):
    """The example callback arrives with Basic auth; the answer repeats its headers and body."""
    receiver = CallbackReceiver()
    app = web.Application()
    app.router.add_post("/one/klient/events", receiver.handle)
    callback_url = str((await aiohttp_server(app)).make_url("/one/klient/events"))
    auth = CallbackAuth.basic("one", PLANTED_PASSWORD)

    result = await sandbox.client.example(CART_OPENED, callback_url, auth)

    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    expected_basic = "Basic " + base64.b64encode(f"one:{PLANTED_PASSWORD}".encode()).decode()
    assert headers["Authorization"] == expected_basic
    assert result.request_headers["Authorization"] == [expected_basic]
    assert result.request_headers["one-tenant"] == [TENANT]
    assert result.request_body.encode() == body
    assert orjson.loads(result.request_body)["tenantKey"] == "example"
    assert PLANTED_PASSWORD not in repr(result)
    assert expected_basic not in repr(result)


async def test_a_wrong_key_is_an_auth_error_asked_once(
    sandbox: Sandbox, session: aiohttp.ClientSession, sleep: RecordingSleep
):
    """401 from the platform: PlatformAuthError, no retry, and the wrong key shown nowhere."""
    wrong_key = "wrong-" + PLANTED_KEY
    client = OneClient(session, sandbox.url, TENANT, wrong_key, sleep=sleep)
    with capture_logs() as logs, pytest.raises(PlatformAuthError) as caught:
        await client.list_page()
    assert caught.value.status == 401
    assert "ApiAuth" in caught.value.body_excerpt  # the sandbox's message names the header
    assert sandbox.calls("GET", "/webhooks") == 1
    assert sleep.delays == []
    for text in (str(caught.value), repr(caught.value), *map(repr, logs)):
        assert wrong_key not in text
        assert PLANTED_KEY not in text


async def test_injected_500s_are_retried_through(sandbox: Sandbox):
    """Two 500s then the real answer: three calls, two backoff sleeps."""
    sandbox.state.faults = Faults(fail_status=500, fail_times=2)
    assert await sandbox.client.list_webhooks() == []
    assert sandbox.calls("GET", "/webhooks") == 3
    assert len(sandbox.sleep.delays) == 2


async def test_injected_429_honours_the_sandboxs_retry_after(sandbox: Sandbox):
    """The sandbox answers 429 with Retry-After: 1; the client sleeps exactly that."""
    sandbox.state.faults = Faults(fail_status=429, fail_times=1)
    await sandbox.client.types()
    assert sandbox.sleep.delays == [1.0]
    assert sandbox.calls("GET", "/webhooks/types") == 2


async def test_injected_400_is_not_retried(sandbox: Sandbox):
    """A 400 is final: one call."""
    sandbox.state.faults = Faults(fail_status=400, fail_times=1)
    with pytest.raises(PlatformError) as caught:
        await sandbox.client.get("abc")
    assert caught.value.status == 400
    assert sandbox.calls("GET", "/webhooks/abc") == 1


async def test_a_rejected_webhook_names_the_field_and_hides_the_password(sandbox: Sandbox):
    """The sandbox's 400 names the bad field; the password we sent is not in the error."""
    bad = make_webhook(webhook_type=WebhookType("CartOpened", "someone-elses-exchange"))
    with pytest.raises(PlatformError) as caught:
        await sandbox.client.create(bad)
    assert caught.value.status == 400
    assert "webhookType.exchangeName" in caught.value.body_excerpt
    assert PLANTED_PASSWORD not in str(caught.value)


async def test_missing_webhooks_are_404s(sandbox: Sandbox):
    """get, update and delete of an unknown id raise PlatformError(404), each asked once."""
    for call in (
        sandbox.client.get("no-such-id"),
        sandbox.client.update(make_webhook(id="no-such-id")),
        sandbox.client.delete("no-such-id"),
    ):
        with pytest.raises(PlatformError) as caught:
            await call
        assert caught.value.status == 404
    assert len(sandbox.state.calls) == 3


@pytest.mark.parametrize("base_url", ["", "api.example/path", "ftp://api.example"])
async def test_a_base_url_that_is_not_http_is_refused_at_construction(
    session: aiohttp.ClientSession, base_url: str
):
    """A broken base URL is a configuration mistake, not a network failure to retry."""
    with pytest.raises(ValueError, match="base_url"):
        OneClient(session, base_url, TENANT, PLANTED_KEY)
