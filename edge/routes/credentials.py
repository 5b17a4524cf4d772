"""The keychain over HTTP, for the ``admin`` role: set a credential (PUT), its metadata (GET), list, delete.

The PUT body is the value itself, raw bytes (any content type), 1 to
:data:`worker.keychain.MAX_VALUE` bytes. No response ever holds a value:
reads give metadata only (alias, version, created_at, key id, size).
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import NotFound, Unavailable, Unprocessable
from edge.openapi import BINARY, Media, operation
from edge.responses import json_response, read_body
from edge.state import EdgeState, state_of
from worker.keychain import (
    MAX_VALUE,
    CredentialMeta,
    Keychain,
    KeychainError,
    PlatformKey,
    Scope,
    UnknownCredential,
    check_alias,
)
from locator.names import check_name

BASE = "/api/v1/tenants/{tenant}/projects/{project}/credentials"


class CredentialList(msgspec.Struct):
    # Not under a key named "credentials": the response scrub masks that key whole.
    items: list[CredentialMeta]


def _scope(request: Request) -> Scope:
    state = state_of(request)
    scope = Scope(check_name("tenant", request.path_params["tenant"]), check_name("project", request.path_params["project"]))
    state.auth.check(request.headers.get("authorization"), tenant=scope.tenant, need="admin")
    return scope


def _alias(request: Request) -> str:
    try:
        return check_alias(request.path_params["alias"])
    except KeychainError as e:
        raise Unprocessable(str(e), field="alias") from e


async def _js(state: EdgeState) -> JetStreamContext:
    # The keychain is global, like the catalog: the first cell holds it.
    return await state.cells.js_for_shard(state.topology.cells[0].shards[0])


async def _keychain(request: Request, *, write: bool) -> Keychain:
    key: PlatformKey | None = request.app.state.keychain_key
    if key is None:
        if write:
            raise Unavailable(
                "this edge has no platform key (NOETL_KEYCHAIN_KEY, NOETL_KEYCHAIN_KEY_FILE or <data-dir>/keychain.key): "
                "it cannot store credentials"
            )
        key = PlatformKey.generate()  # metadata and delete neither wrap nor unwrap: a throwaway stands in
    return Keychain(await _js(state_of(request)), key, env={})


@operation(summary="store a credential's next version (the body is the value)", role="admin", tag="credentials",
           body=Media({"application/octet-stream": BINARY | {"minLength": 1, "maxLength": MAX_VALUE}}),
           responses={201: CredentialMeta},
           headers={201: {"Location": "the credential's URL"}})
async def put_credential(request: Request) -> Response:
    scope, alias = _scope(request), _alias(request)
    value = await read_body(request, max_bytes=MAX_VALUE)
    if not value:
        raise Unprocessable("the body must be the credential's value (1 to 16384 bytes), got none", field="body")
    chain = await _keychain(request, write=True)
    meta = await chain.set(scope, alias, value)
    return json_response(meta, status=201, headers={"Location": BASE.format(tenant=scope.tenant, project=scope.project) + f"/{alias}"})


@operation(summary="a credential's metadata (never its value)", role="admin", tag="credentials",
           responses={200: CredentialMeta}, errors=[404])
async def get_credential(request: Request) -> Response:
    scope, alias = _scope(request), _alias(request)
    meta = await (await _keychain(request, write=False)).meta(scope, alias)
    if meta is None:
        raise NotFound(f"no credential {alias!r} in tenant {scope.tenant!r} project {scope.project!r}")
    return json_response(meta)


@operation(summary="the project's credentials' metadata", role="admin", tag="credentials", responses={200: CredentialList})
async def list_credentials(request: Request) -> Response:
    scope = _scope(request)
    return json_response(CredentialList(await (await _keychain(request, write=False)).list(scope)))


@operation(summary="delete a credential, every version", role="admin", tag="credentials", responses={204: None}, errors=[404])
async def delete_credential(request: Request) -> Response:
    scope, alias = _scope(request), _alias(request)
    try:
        await (await _keychain(request, write=False)).delete(scope, alias)
    except UnknownCredential as e:
        raise NotFound(str(e)) from e
    return Response(status_code=204)


routes = [
    Route(BASE, list_credentials, methods=["GET"]),
    Route(BASE + "/{alias}", put_credential, methods=["PUT"]),
    Route(BASE + "/{alias}", get_credential, methods=["GET"]),
    Route(BASE + "/{alias}", delete_credential, methods=["DELETE"]),
]
