"""The object storage under one base URL, shared by snapshot segments and large results.

``file://`` by default, ``s3://`` through s3fs; see :meth:`ObjectRoot.from_env`
for the settings. Writes are atomic: a reader sees a whole object or none.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import fsspec.core
from fsspec.implementations.local import LocalFileSystem

_AWS_CREDENTIALS: Final = (
    ("AWS_ACCESS_KEY_ID", "key"),
    ("AWS_SECRET_ACCESS_KEY", "secret"),
    ("AWS_SESSION_TOKEN", "token"),
)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectRoot:
    """An fsspec file system rooted at ``base_url``.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = ObjectRoot(f"file://{tmp.name}/objects")
    >>> uri = root.write(root.path("a", "b.bin"), b"hi")
    >>> root.read(root.path_of(uri))
    b'hi'
    >>> tmp.cleanup()
    """

    def __init__(self, base_url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.base = fsspec.core.url_to_fs(self.base_url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        protocol = self.fs.protocol
        self.protocols: tuple[str, ...] = (protocol,) if isinstance(protocol, str) else tuple(protocol)

    @classmethod
    def from_env(cls, *, data_dir: Path, env: Mapping[str, str] | None = None) -> ObjectRoot:
        """``NOETL_OBJECTS_URL`` (default ``file://<data_dir>/objects``); for ``s3://`` also
        ``NOETL_S3_ENDPOINT_URL`` and the usual ``AWS_*`` credentials and region."""
        env = os.environ if env is None else env
        url = env.get("NOETL_OBJECTS_URL") or f"file://{data_dir.absolute()}/objects"
        options: dict[str, Any] = {}
        if url.startswith(("s3://", "s3a://")):
            # botocore reads os.environ itself; an explicit mapping must be passed on.
            if endpoint := env.get("NOETL_S3_ENDPOINT_URL"):
                options["endpoint_url"] = endpoint
            for var, option in _AWS_CREDENTIALS:
                if value := env.get(var):
                    options[option] = value
            if region := env.get("AWS_DEFAULT_REGION"):
                options["client_kwargs"] = {"region_name": region}
        return cls(url, storage_options=options)

    def path(self, *parts: str) -> str:
        """The file system path of ``<base>/<parts…>``."""
        return "/".join((self.base, *parts))

    def uri(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def path_of(self, uri: str) -> str:
        """The path of a full URI; ``ValueError`` if it is on another file system."""
        protocol, _ = fsspec.core.split_protocol(uri)
        if protocol not in self.protocols:
            raise ValueError(f"{uri!r} is not on this store's file system ({self.base_url})")
        return str(self.fs._strip_protocol(uri))

    def write(self, path: str, data: bytes) -> str:
        """Write ``data`` to ``path`` atomically; return its full URI. Raises ``OSError``."""
        if self.local:
            self._write_local(path, data)
        else:
            self.fs.pipe_file(path, data)  # an S3 PUT is atomic already
        return self.uri(path)

    def read(self, path: str) -> bytes:
        """The whole object; ``FileNotFoundError`` if there is none."""
        return bytes(self.fs.cat_file(path))

    def _write_local(self, path: str, data: bytes) -> None:
        directory, _, name = path.rpartition("/")
        self.fs.makedirs(directory, exist_ok=True)
        # A unique temp name: two writers of one path never share (or delete) each other's temp file.
        temp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.fs.mv(temp, path)
        except BaseException:
            if self.fs.exists(temp):
                self.fs.rm_file(temp)
            raise
        # The rename itself must survive a crash, or a pointer written next could outlive the file.
        _fsync_dir(directory)
