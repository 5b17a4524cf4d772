"""The OpenAPI 3.1 document: served without a token, valid, and in step with the app's routes both ways.

In process (httpx's ASGI transport); the document needs no NATS. schemathesis against a live edge is
tests/e2e/test_openapi_fuzz.py.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import schemathesis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.app import create_app
from edge.auth import TokenSpec
from edge.errors import PROBLEM
from edge.openapi import UndeclaredRoute, openapi, operation
from locator import default_topology
from projector.snapshots import SnapshotStore

URL = "/api/v1/openapi.json"


def _app(tmp_path: Any) -> Starlette:
    return create_app(topology=default_topology(), snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
                      tokens=[TokenSpec(name="r", role="read", tenants=("acme",), token="tok-read")])


def _app_operations(app: Starlette) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves and documents (HEAD is Starlette's twin of GET)."""
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.include_in_schema:
            path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
            out |= {(m, path) for m in (route.methods or set()) - {"HEAD"}}
    return out


async def _get(app: Starlette, url: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
        return await client.get(url, **kw)


async def test_served_without_a_token_as_valid_openapi_3_1(tmp_path: Any) -> None:
    response = await _get(_app(tmp_path), URL)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API token (docs/api.md#authentication)"}
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema


async def test_every_route_is_in_the_document_and_every_operation_is_a_route(tmp_path: Any) -> None:
    app = _app(tmp_path)
    doc = openapi(app)  # strict: a route without a declaration raises
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == _app_operations(app)
    served = (await _get(app, URL)).json()
    assert {(m.upper(), p) for p, ops in served["paths"].items() for m in ops} == documented
    for a in ("/api/v1/tenants/{tenant}/projects/{project}/executions", "/api/v1/openapi.json", "/healthz"):
        assert a in doc["paths"]


def test_the_contract_of_every_operation(tmp_path: Any) -> None:
    doc = openapi(_app(tmp_path))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert names == set(re.findall(r"\{(\w+)\}", path)), where
            assert all(p["required"] for p in op["parameters"] if p["in"] == "path"), where
            for status, answer in op["responses"].items():
                if int(status) >= 400:  # every error is a problem document
                    assert list(answer["content"]) == [PROBLEM], where
                    assert answer["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}, where
            assert "500" in op["responses"], where
            if op["security"]:
                assert op["security"] == [{"bearer": []}], where
                assert {"401", "403"} <= set(op["responses"]), where
                assert op["x-noetl-role"] in ("read", "write", "admin"), where
            if names:
                assert "422" in op["responses"], where
    start = doc["paths"]["/api/v1/tenants/{tenant}/projects/{project}/executions"]["post"]
    assert start["x-noetl-role"] == "write"
    assert start["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/StartRequest"}
    assert start["responses"]["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Started"}
    assert {"400", "404", "413", "503"} <= set(start["responses"])
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/api/v1/callbacks/{token}"]["post"]["security"] == []
    projection = doc["components"]["schemas"]["Projection"]
    assert {"execution_id", "status", "steps", "last_seq"} <= set(projection["properties"])


async def test_a_route_without_a_declaration_is_an_error_and_left_out_of_the_served_document(tmp_path: Any) -> None:
    async def undeclared(request: Request) -> Response:
        return Response(status_code=204)

    app = _app(tmp_path)
    app.router.routes.append(Route("/api/v1/undeclared/{thing}", undeclared, methods=["GET"]))
    with pytest.raises(UndeclaredRoute, match=r"GET /api/v1/undeclared/\{thing\} has no @operation"):
        openapi(app)
    served = await _get(app, URL)  # one route's gap is not a 500 for the whole document
    assert served.status_code == 200
    assert "/api/v1/undeclared/{thing}" not in served.json()["paths"]
    assert "/healthz" in served.json()["paths"]


def test_a_path_parameter_without_a_rule_is_an_error() -> None:
    @operation(summary="x", role=None, responses={204: None}, nats=False)
    async def handler(request: Request) -> Response:
        return Response(status_code=204)

    app = Starlette(routes=[Route("/things/{gadget}", handler, methods=["GET"])])
    with pytest.raises(UndeclaredRoute, match="path parameter 'gadget'"):
        openapi(app)


def test_a_route_may_opt_out() -> None:
    async def page(request: Request) -> Response:
        return Response("<html></html>", media_type="text/html")

    app = Starlette(routes=[Route("/ui/", page, methods=["GET"], include_in_schema=False)])
    assert openapi(app)["paths"] == {}
