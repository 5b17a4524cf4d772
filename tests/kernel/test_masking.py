"""Exact-value masking (kernel.masking) and the scrub's one exception for the keychain's audit record."""

from __future__ import annotations

import base64
import io
import sys

import pyarrow as pa
import structlog

from kernel.logs import configure_logging
from kernel.masking import ExactMask, active_mask, masking
from kernel.scrub import scrub

SECRET = b"sk-live-0123456789abcdef"


def test_every_form_of_every_value_is_masked_and_nothing_else() -> None:
    mask = ExactMask([SECRET, b"ada:pa55word", b""])
    b64 = base64.b64encode(SECRET).decode()
    url = base64.urlsafe_b64encode(b"\xfb\xff" + SECRET).decode()
    value = {
        "plain": f"token {SECRET.decode()} twice {SECRET.decode()}",
        "b64": b64, "unpadded": b64.rstrip("="), "basic": "Basic " + base64.b64encode(b"ada:pa55word").decode(),
        SECRET.decode(): [1, 2.5, None, True, ("in", "a", SECRET.decode())], "bytes": b"x" + SECRET,
        "other": "sk-live-0123456789abcdeX is not it", "url_b64": url,
    }  # fmt: skip
    out = mask.value(value)
    assert out == {
        "plain": "token *** twice ***", "b64": "***", "unpadded": "***", "basic": "Basic ***",
        "***": [1, 2.5, None, True, ["in", "a", "***"]], "bytes": b"x***",
        "other": "sk-live-0123456789abcdeX is not it", "url_b64": url,
    }  # fmt: skip
    assert value["plain"].count(SECRET.decode()) == 2  # the input is not changed
    assert ExactMask([b"abc"]).text("xxabcabcxx") == "xx******xx"
    assert not ExactMask([]) and ExactMask([]).value({"a": "b"}) == {"a": "b"}


def test_a_value_inside_another_is_masked_whole() -> None:
    assert ExactMask([b"abc", b"xxabcxx"]).text("1 xxabcxx 2 abc") == "1 *** 2 ***"


def test_an_arrow_table_is_masked_by_value_and_left_alone_without_one() -> None:
    mask = ExactMask([SECRET])
    clean = pa.table({"a": [1, 2], "s": ["x", "y"]})
    assert mask.value(clean) is clean
    dirty = pa.table({"a": [1, 2], "s": ["x", SECRET.decode()], "n": [{"k": SECRET.decode()}, {"k": "v"}]})
    out = mask.value(dirty)
    assert out.schema == dirty.schema
    assert out.to_pylist() == [{"a": 1, "s": "x", "n": {"k": "***"}}, {"a": 2, "s": "***", "n": {"k": "v"}}]


def test_log_lines_inside_a_masking_block_are_masked(monkeypatch: object) -> None:
    err = io.StringIO()
    real = sys.stderr
    sys.stderr = err
    try:
        configure_logging(level="info", fmt="json")
        log = structlog.get_logger("t")
        with masking(ExactMask([SECRET])):
            assert active_mask() is not None
            log.info("inside", value=SECRET.decode(), nested={"k": [SECRET.decode()]})
        assert active_mask() is None
        log.info("outside", value=SECRET.decode())
    finally:
        sys.stderr = real
        structlog.reset_defaults()
    inside, outside = err.getvalue().splitlines()
    assert SECRET.decode() not in inside and '"value": "***"' in inside and '"k": ["***"]' in inside
    assert SECRET.decode() in outside  # only a call's own mask applies; the key-name scrub is the edge's


def test_the_scrub_keeps_the_audit_record_and_masks_anything_else_under_credentials() -> None:
    assert scrub({"credentials": ["api@2", "tenant-db@11"], "result": 1}) == {"credentials": ["api@2", "tenant-db@11"], "result": 1}
    assert scrub({"credentials": ["api@2", "hunter2"]}) == {"credentials": "***"}
    assert scrub({"credentials": {"api": "api"}}) == {"credentials": "***"}
    assert scrub({"credentials": "api@2"}) == {"credentials": "***"}
    assert scrub({"credential": ["api@2"]}) == {"credential": "***"}
