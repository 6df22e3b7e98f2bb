"""plan_changes: desired registrations against the platform's, owned webhooks only."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.control.models import CallbackAuth, Webhook, WebhookType
from bridge.control.plan import Update, drift, plan_changes

PREFIX = "one-bridge:"
URL = "https://bridge.example/one/klient/events"


def hook(
    event_type: str = "CartOpened",
    *,
    id: str | None = None,
    name: str | None = None,
    url: str = URL,
    status: str = "ACTIVE",
    exchange: str | None = None,
    password: str = "pw",
) -> Webhook:
    return Webhook(
        id=id,
        name=name if name is not None else f"{PREFIX}{event_type}",
        status=status,  # type: ignore[arg-type]
        webhook_type=WebhookType(event_type, exchange or f"ex-{event_type.lower()}"),
        callback_url=url,
        callback_auth=CallbackAuth("HTTP_BASIC", "one", password),
    )


DESIRED = [hook("CartOpened"), hook("ClientLogged")]


def test_empty_platform_creates_every_desired_registration():
    """Nothing registered yet: one create per type."""
    plan = plan_changes(DESIRED, [], name_prefix=PREFIX)
    assert plan.create == tuple(DESIRED)
    assert (plan.update, plan.delete) == ((), ())


def test_matching_platform_plans_nothing():
    """The platform already has exactly what we want: an empty plan."""
    actual = [hook("CartOpened", id="a"), hook("ClientLogged", id="b")]
    plan = plan_changes(DESIRED, actual, name_prefix=PREFIX)
    assert plan.is_empty
    assert {w.id for w in plan.unchanged} == {"a", "b"}


@pytest.mark.parametrize(
    ("changed", "expected_drift"),
    [
        ({"url": "https://elsewhere.example/one/klient/events"}, ("url",)),
        ({"status": "INACTIVE"}, ("status",)),
        ({"password": "old-password"}, ("credentials",)),
        ({"exchange": "renamed-exchange"}, ("exchange_name",)),
        ({"name": PREFIX + "CartOpened (edited)"}, ("name",)),
        ({"url": "https://elsewhere.example/x", "status": "INACTIVE"}, ("url", "status")),
    ],
)
def test_each_kind_of_drift_is_an_update_keeping_the_platform_id(changed, expected_drift):
    """URL, status, credentials, exchangeName or name differing: update, same id."""
    actual = [hook("CartOpened", id="a", **changed), hook("ClientLogged", id="b")]
    plan = plan_changes(DESIRED, actual, name_prefix=PREFIX)
    [update] = plan.update
    assert update == Update(actual[0], replace(DESIRED[0], id="a"), expected_drift)
    assert (plan.create, plan.delete) == ((), ())


def test_username_change_is_credential_drift():
    """A different Basic user name is drift too."""
    current = replace(hook(id="a"), callback_auth=CallbackAuth("HTTP_BASIC", "admin", "pw"))
    assert drift(current, hook()) == ("credentials",)


def test_trailing_slash_and_host_case_are_not_drift():
    """The same callback written differently is the same callback."""
    assert drift(hook(url="HTTPS://Bridge.Example/one/klient/events/"), hook()) == ()


def test_credentials_of_a_none_auth_are_ignored():
    """With type NONE the platform ignores username and password: no drift from them."""
    none_auth = CallbackAuth("NONE", None, None)
    stale = CallbackAuth("NONE", "leftover", "leftover")
    assert (
        drift(replace(hook(), callback_auth=stale), replace(hook(), callback_auth=none_auth)) == ()
    )


def test_owned_duplicates_beyond_one_per_type_are_deleted():
    """Two owned CartOpened webhooks: the matching one stays, the other goes."""
    stale = hook("CartOpened", id="a", password="old")
    good = hook("CartOpened", id="b")
    plan = plan_changes(DESIRED, [stale, good, hook("ClientLogged", id="c")], name_prefix=PREFIX)
    assert plan.delete == (stale,)
    assert plan.update == ()


def test_duplicates_none_matching_keep_the_oldest_id_and_update_it():
    """No owned copy matches: the first by id is updated, the rest deleted."""
    first = hook("CartOpened", id="a", password="old")
    second = hook("CartOpened", id="b", password="older")
    plan = plan_changes(DESIRED[:1], [second, first], name_prefix=PREFIX)
    assert [u.current.id for u in plan.update] == ["a"]
    assert plan.delete == (second,)


def test_owned_orphans_of_unwanted_types_are_deleted():
    """An owned webhook for a type we no longer register is removed."""
    orphan = hook("OfferOpened", id="z")
    plan = plan_changes(
        DESIRED,
        [*[hook(t, id=t) for t in ("CartOpened", "ClientLogged")], orphan],
        name_prefix=PREFIX,
    )
    assert plan.delete == (orphan,)


def test_foreign_webhooks_are_never_touched_even_with_our_url():
    """A webhook without our prefix is someone else's, whatever it points at."""
    foreign = hook("CartOpened", id="f", name="New sale", password="admin")
    plan = plan_changes(DESIRED, [foreign], name_prefix=PREFIX)
    assert plan.create == tuple(DESIRED)
    assert foreign not in plan.delete
    assert all(u.current is not foreign for u in plan.update)
