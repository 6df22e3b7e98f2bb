"""The bridge's exception hierarchy; messages are built from safe fields only."""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError, ValueError):
    """The configuration is invalid; the message names the key and where it came from."""


class RejectedEvent(BridgeError):
    """A callback we refuse; `reason` is bounded and used as a metric label."""

    status = 400
    reason = "invalid_body"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class UnknownTenant(RejectedEvent):
    status = 404
    reason = "unknown_tenant"


class Unauthorized(RejectedEvent):
    status = 401
    reason = "unauthorized"


class InvalidBody(RejectedEvent):
    status = 400
    reason = "invalid_body"


class TenantMismatch(RejectedEvent):
    status = 400
    reason = "tenant_mismatch"


class ExpectationFailed(RejectedEvent):
    status = 417
    reason = "expectation_failed"


class UnsupportedMediaType(RejectedEvent):
    status = 415
    reason = "unsupported_media_type"


class BodyTooLarge(RejectedEvent):
    status = 413
    reason = "too_large"


class IncompleteBody(RejectedEvent):
    """The sender closed the connection before the whole body arrived."""

    status = 400
    reason = "incomplete_body"


class NotFound(RejectedEvent):
    status = 404
    reason = "not_found"


class MethodNotAllowed(RejectedEvent):
    status = 405
    reason = "method_not_allowed"


class BodyTimeout(RejectedEvent):
    status = 408
    reason = "body_timeout"


class Overloaded(RejectedEvent):
    status = 503
    reason = "overloaded"


class Unavailable(RejectedEvent):
    """Neither the broker nor (later) the spool could take the event."""

    status = 503
    reason = "unavailable"


class PublishError(BridgeError):
    """A publish was not confirmed; `reason` is one of PUBLISH_FAILURES."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"publish {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason


PUBLISH_FAILURES = ("nacked", "returned", "timeout", "disconnected", "blocked", "channel_error")


class SpoolError(BridgeError, OSError):
    """The spool cannot take or give back records: disk full, unwritable, corrupt or closed."""


class SpoolFull(SpoolError):
    """The spool already holds its configured maximum of events or body bytes."""


class SpoolFullRejected(RejectedEvent):
    """The broker cannot take the event now and the spool is at its bound."""

    status = 503
    reason = "spool_full"


class PlatformError(BridgeError):
    """A call to the ONe management API failed.

    `status` is the final HTTP status, or None when no answer came (network failure, timeout,
    or a platform that never stops paging). `body_excerpt` must arrive already redacted (the
    client masks credentials and its own API key); it is bounded here as a last guard.
    """

    MAX_EXCERPT_CHARS = 300

    def __init__(
        self, operation: str, status: int | None, body_excerpt: str = "", *, detail: str = ""
    ) -> None:
        if len(body_excerpt) > self.MAX_EXCERPT_CHARS:
            body_excerpt = body_excerpt[: self.MAX_EXCERPT_CHARS] + "..."
        self.operation = operation
        self.status = status
        self.body_excerpt = body_excerpt
        self.detail = detail
        message = f"platform {operation} failed"
        message += f": HTTP {status}" if status is not None else ""
        message += f": {detail}" if detail else ""
        message += f": {body_excerpt}" if body_excerpt else ""
        super().__init__(message)


class PlatformAuthError(PlatformError):
    """The platform refused our tenant/API key (401/403): back off long, a human must act."""
