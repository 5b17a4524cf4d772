"""The browser console at ``/ui/``: the files under ``edge/console/static``, served as they ship in the wheel.

Every answer carries a Content-Security-Policy that allows nothing but this origin (no CDN, no inline
script), so the console runs with no network beyond the edge. The pages hold no data: what they show
comes from the public API, with the token the user pastes (kept in the tab's sessionStorage).
"""

from __future__ import annotations

from importlib.resources import files

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


class ConsoleFiles:
    """StaticFiles over the package's assets, with the console's security headers on every answer."""

    def __init__(self) -> None:
        self.files = StaticFiles(directory=str(files("edge.console") / "static"), html=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.files(scope, receive, send_with_headers)


routes = [Mount("/ui", app=ConsoleFiles(), name="console")]
