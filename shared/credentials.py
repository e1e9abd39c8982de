"""Credentials in source and Redis URLs: one place that masks them for display and logs, and one that
seals a source for the single process that must read it.

``redact_url`` masks the password of every ``scheme://user:password@host`` in a text (a URL, a source
spec or a whole log line) and the values of query parameters that carry secrets (``?pwd=``,
``?token=``...). Everything that shows or logs a source or a Redis URL goes through it.

``seal`` / ``unseal``: a source added through the viewer API reaches ``genderlens up`` through a Redis
stream. Its credentials travel sealed under a key that ``up`` makes at start and hands to its viewer in
the environment, so neither the stream nor anything else in Redis holds them in the clear. The cipher
is Fernet (AES-128-CBC with HMAC-SHA256, timestamped) from the ``cryptography`` package, imported only
when a key is in use: capture and a viewer outside ``up`` never need it.
"""

from __future__ import annotations

import re
from typing import Final

#: A URL inside free text: scheme, then everything up to whitespace or a quote.
_URL: Final = re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*://)([^\s'"<>]+)""")
#: Query parameters whose value is a secret (cheap IP cameras put credentials there).
_SECRET_PARAM: Final = re.compile(
    r"(?i)([?&;](?:password|passwd|pass|pwd|secret|token|access_token|auth|key|apikey|api_key|"
    r"sig|signature|credential|credentials)=)[^&#;]*"
)
MASK: Final = "***"


class CredentialsError(ValueError):
    """A sealed value that cannot be opened (wrong key, tampered with, or too old)."""


def _redact_one(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    if "@" in rest:
        # The user info ends at the last "@": a password may itself hold "@", "/" or ":" (users
        # rarely percent-encode them). A URL whose path or query holds an "@" is over-masked, which
        # is safe; stopping at an earlier "@" could show the end of a password.
        userinfo, _, host_and_rest = rest.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        shown = f"{user}:{MASK}" if sep and not re.search(r"[/?#]", user) else MASK
        rest = f"{shown}@{host_and_rest}"
    return scheme + _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, rest)


def redact_url(text: str) -> str:
    """``rtsp://admin:pw@cam/x`` -> ``rtsp://admin:***@cam/x``; ``redis://:pw@h:6379/0`` ->
    ``redis://:***@h:6379/0``; ``http://cam/v.cgi?user=a&pwd=x`` -> ``...&pwd=***``. Text without a URL
    (a file path, a webcam index) comes back unchanged; so does a URL without credentials."""
    if "://" not in text:
        return text
    return _URL.sub(_redact_one, text)


def has_credentials(text: str) -> bool:
    return redact_url(text) != text


def new_key() -> str | None:
    """A fresh sealing key, or None when the ``cryptography`` package is not installed (then sources
    with credentials cannot be added through the API, and say so)."""
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        return None
    return Fernet.generate_key().decode()


def seal(text: str, key: str) -> str:
    from cryptography.fernet import Fernet

    return Fernet(key.encode()).encrypt(text.encode()).decode()


def unseal(token: str, key: str, max_age_s: int | None = None) -> str:
    """The sealed text; raises :class:`CredentialsError` for a wrong key, a forged or damaged token,
    or one older than ``max_age_s``."""
    from cryptography.fernet import Fernet, InvalidToken

    try:
        return Fernet(key.encode()).decrypt(token.encode(), ttl=max_age_s).decode()
    except (InvalidToken, ValueError) as exc:
        raise CredentialsError("sealed source cannot be opened (wrong key, damaged or expired)") from exc
