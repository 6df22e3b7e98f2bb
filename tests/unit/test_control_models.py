"""The platform's webhook objects and their camelCase JSON."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from bridge.control.models import (
    CallbackAuth,
    ExampleResult,
    Webhook,
    WebhookPage,
    WebhookType,
    created_id_from_json,
    example_request_json,
    webhook_types_from_json,
)

PLANTED_PASSWORD = "planted-s3cret-Pa55word"

# Verbatim from the platform's page (seed/000_4457cc2c1a3da0b1.txt): list, read, example answers.
DOCUMENTED_LIST_ANSWER = """{ "items": [ { "id": "c1d10add-f75d-4ac2-a930-58bc8ef9a316",
"status": "ACTIVE", "name": "New sale", "webhookType": { "name": "CartOpened", "exchangeName":
"p-u-o-m-e-c-cartopened-klient" }, "callbackUrl":
"https://fgvw5dzdvrjlfqeq6gnwx73qwq0baind.lambda-url.eu-west-1.on.aws/", "callbackAuthentication":
{ "type": "HTTP_BASIC", "username": "admin", "password": "admin" } }, { "id":
"ad4f29fa-674b-49a0-b872-86fb61b84c39", "status": "ACTIVE", "name": "Webhook test - karta",
"webhookType": { "name": "CartOpened", "exchangeName": "p-u-o-m-e-c-cartopened-klient" },
"callbackUrl": "https://fgvw5dzdvrjlfqeq6gnwx73qwq0baind.lambda-url.eu-west-1.on.aws/",
"callbackAuthentication": { "type": "HTTP_BASIC", "username": "admin", "password": "admin" } } ],
"totalItems": 2, "pageNumber": 1, "totalPages": 1, "pageSize": 10, "nextPage": null }"""

DOCUMENTED_READ_ANSWER = """{ "id": "ad4f29fa-674b-49a0-b872-86fb61b84c39", "status": "ACTIVE",
"name": "Webhook test - card", "webhookType": { "name": "CartOpened", "exchangeName":
"p-u-o-m-e-c-cartopened-klient" }, "callbackUrl":
"https://fgvw5dzdvrjlfqeq6gnwx73qwq0baind.lambda-url.eu-west-1.on.aws/", "callbackAuthentication":
{ "type": "HTTP_BASIC", "username": "admin", "password": "admin" } }"""

DOCUMENTED_EXAMPLE_ANSWER = r"""{ "requestHeaders": { "Accept": [ "application/json,
application/cbor, application/*+json" ], "Authorization": [ "Basic YWRtaW46YWRtaW4=" ],
"one-tenant": [ "klient" ], "Content-Type": [ "application/json" ], "Content-Length": [ "267" ] },
"requestBody": "{\n \"type\" : \"CartOpened\",\n \"tenantKey\" : \"example\",\n \"cartId\" :
\"00000000-0000-0000-0000-000000000000\",\n \"clientId\" :
\"org:00000000-0000-0000-0000-000000000000\",\n \"eventId\" :
\"13200948-cf44-4853-9eee-88eb9284ea23\",\n \"timestamp\" : \"2023-02-22T04:32:51.014160Z\"\n}" }"""

CART_OPENED = WebhookType("CartOpened", "p-u-o-m-e-c-cartopened-klient")


def _loads(text: str) -> object:
    # The verbatim answers above are wrapped to fit 100 columns, each line break standing for
    # one space of the original (some fall inside strings): put the spaces back.
    return orjson.loads(text.replace("\n", " "))


def make_webhook(**changes: object) -> Webhook:
    webhook = Webhook(
        id="c1d10add-f75d-4ac2-a930-58bc8ef9a316",
        name="one-bridge klient CartOpened",
        status="ACTIVE",
        webhook_type=CART_OPENED,
        callback_url="https://bridge.example/one/klient/events",
        callback_auth=CallbackAuth.basic("one", PLANTED_PASSWORD),
    )
    return dataclasses.replace(webhook, **changes)  # type: ignore[arg-type]


def webhook_json(**changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "id": "c1d10add-f75d-4ac2-a930-58bc8ef9a316",
        "name": "one-bridge klient CartOpened",
        "status": "ACTIVE",
        "webhookType": {"name": "CartOpened", "exchangeName": "p-u-o-m-e-c-cartopened-klient"},
        "callbackUrl": "https://bridge.example/one/klient/events",
        "callbackAuthentication": {"type": "HTTP_BASIC", "username": "one", "password": "pw"},
    }
    document.update(changes)
    return {key: value for key, value in document.items() if value is not _DROP}


_DROP = object()


# --- the documented answers parse ---------------------------------------------------------


def test_documented_list_answer_parses():
    """The page's list example yields two HTTP_BASIC CartOpened webhooks and no next page."""
    page = WebhookPage.from_json(_loads(DOCUMENTED_LIST_ANSWER))
    assert (page.total_items, page.page_number, page.total_pages, page.page_size) == (2, 1, 1, 10)
    assert page.next_page is None
    assert [w.id for w in page.items] == [
        "c1d10add-f75d-4ac2-a930-58bc8ef9a316",
        "ad4f29fa-674b-49a0-b872-86fb61b84c39",
    ]
    first = page.items[0]
    assert first.name == "New sale"
    assert first.status == "ACTIVE"
    assert first.webhook_type == CART_OPENED
    assert first.callback_auth == CallbackAuth("HTTP_BASIC", "admin", "admin")


def test_documented_read_answer_parses():
    """The page's read example yields the webhook with its id."""
    webhook = Webhook.from_json(_loads(DOCUMENTED_READ_ANSWER))
    assert webhook.id == "ad4f29fa-674b-49a0-b872-86fb61b84c39"
    assert webhook.name == "Webhook test - card"
    assert webhook.callback_url.startswith("https://fgvw5dzdvrjlfqeq6gnwx73qwq0baind.")


def test_documented_example_answer_parses_and_its_body_is_the_documented_callback():
    """The example answer's headers are lists of strings; its body is the callback's JSON."""
    result = ExampleResult.from_json(_loads(DOCUMENTED_EXAMPLE_ANSWER))
    assert result.request_headers["one-tenant"] == ["klient"]
    assert result.request_headers["Authorization"] == ["Basic YWRtaW46YWRtaW4="]
    body = orjson.loads(result.request_body)
    assert body["type"] == "CartOpened"
    assert body["eventId"] == "13200948-cf44-4853-9eee-88eb9284ea23"


def test_documented_types_table_parses():
    """The types answer is an array of {name, exchangeName}."""
    types = webhook_types_from_json(
        [
            {"name": "CartOpened", "exchangeName": "p-u-o-m-e-c-cartopened-klient"},
            {"name": "ClientLogged", "exchangeName": "p-u-o-m-e-c-clientlogged-klient"},
            {"name": "OfferOpened", "exchangeName": "p-u-o-m-e-o-offeropened-klient"},
        ]
    )
    assert [t.name for t in types] == ["CartOpened", "ClientLogged", "OfferOpened"]
    assert types[0] == CART_OPENED


def test_created_id_answer_parses():
    """The create answer is {"id": ...}; an empty id is refused."""
    assert created_id_from_json({"id": "c1d10add"}) == "c1d10add"
    with pytest.raises(ValueError, match="id"):
        created_id_from_json({"id": ""})
    with pytest.raises(ValueError, match="id: required field is missing"):
        created_id_from_json({})


# --- serialising --------------------------------------------------------------------------


def test_webhook_json_uses_the_platforms_camel_case_names():
    """to_json writes webhookType.exchangeName, callbackUrl and callbackAuthentication."""
    assert make_webhook().to_json() == {
        "id": "c1d10add-f75d-4ac2-a930-58bc8ef9a316",
        "name": "one-bridge klient CartOpened",
        "status": "ACTIVE",
        "webhookType": {"name": "CartOpened", "exchangeName": "p-u-o-m-e-c-cartopened-klient"},
        "callbackUrl": "https://bridge.example/one/klient/events",
        "callbackAuthentication": {
            "type": "HTTP_BASIC",
            "username": "one",
            "password": PLANTED_PASSWORD,
        },
    }


def test_create_body_has_no_id_and_an_unsaved_webhook_has_none_either():
    """include_id=False drops the id; a webhook without id never writes one."""
    assert "id" not in make_webhook().to_json(include_id=False)
    assert "id" not in make_webhook(id=None).to_json()


def test_none_auth_omits_credentials():
    """With type NONE, username and password are left out of the JSON altogether."""
    assert CallbackAuth.none().to_json() == {"type": "NONE"}
    assert CallbackAuth("NONE", "someone", PLANTED_PASSWORD).to_json() == {"type": "NONE"}
    document = make_webhook(callback_auth=CallbackAuth.none()).to_json()
    assert document["callbackAuthentication"] == {"type": "NONE"}
    assert PLANTED_PASSWORD.encode() not in orjson.dumps(document)


def test_none_auth_from_json_drops_credentials_the_platform_ignores():
    """Credentials next to NONE are ignored by the platform, so parsing drops them too."""
    auth = CallbackAuth.from_json({"type": "NONE", "username": "u", "password": "p"})
    assert auth == CallbackAuth.none()


def test_basic_auth_without_credentials_cannot_be_sent():
    """HTTP_BASIC needs both username and password before it goes to the platform."""
    with pytest.raises(ValueError, match=r"callbackAuthentication\.username"):
        CallbackAuth("HTTP_BASIC", None, "pw").to_json()
    with pytest.raises(ValueError, match=r"callbackAuthentication\.password"):
        CallbackAuth("HTTP_BASIC", "one", None).to_json()


def test_example_request_body():
    """The example call's body holds the type, the callback URL and its authentication."""
    assert example_request_json(CART_OPENED, "https://b.example/x", CallbackAuth.none()) == {
        "webhookType": {"name": "CartOpened", "exchangeName": "p-u-o-m-e-c-cartopened-klient"},
        "callbackUrl": "https://b.example/x",
        "callbackAuthentication": {"type": "NONE"},
    }


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "webhook",
    [
        make_webhook(),
        make_webhook(id=None),
        make_webhook(status="INACTIVE", callback_auth=CallbackAuth.none()),
        make_webhook(webhook_type=WebhookType("SomethingNew", "p-x-somethingnew-klient")),
        make_webhook(name="zażółć gęślą jaźń \u2603"),
    ],
    ids=["basic", "unsaved", "inactive-none", "unknown-type", "unicode"],
)
def test_webhook_round_trips_through_json_bytes(webhook: Webhook):
    """Webhook -> JSON bytes -> Webhook gives the same value."""
    assert Webhook.from_json(orjson.loads(orjson.dumps(webhook.to_json()))) == webhook


def test_page_round_trips():
    """A page with items and a next page survives to_json/from_json."""
    page = WebhookPage(
        items=(make_webhook(), make_webhook(id="other", callback_auth=CallbackAuth.none())),
        total_items=23,
        page_number=2,
        total_pages=3,
        page_size=10,
        next_page=3,
    )
    assert WebhookPage.from_json(orjson.loads(orjson.dumps(page.to_json()))) == page


def test_example_result_round_trips():
    """The example answer survives to_json/from_json."""
    result = ExampleResult({"one-tenant": ["klient"], "X-Multi": ["a", "b"]}, '{"type": "x"}')
    assert ExampleResult.from_json(orjson.loads(orjson.dumps(result.to_json()))) == result


# --- tolerance and strictness -------------------------------------------------------------


def test_unknown_extra_fields_are_ignored_everywhere():
    """New fields the platform may add do not break parsing at any level."""
    document = webhook_json(createdAt="2024-01-01", tags=["x"])
    document["webhookType"] = {"name": "CartOpened", "exchangeName": "e", "version": 2}
    document["callbackAuthentication"] = {
        "type": "HTTP_BASIC",
        "username": "one",
        "password": "pw",
        "realm": "r",
    }
    webhook = Webhook.from_json(document)
    assert webhook.webhook_type == WebhookType("CartOpened", "e")
    page = WebhookPage.from_json(
        {
            "items": [document],
            "totalItems": 1,
            "pageNumber": 1,
            "totalPages": 1,
            "pageSize": 10,
            "nextPage": None,
            "sort": "name",
        }
    )
    assert page.items == (webhook,)


def test_missing_optional_fields_are_none():
    """id, username and password may be absent (or null) in an answer."""
    document = webhook_json(id=_DROP, callbackAuthentication={"type": "HTTP_BASIC"})
    webhook = Webhook.from_json(document)
    assert webhook.id is None
    assert webhook.callback_auth == CallbackAuth("HTTP_BASIC", None, None)
    assert Webhook.from_json(webhook_json(id=None)).id is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": _DROP}, r"^name: required field is missing$"),
        ({"status": _DROP}, r"^status: required field is missing$"),
        ({"callbackUrl": _DROP}, r"^callbackUrl: required field is missing$"),
        ({"webhookType": _DROP}, r"^webhookType: required field is missing$"),
        (
            {"callbackAuthentication": _DROP},
            r"^callbackAuthentication: required field is missing$",
        ),
        ({"webhookType": {"name": "CartOpened"}}, r"^webhookType\.exchangeName: required"),
        ({"callbackAuthentication": {}}, r"^callbackAuthentication\.type: required"),
        ({"name": 7}, r"^name: expected a string, got number$"),
        ({"name": None}, r"^name: expected a string, got null$"),
        ({"id": 12}, r"^id: expected a string or null, got number$"),
        ({"status": "PAUSED"}, r"^status: expected one of ACTIVE, INACTIVE$"),
        ({"webhookType": "CartOpened"}, r"^webhookType: expected a JSON object, got string$"),
        (
            {"callbackAuthentication": {"type": "OAUTH"}},
            r"^callbackAuthentication\.type: expected one of NONE, HTTP_BASIC$",
        ),
        (
            {"callbackAuthentication": {"type": "HTTP_BASIC", "password": 1234}},
            r"^callbackAuthentication\.password: expected a string or null, got number$",
        ),
    ],
)
def test_missing_or_mistyped_required_fields_name_the_field(
    changes: dict[str, object], message: str
):
    """A required field missing or of the wrong type raises ValueError naming that field."""
    with pytest.raises(ValueError, match=message):
        Webhook.from_json(webhook_json(**changes))


def test_field_errors_never_quote_the_value():
    """A wrong-typed password is reported by name and type, not by its value."""
    document = webhook_json(
        callbackAuthentication={"type": "HTTP_BASIC", "password": [PLANTED_PASSWORD]}
    )
    with pytest.raises(ValueError) as caught:
        Webhook.from_json(document)
    assert PLANTED_PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"items": None}, r"^items: expected an array, got null$"),
        ({"nextPage": "2"}, r"^nextPage: expected an integer or null, got string$"),
        ({"totalItems": True}, r"^totalItems: expected an integer, got boolean$"),
        ({"pageNumber": 1.5}, r"^pageNumber: expected an integer, got number$"),
        ({"items": [{"name": "x"}]}, r"^items\[0\]\.status: required field is missing$"),
    ],
)
def test_page_errors_name_the_field(changes: dict[str, object], message: str):
    """Page fields are checked with the same precision, items included."""
    document: dict[str, object] = {
        "items": [],
        "totalItems": 0,
        "pageNumber": 1,
        "totalPages": 1,
        "pageSize": 10,
        "nextPage": None,
        **changes,
    }
    with pytest.raises(ValueError, match=message):
        WebhookPage.from_json(document)


def test_page_without_next_page_is_refused_rather_than_read_as_last():
    """nextPage absent (not null) would silently end paging early: it is an error."""
    with pytest.raises(ValueError, match=r"^nextPage: required field is missing$"):
        WebhookPage.from_json(
            {"items": [], "totalItems": 0, "pageNumber": 1, "totalPages": 1, "pageSize": 10}
        )


@pytest.mark.parametrize("document", [[], "x", None, 3])
def test_non_objects_are_refused(document: object):
    """A webhook must be a JSON object."""
    with pytest.raises(ValueError, match="expected a JSON object"):
        Webhook.from_json(document)


def test_types_answer_must_be_an_array_of_types():
    """types errors name the index of the bad entry."""
    with pytest.raises(ValueError, match=r"^types: expected an array, got object$"):
        webhook_types_from_json({"name": "CartOpened"})
    with pytest.raises(ValueError, match=r"^types\[1\]\.exchangeName: required"):
        webhook_types_from_json([{"name": "a", "exchangeName": "b"}, {"name": "c"}])


def test_example_headers_must_be_lists_of_strings():
    """A header value that is not an array of strings is refused, naming the header."""
    with pytest.raises(ValueError, match=r"^requestHeaders\.Accept: expected an array"):
        ExampleResult.from_json({"requestHeaders": {"Accept": "*/*"}, "requestBody": ""})


def test_constructors_refuse_values_outside_the_literals():
    """status and auth type are checked even when built in code."""
    with pytest.raises(ValueError, match="status"):
        make_webhook(status="PAUSED")
    with pytest.raises(ValueError, match="type"):
        CallbackAuth("DIGEST")  # type: ignore[arg-type]


# --- secrets ------------------------------------------------------------------------------


def test_repr_hides_the_password_at_every_level():
    """CallbackAuth, Webhook and WebhookPage reprs show that a password exists, never its value."""
    auth = CallbackAuth.basic("one", PLANTED_PASSWORD)
    webhook = make_webhook(callback_auth=auth)
    page = WebhookPage((webhook,), 1, 1, 1, 10, None)
    for text in (repr(auth), str(auth), repr(webhook), str(webhook), repr(page), f"{page}"):
        assert PLANTED_PASSWORD not in text
    assert repr(auth) == "CallbackAuth(type='HTTP_BASIC', username='one', password='***')"
    assert "password=None" in repr(CallbackAuth.none())


def test_example_result_repr_masks_the_authorization_header():
    """The example answer echoes the Basic credentials; the repr masks them."""
    result = ExampleResult.from_json(_loads(DOCUMENTED_EXAMPLE_ANSWER))
    assert "YWRtaW46YWRtaW4=" not in repr(result)
    assert "'Authorization': ['***']" in repr(result)
    assert "'one-tenant': ['klient']" in repr(result)


def test_models_are_frozen():
    """Values, not records: assignment is refused."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_webhook().name = "x"  # type: ignore[misc]
