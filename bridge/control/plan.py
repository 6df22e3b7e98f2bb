"""Pure: compare the registrations we want with what the platform has, and say what to change.

Only webhooks we own are ever touched: their name starts with the ownership prefix. Each owned
webhook is keyed by its event type; the first one that already matches (else the oldest by id)
is kept, and the other owned webhooks of that type are deleted as duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from bridge.control.models import CallbackAuth, Webhook, WebhookType


@dataclass(frozen=True, slots=True)
class Update:
    """Replace `current` (as the platform has it) with `desired`, keeping the platform's id."""

    current: Webhook
    desired: Webhook
    drift: tuple[str, ...]  # which fields differ, for logs: url, status, credentials, ...


@dataclass(frozen=True, slots=True)
class Plan:
    create: tuple[Webhook, ...] = ()
    update: tuple[Update, ...] = ()
    delete: tuple[Webhook, ...] = ()
    unchanged: tuple[Webhook, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.create or self.update or self.delete)

    def counts(self) -> dict[str, int]:
        return {
            "create": len(self.create),
            "update": len(self.update),
            "delete": len(self.delete),
            "unchanged": len(self.unchanged),
        }


def is_owned(webhook: Webhook, name_prefix: str) -> bool:
    return webhook.name.startswith(name_prefix)


def drift(current: Webhook, desired: Webhook) -> tuple[str, ...]:
    """The fields of `current` that differ from `desired`, in a fixed order."""
    found = []
    if current.name != desired.name:
        found.append("name")
    if _normal_url(current.callback_url) != _normal_url(desired.callback_url):
        found.append("url")
    if current.status != desired.status:
        found.append("status")
    if current.webhook_type.exchange_name != desired.webhook_type.exchange_name:
        found.append("exchange_name")
    if _credentials(current) != _credentials(desired):
        found.append("credentials")
    return tuple(found)


def plan_changes(
    desired: Sequence[Webhook], actual: Iterable[Webhook], *, name_prefix: str
) -> Plan:
    """What to create, update and delete so that the owned webhooks equal `desired`.

    `desired` holds at most one webhook per event type, without ids.
    """
    owned: dict[str, list[Webhook]] = {}
    for webhook in sorted(actual, key=lambda w: w.id or ""):
        if is_owned(webhook, name_prefix):
            owned.setdefault(webhook.webhook_type.name, []).append(webhook)

    create: list[Webhook] = []
    update: list[Update] = []
    delete: list[Webhook] = []
    unchanged: list[Webhook] = []
    for want in desired:
        candidates = owned.pop(want.webhook_type.name, [])
        if not candidates:
            create.append(want)
            continue
        keeper = next((w for w in candidates if not drift(w, want)), candidates[0])
        differences = drift(keeper, want)
        if differences:
            update.append(Update(keeper, replace(want, id=keeper.id), differences))
        else:
            unchanged.append(keeper)
        delete.extend(w for w in candidates if w is not keeper)
    # Owned webhooks of types we no longer want (removed from config, or from the platform).
    for leftovers in owned.values():
        delete.extend(leftovers)
    return Plan(tuple(create), tuple(update), tuple(delete), tuple(unchanged))


def _normal_url(url: str) -> str:
    # Trailing slashes and letter case of scheme and host do not make a different callback.
    scheme, sep, rest = url.strip().partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{path}".rstrip("/")


def _credentials(webhook: Webhook) -> tuple[str, str | None, str | None]:
    auth = webhook.callback_auth
    if auth.type == "NONE":
        return ("NONE", None, None)  # username and password are ignored by the platform
    return (auth.type, auth.username, auth.password)


def desired_webhooks(
    types: Iterable[WebhookType],
    *,
    name_prefix: str,
    callback_url: str,
    callback_auth: CallbackAuth,
) -> list[Webhook]:
    """One ACTIVE registration per event type, named with the ownership prefix."""
    return [
        Webhook(
            id=None,
            name=f"{name_prefix}{webhook_type.name}",
            status="ACTIVE",
            webhook_type=webhook_type,
            callback_url=callback_url,
            callback_auth=callback_auth,
        )
        for webhook_type in types
    ]
