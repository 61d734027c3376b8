"""Where trials write (``--storage``): a folder, or a cloud URI read and written through pyarrow.fs.

A location is one string: an absolute folder, or a URI such as
``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`` (pyarrow's own URI form, the
one Ray Tune's ``storage_path`` takes). :func:`join` puts path parts before the query, so that a
child of a location is again a URI pyarrow parses with the same options; strings travel to Ray
workers as they are (nothing here holds a connection), and each process makes its filesystem once.

Credentials and an endpoint not in the URI come from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...; :data:`AWS_ENV`), which the driver propagates to
its Ray workers.

What lives there: stage checkpoints (``<root>/<study>/trials/<number>/stage<k>.pt``, uploaded as a
trial finishes each stage and downloaded by its rerun), Tune's files (``<root>/<study>/ray``) and
the stage cache (``<root>/cache``, an :class:`ArrowFolder` per cache).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

from smskd_search.errors import UserError
from smskd_search.search.net import unreachable

# The AWS variables pyarrow's S3 filesystem reads (credentials, region, an S3-compatible endpoint):
# a trial on a worker needs them as the driver has them, when the storage is a URI. Not the profile
# and the config/credential file paths: those name files on the driver, and would override a
# worker node's own credential setup.
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")
# URI schemes accepted for --storage (the ones tested: S3 and S3-compatible servers).
SCHEMES = ("s3",)
# Seconds to wait for the endpoint to answer before the storage is called unreachable.
CONNECT_TIMEOUT_S = 3.0
CHECK_TIMEOUT_S = 30.0

_FS: dict[str, tuple[Any, str]] = {}  # per process: the filesystem of each URI's scheme, host and query
_FS_LOCK = threading.Lock()


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path (before a URI's query).

    Example:

        >>> join("s3://b/pre?scheme=http", "study", "trials")
        's3://b/pre/study/trials?scheme=http'
        >>> join("/data/runs", "00001")
        '/data/runs/00001'
    """
    text = str(location)
    if not is_uri(text):
        return str(Path(text, *parts))
    base, sep, query = text.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a URI; the filesystem made once per process."""
    import pyarrow.fs as pafs

    parts = urlsplit(location)
    key = f"{parts.scheme}://{parts.netloc}?{parts.query}"
    with _FS_LOCK:
        made = _FS.get(key)
        if made is None:
            fs, _ = pafs.FileSystem.from_uri(location)
            made = _FS[key] = (fs, unquote(parts.netloc.rpartition("@")[2]))  # the bucket, as pyarrow reads it
    fs, bucket = made
    path = unquote(parts.path).strip("/")
    return fs, f"{bucket}/{path}" if path else bucket


def _endpoint(location: str) -> tuple[str, int] | None:
    """The host and port an S3 URI is served from, where the URI or the environment names one."""
    query = parse_qs(urlsplit(location).query)
    given = (query.get("endpoint_override") or [None])[0]
    scheme = (query.get("scheme") or ["https"])[0]
    if given is None:
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not env:
            return None  # AWS itself: its endpoint depends on the region; the bucket check says the rest
        given = env
    if "://" not in given:
        given = f"{scheme}://{given}"
    parts = urlsplit(given)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_uri(location: str, flag: str = "--storage", timeout: float = CHECK_TIMEOUT_S) -> str:
    """The URI, checked read-only before anything is written: its scheme, its endpoint, its bucket.

    One UserError line naming ``flag`` for an unsupported scheme, a URI pyarrow does not parse, an
    endpoint nobody answers at, or a bucket that is missing or not readable with these credentials.
    """
    parts = urlsplit(location)
    if parts.username or parts.password:
        # Not repeated here: the URI is stored in the study and in Tune's files, and errors are logged.
        raise UserError(f"{flag}: a URI with credentials in it (s3://KEY:SECRET@...) is refused, since the study "
                        "and Tune's files record the URI; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise UserError(f"{flag} {location}: the scheme {scheme}:// is not supported (supported: "
                        f"{', '.join(s + '://' for s in SCHEMES)}, or a folder every node mounts)")
    where = _endpoint(location)
    why = unreachable(where, CONNECT_TIMEOUT_S) if where is not None else None
    if where is not None and why is not None:
        raise UserError(f"{flag} {location}: no storage server answers at {where[0]}:{where[1]} ({why})")
    answer: list[Any] = []
    bucket = unquote(parts.netloc)

    def look() -> None:
        try:
            # Made here, inside the bound: for AWS itself, pyarrow asks the network for the bucket's region.
            fs, _ = filesystem(location)
            answer.append(fs.get_file_info(bucket))
        except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid and OSError alike, in one line below
            answer.append(exc)

    # pyarrow retries a failing request for a while on its own: bounded here, in a thread.
    t = threading.Thread(target=look, daemon=True)
    t.start()
    t.join(timeout)
    if not answer:
        raise UserError(f"{flag} {location}: the storage did not answer within {timeout:g} s")
    if isinstance(answer[0], BaseException):
        raise UserError(f"{flag} {location}: {_first_line(answer[0])}")
    import pyarrow.fs as pafs

    if answer[0].type == pafs.FileType.NotFound:
        raise UserError(f"{flag} {location}: bucket {bucket!r} not found (create it first)")
    return location


# ------------------------------------------------------------------------------ files and folders
def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def write_text(location: str, text: str) -> None:
    if not is_uri(location):
        Path(location).write_text(text)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def remove(location: str) -> None:
    """Remove a file or a folder (and what it holds); nothing if it is not there."""
    if not is_uri(location):
        p = Path(location)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def listing(location: str, recursive: bool = False) -> list[tuple[str, int, int, bool]]:
    """(path relative to ``location``, size, mtime in ns, is_dir) of what a folder holds; [] if none."""
    if not is_uri(location):
        root = Path(location)
        if not root.is_dir():
            return []
        out = []
        for p in root.rglob("*") if recursive else root.iterdir():
            try:
                s = p.stat()
            except FileNotFoundError:
                continue
            out.append((p.relative_to(root).as_posix(), s.st_size, s.st_mtime_ns, p.is_dir()))
        return out
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return [(i.path[len(path):].lstrip("/"), int(i.size or 0), int(i.mtime_ns or 0), i.type == pafs.FileType.Directory)
            for i in infos]


def _put_whole(location: str, data: bytes) -> None:
    """Write ``data`` as the object at ``location`` in one call.

    An S3 object appears whole or not at all: a PUT, or a multipart upload once it is completed. With
    every byte in hand before the stream opens, a process killed mid-write leaves nothing under any
    name (an unfinished multipart upload is not an object), so no temporary key is needed; one would
    be left behind by a ``kill -9`` and would cost a server-side copy for each write.
    """
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local: Path, location: str) -> None:
    """Copy a local file to ``location`` whole (see :func:`_put_whole`)."""
    _put_whole(location, local.read_bytes())


def download(location: str, local: Path) -> None:
    """Copy ``location`` to a local file whole (a temporary file renamed into place)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    tmp = local.with_name(local.name + ".part")
    pafs.copy_files(path, str(tmp), source_filesystem=fs)
    tmp.replace(local)


class ArrowFolder:
    """A flat folder of named files in a pyarrow filesystem: the storage of a
    :class:`~smskd_search.engine.PrefixCache` (see :class:`~smskd_search.engine.prefix_cache.EntryFolder`).

    An object store cannot set a file's modification time: a use is not recorded, and the least
    recently *written* entries are evicted first.
    """

    def __init__(self, location: str):
        self.location = location

    def _path(self, name: str) -> tuple[Any, str]:
        return filesystem(join(self.location, name))

    def where(self, name: str) -> str:
        return join(self.location, name)

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        fs, path = self._path(name)
        with fs.open_input_file(path) as f:  # FileNotFoundError when missing
            yield f

    def write(self, name: str, fill: Callable[[IO[bytes]], None]) -> None:
        # Filled in memory first: a pyarrow output stream that fails half-way is still completed by
        # its close, which would store half an entry under the final name.
        buf = io.BytesIO()
        fill(buf)
        _put_whole(self.where(name), buf.getvalue())

    def remove(self, name: str) -> None:
        fs, path = self._path(name)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    def touch(self, name: str) -> None:
        pass  # see the class docstring

    def entries(self) -> list[tuple[str, int, int]]:
        return [(rel, size, mtime) for rel, size, mtime, is_dir in listing(self.location)
                if not is_dir and rel.endswith(".pt") and not rel.startswith(".")]


__all__ = ["AWS_ENV", "ArrowFolder", "SCHEMES", "check_uri", "download", "exists", "filesystem", "is_uri", "join",
           "listing", "remove", "upload", "write_text"]
