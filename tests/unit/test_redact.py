"""Redaction of secrets in URLs, free text and mappings."""

from bridge.redact import MASK, redact, redact_text, redact_url


def test_url_password_is_masked_and_the_rest_kept():
    """Only the password of a URL is hidden."""
    assert redact_url("amqp://guest:s3cret@host:5672/vh") == f"amqp://guest:{MASK}@host:5672/vh"
    assert redact_url("amqp://host/") == "amqp://host/"


def test_free_text_credentials_are_masked():
    """URLs, Basic/Bearer tokens and key=value secrets inside messages."""
    text = (
        'connect amqp://u:pw1@h/ failed; Authorization: Basic b25lOnB3 password="pw2" ApiAuth: key3'
    )
    cleaned = redact_text(text)
    for secret in ("pw1", "b25lOnB3", "pw2", "key3"):
        assert secret not in cleaned


def test_mappings_mask_secret_keys_recursively():
    """Header names and config keys that hold secrets are masked at any depth."""
    data = {
        "headers": {"Authorization": "Basic x", "ApiAuth": "k", "Accept": "*/*"},
        "callbackAuthentication": {"username": "u", "password": "p"},
    }
    assert redact(data) == {
        "headers": {"Authorization": MASK, "ApiAuth": MASK, "Accept": "*/*"},
        "callbackAuthentication": {"username": "u", "password": MASK},
    }
