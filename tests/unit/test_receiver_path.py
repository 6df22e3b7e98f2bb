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
    ],
)
def test_tenant_in_path(path: str, tenant: str | None) -> None:
    assert tenant_in_path(path) == tenant
