"""Which paths are a tenant's callback URL."""

from __future__ import annotations

import pytest

from bridge.receiver import tenant_in_path


@pytest.mark.parametrize(
    ("path", "tenant"),
    [
        ("/one/klient/events", "klient"),
        ("/one/k-1_x/events", "k-1_x"),
        ("/one//events", None),
        ("/one/a/b/events", None),
        ("/one/klient/events/", None),
        ("/one/klient", None),
        ("/two/klient/events", None),
        ("/one/events", None),
        ("/", None),
        ("/one/klient/events?x=1", "klient"),
        ("/one/kl%69ent/events", "klient"),
        ("/one/klient%2Fevents", None),
        ("/one/a%2Fb/events", None),
        ("/one/kl%ff/events", None),
        ("http://bridge.example:8080/one/klient/events", "klient"),
        ("http://bridge.example", None),
        ("http:/one/klient/events", None),
    ],
)
def test_tenant_in_path(path: str, tenant: str | None) -> None:
    """The tenant of a callback target as sent (origin or absolute form), or None."""
    assert tenant_in_path(path) == tenant
