"""Pure: parse a Basic Authorization header and check it in constant time."""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from collections.abc import Sequence


def parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    """(username, password) from `Basic <base64>`, or None if absent or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, separator, password = decoded.partition(b":")
    if not separator:
        return None
    return username, password


def check_credentials(header: str | None, *, username: str, passwords: Sequence[str]) -> bool:
    """True when the header carries the username and any of the accepted passwords.

    Every comparison runs whatever the earlier ones gave, so the time taken does not tell
    which part was wrong or which password in a rotation matched.
    """
    credentials = parse_basic(header)
    if credentials is None:
        return False
    given_user, given_password = credentials
    user_ok = hmac.compare_digest(given_user, username.encode())
    password_ok = False
    for accepted in passwords:
        password_ok |= hmac.compare_digest(given_password, accepted.encode())
    return user_ok and password_ok
