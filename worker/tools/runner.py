"""The tools a data worker runs: one rendered playbook tool in, one JSON value (or Arrow table) out.

The playbook was checked against the operator :class:`Policy` when it was
registered; the checks are made again here, at run time, because the policy
may have changed since and because a command on ``CMD_<shard>`` can be
published by anyone who can publish there (defense in depth).

Every failure is a :class:`ToolError` with a short ``type`` and a
``message``, which the worker reports as the ``call.error`` event's
``{"type", "message"}``.

Which code runs a tool is the registry's answer for its ``kind``
(:mod:`worker.tools.registry`; the built-in kinds are in
:mod:`worker.tools.kinds`, their python and http runners
here); a kind the operator does not allow (``NOETL_TOOL_KINDS``) is refused
with type ``denied``.

Credentials: a tool that references keychain aliases (``http`` ``auth``,
``python`` ``credentials``) has them resolved by :class:`ToolRunner` right
before the call, always in the command's own tenant/project, with the
worker's platform key; the values live in memory for that call only. The
result, the error message and the log lines of the call pass through an
:class:`~kernel.masking.ExactMask` of those values, and the success or
failure event records ``credentials: ["alias@version", …]``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import msgspec
import nats.errors
import pyarrow as pa
import structlog
from nats.js import JetStreamContext

from worker.keychain import Keychain, KeychainError, PlatformKey, Resolved, Scope, UnknownCredential, old_keys_from_env
from kernel.masking import ExactMask, masking
from worker.wasm import WasmHost
from worker.worker import Reported
from locator.command import Command
from locator.topology import Topology
from system_playbooks.orchestrate.errors import OrchestrateError
from kernel.errors import ConfigError
from projector.results import ResultStore
from system_playbooks.orchestrate.playbook import CALL_RE, HttpAuth, HttpTool, Policy, PythonTool, tool_kind
from worker.tools.registry import ToolConfig, ToolKind, registry
from worker.tools.wasm_tool import WasmTools

__all__ = [
    "MAX_HTTP_BODY",
    "ToolContext",
    "ToolError",
    "ToolRunner",
    "builtins_result",
    "parse_tool",
    "run_http",
    "run_python",
    "run_tool",
    "tool_aliases",
]

log = structlog.get_logger("noetl.orchestrate.tools")

MAX_HTTP_BODY: Final = 32 * 1024 * 1024
_JSON_TYPES: Final = ("application/json", "+json")


class ToolError(OrchestrateError):
    """A tool failed; ``type`` is a short code (``denied``, ``timeout``, ``http_status``…, or the
    class name of what a Python tool raised) and ``message`` says what happened.

    >>> ToolError("denied", "no").payload()
    {'type': 'denied', 'message': 'no'}
    """

    def __init__(self, type: str, message: str, *, report: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.report = dict(report or {})  # extra fields for the call.error payload (the credentials used)

    def payload(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """Who runs the tool: the step attempt (a Python tool sees it as its ``noetl`` argument) and the policy.

    What a kind's ``run`` may use besides: ``secrets`` (the credentials its config references, resolved from
    the keychain for this call only; :meth:`secret`), ``results`` (the result store, to read an earlier step's
    ``result_ref``; a large result is stored by returning it, or a ``pyarrow.Table``), ``nats`` (the worker's
    NATS connection, ``nats.aio.client.Client``) and ``wasm`` (the plug-in registry).
    """

    execution_id: str
    step: str
    iteration: int | None
    attempt: int
    policy: Policy
    tenant: str = ""
    project: str = ""
    affinity: str = ""
    wasm: WasmTools | None = None  # set once the worker bound the runner to its NATS connection
    results: ResultStore | None = None
    nats: Any = None  # nats.aio.client.Client once bound (nats-py ships no types)
    secrets: Mapping[str, bytes] = dataclasses.field(default_factory=dict, repr=False)  # alias -> value, this call only

    def noetl(self, credentials: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The ``noetl`` argument of a Python tool; with ``credentials`` (name -> alias) their values as text."""
        context: dict[str, Any] = {"execution_id": self.execution_id, "step": self.step, "iteration": self.iteration,
                                   "attempt": self.attempt}  # fmt: skip
        if credentials:
            context["credentials"] = {name: self.secret_text(alias) for name, alias in credentials.items()}
        return context

    def secret(self, alias: str) -> bytes:
        """The resolved value of ``alias``; a ``credential`` :class:`ToolError` when it was not resolved."""
        value = self.secrets.get(alias)
        if value is None:
            raise ToolError("credential", f"credential {alias!r} was not resolved for this call")
        return value

    def secret_text(self, alias: str) -> str:
        try:
            return self.secret(alias).decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError("credential", f"credential {alias!r} is not UTF-8 text") from None


def tool_aliases(tool: ToolConfig) -> list[str]:
    """The keychain aliases ``tool`` references, each once, in order.

    >>> tool_aliases(HttpTool(url="https://x/", auth=HttpAuth(type="bearer", credential="api")))
    ['api']
    """
    aliases = [alias for _, alias in _kind(tool_kind(tool)).credentials(tool)]
    return list(dict.fromkeys(aliases))


def _kind(name: str) -> ToolKind:
    try:
        return registry().kind(name)
    except ConfigError as e:
        raise ToolError("invalid_tool", f"the command's tool is not a valid playbook tool: {e}") from None


def parse_tool(tool: dict[str, Any], policy: Policy) -> ToolConfig:
    """A command's tool as its kind's config; :class:`ToolError` ``denied`` for a kind the operator does not allow,
    ``invalid_tool`` for one that is not installed or a config that does not validate."""
    name = tool.get("kind")
    if not isinstance(name, str):
        raise ToolError("invalid_tool", "the command's tool is not a valid playbook tool: it names no kind")
    kind = _kind(name)
    if not policy.allows_kind(name):
        allowed = ", ".join(policy.tool_kinds) or "none"
        raise ToolError("denied", f"tool kind {name!r} is not allowed by the operator (NOETL_TOOL_KINDS allows: {allowed})")
    try:
        return msgspec.convert(tool, kind.config)
    except msgspec.ValidationError as e:
        raise ToolError("invalid_tool", f"the command's tool is not a valid playbook tool: {e}") from e


def builtins_result(value: Any) -> Any:
    """The result as plain JSON values (a ``pyarrow.Table`` passes as it is)."""
    if isinstance(value, pa.Table):
        return value
    try:
        return msgspec.to_builtins(value)
    except (TypeError, msgspec.EncodeError) as e:
        raise ToolError("bad_result", f"the tool returned a value that is not JSON-serializable: {e}") from e


async def run_tool(tool: dict[str, Any] | ToolConfig, ctx: ToolContext) -> Any:
    """Run one rendered tool (``msgspec.to_builtins`` of a playbook tool) with its kind's runner; return its result.

    Raises :class:`ToolError` on any failure.

    >>> import asyncio
    >>> ctx = ToolContext(execution_id="7", step="a", iteration=None, attempt=1, policy=Policy())
    >>> asyncio.run(run_tool({"kind": "noop", "result": {"x": 1}}, ctx))
    {'x': 1}
    >>> asyncio.run(run_tool({"kind": "python", "call": "os:getcwd"}, ctx))
    Traceback (most recent call last):
    ...
    worker.tools.runner.ToolError: call 'os:getcwd' is not allowed by the operator policy (allowed module prefixes: none)
    """
    config = parse_tool(tool, ctx.policy) if isinstance(tool, dict) else tool
    if not isinstance(tool, dict) and not ctx.policy.allows_kind(tool_kind(config)):
        parse_tool({"kind": tool_kind(config)}, ctx.policy)  # raises denied
    return await _kind(tool_kind(config)).run(config, ctx)


# --- python ---------------------------------------------------------------------------------------


def _resolve(call: str) -> Callable[..., Any]:
    module_name, _, name = call.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import runs arbitrary module code: any failure is the tool's
        raise ToolError("import_error", f"cannot import {module_name!r} for {call!r}: {e!r}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ToolError("import_error", f"{call!r}: module {module_name!r} has no callable {name!r}")
    return fn  # type: ignore[no-any-return]


def _arguments(fn: Callable[..., Any], tool: PythonTool, ctx: ToolContext) -> dict[str, Any]:
    call = tool.call
    if "noetl" in tool.args:
        raise ToolError("bad_args", f"{call!r}: the argument name 'noetl' is reserved for the runtime")
    kwargs = dict(tool.args)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None  # a builtin without a signature: let the call itself complain
    parameter = None if signature is None else signature.parameters.get("noetl")
    takes_noetl = parameter is not None and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    if tool.credentials and not takes_noetl:
        raise ToolError("bad_args", f"{call!r} declares credentials but takes no 'noetl' argument to receive them")
    if signature is None:
        return kwargs
    if takes_noetl:
        kwargs["noetl"] = ctx.noetl(tool.credentials)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise ToolError("bad_args", f"{call!r} does not accept these arguments: {e}") from e
    return kwargs


def _call_sync(tool: PythonTool, ctx: ToolContext) -> tuple[Any, bool]:
    """Import and call in a worker thread; (result, True) or (coroutine function, False) for async ones."""
    fn = _resolve(tool.call)
    if inspect.iscoroutinefunction(fn):
        return fn, False
    kwargs = _arguments(fn, tool, ctx)
    try:
        return fn(**kwargs), True
    except ToolError:
        raise
    except BaseException as e:  # SystemExit from a tool must not stop the worker
        raise ToolError(type(e).__name__, str(e) or type(e).__name__) from e


async def run_python(tool: PythonTool, ctx: ToolContext) -> Any:
    """Call a ``python`` tool's callable (in a thread unless it is a coroutine function)."""
    call = tool.call
    if CALL_RE.fullmatch(call) is None:
        raise ToolError("invalid_tool", f"invalid call {call!r}: expected 'package.module:function'")
    if not ctx.policy.allows_call(call):
        allowed = ", ".join(ctx.policy.python_allow) or "none"
        raise ToolError("denied", f"call {call!r} is not allowed by the operator policy (allowed module prefixes: {allowed})")
    # In a thread: the import and a synchronous tool must not block the loop (heartbeats, other commands).
    value, done = await asyncio.to_thread(_call_sync, tool, ctx)
    if done and not inspect.isawaitable(value):
        return value
    awaitable = value if done else value(**_arguments(value, tool, ctx))
    try:
        return await awaitable
    except ToolError:
        raise
    except (Exception, SystemExit) as e:
        raise ToolError(type(e).__name__, str(e) or type(e).__name__) from e


# --- http -----------------------------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == _JSON_TYPES[0] or media.endswith(_JSON_TYPES[1])


async def run_http(tool: HttpTool, ctx: ToolContext) -> dict[str, Any]:
    """One ``http`` tool request: ``{"status", "headers", "body"}`` (the body decoded when it is JSON)."""
    try:
        parts = urlsplit(tool.url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as e:
        raise ToolError("invalid_tool", f"invalid url {tool.url!r}: {e}") from e
    if parts.scheme not in ("http", "https") or not host:
        raise ToolError("invalid_tool", f"invalid url {tool.url!r}: expected http(s)://host/...")
    if not ctx.policy.allows_host(host):
        allowed = ", ".join(ctx.policy.http_hosts) or "none"
        raise ToolError("denied", f"host {host!r} is not allowed by the operator policy (allowed hosts: {allowed})")
    headers = dict(tool.headers)
    if tool.auth is not None:
        headers[tool.auth.header_name] = _auth_header(tool.auth, ctx)
    content: dict[str, Any] = {}
    if isinstance(tool.body, str):
        content["content"] = tool.body.encode()
    elif tool.body is not None:
        content["json"] = tool.body
    what = f"{tool.method} {tool.url}"
    try:
        # The whole exchange is bounded, not only each read: a server that drips bytes still times out.
        async with asyncio.timeout(tool.timeout):
            # No redirects: a Location on another host would slip past the host allow-list.
            async with httpx.AsyncClient(timeout=tool.timeout, follow_redirects=False) as client:
                async with client.stream(tool.method, tool.url, headers=headers, **content) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_HTTP_BODY:
                            raise ToolError("http_too_large", f"{what}: response body over {MAX_HTTP_BODY} bytes")
    except (httpx.TimeoutException, TimeoutError) as e:
        raise ToolError("timeout", f"{what}: no complete answer within {tool.timeout} s") from e
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise ToolError("http_error", f"{what}: {type(e).__name__}: {e}") from e
    text = body.decode(response.encoding or "utf-8", errors="replace")
    if response.status_code >= 400:
        snippet = text[:500] + ("…" if len(text) > 500 else "")
        raise ToolError("http_status", f"{what} answered {response.status_code}: {snippet}")
    parsed: Any = text if body else None
    if body and _is_json(response.headers.get("content-type", "")):
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            raise ToolError("http_invalid_json", f"{what}: the body says it is JSON but is not: {e}") from e
    return {"status": response.status_code, "headers": dict(response.headers), "body": parsed}


def _auth_header(auth: HttpAuth, ctx: ToolContext) -> str:
    value = ctx.secret_text(auth.credential)
    if any(c in value for c in "\r\n\0"):
        raise ToolError("credential", f"credential {auth.credential!r} holds a line break or NUL: not a header value")
    match auth.type:
        case "bearer":
            return f"Bearer {value}"
        case "basic":
            if ":" not in value:
                raise ToolError("credential", f"credential {auth.credential!r} is not 'user:password' (basic auth)")
            return "Basic " + base64.b64encode(value.encode("utf-8")).decode("ascii")
        case _:
            return value


# --- the worker's runner --------------------------------------------------------------------------


class ToolRunner:
    """What ``worker.worker`` hands each command to: runs its tool under the operator policy.

    >>> # await run_workers(urls, topology, runner=ToolRunner(policy_from_env(os.environ)), ...)
    """

    def __init__(
        self,
        policy: Policy,
        *,
        wasm_host: WasmHost | None = None,
        data_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.policy = policy
        self.wasm_host = wasm_host
        self.wasm: WasmTools | None = None
        self.nats: Any = None
        self.data_dir = data_dir
        # The same store (NOETL_OBJECTS_URL…) the worker puts large results in: tools read earlier ones from it.
        self.results = None if data_dir is None else ResultStore.from_env(data_dir=data_dir, env=env)
        self.env = env
        self.keychain: Keychain | None = None
        self.no_keychain = "this worker is not bound to the keychain"

    def bind(self, js: JetStreamContext, topology: Topology) -> None:
        """Called by the worker with its connection: ``wasm`` tools then load modules from the plug-in registry,
        and credentials are resolved from the keychain with the platform key (``NOETL_KEYCHAIN_KEY``,
        ``NOETL_KEYCHAIN_KEY_FILE`` or ``<data_dir>/keychain.key``)."""
        self.wasm = WasmTools(js, topology, host=self.wasm_host)
        # The core connection under the JetStream context (nats-py keeps it as _nc): nats tools publish on it.
        self.nats = getattr(js, "_nc", None)
        if self.data_dir is None:
            self.no_keychain = "this worker was started without a data directory to find the keychain key in"
            return
        try:
            # The old keys too (NOETL_KEYCHAIN_OLD_KEY_FILES): during a rewrap this worker reads either wrapping.
            self.keychain = Keychain(js, PlatformKey.from_env(data_dir=self.data_dir, env=self.env),
                                     old_keks=old_keys_from_env(self.env), env=self.env)
        except KeychainError as e:
            # Not fatal: steps without credentials run; a step with one fails with call.error type credential.
            self.no_keychain = f"this worker has no keychain key: {e}"
            log.warning("keychain.unavailable", reason=str(e))

    async def _resolve(self, scope: Scope, aliases: list[str]) -> dict[str, Resolved]:
        if self.keychain is None:
            raise ToolError("credential", f"cannot resolve credential {aliases[0]!r}: {self.no_keychain}")
        resolved: dict[str, Resolved] = {}
        for alias in aliases:
            try:
                resolved[alias] = await self.keychain.resolve(scope, alias)
            except UnknownCredential:
                raise ToolError("credential", f"unknown credential {alias!r} in {scope.tenant}/{scope.project}") from None
            except KeychainError as e:
                raise ToolError("credential", f"credential {alias!r}: {e}") from None
            except (nats.errors.Error, OSError) as e:
                raise ToolError("credential", f"credential {alias!r}: the keychain is unreachable: {e!r}") from None
        return resolved

    async def __call__(self, command: Command, *, attempt: int) -> Any:
        ctx = ToolContext(
            execution_id=command.execution_id,
            step=command.step,
            iteration=command.iteration,
            attempt=attempt,
            policy=self.policy,
            tenant=command.tenant,
            project=command.project,
            affinity=command.affinity,
            wasm=self.wasm,
            results=self.results,
            nats=self.nats,
        )
        tool = parse_tool(command.tool, self.policy)
        aliases = tool_aliases(tool)
        if not aliases:
            return await run_tool(tool, ctx)
        # Always the command's own tenant/project: a command naming another tenant's alias resolves nothing of it.
        resolved = await self._resolve(Scope(command.tenant, command.project), aliases)
        used = [f"{alias}@{r.version}" for alias, r in resolved.items()]
        mask = ExactMask(_mask_values(tool, resolved))
        with masking(mask):
            try:
                value = await run_tool(tool, dataclasses.replace(ctx, secrets={a: r.value for a, r in resolved.items()}))
            except ToolError as e:
                raise ToolError(e.type, mask.text(e.message), report={**e.report, "credentials": used}) from None
            except Exception as e:  # noqa: BLE001 - the message may hold a value: mask it, keep the type
                raise ToolError(type(e).__name__, mask.text(str(e) or type(e).__name__),
                                report={"credentials": used}) from None  # fmt: skip
        if isinstance(value, Reported):
            return Reported(mask.value(value.value), {**mask.value(dict(value.payload)), "credentials": used})
        return Reported(mask.value(value), {"credentials": used})


def _mask_values(tool: ToolConfig, resolved: Mapping[str, Resolved]) -> list[bytes]:
    """What to mask: each value, and for basic auth also its password alone (its base64 comes with each)."""
    values = [r.value for r in resolved.values()]
    if isinstance(tool, HttpTool) and tool.auth is not None and tool.auth.type == "basic":
        password = resolved[tool.auth.credential].value.partition(b":")[2]
        if password:
            values.append(password)
    return values
