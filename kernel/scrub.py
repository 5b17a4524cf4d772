"""Response-boundary scrub: mask credentials in JSON-like data before it leaves the edge.

:func:`scrub` returns a scrubbed deep copy of ``dict``/``list``/``tuple``/``str``/
``int``/``float``/``bool``/``None`` data and never mutates its input;
:func:`scrub_text` masks credentials inside one string.

>>> scrub({"user": "ada", "dbPassword": "hunter2", "token_count": 12,
...        "dsn": {"host": "db", "password": "hunter2"}})
{'user': 'ada', 'dbPassword': '***', 'token_count': 12, 'dsn': '***'}
>>> scrub({"log": "connect to postgres://ada:hunter2@db/app failed", "max_tokens": 256})
{'log': 'connect to postgres://ada:***@db/app failed', 'max_tokens': 256}
>>> scrub_text("GET https://api.example/v1?api_key=abc&page=2 Authorization: Bearer eyJhbGci")
'GET https://api.example/v1?api_key=***&page=2 Authorization: Bearer ***'

Sensitive keys
--------------
A key is *normalised*: camelCase is split (``apiKey`` -> ``api_key``, ``APIKey``
-> ``api_key``), digits are split from the letters before them (``password2`` ->
``password_2``), it is lowercased, and runs of ``-``, ``.``, ``_`` and whitespace
become one ``_``. It is sensitive when one of the terms below occurs in it as a
whole run of ``_``-separated words, so equal, prefix, suffix and middle all count::

    password passwd pwd secret token api_key apikey authorization auth_token
    access_token refresh_token dsn credential credentials private_key
    secret_key client_secret cookie set_cookie session_key
    (and the plurals passwords secrets api_keys apikeys private_keys
    secret_keys access_tokens refresh_tokens cookies)

Masked: ``db_password``, ``x-api-key``, ``Authorization``, ``aws_secret_access_key``,
``privateKey``, ``github_token``, ``refreshToken``, ``password_hash``, ``secrets``.
Not masked, because the term is not a whole word: ``tokens_used``, ``max_tokens``,
``passwordless``, ``dsname``. Bare ``tokens`` is deliberately *not* a term (it is
what language-model usage counters are called).

A matching key is still left alone when it has the shape of a counter or a limit:
its first word is ``max``, ``min`` or ``num``, or its last word is ``count``,
``used``, ``policy`` or ``limit`` (``token_count``, ``max_token``,
``password_policy``, ``secret_used``).

The value under a sensitive key is replaced by :data:`MASK` whatever its type:
a dict or list there is masked whole, and so is ``None``. One exception: the
keychain's audit record, a ``credentials`` key holding a list of
``alias@version`` strings (what a step event records), is kept as it is:
aliases name credentials, they are not credentials.

Strings
-------
Every string value and list item (dict keys are never changed) goes through
:func:`scrub_text`, which masks, anywhere in free text:

* ``scheme://user:pass@host`` -> ``scheme://user:***@host`` for any scheme;
* ``scheme://token@host`` -> ``scheme://***@host`` only for the schemes in
  ``_BARE_USERINFO_SCHEMES`` (so ``ssh://git@host``, ``mailto:`` and e-mail
  addresses are untouched);
* ``name=value`` whose name is a sensitive key: query parameters
  (``?token=abc&x=1``), libpq/ODBC DSNs (``host=h password=p``, ``Pwd=p;``);
  a quoted value keeps its quotes (``password='***'``);
* ``"name": value`` and ``'name': value`` with a sensitive name, as found in
  JSON or Python ``repr`` text embedded in error messages;
* ``Bearer <token>`` (any case) and the credentials of an
  ``Authorization: <scheme> ...`` header line, up to the end of the line or a quote.

Plain prose such as ``password: hunter2`` (no quotes, no ``=``) is *not*
recognised: matching it would mean scanning every timestamp for ``:``.
Masking errs towards hiding: ``the bearer of news`` becomes ``the bearer ***
news``.

Depth
-----
Containers nested deeper than :data:`MAX_DEPTH` levels (the root is level 1) are
replaced whole by :data:`DEPTH_MARK`, which bounds the recursion; JSON decoded by
msgspec has no cycles, so none are looked for.

Values of other types (a ``datetime``, a msgspec ``Struct``) are returned as they
are, neither copied nor scrubbed: convert with ``msgspec.to_builtins`` first.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

from locator.envelope import Envelope

__all__ = ["DEPTH_MARK", "MASK", "MAX_DEPTH", "is_sensitive_key", "scrub", "scrub_text"]

MASK = "***"
DEPTH_MARK = "***depth***"
MAX_DEPTH = 64

# Leaves returned as they are; checked by exact type because that is the fast path.
_ATOMS = frozenset({int, float, bool, type(None)})

_TERMS = ["password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "authorization", "auth_token", "access_token", "refresh_token", "dsn", "credential", "credentials", "private_key", "secret_key", "client_secret", "cookie", "set_cookie", "session_key", "passwords", "secrets", "api_keys", "apikeys", "private_keys", "secret_keys", "access_tokens", "refresh_tokens", "cookies"]
# Longest first so that the alternation prefers the longer term; only whole words match.
_SENSITIVE = re.compile(
    r"(?:^|_)(?:" + "|".join(sorted(_TERMS, key=len, reverse=True)) + r")(?:_|$)"
)
_COUNTER_FIRST = frozenset({"max", "min", "num"})
_COUNTER_LAST = frozenset({"count", "used", "policy", "limit"})

_ACRONYM_BOUNDARY = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_BOUNDARY = re.compile(r"([a-z0-9])([A-Z])")
_DIGIT_BOUNDARY = re.compile(r"([A-Za-z])([0-9])")
_SEPARATORS = re.compile(r"[-.\s_]+")

_BARE_USERINFO_SCHEMES = frozenset(
    ["http", "https", "ftp", "redis", "rediss", "amqp", "amqps", "postgres", "postgresql", "mysql", "mongodb", "mongodb+srv", "nats", "tls", "s3"]
)
# The lookbehind anchors a scheme at a word start, so a long word is not re-scanned from
# every letter. Userinfo runs to the last '@' of the authority (passwords with a raw '@').
_URL_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.\-])(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<userinfo>[^\s/?#\"'<>\\]*)@"
)
_PAIR = re.compile(
    r"(?<![\w.\-])(?P<name>[A-Za-z_][\w.\-]*)="
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s&;\"'<>]*)"
)
_QUOTED_PAIR = re.compile(
    r"(?P<q>[\"'])(?P<name>[^\"'\\\n]{1,64})(?P=q)(?P<sep>\s*:\s*)"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s,}\]{\[\"']+)"
)
_BEARER = re.compile(r"(?i)\b(?P<scheme>bearer)(?P<sep>\s+)[A-Za-z0-9\-._~+/]+=*")
_AUTH_HEADER = re.compile(
    r"(?i)\b(?P<head>authorization\s*:[ \t]*)"
    r"(?:(?P<scheme>basic|bearer|digest|token|negotiate|ntlm|hoba|mutual|aws4-hmac-sha256)[ \t]+)?"
    r"(?P<value>[^\r\n\"']*)"
)


def scrub(value: Any) -> Any:
    """Return a deep copy of JSON-like ``value`` with credentials masked (see the module doc)."""
    return _scrub(value, 0)


def scrub_text(text: str) -> str:
    """Mask credentials in URLs, DSNs, ``name=value`` pairs and bearer tokens inside ``text``."""
    # Cheap substring tests first: most strings (ids, names, timestamps) need no regex at all.
    if "://" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    # Bearer before pairs: "token=Bearer abc" must not mask only the word "Bearer".
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(_mask_bearer, text)
    if "uthorization" in text or "UTHORIZATION" in text:
        text = _AUTH_HEADER.sub(_mask_auth_header, text)
    if "=" in text:
        text = _PAIR.sub(_mask_pair, text)
    if ":" in text and ('"' in text or "'" in text):
        text = _QUOTED_PAIR.sub(_mask_quoted_pair, text)
    return text


@functools.lru_cache(maxsize=4096)
def is_sensitive_key(key: str) -> bool:
    """Whether a value under ``key`` is a credential (rule in the module doc).

    >>> [is_sensitive_key(k) for k in ("clientSecret", "x-api-key", "token_count", "tokens_used")]
    [True, True, False, False]
    """
    normalised = _normalise(key)
    if _SENSITIVE.search(normalised) is None:
        return False
    words = normalised.split("_")
    return words[0] not in _COUNTER_FIRST and words[-1] not in _COUNTER_LAST


def _normalise(key: str) -> str:
    key = _ACRONYM_BOUNDARY.sub(r"\1_\2", key)
    key = _DIGIT_BOUNDARY.sub(r"\1_\2", _CAMEL_BOUNDARY.sub(r"\1_\2", key))
    return _SEPARATORS.sub("_", key.lower()).strip("_")


def _scrub(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is str:
        return scrub_text(value)
    if kind in _ATOMS:
        return value
    if isinstance(value, dict):
        return _scrub_dict(value, depth + 1)
    if isinstance(value, list):
        return _scrub_items(value, depth + 1)
    if isinstance(value, tuple):
        scrubbed = _scrub_items(value, depth + 1)
        return scrubbed if scrubbed is DEPTH_MARK else tuple(scrubbed)
    # A str subclass (an enum member) is still text; anything else is not JSON and passes through.
    return scrub_text(value) if isinstance(value, str) else value


_AUDIT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}@[0-9]{1,18}$")


def _is_audit(key: str, item: Any) -> bool:
    """``credentials: ["api@2", …]``: which keychain versions a step used, never a value."""
    return key == "credentials" and type(item) is list and all(type(u) is str and _AUDIT.match(u) for u in item)


def _scrub_dict(mapping: dict[Any, Any], depth: int) -> dict[Any, Any] | str:
    if depth > MAX_DEPTH:
        return DEPTH_MARK
    scrubbed: dict[Any, Any] = {}
    # The loop inlines the common leaf cases: a call per value would double the cost.
    for key, item in mapping.items():
        if isinstance(key, str) and is_sensitive_key(key):
            scrubbed[key] = list(item) if _is_audit(key, item) else MASK
        elif type(item) is str:
            scrubbed[key] = scrub_text(item)
        elif type(item) in _ATOMS:
            scrubbed[key] = item
        else:
            scrubbed[key] = _scrub(item, depth)
    return scrubbed


def _scrub_items(items: list[Any] | tuple[Any, ...], depth: int) -> list[Any] | str:
    if depth > MAX_DEPTH:
        return DEPTH_MARK
    return [_scrub(item, depth) for item in items]


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match["scheme"], match["userinfo"]
    user, colon, password = userinfo.partition(":")
    if colon:
        masked = f"{user}:{MASK}" if password else userinfo
    elif userinfo and scheme.lower() in _BARE_USERINFO_SCHEMES:
        masked = MASK
    else:
        masked = userinfo
    return f"{scheme}://{masked}@"


def _mask_bearer(match: re.Match[str]) -> str:
    return f"{match['scheme']}{match['sep']}{MASK}"


def _mask_auth_header(match: re.Match[str]) -> str:
    if not match["value"].strip():
        return match[0]
    scheme = f"{match['scheme']} " if match["scheme"] else ""
    return f"{match['head']}{scheme}{MASK}"


def _mask_pair(match: re.Match[str]) -> str:
    value = match["value"]
    if not value or not is_sensitive_key(match["name"]):
        return match[0]
    return f"{match['name']}={_mask_keeping_quotes(value)}"


def _mask_quoted_pair(match: re.Match[str]) -> str:
    if not is_sensitive_key(match["name"]):
        return match[0]
    q = match["q"]
    return f"{q}{match['name']}{q}{match['sep']}{_mask_keeping_quotes(match['value'])}"


def _mask_keeping_quotes(value: str) -> str:
    quote = value[0]
    if quote in "\"'" and len(value) >= 2 and value[-1] == quote:
        return f"{quote}{MASK}{quote}"
    return MASK


def scrub_envelope(env: Envelope) -> Envelope:
    """A copy of ``env`` with its payload and ``result_ref`` scrubbed: build summaries and rows from this.

    Summarise *after* scrubbing: a summary cuts long values, and a cut secret no longer looks like one.

    >>> from locator import new_event
    >>> env = new_event(tenant="a", project="b", execution_id="1", type="user.x", payload={"password": "p" * 80})
    >>> scrub_envelope(env).payload
    {'password': '***'}
    """
    ref = scrub_text(env.result_ref) if env.result_ref else env.result_ref
    return msgspec.structs.replace(env, payload=scrub(env.payload), result_ref=ref)
