"""Redis URLs as they may be shown, and checked.

``redact`` hides the password of a URL before it reaches a log line, an error message or the CLI's
output; ``checked`` raises ``ConfigError`` naming the field ``redis_url`` and the redacted value
when a URL cannot be a Redis URL.

A Sentinel URL names the sentinels and the master's service name:
``redis+sentinel://[user:password@]host:26379[,host:26379...]/SERVICE[/DB]`` (``rediss+`` for TLS;
the password is the master's; ``?sentinel_password=`` the sentinels' own, if they have one).

The password is the one in the user info (``redis://user:secret@host:6379/0``) or in the query
(``?password=secret``, which redis-py also reads); the user, host, port and database stay, so the
shown URL still says which Redis is meant.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from services.core.errors import ConfigError

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
HIDDEN = "***"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``; never raises (it is used in errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: show nothing that could be a secret
        return HIDDEN
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{hostport}" if colon else netloc
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, HIDDEN if k in ("password", "sentinel_password") else v) for k, v in pairs],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def checked(url: str) -> str:
    """``url``, when it can be a Redis URL; else ``ConfigError``."""
    if not url.startswith(SCHEMES):
        raise ConfigError(
            "redis_url: must start with redis://, rediss://, unix://, redis+sentinel:// or "
            f"rediss+sentinel://, got {redact(url)!r}"
        )
    return url
