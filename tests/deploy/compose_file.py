"""``deploy/docker-compose.yml`` loaded and checked in Python, with no ``docker-compose`` binary.

What ``docker compose config`` does, as far as the deploy tests need it: read the
YAML (anchors and ``<<`` merge keys are PyYAML's), interpolate ``${VAR}``,
``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``,
``$VAR`` and ``$$`` in every string value from a ``.env`` file, and validate the
result against the Compose specification's JSON schema (the copy vendored in the
``check-jsonschema`` wheel, Apache-2.0, from github.com/compose-spec/compose-spec).

Unlike Compose, a variable that is not set is an error naming it (Compose warns
and substitutes an empty string), and only the ``.env`` file is read, not the
process environment, so the tests see what the repository ships.

>>> interpolate("s3://${BUCKET}/objects, $$HOME, ${PORT:-4222}", {"BUCKET": "noetl"})
's3://noetl/objects, $HOME, 4222'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from jsonschema.validators import validator_for

__all__ = ["ComposeError", "compose_errors", "interpolate", "load_compose", "parse_port", "read_env_file"]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(
    rf"\$(?:(?P<escaped>\$)|\{{(?P<braced>{_NAME})(?:(?P<op>:?[-?])(?P<arg>[^}}]*))?\}}|(?P<named>{_NAME})|(?P<invalid>))"
)


class ComposeError(Exception):
    """The compose file cannot be resolved: a variable not set, a bad ``$`` expression, a bad ``.env`` line."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped, one pair of surrounding quotes is removed."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(_NAME, key):
            raise ComposeError(f"{path.name}:{number}: not a KEY=VALUE line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute Compose's ``$`` expressions in one string; a variable that is not set raises ComposeError."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None and match["braced"] is None and match["named"] is None:
            raise ComposeError(f"invalid interpolation in {text!r}: a '$' must start $NAME, ${{NAME}} or $$")
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"]
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else str(value)
        if op in (":?", "?") and empty:
            raise ComposeError(f"variable {name} is not set in .env: {arg}")
        if value is None:
            raise ComposeError(f"variable {name} is not set in .env (used in {text!r})")
        return value

    return _VARIABLE.sub(one, text)


def _interpolate_values(node: Any, env: Mapping[str, str]) -> Any:
    # Values only: Compose never interpolates mapping keys.
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_values(item, env) for item in node]
    return node


def compose_errors(doc: Any) -> list[str]:
    """Every place where ``doc`` breaks the Compose specification's JSON schema, as ``path: message``."""
    schema = get_builtin_schema("vendor.compose-spec")
    cls = validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def load_compose(path: Path, env_file: Path | None = None) -> dict[str, Any]:
    """The compose file with its ``.env`` (beside it by default) interpolated, or ComposeError; not yet validated."""
    env = read_env_file(env_file or path.parent / ".env")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ComposeError(f"{path.name} is not a mapping")
    resolved: dict[str, Any] = _interpolate_values(doc, env)
    return resolved


def parse_port(entry: str | int | dict[str, Any]) -> dict[str, Any]:
    """A ports entry in Compose's long form: ``"8081:8080"`` is ``{"published": 8081, "target": 8080}``."""
    if isinstance(entry, dict):
        return entry
    text = str(entry)
    proto = "tcp"
    if "/" in text:
        text, proto = text.split("/", 1)
    parts = text.split(":")
    if len(parts) > 3 or not parts[-1].isdigit():
        raise ComposeError(f"ports entry {entry!r} is not [[host:]published:]target[/protocol]")
    port: dict[str, Any] = {"target": int(parts[-1]), "protocol": proto}
    if len(parts) >= 2:
        port["published"] = int(parts[-2])
    if len(parts) == 3:
        port["host_ip"] = parts[0]
    return port
