"""Response-boundary scrub: sensitive keys, credentials in strings, depth bound, copy semantics, properties."""

from __future__ import annotations

import copy
import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.scrub import DEPTH_MARK, MASK, MAX_DEPTH, is_sensitive_key, scrub, scrub_text

SENSITIVE_KEYS = [
    "password",
    "passwd",
    "pwd",
    "Pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "APIKEY",
    "apiKey",
    "APIKey",
    "x-api-key",
    "X-API-Key",
    "Authorization",
    "proxy-authorization",
    "auth_token",
    "access_token",
    "refresh_token",
    "refreshToken",
    "dsn",
    "DATABASE_DSN",
    "credential",
    "credentials",
    "private_key",
    "privateKey",
    "secret_key",
    "client_secret",
    "clientSecret",
    "cookie",
    "Set-Cookie",
    "session_key",
    "db_password",
    "DB_PASSWORD",
    "dbPassword",
    "aws_secret_access_key",
    "github_token",
    "password_hash",
    "user password",
    "db.password",
    "secrets",
    "passwords",
    "password2",
    "apiKey2",
    "oauth2Token",
    "__token__",
]
NON_SENSITIVE_KEYS = [
    "tokens_used",
    "token_count",
    "tokenCount",
    "max_tokens",
    "max_token",
    "min_password_length",
    "num_tokens",
    "password_policy",
    "passwordPolicy",
    "secret_used",
    "rate_limit",
    "token_limit",
    "tokens",
    "passwordless",
    "dsname",
    "user",
    "username",
    "author",
    "keyboard",
    "tokenizer",
    "cookbook",
    "id",
]


@pytest.mark.parametrize("key", SENSITIVE_KEYS)
def test_sensitive_key_is_masked_whatever_the_value(key: str) -> None:
    assert is_sensitive_key(key)
    for value in ("s3cr3t", 42, 1.5, True, None, {"nested": "x"}, ["a", "b"]):
        assert scrub({key: value, "other": 1}) == {key: MASK, "other": 1}


@pytest.mark.parametrize("key", NON_SENSITIVE_KEYS)
def test_non_secret_key_is_kept(key: str) -> None:
    assert not is_sensitive_key(key)
    assert scrub({key: 128}) == {key: 128}
    assert scrub({key: "plain"}) == {key: "plain"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgres://u:***@h:5432/db"),
        ("postgresql://admin:hunter2@db.internal/app", "postgresql://admin:***@db.internal/app"),
        ("custom+proto://me:pw@host", "custom+proto://me:***@host"),
        ("ssh://git:pw@host/repo", "ssh://git:***@host/repo"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("mysql://u:p@ss@h/db", "mysql://u:***@h/db"),
        ("HTTPS://U:P@H/", "HTTPS://U:***@H/"),
        ("redis://tok3n@cache:6379", "redis://***@cache:6379"),
        ("https://ghp_abc@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("mongodb+srv://tok@cluster.x/db", "mongodb+srv://***@cluster.x/db"),
        ("nats://tok@n:4222", "nats://***@n:4222"),
        ("s3://AKIAKEY@bucket/path", "s3://***@bucket/path"),
        (
            "connect to postgres://u:p@h:5432/db failed, retry amqp://guest:guest@mq//",
            "connect to postgres://u:***@h:5432/db failed, retry amqp://guest:***@mq//",
        ),
        ('{"url": "http://a:b@h"}', '{"url": "http://a:***@h"}'),
        ("https://h/x?token=abc&x=1", "https://h/x?token=***&x=1"),
        ("https://h/x?x=1&api_key=k-123&y=2", "https://h/x?x=1&api_key=***&y=2"),
        ("https://h/x?X-Amz-Credential=AK/2024&X-Amz-Signature=s", "https://h/x?X-Amz-Credential=***&X-Amz-Signature=s"),
        ("postgres://u:p@h/db?password=p2", "postgres://u:***@h/db?password=***"),
        ("host=db user=app password=hunter2 dbname=x", "host=db user=app password=*** dbname=x"),
        ("host=db password='a b c' port=5432", "host=db password='***' port=5432"),
        ('Server=s;Database=d;Uid=u;Pwd=p4ss;', "Server=s;Database=d;Uid=u;Pwd=***;"),
        ("login failed token=abc", "login failed token=***"),
        ("Authorization: Bearer xyz", "Authorization: Bearer ***"),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("authorization: opaque-cred more\nnext line", "authorization: ***\nnext line"),
        ("sent Bearer eyJhbGciOi.J9.x-_y== to upstream", "sent Bearer *** to upstream"),
        ("bearer abc", "bearer ***"),
        ("token=Bearer abc", "token=*** ***"),
        ('body {"user": "ada", "password": "hunter2"}', 'body {"user": "ada", "password": "***"}'),
        ("body {'user': 'ada', 'apiKey': 'k'}", "body {'user': 'ada', 'apiKey': '***'}"),
        ('{"secret": 12345, "n": 1}', '{"secret": ***, "n": 1}'),
    ],
)
def test_credentials_in_text_are_masked(text: str, expected: str) -> None:
    assert scrub_text(text) == expected
    assert scrub({"message": text}) == {"message": expected}
    assert scrub([text]) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "plain words with no secrets",
        "2024-05-01T12:00:00Z",
        "mailto:ada@example.com",
        "ada@example.com",
        "see https://example.com/@ada and ada@example.com",
        "https://example.com/path?page=2&sort=asc",
        "https://example.com/path?max_tokens=5&token_count=2",
        "ssh://git@github.com/o/r.git",
        "git+ssh://git@github.com/o/r.git",
        "ftp://@host/",
        "postgres://u:@h/db",
        "a=1, b=2",
        "x == y",
        "token=",
        '{"user": "ada", "tokens_used": 12}',
        "Basic setup complete",
        "the token expired",
    ],
)
def test_text_without_credentials_is_unchanged(text: str) -> None:
    assert scrub_text(text) == text


def test_nested_structures_are_scrubbed_at_every_level() -> None:
    doc = {
        "id": "run-1",
        "steps": [
            {"name": "fetch", "env": {"DB_DSN": "postgres://u:p@h/db", "HOME": "/root"}},
            {"name": "call", "headers": {"Authorization": "Bearer t", "Accept": "*/*"}},
            ["redis://:pw@cache", {"apiKey": ["a", "b"]}],
        ],
        "credentials": {"user": "ada", "password": "x"},
        "usage": {"tokens_used": 10, "max_tokens": 100},
    }
    assert scrub(doc) == {
        "id": "run-1",
        "steps": [
            {"name": "fetch", "env": {"DB_DSN": MASK, "HOME": "/root"}},
            {"name": "call", "headers": {"Authorization": MASK, "Accept": "*/*"}},
            ["redis://:***@cache", {"apiKey": MASK}],
        ],
        "credentials": MASK,
        "usage": {"tokens_used": 10, "max_tokens": 100},
    }


def test_dict_keys_are_never_changed() -> None:
    key = "postgres://u:p@h"
    assert scrub({key: 1}) == {key: 1}


def test_non_string_keys_and_other_types_pass_through() -> None:
    assert scrub({1: "a", None: 2.5}) == {1: "a", None: 2.5}
    marker = object()
    assert scrub([marker])[0] is marker


def test_tuples_stay_tuples() -> None:
    assert scrub(("x", {"token": "t"})) == ("x", {"token": MASK})


def test_input_is_not_mutated_and_output_shares_no_containers() -> None:
    doc: dict[str, Any] = {
        "a": {"password": "p", "list": ["postgres://u:p@h", {"token": "t"}]},
        "b": [1, 2, {"c": "d"}],
    }
    before = copy.deepcopy(doc)
    out = scrub(doc)
    assert doc == before
    out["b"][2]["c"] = "changed"
    out["b"].append(3)
    assert doc == before


def nest(depth: int) -> Any:
    doc: Any = "leaf"
    for _ in range(depth):
        doc = {"k": doc}
    return doc


def test_containers_beyond_max_depth_are_replaced_by_a_marker() -> None:
    assert scrub(nest(MAX_DEPTH)) == nest(MAX_DEPTH)
    deep = scrub(nest(MAX_DEPTH + 1))
    for _ in range(MAX_DEPTH):
        deep = deep["k"]
    assert deep == DEPTH_MARK


def test_depth_marker_for_lists_and_tuples() -> None:
    doc: Any = ["leaf"]
    for _ in range(MAX_DEPTH):
        doc = [doc]
    out = scrub(doc)
    for _ in range(MAX_DEPTH - 1):
        out = out[0]
    assert out == [DEPTH_MARK]


def test_depth_marker_for_tuples() -> None:
    doc: Any = ("leaf",)
    for _ in range(MAX_DEPTH):
        doc = (doc,)
    out = scrub(doc)
    for _ in range(MAX_DEPTH - 1):
        out = out[0]
    assert out == (DEPTH_MARK,)


# --- properties ------------------------------------------------------------------

# Plain text that cannot contain the secret marker ("ZZ") but does exercise the URL and pair checks.
_PLAIN = st.text(alphabet=string.ascii_lowercase + string.digits + " :/@=?&.-_'\"", max_size=30)
_SAFE_KEY = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12).filter(
    lambda k: not is_sensitive_key(k)
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _PLAIN,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_SAFE_KEY, children, max_size=4),
    max_leaves=20,
)
# Siblings stay small: the point is the random position, and generating big ones is slow.
_SIBLING = st.none() | st.integers() | _PLAIN | st.dictionaries(_SAFE_KEY, _PLAIN, max_size=2)
_TERMS = [
    "password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "authorization", "auth_token",
    "access_token", "refresh_token", "dsn", "credential", "credentials", "private_key", "secret_key",
    "client_secret", "cookie", "set_cookie", "session_key",
]  # fmt: skip
_SECRET = st.text(alphabet="0123456789abcdef", min_size=8, max_size=16).map(lambda s: "ZZ" + s)


@st.composite
def sensitive_keys(draw: st.DrawFn) -> str:
    words = draw(st.sampled_from(_TERMS)).split("_")
    prefix = draw(st.sampled_from([[], ["db"], ["x"], ["aws"], ["github"], ["my", "app"]]))
    suffix = draw(st.sampled_from([[], ["value"], ["hash"], ["id"]]))
    words = prefix + words + suffix
    style = draw(st.sampled_from(["snake", "kebab", "camel", "upper", "space"]))
    if style == "camel":
        return words[0] + "".join(w.capitalize() for w in words[1:])
    if style == "kebab":
        return "-".join(words)
    if style == "upper":
        return "_".join(words).upper()
    return (" " if style == "space" else "_").join(words)


def bury(draw: st.DrawFn, payload: Any) -> Any:
    """Wrap ``payload`` in a random number of random containers with random siblings."""
    for _ in range(draw(st.integers(min_value=0, max_value=12))):
        siblings = draw(st.lists(_SIBLING, max_size=3))
        if draw(st.booleans()):
            position = draw(st.integers(min_value=0, max_value=len(siblings)))
            payload = siblings[:position] + [payload] + siblings[position:]
        else:
            mapping = {f"k{i}": s for i, s in enumerate(siblings)}
            mapping[draw(_SAFE_KEY)] = payload
            payload = mapping
    return payload


@st.composite
def documents_with_a_secret_under_a_key(draw: st.DrawFn) -> tuple[Any, str]:
    secret = draw(_SECRET)
    value = draw(st.sampled_from([secret, [secret], {"inner": secret}, [{"v": [secret]}]]))
    return bury(draw, {draw(sensitive_keys()): value, "n": draw(_JSON)}), secret


@st.composite
def documents_with_a_secret_in_text(draw: st.DrawFn) -> tuple[Any, str]:
    secret = draw(_SECRET)
    template = draw(
        st.sampled_from(
            [
                "postgres://user:{}@db:5432/app",
                "failed: redis://{}@cache:6379 unreachable",
                "https://api.example/v1?page=2&api_key={}&x=1",
                "host=db user=app password={} dbname=d",
                "Authorization: Bearer {}",
                "call with bearer {} done",
                'payload {{"user": "ada", "client_secret": "{}"}}',
            ]
        )
    )
    text = draw(_PLAIN) + " " + template.format(secret) + " " + draw(_PLAIN)
    return bury(draw, {draw(_SAFE_KEY): text}), secret


@settings(max_examples=300)
@given(documents_with_a_secret_under_a_key())
def test_a_secret_under_a_sensitive_key_never_leaks(case: tuple[Any, str]) -> None:
    doc, secret = case
    assert secret not in json.dumps(scrub(doc))


@settings(max_examples=300)
@given(documents_with_a_secret_in_text())
def test_a_secret_in_a_url_dsn_or_header_never_leaks(case: tuple[Any, str]) -> None:
    doc, secret = case
    assert secret not in json.dumps(scrub(doc))


_CLEAN_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ./-_,!?#%()", max_size=40).filter(
    lambda s: "earer" not in s.lower() and "uthorization" not in s.lower()
)
_CLEAN_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _CLEAN_TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_SAFE_KEY, children, max_size=5),
    max_leaves=30,
)


@given(_CLEAN_JSON)
def test_documents_without_credentials_come_back_equal(doc: Any) -> None:
    assert scrub(doc) == doc


_FRAGMENTS = st.sampled_from(
    [
        "postgres://", "https://", "redis://", "u", ":", "p", "@", "h", "/", "?", "&", "=", ";", " ", "\n",
        '"', "'", "token", "password", "Bearer ", "Authorization: ", "Basic ", "***", "{", "}", "x",
    ]
)  # fmt: skip


@settings(max_examples=500)
@given(st.lists(_FRAGMENTS, max_size=14).map("".join))
def test_scrub_text_is_idempotent(text: str) -> None:
    once = scrub_text(text)
    assert scrub_text(once) == once


@given(_JSON, sensitive_keys())
def test_scrub_is_idempotent(doc: Any, key: str) -> None:
    doc = {key: doc, "d": doc, "u": "postgres://u:p@h?token=t"}
    once = scrub(doc)
    assert scrub(once) == once
