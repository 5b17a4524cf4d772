"""Playbooks in the catalog: register a version (PUT), read one (GET), list a project's."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import yaml
from nats.js.errors import BucketNotFoundError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import BadRequest, EdgeError, NotFound, Unavailable, Unprocessable
from edge.openapi import Media, Param, operation
from edge.responses import MAX_BODY_DEPTH, decode_json, json_response, read_body
from edge.state import EdgeState, state_of
from locator.names import check_name
from locator.subjects import CATALOG_BUCKET
from system_playbooks.orchestrate.catalog import Catalog, PlaybookNotFound, VersionConflict
from system_playbooks.orchestrate.latest import LatestVersions
from system_playbooks.orchestrate.playbook import Playbook, PlaybookError, Policy, load_playbook, parse_playbook

BASE = "/api/v1/tenants/{tenant}/projects/{project}/playbooks"
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
_YAML_EVENTS = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: C speed, its own nesting limit


class Conflict(EdgeError):
    status, title = 409, "Conflict"


class Listed(msgspec.Struct, frozen=True):
    path: str
    version: int


class PlaybookList(msgspec.Struct):
    playbooks: list[Listed]


class PlaybookVersionDoc(msgspec.Struct, kw_only=True):
    # ``playbook`` is the registered document as plain JSON, not the request's Playbook schema: the response
    # scrub masks credential aliases (a python step's {"credentials": {...}} answers as "***").
    path: str
    version: int
    playbook: dict[str, Any]


class Registered(msgspec.Struct, kw_only=True):
    """A PUT's answer: ``created`` false when the same document was already the latest version (a 200)."""

    path: str
    version: int
    created: bool
    playbook: dict[str, Any]


def _names(request: Request) -> tuple[str, str]:
    return check_name("tenant", request.path_params["tenant"]), check_name("project", request.path_params["project"])


def policy_of(request: Request) -> Policy:
    policy: Policy = request.app.state.policy
    return policy


async def catalog_of(state: EdgeState) -> Catalog:
    """The catalog, in the KV bucket of the first cell (503 when the bucket does not exist)."""
    # The catalog is global: it lives on the first cell, next to the first shard's streams.
    try:
        # Kept only with its keychain bucket: one created later must still be found for alias checks.
        return await state.cells.held(
            state.topology.cells[0].shards[0], "catalog", Catalog.open, keep=lambda c: c.keychain is not None
        )
    except BucketNotFoundError as e:
        raise Unavailable(f"KV bucket {CATALOG_BUCKET!r} does not exist: bootstrap the topology first") from e


async def latest_of(state: EdgeState) -> LatestVersions:
    """The catalog's ``latest`` pointers as this edge remembers them (503 when the bucket does not exist)."""
    try:
        return await state.cells.held(state.topology.cells[0].shards[0], "latest", LatestVersions.open)
    except BucketNotFoundError as e:
        raise Unavailable(f"KV bucket {CATALOG_BUCKET!r} does not exist: bootstrap the topology first") from e


def _yaml_too_deep(raw: bytes) -> bool:
    """Whether YAML text nests deeper than a JSON body may, told by the parser's events before any loader
    walks it (PyYAML's flow scanning is quadratic in the depth: 5,000 ``[`` take seconds)."""
    depth = 0
    try:
        for event in yaml.parse(raw, Loader=_YAML_EVENTS):
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_BODY_DEPTH:
                    return True
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
    except yaml.YAMLError as e:
        return "nesting" in str(e)  # libyaml's own depth limit; any other error is the loader's to report
    return False


def _validate(raw: bytes, content_type: str, policy: Policy) -> tuple[Playbook, bytes | dict[str, Any]]:
    """The playbook and the source to register: YAML text, or the decoded JSON document."""
    try:
        if content_type in YAML_TYPES:
            # YAML is only another spelling of the document: the same depth limit as JSON.
            if _yaml_too_deep(raw):
                raise BadRequest(f"the playbook is nested more than {MAX_BODY_DEPTH} levels deep", reason="too_deep")
            playbook = load_playbook(raw, policy=policy)
            msgspec.json.encode(playbook)  # and text only: a "\\ud800" escape is a lone surrogate, which no JSON carries
            return playbook, raw
        doc = decode_json(raw, what="request body (send YAML as application/yaml)")
        if not isinstance(doc, dict):
            raise PlaybookError("a playbook must be an object")
        return parse_playbook(doc, policy=policy), doc
    except PlaybookError as e:
        raise Unprocessable(f"invalid playbook: {e}", field=e.path) from e
    except UnicodeError as e:
        raise BadRequest(f"the playbook has a string that is not text (a lone surrogate escape?): {e}", reason="not_utf8") from e
    except RecursionError as e:  # block nesting that the pure-Python loader recurses into
        raise BadRequest(f"the playbook is nested more than {MAX_BODY_DEPTH} levels deep", reason="too_deep") from e


def _url(tenant: str, project: str, playbook: Playbook) -> str:
    return BASE.format(tenant=tenant, project=project) + f"/{playbook.path}?version={playbook.version}"


def _version_param(request: Request) -> int | None:
    raw = request.query_params.get("version")
    if raw is None or raw == "" or raw == "latest":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 16 or not 1 <= int(raw) <= 2**53:
        raise Unprocessable(f"query parameter 'version' must be a positive integer or 'latest', got {raw!r}", field="version")
    return int(raw)


@operation(summary="register a playbook version (YAML or JSON)", role="write", tag="playbooks",
           body=Media({"application/json": Playbook, "application/yaml": {"type": "string"}}),
           responses={200: Registered, 201: Registered}, errors=[409],
           headers={200: {"Location": "the version's URL"}, 201: {"Location": "the version's URL"}})
async def put_playbook(request: Request) -> Response:
    state = state_of(request)
    tenant, project = _names(request)
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="write")
    raw = await read_body(request, max_bytes=state.max_body)
    if not raw:
        raise BadRequest("the body must be the playbook, as YAML (application/yaml) or JSON")
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    # Off the event loop: parsing a large YAML document in pure Python must not stall every other request.
    playbook, source = await asyncio.to_thread(_validate, raw, content_type, policy_of(request))
    path = request.path_params["path"]
    if playbook.path != path:
        raise Unprocessable(f"the playbook's path {playbook.path!r} disagrees with the URL ({path!r})", field="path")
    try:
        registered = await (await catalog_of(state)).add(tenant, project, source, policy=policy_of(request))
    except VersionConflict as e:
        raise Conflict(str(e)) from e
    except PlaybookError as e:  # an unregistered wasm plug-in, an unset keychain alias (or a policy change since _validate)
        raise Unprocessable(f"invalid playbook: {e}", field=e.path) from e
    pb = registered.playbook
    (await latest_of(state)).note(tenant, project, pb.path, pb.version)
    return json_response(
        Registered(path=pb.path, version=pb.version, created=registered.created, playbook=msgspec.to_builtins(pb)),
        status=201 if registered.created else 200,
        headers={"Location": _url(tenant, project, pb)},
    )


@operation(summary="one playbook version (the latest without ?version)", role="read", tag="playbooks", params=[
    Param(name="version", schema={"anyOf": [{"type": "integer", "minimum": 1, "maximum": 2**53}, {"const": "latest"}]},
          description="a version number, or latest"),
], responses={200: PlaybookVersionDoc}, errors=[404])
async def get_playbook(request: Request) -> Response:
    state = state_of(request)
    tenant, project = _names(request)
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    version = _version_param(request)
    try:
        pb = await (await catalog_of(state)).get(tenant, project, request.path_params["path"], version)
    except PlaybookNotFound as e:
        raise NotFound(str(e)) from e
    return json_response(PlaybookVersionDoc(path=pb.path, version=pb.version, playbook=msgspec.to_builtins(pb)))


@operation(summary="the project's playbooks (the latest version of each)", role="read", tag="playbooks",
           responses={200: PlaybookList})
async def list_playbooks(request: Request) -> Response:
    state = state_of(request)
    tenant, project = _names(request)
    state.auth.check(request.headers.get("authorization"), tenant=tenant, need="read")
    found = await (await catalog_of(state)).list(tenant, project)
    return json_response(PlaybookList([Listed(path, version) for path, version in found]))


routes = [
    Route(BASE, list_playbooks, methods=["GET"]),
    Route(BASE + "/{path:path}", put_playbook, methods=["PUT"]),
    Route(BASE + "/{path:path}", get_playbook, methods=["GET"]),
]
