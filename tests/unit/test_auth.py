"""Basic credentials: parsing and the constant-time check."""

from base64 import b64encode

import pytest

from bridge.auth import check_credentials, parse_basic


def basic(user: str, password: str) -> str:
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


def test_parse_basic_splits_at_the_first_colon():
    """A password may itself contain colons."""
    assert parse_basic(basic("one", "a:b:c")) == (b"one", b"a:b:c")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!notbase64",
        "Basic " + b64encode(b"nocolon").decode(),
        "Basic ąę",
    ],
)
def test_malformed_headers_are_not_credentials(header):
    """Anything but a well-formed Basic header yields no credentials."""
    assert parse_basic(header) is None


def test_any_password_of_a_rotation_is_accepted():
    """The current and the previous password both pass during a rotation."""
    for password in ("new", "old"):
        assert check_credentials(basic("one", password), username="one", passwords=["new", "old"])


@pytest.mark.parametrize(
    ("user", "password"), [("one", "wrong"), ("two", "new"), ("", ""), ("one", "")]
)
def test_wrong_user_or_password_is_refused(user, password):
    """Both the username and one of the passwords must match."""
    assert not check_credentials(basic(user, password), username="one", passwords=["new", "old"])


def test_scheme_is_case_insensitive():
    """RFC 7617: the scheme name is case-insensitive."""
    header = basic("one", "pw").replace("Basic", "bAsIc")
    assert check_credentials(header, username="one", passwords=["pw"])
