"""Remove secrets from headers, mappings, URLs and free text before they are shown anywhere."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from yarl import URL

MASK = "***"

# Key names whose values are secrets wherever they appear (headers, config, log fields).
SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "apiauth",
        "password",
        "passwords",
        "api_key",
        "apikey",
        "secret",
        "token",
        "cookie",
        "set-cookie",
    }
)

# user:password@ inside any URL-like text, and Basic/Bearer credentials inside free text.
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@"
)
_AUTH_SCHEME = re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9+/=._~-]+")
_KEY_VALUE = re.compile(
    r'(?i)("?(?:password|apiauth|api_key|authorization)"?\s*[:=]\s*)("[^"]*"|\'[^\']*\'|[^\s,}]+)'
)

_SECRET_SUFFIXES = ("_password", "_secret", "_token", "_api_key")


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def redact_url(url: str) -> str:
    """Mask the password in a URL; leave everything else readable."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return redact_text(url)
    if parsed.password is None:
        return url
    return str(parsed.with_password(MASK))


def redact_text(text: str) -> str:
    """Mask credentials embedded in free text (exception messages, bodies)."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _KEY_VALUE.sub(lambda m: f"{m.group(1)}{MASK}", text)


def redact(value: Any) -> Any:
    """Recursively mask secret keys in mappings and credentials in strings."""
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
